#!/usr/bin/env bash
# Keep a copy of a training checkpoint every N steps: the trainer keeps only the last one,
# a learning curve (scripts/learning_curve.py) needs the earlier ones.
# Usage: bash scripts/snapshot_checkpoints.sh RUN_DIR [EVERY=100]   (runs until killed)
# Copies land in RUN_DIR_snapshots/step_N (copied under a temporary name, then renamed).
set -u
RUN=${1:?usage: bash scripts/snapshot_checkpoints.sh RUN_DIR [EVERY]}
EVERY=${2:-100}
case $EVERY in ''|*[!0-9]*|0) echo "EVERY must be a positive integer, got $EVERY" >&2; exit 2 ;; esac
while true; do
  if [ -f "$RUN/training_state.json" ]; then
    step=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['step'])" "$RUN/training_state.json" 2>/dev/null)
    if [ -n "$step" ] && [ $((step % EVERY)) = 0 ] && [ ! -d "${RUN}_snapshots/step_$step" ]; then
      mkdir -p "${RUN}_snapshots"
      rm -rf "${RUN}_snapshots/.tmp_$step"
      cp -r "$RUN" "${RUN}_snapshots/.tmp_$step" && mv "${RUN}_snapshots/.tmp_$step" "${RUN}_snapshots/step_$step"
    fi
  fi
  sleep 20
done
