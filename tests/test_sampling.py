"""Tree rejection sampling keeps the model's distribution (chi-square tests)."""

import functools

import mlx.core as mx
import numpy as np
import pytest

scipy_stats = pytest.importorskip("scipy.stats")

import specstream_mlx.decode as decode_module  # noqa: E402
import specstream_mlx.drafters as drafters  # noqa: E402
from .helpers import decode_tokens, random_prompt, ss_model  # noqa: E402
from specstream_mlx.config import TreeSettings  # noqa: E402
from specstream_mlx.verify import SamplingParams, accept_sampling, target_logits  # noqa: E402

SAMPLING = SamplingParams(temp=1.3, top_k=6)
PROMPT = random_prompt(8, seed=11)
RUNS = 1500


@functools.lru_cache(maxsize=None)
def _model():
    return ss_model("llama", seed=4)


def _next_probs(base, tokens):
    logits = base(mx.array(tokens)[None])[0, -1]
    return np.array(mx.softmax(target_logits(logits, SAMPLING), axis=-1))


def _exact_marginals(base, steps):
    """Exact distribution of the token at each of the first ``steps`` positions."""
    frontier = {(): 1.0}
    marginals = []
    for _ in range(steps):
        nxt, marginal = {}, {}
        for prefix, weight in frontier.items():
            probs = _next_probs(base, PROMPT + list(prefix))
            for token in np.nonzero(probs > 0)[0]:
                w = weight * probs[token]
                nxt[prefix + (int(token),)] = w
                marginal[int(token)] = marginal.get(int(token), 0.0) + w
        frontier = nxt
        marginals.append(marginal)
    return marginals


def _fixed_drafts(monkeypatch):
    """Draft the most likely tokens of each position (any fixed drafts are valid).

    Untrained streams rarely guess right; the correctness argument holds for
    any deterministic drafts, so fixed, often-right drafts make the test strong.
    """
    marginals = _marginals()
    table = []
    for position in (1, 2):
        ranked = sorted(marginals[position], key=marginals[position].get, reverse=True)
        table += (ranked + ranked[:1] * 3)[:3]
    fixed = mx.array(table)
    monkeypatch.setattr(drafters, "_draft_table", lambda *args: fixed)


def _sample_runs(steps, seed=0, drafter=None):
    mx.random.seed(seed)
    samples = []
    accepted = 0
    for _ in range(RUNS):
        tokens, trace = decode_tokens(_model(), PROMPT, steps, sampling=SAMPLING,
                                      tree=TreeSettings((3, 2), None),
                                      drafter=drafter() if drafter else None)
        samples.append(tokens)
        accepted += sum(s.accepted for s in trace)
    return np.array(samples), accepted


def _p_value(observed_tokens, expected):
    keys = sorted(expected)
    probs = np.array([expected[k] for k in keys], dtype=np.float64)
    counts = np.array([(observed_tokens == k).sum() for k in keys], dtype=float)
    assert counts.sum() == observed_tokens.size, "sampled a token the model forbids"
    want = probs / probs.sum() * counts.sum()
    small = want < 5  # pool rare cells so the chi-square approximation holds
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        want = np.append(want[~small], want[small].sum())
    return scipy_stats.chisquare(counts, want).pvalue


@functools.lru_cache(maxsize=None)
def _marginals():
    return _exact_marginals(_model().base, 3)


def test_tree_sampling_matches_model_distribution(monkeypatch):
    _fixed_drafts(monkeypatch)
    samples, accepted = _sample_runs(3)
    assert accepted > RUNS // 5, "drafts were rarely accepted; the test would be weak"
    for position in range(3):
        p = _p_value(samples[:, position], _marginals()[position])
        assert p > 1e-3, f"token {position + 1}: p = {p:.2e}"


def test_streams_plus_lookup_sampling_matches_model_distribution(monkeypatch):
    """Grafted lookup nodes are tried after the streams' siblings; the rule stays exact."""

    _fixed_drafts(monkeypatch)
    ranked = [sorted(m, key=m.get, reverse=True) for m in _marginals()]
    # a chain whose first token is not among the streams' top 3: it grafts new nodes
    chain = [ranked[1][min(3, len(ranked[1]) - 1)], ranked[2][0]]
    monkeypatch.setattr(drafters, "find_draft", lambda *args: list(chain))
    grown = []
    real_forward = decode_module.forward
    monkeypatch.setattr(decode_module, "forward", lambda model, tokens, rows, cache, **kw: (
        grown.append(rows.size), real_forward(model, tokens, rows, cache, **kw))[1])
    drafter = lambda: drafters.StreamLookupDrafter(_model(), TreeSettings((3, 2), None), num_tokens=2)  # noqa: E731
    samples, accepted = _sample_runs(3, seed=2, drafter=drafter)
    assert max(grown) > 1 + 3 + 6, "no lookup node was grafted"
    assert accepted > RUNS // 5
    for position in range(3):
        p = _p_value(samples[:, position], _marginals()[position])
        assert p > 1e-3, f"token {position + 1}: p = {p:.2e}"


