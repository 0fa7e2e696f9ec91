"""scripts/learning_curve.py on tiny checkpoints: one point per step_N, JSON and plot written."""

import json
import subprocess
import sys
from pathlib import Path

from .helpers import write_base
from specstream_mlx.loading import init_checkpoint

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "learning_curve.py"


def test_curve_has_a_point_per_snapshot_in_step_order(tmp_path):
    base = write_base(tmp_path / "base", "llama", seed=2)
    snaps = tmp_path / "run_snapshots"
    for step, seed in ((200, 1), (100, 2)):
        init_checkpoint(str(base), str(snaps / f"step_{step}"), stream_layers=2, seed=seed)
    (snaps / "not_a_step").mkdir()
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps({"prompt": f"a b c {i}", "completion": "d e f"}) + "\n"
                           for i in range(3)))
    out = tmp_path / "curve"
    run = subprocess.run([sys.executable, str(SCRIPT), str(dev), str(snaps), str(out),
                          "--prompts", "2", "--max-tokens", "6", "--tree", "2,1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    points = json.loads((out / "curve.json").read_text())["points"]
    assert [p["step"] for p in points] == [100, 200]
    assert all(p["dev_loss"] > 0 and p["dev_loss_tokens"] > 0 for p in points)
    assert all(1.0 <= p["tokens_per_forward"] and len(p["acceptance_by_depth"]) == 2
               for p in points)
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"
    # --steps keeps some; --baseline adds another run's dev loss at the same steps
    base_snaps = tmp_path / "baseline_snapshots"
    init_checkpoint(str(write_base(tmp_path / "other", "llama", seed=5)), str(base_snaps / "step_200"),
                    stream_layers=2)
    run = subprocess.run([sys.executable, str(SCRIPT), str(dev), str(snaps), str(out), "--prompts", "1",
                          "--max-tokens", "4", "--steps", "200", "--baseline", str(base_snaps)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    points = json.loads((out / "curve.json").read_text())["points"]
    assert [p["step"] for p in points] == [200]
    assert points[0]["baseline_dev_loss"] > 0 and points[0]["baseline_dev_loss"] != points[0]["dev_loss"]
    empty = subprocess.run([sys.executable, str(SCRIPT), str(dev), str(tmp_path / "base"),
                            str(out)], capture_output=True, text=True, timeout=120)
    assert empty.returncode == 2 and "no step_N" in empty.stderr
