"""The module that the Core ML export traces, checked against the MLX runtime (Linux).

The traced ``StepModule`` is run through the host loop's inputs (``coreml.host``):
prompt chunks with padding, tree steps with a branching mask, commits of a
non-contiguous accepted path, every enumerated size from one trace. Needs torch.
"""

import os
import re
from unittest.mock import patch

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from .helpers import decode_tokens, random_prompt, ss_model  # noqa: E402
from specstream_mlx.coreml import export as ex  # noqa: E402
from specstream_mlx.coreml import host, interface  # noqa: E402
from specstream_mlx.coreml.parity import compare, deepest_path, worst  # noqa: E402
from specstream_mlx.config import TreeSettings  # noqa: E402
from specstream_mlx.verify import SamplingParams, target_logits  # noqa: E402

SIZES, CONTEXT = (4, 8, 12), 64
CASES = [("llama", "lossless", 4), ("qwen2", "shared", 0), ("phi3", "lossless", 0), ("qwen3", "shared", 4)]


def _traced(model, cache_dtype=None, compute_dtype=None):
    layout = ex.layout_for(model, SIZES, CONTEXT)
    step = ex.build_step(model, CONTEXT, cache_dtype or torch.float32, compute_dtype)
    return ex.trace_step(step, layout), layout


@pytest.mark.parametrize("family,mode,rank", CASES)
def test_traced_step_matches_mlx_at_every_size(family, mode, rank):
    """One trace (at 12 rows) serves 4, 8 and 12 rows; float32 cache: exact up to rounding."""
    model = ss_model(family, mode=mode, seed=2, adapter_rank=rank)
    traced, layout = _traced(model)
    for size in SIZES:
        path = deepest_path(layout.trees[size].parents)
        assert len(path) == 4 and (size == 4 or path != list(range(4))), "the path must skip rows"
        errors = compare(host.TorchBackend(traced), model, layout, tree_size=size, seed=size)
        assert worst(errors) < 1e-5, (size, errors)


def test_float16_cache_and_float16_arithmetic_stay_close():
    """The converted configuration (float16 state) and a float16 emulation of the program."""
    model = ss_model("llama", seed=4, adapter_rank=4)
    traced, layout = _traced(model, cache_dtype=torch.float16)
    assert worst(compare(host.TorchBackend(traced), model, layout)) < 2e-3
    half, _ = _traced(model, torch.float16, torch.float16)
    assert worst(compare(host.TorchBackend(half), model, layout)) < 2e-2


def test_a_wrong_commit_is_caught():
    """The check can fail: a host that forgets the slot copies breaks the step after a commit."""
    model = ss_model("llama", seed=5)
    traced, layout = _traced(model)
    original = host.Session.commit

    def no_copies(self, rows):
        original(self, rows)
        self._pending = []

    with patch.object(host.Session, "commit", no_copies):
        errors = compare(host.TorchBackend(traced), model, layout)
    assert errors["tree_main"] < 1e-5 and errors["after_commit_main"] > 1e-3


@pytest.mark.parametrize("mode", ["lossless", "shared"])
def test_host_loop_decodes_like_the_runtime(mode):
    """Greedy decoding through the exported interface emits the MLX runtime's tokens."""
    model = ss_model("llama", mode=mode, seed=6, adapter_rank=4)
    traced, layout = _traced(model)
    prompt = random_prompt(15, seed=1)  # two prefill chunks of 12
    for size in (8, 12):
        tree = layout.trees[size]
        widths = (3, 2, 1)
        assert tree.size == size
        expected, steps = decode_tokens(model, prompt, 24, tree=TreeSettings(widths, size))
        out = host.generate(host.TorchBackend(traced), layout, prompt, 24, tree_size=size)
        assert out["tokens"] == expected
        assert out["forwards"] == len(steps) - 1  # the runtime's prefill is one step


def test_sampling_path_at_low_temperature_is_greedy():
    """Rejection sampling with a near one-hot target accepts exactly the greedy path."""
    model = ss_model("qwen2", seed=7)
    traced, layout = _traced(model)
    prompt = random_prompt(10, seed=2)
    greedy = host.generate(host.TorchBackend(traced), layout, prompt, 20)
    sampled = host.generate(host.TorchBackend(traced), layout, prompt, 20,
                            sampling=SamplingParams(temp=1e-4), seed=3)
    assert sampled["tokens"] == greedy["tokens"]
    hot = host.generate(host.TorchBackend(traced), layout, prompt, 20,
                        sampling=SamplingParams(temp=1.5, top_k=50, top_p=0.9), seed=3)
    assert len(hot["tokens"]) == 20 and hot["tokens"] != greedy["tokens"]


