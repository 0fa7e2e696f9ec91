"""Package a shared-mode training run as a task model shipped by name.

    python scripts/package_task_model.py RUN_DIR --name smollm2-135m-e2e-nlg --task e2e_nlg \
        [--note TEXT] [--out specstream_mlx/data]

Writes ``OUT/NAME/`` (task.json, lora.safetensors and the streams, float16),
which ``--model NAME`` then finds (``convert/task_models.py``). The run must be
a ``specstream-mlx train --mode shared --lora-rank R`` output over the embedded
base (docs/table1.md).
"""

import argparse
import sys
from pathlib import Path

from specstream_mlx.convert.common import ConversionError
from specstream_mlx.convert.task_models import pack


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a `specstream-mlx train --out` folder (shared mode, LoRA)")
    parser.add_argument("--name", required=True, help="the model's name, e.g. smollm2-135m-e2e-nlg")
    parser.add_argument("--task", required=True, help="the task (dialogsum, e2e_nlg, sql)")
    parser.add_argument("--note", default="", help="free text kept in task.json (how it was trained)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "specstream_mlx" / "data")
    args = parser.parse_args()
    try:
        folder = pack(args.run, args.out / args.name, args.task, args.note)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(f"wrote {folder} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
