#!/usr/bin/env bash
# Shared-mode SS (LoRA on the top 4 layers + streams) vs a plain LoRA fine-tune
# by mlx-lm (same rank, layers, steps, batch, lr schedule) vs the base model,
# on one task: quality (ROUGE-L F1 for dialogsum and e2e_nlg, best over the
# references, with ROUGE-1 alongside; SQL exact match for sql) and tokens per
# forward from `specstream-mlx eval`.
# Usage (from the repo root): bash scripts/task_compare.sh dialogsum|e2e_nlg|sql
#   (spider: the old name of sql)
#   env: WORK=work ITERS=80 N=100 SHARED=../shared BASELINE=1 (0: skip plain LoRA)
#        TRAIN=1200 (training records kept) SPLIT=dev (test: only for figures you report)
# Task data: scripts/build_task_data.py (docs/tasks.md), into $WORK/$TASK.
# Prints each model's figures, then the paired per-example quality difference
# shared SS - plain LoRA with its standard error (same N examples of $SPLIT).
set -euo pipefail
TASK=${1:?usage: bash scripts/task_compare.sh dialogsum|e2e_nlg|sql}
case $TASK in
  dialogsum) METRIC=rougeL; LEN=384; TOKENS=64; BUILD=(--max-chars 900) ;;
  e2e_nlg) METRIC=rougeL; LEN=256; TOKENS=64; BUILD=() ;;
  sql|spider) TASK=sql; METRIC=exact; LEN=512; TOKENS=96; BUILD=() ;;
  *) echo "unknown task $TASK: dialogsum, e2e_nlg or sql" >&2; exit 2 ;;
esac
WORK=${WORK:-work}; ITERS=${ITERS:-80}; N=${N:-100}; SHARED=${SHARED:-../shared}; BASELINE=${BASELINE:-1}
TRAIN=${TRAIN:-1200}; SPLIT=${SPLIT:-dev}
case $SPLIT in dev|test) ;; *) echo "SPLIT must be dev or test, got $SPLIT" >&2; exit 2 ;; esac
S=.venv/bin/specstream-mlx; PY=.venv/bin/python
# mlx-lm's own CLI, with OpenBLAS loaded before mlx as specstream-mlx does (else MLX's slow reference BLAS)
MLX_LM=($PY -c "import specstream_mlx, runpy; runpy.run_module('mlx_lm', run_name='__main__')")
D=$WORK/$TASK; O=$WORK/${TASK}_out; mkdir -p "$O"
M=$($PY -c "from specstream_mlx.convert.default_model import default_model_path as p; print(p(quiet=True))")
$PY scripts/build_task_data.py "$TASK" --shared "$SHARED" --out "$D" --train "$TRAIN" "${BUILD[@]}"
[ -d "$O/ss_shared" ] || $S train --model "$M" --fresh-streams --mode shared --adapter-rank 0 \
  --lora-rank 32 --data "$D" --out "$O/ss_shared" --iters "$ITERS" --batch-size 4 \
  --max-seq-len "$LEN" --learning-rate 1e-3 --embedding-lr 0.05 --warmup 10 --save-every "$ITERS"
runs=("base:$M" "ss_shared:$O/ss_shared")
if [ "$BASELINE" = 1 ]; then
  cat > "$O/lora.yaml" <<YAML
lora_parameters: {rank: 32, scale: 2.0, dropout: 0.0}
lr_schedule: {name: cosine_decay, warmup: 10, warmup_init: 1.0e-5, arguments: [1.0e-3, $((ITERS - 10)), 1.0e-4]}
YAML
  [ -f "$O/lora_adapters/adapters.safetensors" ] || "${MLX_LM[@]}" lora --model "$M" --train --data "$D" --num-layers 4 \
    --iters "$ITERS" --batch-size 4 --learning-rate 1e-3 --mask-prompt --max-seq-length "$LEN" \
    -c "$O/lora.yaml" --adapter-path "$O/lora_adapters" --steps-per-eval 100000 --val-batches 1
  [ -d "$O/lora_fused" ] || "${MLX_LM[@]}" fuse --model "$M" --adapter-path "$O/lora_adapters" \
    --save-path "$O/lora_fused"
  $S init --model "$O/lora_fused" --out "$O/lora_ss" --overwrite
  runs+=("lora:$O/lora_ss")
fi
for run in "${runs[@]}"; do
  name=${run%%:*}
  # the plain-LoRA model has untrained streams: plain decoding, same text, quicker
  extra=(); [ "$name" = lora ] && extra=(--no-spec)
  $S eval --model "${run#*:}" --data "$D/$SPLIT.jsonl" --metric "$METRIC" --num "$N" -m "$TOKENS" \
    "${extra[@]}" --out "$O/eval_$name.json"
done
if [ "$BASELINE" = 1 ]; then
  $PY -c "import json, sys; from specstream_mlx.bench.evaluate import paired_difference as d
r = d(*(json.load(open(f)) for f in sys.argv[1:]))
print(f'shared SS - plain LoRA: {r[\"difference\"]:+.4f} +- {r[\"stderr\"]:.4f} (paired, {r[\"examples\"]} examples)')" \
    "$O/eval_ss_shared.json" "$O/eval_lora.json"
fi
