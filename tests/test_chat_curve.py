"""scripts/chat_curve.py on tiny checkpoints: one point per label, re-measures replace, plot written."""

import json
import subprocess
import sys
from pathlib import Path

from .helpers import random_prompt, write_base
from specstream_mlx.loading import init_checkpoint

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "chat_curve.py"


def _measure(ckpt, label, tokens, out, heldout, prompts, cache):
    return subprocess.run(
        [sys.executable, str(SCRIPT), "measure", str(ckpt), "--label", label, "--tokens", str(tokens),
         "--capacity", "2 layers", "--heldout", str(heldout), "--out", str(out),
         "--prompts", str(prompts), "--num-prompts", "2", "--max-tokens", "5",
         "--trees", "1;2,1", "--cache-folder", str(cache)],
        capture_output=True, text=True, timeout=300)


def test_points_by_label_and_plot(tmp_path):
    base = write_base(tmp_path / "base", "llama", seed=2)
    small, large = tmp_path / "small", tmp_path / "large"
    init_checkpoint(str(base), str(small), stream_layers=2, seed=1)
    init_checkpoint(str(base), str(large), stream_layers=2, seed=2)
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"tokens": random_prompt(14, seed=i), "loss_start": 6,
                                           "source": "chat" if i else "sql"}) + "\n"
                               for i in range(3)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"a b c {i}"}) + "\n" for i in range(2)))
    out, cache = tmp_path / "curve.json", tmp_path / "cache"
    for ckpt, label, tokens in ((small, "small", 1000), (large, "large", 3000), (small, "small", 1000)):
        run = _measure(ckpt, label, tokens, out, heldout, prompts, cache)
        assert run.returncode == 0, run.stderr
    points = json.loads(out.read_text())["points"]
    assert sorted(p["label"] for p in points) == ["large", "small"]  # the re-measure replaced
    for p in points:
        assert len(p["stream_accuracy"]) == 3 and all(0 <= a <= 1 for a in p["stream_accuracy"])
        assert p["heldout_positions"] > 0
        assert sorted(p["stream_accuracy_by_source"]) == ["chat", "sql"]
        assert set(p["trees"]) == {"1", "2,1"}
        assert p["trees"]["1"]["tokens_per_forward"] >= 1.0
        assert len(p["trees"]["2,1"]["acceptance_by_depth"]) == 2
    assert len(list(cache.iterdir())) == 1  # the held-out main stream computed once, then read
    png = tmp_path / "curve.png"
    run = subprocess.run([sys.executable, str(SCRIPT), "plot", str(out), str(png)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bad_heldout_file_is_one_clear_error(tmp_path):
    base = write_base(tmp_path / "base", "llama", seed=2)
    ckpt = tmp_path / "ckpt"
    init_checkpoint(str(base), str(ckpt), stream_layers=2, seed=1)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a b"}) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "not distilled"}) + "\n")
    out = tmp_path / "curve.json"
    for heldout in (tmp_path / "missing.jsonl", bad):
        run = _measure(ckpt, "x", 1, out, heldout, prompts, tmp_path / "cache")
        assert run.returncode == 2 and "error:" in run.stderr and "Traceback" not in run.stderr
    assert not out.exists()
