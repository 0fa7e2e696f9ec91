"""Print the paper's Table 1 rows for one task from measured files.

    python scripts/table1.py --dataset E2E-NLG --bench BENCH_DIR/results.json \
        --ss-eval ss_test.json --baseline-eval lora_test.json [--header]

BENCH_DIR: `specstream-mlx bench --model <SS model> --data <task>/test.jsonl
--methods ar,ss,pld,draft --out BENCH_DIR`; the evaluations: `specstream-mlx eval
--data <task>/test.jsonl --out FILE` of the SS model and of the plain-LoRA
baseline (same examples). Extra parameters of SS: the elements of the SS
model's specstream.safetensors (streams; LoRA is in both models); of the draft
model: every weight of the target, in 4 bits. See docs/table1.md.
"""

import argparse
import json
import sys
from pathlib import Path

from specstream_mlx.bench.paper_table import format_rows, table_rows


def _stream_params(model_dir: Path):
    file = model_dir / "specstream.safetensors"
    if not file.is_file():
        return None
    import mlx.core as mx

    return sum(v.size for v in mx.load(str(file)).values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--bench", type=Path, required=True, help="a bench run's results.json")
    parser.add_argument("--ss-eval", type=Path, required=True)
    parser.add_argument("--baseline-eval", type=Path, required=True)
    parser.add_argument("--header", action="store_true", help="print the table's header too")
    args = parser.parse_args()
    try:
        bench = json.loads(args.bench.read_text())
        ss, baseline = (json.loads(p.read_text()) for p in (args.ss_eval, args.baseline_eval))
        weight_bytes = (bench.get("device") or {}).get("weight_bytes")
        dtype_bytes = {"float32": 4, "float16": 2, "bfloat16": 2}.get(bench["environment"].get("dtype"), 4)
        rows = table_rows(args.dataset, bench, ss, baseline, _stream_params(Path(bench["settings"]["model"])),
                          weight_bytes // dtype_bytes if weight_bytes else None)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_rows(rows, header=args.header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
