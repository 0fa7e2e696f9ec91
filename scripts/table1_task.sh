#!/usr/bin/env bash
# The paper's Table 1 rows for one task, measured here (docs/table1.md has the runs).
#
# Usage (repository root): bash scripts/table1_task.sh TASK SS_RUN BASELINE_RUN OUT
#   TASK: dialogsum | e2e_nlg | sql; data from scripts/build_task_data.py in $T/TASK
#   SS_RUN: shared-mode SS training output; BASELINE_RUN: the plain-LoRA one (same command
#   with --stream-weight 0 --exit-weight 0)
#   env: T=~/.cache/specstream-mlx/tasks  N_SPEED=16 (test prompts for speed)
#        N_SWEEP=6 (dev prompts for the tree sweep)  NAME (shipped name, e.g. smollm2-135m-e2e-nlg)
#        SKIP_SWEEP=1 (keep SS_RUN's tree)  N_QUALITY (first N test examples for quality; default all)
#        EVAL_BATCH=32 (quality: examples decoded together by mlx-lm's batch_generate)
# Steps: 1. tree sweep on dev, the fastest tree saved into SS_RUN as this backend's default;
#        2. SS_RUN packaged as the named task model (float16 streams + LoRA) when NAME is set;
#        3. speed on test: ar, ss, pld, draft interleaved in one run, on the model users get;
#        4. quality on test: the SS model (its own greedy text, which the speed run checks
#           speculative decoding returns) and the baseline, by batched plain decoding;
#        5. the table rows (scripts/table1.py), also written to OUT/rows.md.
set -euo pipefail
TASK=${1:?usage: bash scripts/table1_task.sh TASK SS_RUN BASELINE_RUN OUT}
SS_RUN=${2:?}; BASE_RUN=${3:?}; OUT=${4:?}
case $TASK in
  dialogsum) METRIC=rougeL; TOKENS=128; LABEL=DialogSum ;;
  e2e_nlg) METRIC=rougeL; TOKENS=96; LABEL=E2E-NLG ;;
  sql) METRIC=exact; TOKENS=96; LABEL=SQL ;;
  *) echo "unknown task $TASK: dialogsum, e2e_nlg or sql" >&2; exit 2 ;;
esac
T=${T:-$HOME/.cache/specstream-mlx/tasks}; D=$T/$TASK
N_SPEED=${N_SPEED:-16}; N_SWEEP=${N_SWEEP:-6}
QUALITY=(); [ -n "${N_QUALITY:-}" ] && QUALITY=(--num "$N_QUALITY")
S=.venv/bin/specstream-mlx; PY=.venv/bin/python
mkdir -p "$OUT"
if [ "${SKIP_SWEEP:-0}" != 1 ]; then
  $S bench --model "$SS_RUN" --data "$D/dev.jsonl" --num-prompts "$N_SWEEP" -m "$TOKENS" --sweep \
    --sweep-widths '1;1,1;1,1,1;2,1,1;2,2,1;3,2,1;3,3,1' --sweep-max-nodes 8,16 --save-tree \
    --out "$OUT/sweep-dev"
fi
MODEL=$SS_RUN
if [ -n "${NAME:-}" ]; then
  $PY scripts/package_task_model.py "$SS_RUN" --name "$NAME" --task "$TASK" \
    --note "scripts/table1_task.sh $TASK; training command in docs/table1.md"
  MODEL=$NAME
fi
$S bench --model "$MODEL" --data "$D/test.jsonl" --num-prompts "$N_SPEED" -m "$TOKENS" \
  --methods ar,ss,pld,draft --device-report --out "$OUT/speed-test"
EVAL_BATCH=${EVAL_BATCH:-32}
$S eval --model "$MODEL" --data "$D/test.jsonl" --metric "$METRIC" -m "$TOKENS" "${QUALITY[@]}" \
  --batch-size "$EVAL_BATCH" --out "$OUT/quality-ss.json"
$S eval --model "$BASE_RUN" --data "$D/test.jsonl" --metric "$METRIC" -m "$TOKENS" "${QUALITY[@]}" \
  --batch-size "$EVAL_BATCH" --out "$OUT/quality-baseline.json"
$PY scripts/table1.py --dataset "$LABEL" --bench "$OUT/speed-test/results.json" \
  --ss-eval "$OUT/quality-ss.json" --baseline-eval "$OUT/quality-baseline.json" --header | tee "$OUT/rows.md"
