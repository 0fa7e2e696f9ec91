#!/usr/bin/env bash
# DialogSum, equal steps: shared-mode SS (LoRA r32 on the top 4 layers + streams)
# vs a plain LoRA fine-tune by mlx-lm (same rank, layers, steps, batch, lr schedule)
# vs the base model; ROUGE-L and tokens per forward from `specstream-mlx eval`.
# Usage: WORK=work ITERS=80 N=15 bash scripts/dialogsum_compare.sh   (from the repo root)
set -euo pipefail
WORK=${WORK:-work}; ITERS=${ITERS:-80}; N=${N:-15}; SHARED=${SHARED:-../shared}
S=.venv/bin/specstream-mlx; PY=.venv/bin/python
D=$WORK/dialogsum; O=$WORK/dialogsum_out; mkdir -p "$D" "$O"
M=$($PY -c "from specstream_mlx.convert.default_model import default_model_path as p; print(p(quiet=True))")
$PY - "$SHARED" "$D" <<'PY'
import json, random, sys
shared, out = sys.argv[1], sys.argv[2]
rows = [json.loads(l) for l in open(f"{shared}/datasets/dialogsum/dialogsum.train.jsonl")]
dev = [json.loads(l) for l in open(f"{shared}/datasets/dialogsum/dialogsum.dev.jsonl")]
rec = lambda r: json.dumps({"prompt": f"Summarize the following dialogue.\n\n{r['dialogue']}",
                            "completion": r["summary"]}) + "\n"
short = [r for r in rows if len(r["dialogue"]) < 900]
open(f"{out}/train.jsonl", "w").writelines(rec(r) for r in random.Random(0).sample(short, 1200))
for split in ("valid", "test"):
    open(f"{out}/{split}.jsonl", "w").writelines(rec(r) for r in dev[:40])
PY
$S train --model "$M" --fresh-streams --mode shared --adapter-rank 0 --lora-rank 32 --data "$D" \
  --out "$O/ss_shared" --iters "$ITERS" --batch-size 4 --max-seq-len 384 --learning-rate 1e-3 \
  --embedding-lr 0.05 --warmup 10 --save-every "$ITERS"
cat > "$O/lora.yaml" <<YAML
lora_parameters: {rank: 32, scale: 2.0, dropout: 0.0}
lr_schedule: {name: cosine_decay, warmup: 10, warmup_init: 1.0e-5, arguments: [1.0e-3, $((ITERS - 10)), 1.0e-4]}
YAML
$PY -m mlx_lm lora --model "$M" --train --data "$D" --num-layers 4 --iters "$ITERS" --batch-size 4 \
  --learning-rate 1e-3 --mask-prompt --max-seq-length 384 -c "$O/lora.yaml" \
  --adapter-path "$O/lora_adapters" --steps-per-eval 100000 --val-batches 1
$PY -m mlx_lm fuse --model "$M" --adapter-path "$O/lora_adapters" --save-path "$O/lora_fused"
$S init --model "$O/lora_fused" --out "$O/lora_ss" --overwrite
for run in "base:$M" "ss_shared:$O/ss_shared" "lora:$O/lora_ss"; do
  name=${run%%:*}
  $S eval --model "${run#*:}" --data "$D/test.jsonl" --metric rouge --num "$N" -m 64 \
    --out "$O/eval_$name.json" > /dev/null
  echo "$name: $(tr -d '\n ' < "$O/eval_$name.json")"
done