def test_chi_square_catches_a_broken_acceptance_rule(monkeypatch):
    def accept_without_renormalising(tree, child_probs, uniforms):
        # Bug: accepts the best draft whenever the model gives it any mass.
        path = [0]
        while tree.children[path[-1]]:
            first = tree.children[path[-1]][0]
            if child_probs[first] <= 0:
                break
            path.append(first)
        return path, []

    _fixed_drafts(monkeypatch)
    monkeypatch.setattr(decode_module, "accept_sampling", accept_without_renormalising)
    samples, _ = _sample_runs(2, seed=1)
    p = _p_value(samples[:, 1], _marginals()[1])
    assert p < 1e-6


def test_accept_sampling_rule():
    from specstream_mlx.tree import build_tree

    tree = build_tree((2,)).with_tokens(np.array([0, 5, 6]))
    probs = np.array([0.0, 0.5, 0.3])
    # First child accepted when u * 1 < 0.5.
    assert accept_sampling(tree, probs, np.array([0, 0.49, 0.9])) == ([0, 1], [])
    # First rejected; second accepted when u * (1 - 0.5) < 0.3, i.e. u < 0.6.
    assert accept_sampling(tree, probs, np.array([0, 0.51, 0.59])) == ([0, 2], [])
    # Both rejected: draw from the residual without tokens 5 and 6.
    assert accept_sampling(tree, probs, np.array([0, 0.51, 0.61])) == ([0], [5, 6])


def test_bad_sampling_settings():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temp=-1)
    with pytest.raises(ValueError, match="top-p"):
        SamplingParams(temp=1, top_p=2)


def test_medusa_sampling_matches_model_distribution(monkeypatch):
    """Medusa heads' drafts go through the same tree rejection sampling: the rule stays exact."""
    from specstream_mlx.heads import MedusaHeads, heads_config_for

    _fixed_drafts(monkeypatch)  # fixed, often-right drafts from the heads' table too
    model = _model()
    # fresh heads (any heads will do: the drafts are fixed above); the model is shared, so
    # the attribute is put back after the test
    monkeypatch.setattr(model, "_medusa", MedusaHeads(heads_config_for(model.base, 2)))
    drafter = lambda: drafters.make_drafter(model, TreeSettings((3, 2), None), source="medusa")  # noqa: E731
    assert isinstance(drafter(), drafters.MedusaDrafter)
    samples, accepted = _sample_runs(3, seed=3, drafter=drafter)
    assert accepted > RUNS // 5
    for position in range(3):
        p = _p_value(samples[:, position], _marginals()[position])
        assert p > 1e-3, f"token {position + 1}: p = {p:.2e}"


def test_eagle_sampling_matches_model_distribution(monkeypatch):
    """EAGLE drafts (children chosen per parent) go through the same rejection sampling."""
    from specstream_mlx.eagle import EagleHead, eagle_config_for

    model = _model()
    head = EagleHead(model.base, eagle_config_for(model.base))
    marginals = _marginals()
    vocab = model.base.args.vocab_size
    fixed = []
    for position in (1, 2):  # often-right drafts, as for the streams: the likeliest tokens first
        ranked = sorted(marginals[position], key=marginals[position].get, reverse=True)[:3]
        row = np.zeros(vocab, np.float32)
        row[ranked] = [3.0, 2.0, 1.0][: len(ranked)]
        fixed.append(mx.array(row))
    # depth 1 asks for the root's row (1 parent), depth 2 for the 3 depth-1 nodes' rows
    monkeypatch.setattr(head, "logits", lambda base, h: mx.stack([fixed[0 if h.shape[0] == 1 else 1]] * h.shape[0]))
    monkeypatch.setattr(model, "_eagle", head)
    drafter = lambda: drafters.make_drafter(model, TreeSettings((3, 2), None), source="eagle")  # noqa: E731
    samples, accepted = _sample_runs(3, seed=4, drafter=drafter)
    assert accepted > RUNS // 5
    for position in range(3):
        p = _p_value(samples[:, position], _marginals()[position])
        assert p > 1e-3, f"token {position + 1}: p = {p:.2e}"
