"""Task models shipped by name: shared-mode streams plus LoRA over the embedded base.

``--model smollm2-135m-e2e-nlg`` (and ``-dialogsum``, ``-sql``) names a model
fine-tuned in shared mode on one task (docs/table1.md). The package ships only
what training changed, in float16, a few MB per task::

    specstream_mlx/data/<name>/
      task.json                 what it is: task, base, LoRA rank/scale, trained-on figures
      lora.safetensors          <module>.lora_a (in, r) and <module>.lora_b (r, out)
      specstream.json           stream settings (mode shared, the tree measured for it)
      specstream.safetensors    stream embeddings

On first use the base (the embedded model, ``default_model``) gets the LoRA
weights fused in, ``W + scale * (lora_a @ lora_b).T`` as mlx-lm's
``LoRALinear.fuse`` does, and the result is cached as an ordinary checkpoint
folder beside the base. ``pack`` makes a package from a ``specstream-mlx
train`` output folder (``scripts/package_task_model.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx

from ..atomic import atomic_dir
from ..config import CONFIG_FILE, WEIGHTS_FILE, read_config
from .common import ConversionError, package_data, say

TASK_FILE = "task.json"
LORA_FILE = "lora.safetensors"
BASE_WEIGHTS = "model.safetensors"
TRAIN_STATE = ("training_state.json", "training_state.safetensors")
PACKAGE_FILES = (TASK_FILE, LORA_FILE, CONFIG_FILE, WEIGHTS_FILE)


def shipped() -> Dict[str, Path]:
    """``{name: package folder}`` of every task model in the package."""
    root = package_data()
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir())
            if all((p / f).is_file() for f in PACKAGE_FILES)}


def package_tag(package: Path) -> str:
    """Short content hash of a package, part of its cache folder's name."""
    digest = hashlib.sha256()
    for name in PACKAGE_FILES:
        digest.update((Path(package) / name).read_bytes())
    return digest.hexdigest()[:10]


def _lora_modules(weights: Dict[str, mx.array]) -> List[str]:
    names = sorted({k[: -len(".lora_a")] for k in weights if k.endswith(".lora_a")})
    unpaired = [n for n in names if f"{n}.lora_b" not in weights]
    if unpaired or len(names) * 2 != len(weights):
        raise ConversionError(f"LoRA weights must come in lora_a/lora_b pairs; odd ones: "
                              f"{unpaired or sorted(set(weights) - {f'{n}.{s}' for n in names for s in ('lora_a', 'lora_b')})}")
    return names


def fuse_lora(weights: Dict[str, mx.array], lora: Dict[str, mx.array], scale: float) -> Dict[str, mx.array]:
    """``weights`` with each LoRA pair fused into its linear layer (a new dict).

    ``lora`` maps ``<module>.lora_a`` (in, r) and ``<module>.lora_b`` (r, out);
    the layer's ``<module>.weight`` is (out, in). The sum is taken in float32
    and stored in the weight's dtype.
    """
    fused = dict(weights)
    for module in _lora_modules(lora):
        key = f"{module}.weight"
        if key not in weights:
            raise ConversionError(f"the base model has no {key} for the LoRA weights of {module}: "
                                  "the package was made for another base model")
        w = weights[key]
        a, b = lora[f"{module}.lora_a"].astype(mx.float32), lora[f"{module}.lora_b"].astype(mx.float32)
        if a.shape[0] != w.shape[1] or b.shape[1] != w.shape[0]:
            raise ConversionError(f"{module}: LoRA shapes {tuple(a.shape)} x {tuple(b.shape)} do not "
                                  f"fit the base weight {tuple(w.shape)}")
        fused[key] = (w.astype(mx.float32) + scale * (b.T @ a.T)).astype(w.dtype)
    return fused


