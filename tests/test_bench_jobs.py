"""`prunekit bench EXP --jobs 2`: two shard processes into one folder give the full grid once, like one run."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

DOC = {"name": "jobs", "model": "lenet_300_100", "model_kwargs": {"width": 0.1}, "dataset": "synthetic",
       "dataset_kwargs": {"in_channels": 1, "image_size": 8, "n": 128},
       "base": {"train": {"epochs": 1, "lr": 0.05, "batch_size": 64}},
       "methods": ["l1", "magnitude"], "targets": {"channel": ["flops=1.5", "flops=2"], "weight": ["params=2"]},
       "seeds": [0, 1], "finetune": {"epochs": 0}, "prune": {"prune_set": 32}, "measure": {"latency": False}}


def test_jobs_run_the_full_grid_once(tmp_path) -> None:
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump(DOC))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "prunekit", "bench", str(exp), "--out", str(out), "--jobs", "2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    cells = {(x["method"], x["target"], x["seed"]) for x in rows}
    assert len(rows) == len(cells) == 2 * 2 + 1 * 2  # l1 x 2 targets x 2 seeds + magnitude x 1 x 2, no duplicate
    assert all(x["status"] == "ok" for x in rows)
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    assert "2 processes" in r.stdout


def test_jobs_with_shard_is_refused(tmp_path) -> None:
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump(DOC))
    r = subprocess.run([sys.executable, "-m", "prunekit", "bench", str(exp), "--out", str(tmp_path / "o"), "--jobs",
                        "2", "--shard", "1/2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--jobs" in r.stderr
