"""Load and create Speculative Streaming checkpoints.

A checkpoint is an mlx-lm model directory plus ``specstream.json`` and
``specstream.safetensors`` (stream embeddings, pruning adapter). The base part
stays loadable by mlx-lm itself.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Optional, Tuple

import mlx.core as mx
from mlx.utils import tree_map, tree_unflatten

from .config import (
    CONFIG_FILE, DEFAULT_ADAPTER_RANK, DEFAULT_GAMMA, DEFAULT_MODE, DEFAULT_STREAM_LAYERS,
    DEFAULT_STREAM_LORA_RANK, WEIGHTS_FILE,
    CheckpointError, SpecStreamConfig, TreeSettings, read_config, write_config,
)
from .families import family_for
from .atomic import atomic_dir
from .model import SpecStreamModel

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_path(path_or_repo: str, revision: Optional[str] = None) -> Path:
    """A local directory for ``path_or_repo``: the path itself, or a hub download.

    Raises:
        CheckpointError: neither a local directory nor a downloadable repo.
    """
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; give the model directory that holds it")
        return path
    if not _REPO_ID.match(str(path_or_repo)):
        raise CheckpointError(f"model path {path_or_repo!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(path_or_repo, revision=revision, allow_patterns=_HUB_PATTERNS)
        )
    except Exception as exc:  # network, auth, missing repo: all end the same way
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{path_or_repo!r} is not a local directory, and downloading it from the "
            f"Hugging Face hub failed ({reason}). Check the path, or connect to the "
            f"network (set HF_HUB_OFFLINE=0) so the repo can be fetched."
        ) from None


def _read_base_config(path: Path) -> dict:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path} has no config.json: it is not an mlx-lm model directory")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from None
    weights = [p for p in path.glob("*.safetensors") if p.name != WEIGHTS_FILE]
    if not weights:
        raise CheckpointError(
            f"{path} holds no model weights (*.safetensors); convert the model first "
            f"(mlx_lm.convert, or specstream-mlx convert)"
        )
    return config


def _load_sharded(path: Path, shard: str):
    """mlx-lm's ``sharded_load`` of ``path`` over all ranks, after checking that the model can
    be split and that every rank has the same checkpoint (``shard``)."""
    from mlx_lm.utils import load_model, sharded_load

    from . import shard as sharding

    world = sharding.group(shard)
    lazy, _ = load_model(path, lazy=True, strict=False)
    sharding.check_shardable(lazy, shard, world)
    if shard == "pipeline" and not (path / "model.safetensors.index.json").is_file():
        # sharded_load reads the index to fetch each stage's files; one local file holds them all
        base, config = load_model(path, lazy=True, strict=False)
        base.model.pipeline(world)
        mx.eval(base.parameters())
    else:
        groups = {"tensor_group": world} if shard == "tensor" else {"pipeline_group": world}
        base, _, config = sharded_load(str(path), return_config=True, **groups)
    return base, config


def _load_base(path: Path, dtype: Optional[mx.Dtype], shard: Optional[str] = None):
    """The mlx-lm model and tokenizer in ``path``, cast to ``dtype`` when given; split across
    the ``mlx.launch`` ranks by ``shard`` (``"tensor"`` or ``"pipeline"``) when given."""
    from mlx_lm.utils import load_model, load_tokenizer

    config = _read_base_config(path)
    family = family_for(config.get("model_type"))
    try:
        base, config = load_model(path) if shard is None else _load_sharded(path, shard)
    except (ValueError, OSError, RuntimeError) as exc:
        if type(exc).__name__ == "ShardError":
            raise
        raise CheckpointError(f"could not load the model in {path}: {exc}") from None
    if dtype is None and mx.default_device() == mx.cpu:
        dtype = mx.float32  # float16/bfloat16 matmuls are slow on CPUs
    if dtype is not None:
        base.update(
            tree_map(
                lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a,
                base.parameters(),
            )
        )
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    return base, tokenizer, config, family


def _base_dims(base) -> Tuple[int, int, int]:
    args = base.args
    return args.hidden_size, args.vocab_size, len(base.model.layers)


def _check_fits(config: SpecStreamConfig, base, where: Path) -> None:
    hidden, vocab, layers = _base_dims(base)
    for name, have, want in (
        ("hidden size", config.hidden_size, hidden),
        ("vocabulary size", config.vocab_size, vocab),
        ("layer count", config.num_layers, layers),
    ):
        if have != want:
            raise CheckpointError(
                f"{where / CONFIG_FILE} was made for a base model with {name} {have}, "
                f"but the model in {where} has {want}: the streams do not belong to this model"
            )
    config.validate()


def _load_streams(model: SpecStreamModel, path: Path) -> None:
    file = path / WEIGHTS_FILE
    if not file.is_file():
        raise CheckpointError(f"{path} has {CONFIG_FILE} but no {WEIGHTS_FILE}")
    try:
        weights = mx.load(str(file))
    except Exception as exc:
        raise CheckpointError(f"{file} is corrupt or not safetensors ({exc})") from None
    expected = model.stream_parameters()
    missing = sorted(set(expected) - set(weights))
    unknown = sorted(set(weights) - set(expected))
    if missing or unknown:
        raise CheckpointError(
            f"{file} does not match {CONFIG_FILE}: missing {missing}, unexpected {unknown}"
        )
    for name, value in weights.items():
        if value.shape != expected[name].shape:
            raise CheckpointError(
                f"{file}: {name} has shape {tuple(value.shape)}, expected "
                f"{tuple(expected[name].shape)} from {CONFIG_FILE} and the base model"
            )
    dtype = model.base.model.norm.weight.dtype
    model.update(tree_unflatten([(k, v.astype(dtype)) for k, v in weights.items()]))


def load(
    path_or_repo: str,
    dtype: Optional[mx.Dtype] = None,
    revision: Optional[str] = None,
    shard: Optional[str] = None,
) -> Tuple[SpecStreamModel, object]:
    """Load a Speculative Streaming checkpoint.

    Args:
        path_or_repo: a local checkpoint directory or a Hugging Face repo id.
        dtype: cast floating weights to this dtype; by default float32 on the
            CPU (half-precision matmuls are slow there) and as stored elsewhere.
        revision: hub revision, for repo ids.
        shard: ``"tensor"`` or ``"pipeline"``: split the base model across the ranks
            that ``mlx.launch`` started, with mlx-lm's ``sharded_load`` (``shard``);
            the streams are loaded whole on every rank.

    Returns:
        ``(model, tokenizer)``: a ``SpecStreamModel`` and mlx-lm's ``TokenizerWrapper``.

    Raises:
        CheckpointError: missing, corrupt or mismatched files.
        UnsupportedArchitectureError: a ``model_type`` the runtime cannot drive.
        shard.ShardError: ``shard`` without ``mlx.launch``, a model that cannot be split,
            or ranks with different checkpoints.
    """
    if shard is None:
        path = resolve_path(path_or_repo, revision)
        _read_base_config(path)
        config = read_config(path)
    else:  # every rank gets this far and compares what it has, even when it has nothing
        from .shard import check_mode, check_same_checkpoint, group

        world = group(check_mode(shard))
        try:
            path = resolve_path(path_or_repo, revision)
            _read_base_config(path)
            config = read_config(path)
        except Exception as exc:
            check_same_checkpoint(None, world, exc)
            raise
        check_same_checkpoint(path, world)
    if shard is not None and config.stream_lora_rank:
        raise CheckpointError(
            f"{path} has stream LoRA (stream_lora_rank {config.stream_lora_rank}), which a split "
            "model cannot run yet: load it without --shard"
        )
    base, tokenizer, base_config, family = _load_base(path, dtype, shard)
    owners = None
    if shard == "pipeline":  # pad the stage's layer list; which rank holds each layer
        from .shard import pipeline_owners

        owners = pipeline_owners(base, mx.distributed.init(), base_config["num_hidden_layers"])
    _check_fits(config, base, path)
    model = SpecStreamModel(base, config, family)
    if shard is not None:
        model.set_sharding(shard, mx.distributed.init(), owners)
    from .eagle import load_eagle
    from .heads import load_heads

    model.set_medusa(load_heads(path, base))
    model.set_eagle(load_eagle(path, base))
    _load_streams(model, path)
    mx.eval(model.parameters())
    return model, tokenizer


def load_mlx_lm(path_or_repo: str, dtype: Optional[mx.Dtype] = None,
                revision: Optional[str] = None, shard: Optional[str] = None) -> Tuple[object, object]:
    """The checkpoint's base model as mlx-lm loads it (no streams), for plain decoding.

    The same cast as ``load`` (float32 on the CPU by default), so its text is the
    main stream's; ``bench``'s ``ar`` method and ``eval --batch-size`` decode this
    model. ``shard``: as for ``load``.

    Raises:
        CheckpointError: a missing or unreadable checkpoint.
    """
    path = resolve_path(path_or_repo, revision)
    _read_base_config(path)
    base, tokenizer, _, _ = _load_base(path, dtype, shard)
    mx.eval(base.parameters())
    return base, tokenizer


def save_streams(model: SpecStreamModel, directory: Path) -> None:
    """Write ``specstream.json`` and ``specstream.safetensors`` into ``directory``."""
    write_config(model.config, directory)
    mx.save_safetensors(
        str(Path(directory) / WEIGHTS_FILE),
        {k: v.astype(mx.float32) for k, v in model.stream_parameters().items()},
        metadata={"format": "mlx", "producer": "specstream-mlx"},
    )


def fresh_model(base, family, config: SpecStreamConfig, seed: int = 0) -> SpecStreamModel:
    """A ``SpecStreamModel`` over ``base`` with freshly initialised (untrained) streams.

    The one initialisation of new streams: ``init``, ``convert`` (without
    trained streams) and ``train`` (fresh streams) all call it, so the same
    base, settings and ``seed`` give the same streams whichever made them.
    The draws come from ``seed`` alone (not the global random state): the
    stream embeddings, the pruning adapter's ``down`` and each stream
    adapter's ``down`` (``up`` starts at zero: a fresh adapter is the identity).
    """
    config.validate()
    model = SpecStreamModel(base, config, family)
    hidden = config.hidden_size
    key = mx.random.key(seed)
    k1, k2, k3 = mx.random.split(key, 3)
    model.stream_embeddings = 0.02 * mx.random.normal((config.gamma, hidden), key=k1)
    model.prune_adapter.down.weight = mx.random.normal((config.prune_rank, hidden), key=k2) * hidden**-0.5
    keys = mx.random.split(k3, max(len(model.stream_adapters), 1))
    for adapter, k in zip(model.stream_adapters, keys):
        adapter.down.weight = mx.random.normal(adapter.down.weight.shape, key=k) * hidden**-0.5
    if model.stream_lora:  # its own draw, so the draws above stay what they were without it
        lora_key = mx.random.split(key, 4)[3]
        pairs = [layer.pair(path) for layer in model.stream_lora for path in layer.paths]
        for pair, k in zip(pairs, mx.random.split(lora_key, len(pairs))):
            fan_in = pair["a"].shape[0]
            pair["a"] = mx.random.normal(pair["a"].shape, key=k) * fan_in**-0.5
    return model


def new_config(
    dims: Tuple[int, int, int],
    gamma: int = DEFAULT_GAMMA,
    stream_layers: int = DEFAULT_STREAM_LAYERS,
    mode: str = DEFAULT_MODE,
    tree: Optional[TreeSettings] = None,
    adapter_rank: int = 0,
    **extra,
) -> SpecStreamConfig:
    """Settings of new streams over a base model of ``dims`` = (hidden, vocab, layers).

    ``tree`` (default ``TreeSettings()``) is cut to ``gamma``; ``extra`` goes to
    ``SpecStreamConfig`` (e.g. ``prune_rank``).
    """
    hidden, vocab, layers = dims
    return SpecStreamConfig(
        gamma=gamma, stream_layers=stream_layers, mode=mode, stream_adapter_rank=adapter_rank,
        hidden_size=hidden, vocab_size=vocab, num_layers=layers,
        tree=(tree or TreeSettings()).cut(gamma), **extra,
    )


#: Stream settings of fresh streams for training when the caller gives none.
FRESH_DEFAULTS = {"gamma": DEFAULT_GAMMA, "stream_layers": DEFAULT_STREAM_LAYERS,
                  "stream_adapter_rank": DEFAULT_ADAPTER_RANK, "stream_lora_rank": DEFAULT_STREAM_LORA_RANK}


def load_for_training(
    path_or_repo: str,
    gamma: Optional[int] = None,
    stream_layers: Optional[int] = None,
    mode: Optional[str] = None,
    adapter_rank: Optional[int] = None,
    seed: int = 0,
    fresh_streams: bool = False,
    stream_lora_rank: Optional[int] = None,
):
    """A model to train: a checkpoint's, or a plain model with fresh streams.

    Args:
        path_or_repo: a checkpoint (it keeps its own streams unless
            ``fresh_streams``) or a plain mlx-lm model.
        gamma, stream_layers, adapter_rank, stream_lora_rank: settings of fresh streams
            (``None``: ``FRESH_DEFAULTS``). For a checkpoint's own streams
            they must be ``None`` or agree with it.
        mode: training mode; ``None`` keeps the checkpoint's (or lossless).
        seed: for fresh streams.
        fresh_streams: for a checkpoint: keep its base model, replace its
            streams by fresh ones with the settings given here.

    Returns:
        ``(model, tokenizer, path)``.

    Raises:
        CheckpointError: settings that contradict the checkpoint's own streams.
    """
    path = resolve_path(path_or_repo)
    _read_base_config(path)
    asked = {"gamma": gamma, "stream_layers": stream_layers, "stream_adapter_rank": adapter_rank,
             "stream_lora_rank": stream_lora_rank}
    if (path / CONFIG_FILE).is_file() and not fresh_streams:
        own = read_config(path)
        flags = {"gamma": "--gamma", "stream_layers": "--stream-layers",
                 "stream_adapter_rank": "--adapter-rank", "stream_lora_rank": "--stream-lora-rank"}
        clash = [f"{flags[k]} {v} (it has {getattr(own, k)})" for k, v in asked.items()
                 if v is not None and v != getattr(own, k)]
        if clash:
            raise CheckpointError(
                f"{path} is a checkpoint with its own streams; {', '.join(clash)}. "
                "Pass --fresh-streams (fresh_streams=True) to train new streams over its base model."
            )
        model, tokenizer = load(str(path))
        if mode is not None and mode != model.config.mode:
            model.config.mode = mode
            model.config.validate()
        return model, tokenizer, path
    settings = {k: FRESH_DEFAULTS[k] if v is None else v for k, v in asked.items()}
    base, tokenizer, _, family = _load_base(path, None)
    config = new_config(_base_dims(base), settings["gamma"], settings["stream_layers"],
                        mode or DEFAULT_MODE, None, settings["stream_adapter_rank"],
                        stream_lora_rank=settings["stream_lora_rank"])
    return fresh_model(base, family, config, seed), tokenizer, path


def init_checkpoint(
    base_path: str,
    out: str,
    gamma: int = DEFAULT_GAMMA,
    stream_layers: int = DEFAULT_STREAM_LAYERS,
    mode: str = DEFAULT_MODE,
    seed: int = 0,
    tree: Optional[TreeSettings] = None,
    overwrite: bool = False,
    adapter_rank: int = 0,
) -> Path:
    """Turn a plain mlx-lm model into a checkpoint with fresh (untrained) streams.

    The base files are copied unchanged; the output appears only when complete.

    Args:
        base_path: mlx-lm model directory or hub repo id.
        out: output directory (must not exist unless ``overwrite``).
        gamma: number of streams; stream_layers: ``Ns``; mode: lossless|shared.
        seed: seed for the stream embeddings and adapters.
        tree: default tree settings stored in the checkpoint.
        overwrite: replace an existing ``out``.
        adapter_rank: rank of the stream adapters (0: none).

    Returns:
        The output path.
    """
    src = resolve_path(base_path)
    base_config = _read_base_config(src)
    family = family_for(base_config.get("model_type"))
    from mlx_lm.utils import load_model

    try:
        base, _ = load_model(src, lazy=True)
    except (ValueError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"could not load the model in {src}: {exc}") from None
    config = new_config(_base_dims(base), gamma, stream_layers, mode, tree, adapter_rank)
    model = fresh_model(base, family, config, seed)

    if Path(out).exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another --out or pass --overwrite")
    with atomic_dir(Path(out)) as tmp:
        for item in src.iterdir():
            if item.name in (CONFIG_FILE, WEIGHTS_FILE) or item.name.startswith("."):
                continue
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
        save_streams(model, tmp)
    return Path(out)