def pack(run_dir: Path, out: Path, task: str, note: str = "", quiet: bool = False) -> Path:
    """Package a shared-mode training output (``specstream-mlx train --out``) as a task model.

    Keeps the LoRA factors and the streams in float16, and checks that fusing
    them back into the run's base reproduces the run's fused weights (to float16
    rounding). Refuses lossless runs (nothing to fuse) and runs without LoRA.
    """
    run_dir, out = Path(run_dir), Path(out)
    for name in (CONFIG_FILE, WEIGHTS_FILE, BASE_WEIGHTS) + TRAIN_STATE:
        if not (run_dir / name).is_file():
            raise ConversionError(f"{run_dir} has no {name}: pass a `specstream-mlx train --out` folder")
    config = read_config(run_dir)
    if not config.shared:
        raise ConversionError(f"{run_dir} is a {config.mode}-mode checkpoint; task models are shared "
                              "mode (streams + LoRA); ship lossless streams as the default model's")
    info = json.loads((run_dir / TRAIN_STATE[0]).read_text())
    state = mx.load(str(run_dir / TRAIN_STATE[1]))
    prefix = "base."
    lora = {k[len(prefix):]: v.astype(mx.float16) for k, v in state.items()
            if k.startswith(prefix) and (k.endswith(".lora_a") or k.endswith(".lora_b"))}
    if not lora:
        raise ConversionError(f"{run_dir} was trained without LoRA: nothing to package")
    modules = _lora_modules(lora)
    scale = float(info["config"]["lora_scale"])

    base_dir = Path(info["base_dir"])
    if (base_dir / BASE_WEIGHTS).is_file():  # the check needs the base the run started from
        base = mx.load(str(base_dir / BASE_WEIGHTS))
        trained = mx.load(str(run_dir / BASE_WEIGHTS))
        fused = fuse_lora({f"{m}.weight": base[f"{m}.weight"] for m in modules}, lora, scale)
        err = max(float(mx.abs(fused[k].astype(mx.float32) - trained[k].astype(mx.float32)).max())
                  for k in fused)
        untouched = [k for k in trained if k not in fused and not mx.array_equal(trained[k], base[k])]
        if untouched:
            raise ConversionError(f"{run_dir}: weights outside the LoRA layers changed ({untouched[:3]}); "
                                  "this is not a LoRA run over its recorded base")
        say(f"fused float16 LoRA vs the run's weights: max |difference| {err:.2e}", quiet)
    else:
        err = None
        say(f"note: the run's base {base_dir} is gone; the fused weights were not checked", quiet)

    streams = mx.load(str(run_dir / WEIGHTS_FILE))
    figures = info.get("figures", {})
    meta = {
        "task": task,
        "base": "smollm2-135m",
        "lora": {"rank": int(info["config"]["lora_rank"]), "scale": scale, "modules": modules},
        "trained": {"steps": info["step"], "config": info["config"],
                    "val_tokens_per_forward": figures.get("val_tokens_per_forward")},
        "fuse_check_max_abs": err,
        "note": note,
    }
    with atomic_dir(out) as tmp:
        mx.save_safetensors(str(tmp / LORA_FILE), lora, metadata={"format": "mlx"})
        mx.save_safetensors(str(tmp / WEIGHTS_FILE), {k: v.astype(mx.float16) for k, v in streams.items()},
                            metadata={"format": "mlx", "producer": "specstream-mlx"})
        shutil.copy2(run_dir / CONFIG_FILE, tmp / CONFIG_FILE)
        (tmp / TASK_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def build(package: Path, base_dir: Path, target: Path, quiet: bool = False) -> Path:
    """Write the checkpoint folder ``target``: ``base_dir`` with the package's LoRA fused in
    and its streams. Atomic: an interrupted build leaves no folder."""
    package, base_dir = Path(package), Path(base_dir)
    meta = json.loads((package / TASK_FILE).read_text())
    if not (base_dir / BASE_WEIGHTS).is_file():
        raise ConversionError(f"{base_dir} has no single {BASE_WEIGHTS}: the task models need the "
                              "embedded base model's folder")
    say(f"preparing the task model {package.name} over {base_dir}", quiet)
    weights = fuse_lora(mx.load(str(base_dir / BASE_WEIGHTS)), mx.load(str(package / LORA_FILE)),
                        float(meta["lora"]["scale"]))
    with atomic_dir(target) as tmp:
        for item in base_dir.iterdir():
            if not item.is_file() or item.name.startswith(".") or item.name.endswith(".safetensors") \
                    or item.name in (CONFIG_FILE, "model.safetensors.index.json") or item.name in TRAIN_STATE:
                continue
            try:
                os.link(item, tmp / item.name)
            except OSError:
                shutil.copy2(item, tmp / item.name)
        mx.save_safetensors(str(tmp / BASE_WEIGHTS), weights, metadata={"format": "mlx"})
        for name in (CONFIG_FILE, WEIGHTS_FILE, TASK_FILE):
            shutil.copy2(package / name, tmp / name)
    return target


def task_model_path(name: str, base_dir: Path, cache: Path, dtype: str, quiet: bool = False) -> Optional[Path]:
    """The cached checkpoint of the shipped task model ``name`` (built on first use), or
    ``None`` when the package ships no model of that name."""
    package = shipped().get(name)
    if package is None:
        return None
    target = Path(cache) / f"{name}-{dtype}-{package_tag(package)}-{Path(base_dir).name}"
    if (target / CONFIG_FILE).is_file():
        return target
    import fcntl

    # Several processes (ranks on one machine) may ask at once: one builds, the others wait
    # and reuse it (a second build would replace the folder under a reader).
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / CONFIG_FILE).is_file():
            return target
        return build(package, base_dir, target, quiet)
