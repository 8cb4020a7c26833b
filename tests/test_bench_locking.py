"""Several `prunekit bench` processes on one output folder, and SIGKILLs at random moments.

Real subprocesses on a tiny synthetic preset (a narrow LeNet-300-100 on 8x8 synthetic images, two fast
methods, 12 cells): two shards run concurrently into one folder end with exactly the grid that running them
apart and merging gives; a second process on the same shard is refused naming the holder; a sweep killed
``PRUNEKIT_KILL_TESTS`` times (default 3; the acceptance run used 20) at random moments and then resumed has
every cell exactly once, no torn row, and the values of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from prunekit.bench import results as R

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX locks and signals")

N_KILLS = int(os.environ.get("PRUNEKIT_KILL_TESTS", "3"))
#: values that do not depend on timing: equal between an interrupted and an uninterrupted run
STABLE = ("status", "method", "target", "seed", "base_fingerprint", "cell_config_hash", "params_nonzero",
          "top1_pruned", "top1_finetuned", "agreement_final", "compression", "flops_effective")


def _experiment(tmp_path: Path) -> Path:
    doc = {
        "name": "tiny-locking", "model": "lenet_300_100", "model_kwargs": {"width": 0.1}, "dataset": "synthetic",
        "dataset_kwargs": {"in_channels": 1, "image_size": 8, "n": 512},
        # one base model for every output folder here (trained once; concurrent runs wait for it)
        "base": {"train": {"epochs": 1, "lr": 0.05, "batch_size": 64}, "cache_dir": str(tmp_path / "cache")},
        "methods": ["magnitude", "l1"],
        "targets": {"weight": ["params=2", "params=4"], "channel": ["flops=1.5", "flops=2"]},
        "seeds": [0, 1, 2], "finetune": {"epochs": 2, "lr": 0.01, "batch_size": 32}, "prune": {"prune_set": 32},
        "measure": {"latency": False}, "device": "cpu", "threads": 1,
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _bench(exp: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "prunekit", "bench", str(exp), "--out", str(out), "--quiet",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _finish(p: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out + err


def _rows_exactly_once(out: Path) -> dict[str, dict]:
    """Every line of results.jsonl a whole row, every cell once; the rows by cell id."""
    data = (out / R.JSONL).read_bytes()
    assert data.endswith(b"\n"), "torn last line"
    rows = [json.loads(line) for line in data.split(b"\n")[:-1]]  # a torn or interleaved line fails here
    ids = [r["cell_id"] for r in rows]
    assert len(ids) == len(set(ids)), "a cell appears twice"
    return {r["cell_id"]: r for r in rows}


def _stable(rows: dict[str, dict]) -> dict[str, tuple]:
    return {cid: tuple(r.get(k) for k in STABLE) for cid, r in rows.items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """An uninterrupted run of the whole grid (it also trains the shared base model)."""
    tmp = tmp_path_factory.mktemp("locking")
    exp = _experiment(tmp)
    rc, log = _finish(_bench(exp, tmp / "ref"))
    assert rc == 0, log
    rows = _rows_exactly_once(tmp / "ref")
    assert len(rows) == 12 and all(r["status"] == "ok" for r in rows.values())
    return exp, rows


def test_concurrent_shards_into_one_folder_equal_separate_runs_merged(reference, tmp_path):
    exp, ref = reference
    shared = tmp_path / "shared"
    procs = [_bench(exp, shared, "--shard", f"{i}/2") for i in range(2)]
    for p in procs:
        rc, log = _finish(p)
        assert rc == 0, log
    together = _rows_exactly_once(shared)
    apart = []
    for i in range(2):
        rc, log = _finish(_bench(exp, tmp_path / f"s{i}", "--shard", f"{i}/2"))
        assert rc == 0, log
        apart.append(tmp_path / f"s{i}")
    merged = {r["cell_id"]: r for r in R.merge(apart, tmp_path / "merged")}
    assert len(together) == 12 and set(together) == set(merged) == set(ref)
    assert _stable(together) == _stable(merged) == _stable(ref)
    assert (shared / R.CSV).read_text().count("\n") == 13  # the CSV has every row too (header + 12)


def test_second_process_on_the_same_shard_exits_2_naming_the_holder(reference, tmp_path):
    exp, _ = reference
    out = tmp_path / "o"
    first = _bench(exp, out, "--set", "finetune.epochs=20")  # long enough to still be running
    try:
        lock = out / ".bench-all.lock"
        deadline = time.time() + 120
        while time.time() < deadline and not (lock.is_file() and lock.read_text().strip()):
            time.sleep(0.1)
        assert first.poll() is None, _finish(first)[1]
        rc, log = _finish(_bench(exp, out, "--set", "finetune.epochs=20"))
        assert rc == 2, log
        assert f"pid {first.pid} on host" in log and "since" in log and "Traceback" not in log
    finally:
        first.kill()
        first.wait()


def test_sigkill_at_random_moments_then_resume_loses_and_duplicates_nothing(reference, tmp_path):
    exp, ref = reference
    out = tmp_path / "killed"
    rng = random.Random(int(os.environ.get("PRUNEKIT_KILL_SEED", "0")))
    kills = 0
    while kills < N_KILLS:
        before = len(R.read_jsonl(out / R.JSONL))
        p = _bench(exp, out)
        if rng.random() < 0.3:  # anywhere: start-up, loading, measuring the base, a cell
            time.sleep(rng.uniform(0.0, 8.0))
        else:  # inside the sweep: after a new row, a random fraction of a cell later
            deadline = time.time() + 120
            while p.poll() is None and len(R.read_jsonl(out / R.JSONL)) <= before and time.time() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.5))
        if p.poll() is not None:  # finished before the kill: check this folder, go on in a fresh one
            assert p.wait() == 0, p.communicate()
            p.communicate()
            assert _stable(_rows_exactly_once(out)) == _stable(ref)
            out = tmp_path / f"killed{kills}"
            continue
        p.send_signal(signal.SIGKILL)
        p.communicate()
        kills += 1
    rc, log = _finish(_bench(exp, out))
    assert rc == 0, log
    rows = _rows_exactly_once(out)
    assert set(rows) == set(ref) and _stable(rows) == _stable(ref)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


_SAVER = """
import sys
from prunekit.io import save_with_metrics
from prunekit.models import create_model