SAMPLING_CASES = [  # (temp, top_p, top_k, min_p)
    (1.0, 1.0, 0, 0.0), (0.5, 0.9, 5, 0.0), (0.5, 0.9, 0, 0.0), (2.0, 0.3, 0, 0.0),
    (0.7, 0.0, 8, 0.0), (1.3, 1.0, 0, 0.1), (0.5, 0.8, 3, 0.05), (1.0, 0.95, 200, 0.0),
    (0.25, 0.5, 1, 0.0), (1.0, 1.0, 0, 1.0),
]


@pytest.mark.parametrize("temp,top_p,top_k,min_p", SAMPLING_CASES)
def test_host_target_distribution_is_verify_target_logits(temp, top_p, top_k, min_p):
    """The host loop's numpy distribution (which the Swift code copies) is the runtime's."""
    rng = np.random.default_rng(int(temp * 100) + top_k)
    sampling = SamplingParams(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p)
    logits = (rng.standard_normal((16, 64)) * 2.5).astype(np.float32)
    want = np.array(mx.softmax(target_logits(mx.array(logits), sampling), axis=-1))
    got = host.target_probs(logits, sampling)
    assert ((got > 0) == (want > 0)).all()  # the same tokens survive the filters
    np.testing.assert_allclose(got, want, atol=2e-6)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-9)


def test_filters_come_before_the_temperature():
    """temp 0.5, top-p 0.9, top-k 5: filtering the tempered distribution (the old host and
    Swift order: temperature, top-k, top-p) keeps other tokens; the host follows mlx-lm."""
    sampling = SamplingParams(temp=0.5, top_p=0.9, top_k=5)
    logits = (np.random.default_rng(0).standard_normal((16, 64)) * 2.5).astype(np.float32)
    want = np.array(mx.softmax(target_logits(mx.array(logits), sampling), axis=-1))
    x = logits.astype(np.float64) / sampling.temp  # the old order, for contrast
    x = np.where(x < np.sort(x, -1)[:, -5:-4], -np.inf, x)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    order = np.argsort(-p, -1)
    before = np.cumsum(np.take_along_axis(p, order, -1), -1) - np.take_along_axis(p, order, -1)
    keep = np.zeros_like(p, bool)
    np.put_along_axis(keep, order, before < 0.9, -1)
    assert ((want > 0) != keep).any()  # the order changes the distribution here
    assert ((host.target_probs(logits, sampling) > 0) == (want > 0)).all()


def test_swift_sampling_applies_the_filters_in_verify_order():
    path = os.path.join(os.path.dirname(__file__), "..", "apps", "SpecStreamCoreML", "Sources",
                        "SpecStreamCoreML", "Decoder.swift")
    text = open(path).read()
    body = text[text.index("func probabilities"):]
    body = body[: body.index("\n    }\n")]
    steps = ["topP < 1", "minP > 0", "topK > 0", "/ Double(temperature)"]
    assert all(step in body for step in steps), body
    assert [body.index(step) for step in steps] == sorted(body.index(step) for step in steps)
    assert "topP == 0 ? 1 : topP" in text  # SamplingParams' one "off" value for top-p


def test_context_limit_and_stop_tokens():
    model = ss_model("llama", seed=8)
    traced, layout = _traced(model)
    prompt = random_prompt(30, seed=3)
    out = host.generate(host.TorchBackend(traced), layout, prompt, 100)
    assert out["finish"] == "context"  # 64 slots: 30 prompt + trees of 12 rows
    assert 30 + len(out["tokens"]) <= CONTEXT
    first = host.generate(host.TorchBackend(traced), layout, prompt, 8)["tokens"]
    stop = host.generate(host.TorchBackend(traced), layout, prompt, 8, stop_ids=[first[2]])
    assert stop["finish"] == "stop" and stop["tokens"] == first[: first.index(first[2]) + 1]