m = create_model("resnet20", num_classes=10, in_channels=3)
i = 0
while True:
    save_with_metrics(m, sys.argv[1], {"i": i})
    print(i, flush=True)
    i += 1
"""


def test_sigkill_during_checkpoint_and_metrics_saves_leaves_a_loadable_pair(tmp_path):
    """A process saving ``model.pt`` + ``metrics.json`` in a loop, killed at random moments: the checkpoint always
    loads, the metrics either match it or are refused as a mismatched pair, and the leftovers are cleaned."""
    from prunekit.errors import CheckpointError
    from prunekit.io import load, read_metrics, save_with_metrics
    from prunekit.models import create_model

    rng = random.Random(1)
    out = tmp_path / "o"
    for _ in range(N_KILLS):
        p = subprocess.Popen([sys.executable, "-c", _SAVER, str(out)], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip().isdigit()  # one pair written
        time.sleep(rng.uniform(0.0, 0.3))
        p.send_signal(signal.SIGKILL)
        p.communicate()
        model = load(out / "model.pt")  # never a partial checkpoint
        try:
            metrics = read_metrics(out)
        except CheckpointError as e:  # killed between the two renames: detected, not silently mixed
            assert "describes another checkpoint" in str(e)
        else:
            assert metrics["i"] == model.prunekit_meta["metrics"]["i"]
    save_with_metrics(create_model("resnet20", num_classes=10, in_channels=3), out, {"i": -1})
    assert read_metrics(out)["i"] == -1
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.pt"]  # leftovers of the kills cleaned