def test_tree_for_size_has_exactly_that_many_nodes():
    for size in (1, 2, 7, 16, 40, 64):
        tree = ex.tree_for_size((3, 2, 1), 3, size)
        assert tree.size == size and tree.max_depth <= 3
        assert (tree.parents[1:] < np.arange(1, size)).all()  # parents first


SWIFT_SOURCES = os.path.join(os.path.dirname(__file__), "..", "apps", "SpecStreamCoreML", "Sources")


def _swift_files() -> dict:
    return {f: open(os.path.join(root, f)).read() for root, _, files in os.walk(SWIFT_SOURCES)
            for f in files if f.endswith(".swift")}


def _roles_used(files: dict) -> dict:
    """Interface roles the Swift package reads or writes where it uses the model.

    inputs: the features handed to ``model.prediction``, each named by ``iface.input(role)``;
    outputs: the feature values read from the prediction, named by ``iface.output(role)``;
    metadata: the ``specstream.*`` entries ``PackageInfo`` reads (by role, and the interface
    itself under ``Interface.interfaceKey``). A ``Role`` constant that nothing uses counts for
    nothing. States are not named: the ``MLState`` holds the whole cache.
    """
    role_enum = re.search(r"enum Role \{(.*?)\n\}", files["Interface.swift"], re.S).group(1)
    constants = dict(re.findall(r'static let (\w+) = "(\w+)"', role_enum))
    session, info = files["Session.swift"], files["Interface.swift"]
    used = {"inputs": set(), "outputs": set(), "metadata": set()}
    feed = re.search(r"for \(role, array\) in \[(.*?)\] \{\s*let name = try iface\.input\(role\)"
                     r"\s*features\[name\] = array", session, re.S)
    fed = ("let provider = try MLDictionaryFeatureProvider(dictionary: features)" in session
           and "model.prediction(from: provider," in session)
    if feed and fed:
        used["inputs"] = {constants[n] for n in re.findall(r"Role\.(\w+)", feed.group(1))}
    for var, const in re.findall(r"let (\w+) = try iface\.output\(Role\.(\w+)\)", session):
        if f"out.featureValue(for: {var})" in session:
            used["outputs"].add(constants[const])
    used["metadata"] = set(re.findall(r'\b(?:value|integer|integers)\("(\w+)"\)', info))
    key = re.search(r'static let interfaceKey = "([\w.]+)"', info)
    if key and "metadata[Interface.interfaceKey]" in info:
        used["metadata"].add(key.group(1))
    return used


def test_interface_is_what_the_module_and_the_swift_code_use():
    """Inputs in interface.json are the step's arguments, in order; the Swift package feeds
    every input, reads every output and every metadata entry (states: held by its MLState)."""
    import inspect

    from specstream_mlx.coreml.step import StepModule

    spec = interface.interface()
    params = list(inspect.signature(StepModule.forward).parameters)[1:]
    assert params == [spec["inputs"][r]["name"] for r in spec["inputs"]] == list(spec["inputs"])
    files = _swift_files()
    used = _roles_used(files)
    assert used["inputs"] == set(spec["inputs"])
    assert used["outputs"] == set(spec["outputs"])
    metadata = {spec["metadata"]["interface"]["key"] if r == "interface" else r
                for r in spec["metadata"]}
    assert used["metadata"] == metadata
    session = files["Session.swift"]
    assert "state = model.makeState()" in session and "using: state)" in session
    assert f"interfaceVersion = {spec['interface_version']}" in files["Interface.swift"]


def test_interface_check_sees_a_role_the_swift_code_drops():
    files = _swift_files()
    full = _roles_used(files)
    dropped = dict(files, **{"Session.swift": files["Session.swift"].replace(", (Role.commitDst, dst)", "")})
    assert full["inputs"] - _roles_used(dropped)["inputs"] == {"commit_dst"}
    unread = dict(files, **{"Session.swift": files["Session.swift"].replace(
        "out.featureValue(for: streamName)", "out.featureValue(for: mainName)")})
    assert full["outputs"] - _roles_used(unread)["outputs"] == {"stream_logits"}
    skipped = dict(files, **{"Interface.swift": files["Interface.swift"].replace(
        '_ = try integer("format_version")', "")})
    assert full["metadata"] - _roles_used(skipped)["metadata"] == {"format_version"}
