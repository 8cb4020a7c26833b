"""Benchmark results bound to their inputs, crash-safe and locked outputs, failures that are reported.

Runs in process on the tiny synthetic setup of ``test_bench`` (its stand-in prune function and throw-away
methods); the multi-process tests (concurrent shards, SIGKILL) are in ``test_bench_locking``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from test_bench import CALLS, _cli, _doubles, run, tiny_doc  # noqa: F401  (_doubles: the autouse fixture)

from prunekit.bench import results as R
from prunekit.bench.config import load_experiment
from prunekit.bench.report import aggregate
from prunekit.bench.runner import Runner
from prunekit.errors import ConfigError, PrunekitError
from prunekit.io import load, read_metrics, save, save_with_metrics


def _lines(out: Path) -> list[bytes]:
    return (out / R.JSONL).read_bytes().split(b"\n")


def _assert_clean(out: Path, n: int) -> None:
    """``results.jsonl``: ``n`` lines, each a whole row, every cell exactly once, ending in a newline."""
    data = (out / R.JSONL).read_bytes()
    assert data.endswith(b"\n")
    lines = data.split(b"\n")[:-1]
    rows = [json.loads(line) for line in lines]  # raises on a torn or interleaved line
    assert len(rows) == n and len({r["cell_id"] for r in rows}) == n


def _checkpoint(tmp_path: Path, name: str = "ckpt.pt", bump: float = 0.0) -> Path:
    """A base-model checkpoint (trained once by a benchmark run, then copied), optionally with changed weights."""
    cache = tmp_path / "_base_run"
    if not (cache / "base").is_dir():
        run(tiny_doc(seeds=[0], methods=["bench_zero"], targets={"weight": ["params=2"]}), cache)
    (cached,) = (cache / "base").glob("*.pt")
    dst = tmp_path / name
    if bump:
        m = load(cached)
        with torch.no_grad():
            next(m.parameters()).add_(bump)
        save(m, dst)
    else:
        shutil.copy(cached, dst)
    return dst


def _ckpt_doc(path: Path, **over) -> dict:
    doc = tiny_doc(**over)
    doc["base"] = {"checkpoint": str(path)}
    return doc


# --------------------------------------------------------------------------------------------- torn lines
def test_torn_last_line_is_repaired_and_every_cell_appears_once(tmp_path):
    run(tiny_doc(), tmp_path)
    data = (tmp_path / R.JSONL).read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    (tmp_path / R.JSONL).write_bytes(data[: last_start + 40])  # killed while writing the 6th row
    assert len(R.load_rows(tmp_path)) == 5  # the fragment is never read as a row
    CALLS.clear()
    s = run(tiny_doc(), tmp_path)
    assert s.ran == 1 and s.done_before == 5 and len(CALLS) == 1
    _assert_clean(tmp_path, 6)  # before the fix the fragment swallowed the new row: the cell stayed lost
    CALLS.clear()
    s = run(tiny_doc(), tmp_path)
    assert s.ran == 0 and CALLS == [] and s.done_before == 6
    _assert_clean(tmp_path, 6)


def test_whole_row_without_newline_is_completed_not_dropped(tmp_path):
    R.append_row(tmp_path, {"cell_id": "a", "status": "ok"})
    with open(tmp_path / R.JSONL, "ab") as f:
        f.write(b'{"cell_id": "b", "status": "ok"}')  # e.g. edited by hand, no final newline
    R.append_row(tmp_path, {"cell_id": "c", "status": "ok"})
    assert [r["cell_id"] for r in R.read_jsonl(tmp_path / R.JSONL)] == ["a", "b", "c"]
    _assert_clean(tmp_path, 3)


def test_lines_that_are_not_rows_are_ignored(tmp_path):
    (tmp_path / R.JSONL).write_bytes(b'[1, 2]\n{"no": "id"}\n\xff\xfe\n{"cell_id": 3, "status": "ok"}\n'
                                     b'{"cell_id": "x", "status": "ok"}\n')
    assert [r["cell_id"] for r in R.read_jsonl(tmp_path / R.JSONL)] == ["x"]


# --------------------------------------------------------------------------------------------- base binding
def test_rows_carry_base_fingerprint_and_config_hash(tmp_path):
    run(tiny_doc(), tmp_path)
    rows = R.load_rows(tmp_path)
    base = json.loads((tmp_path / "base_metrics.json").read_text())
    assert {r["base_fingerprint"] for r in rows} == {base["fingerprint"]} and len(base["fingerprint"]) == 64
    assert len({r["cell_config_hash"] for r in rows}) == 6 and len({r["seed_group"] for r in rows}) == 2
    header = (tmp_path / R.CSV).read_text().splitlines()[0]
    assert "base_fingerprint" in header and "cell_config_hash" in header


def test_cell_ids_follow_contents_not_the_checkpoint_path(tmp_path):
    a = _checkpoint(tmp_path, "a.pt")
    run(_ckpt_doc(a), tmp_path / "o")
    ids = {r["cell_id"] for r in R.load_rows(tmp_path / "o")}
    moved = tmp_path / "elsewhere" / "renamed.pt"
    moved.parent.mkdir()
    shutil.move(a, moved)  # the same weights at another path: every cell is still done
    CALLS.clear()
    s = run(_ckpt_doc(moved), tmp_path / "o")
    assert s.done_before == 6 and CALLS == []
    # other weights at the same path: other cell ids, and the old folder refuses them, naming both fingerprints
    b = _checkpoint(tmp_path, "b.pt", bump=0.01)
    shutil.copy(b, moved)
    with pytest.raises(PrunekitError, match="base model differs") as e:
        run(_ckpt_doc(moved), tmp_path / "o")
    fa = next(iter(R.base_fingerprints(R.load_rows(tmp_path / "o"))))
    assert fa[:16] in str(e.value) and str(moved) in str(e.value)
    run(_ckpt_doc(moved), tmp_path / "o2")
    assert ids.isdisjoint({r["cell_id"] for r in R.load_rows(tmp_path / "o2")})


def test_legacy_rows_without_fingerprint_are_refused(tmp_path):
    R.append_row(tmp_path, {"cell_id": "old", "status": "ok", "method": "bench_zero", "target": "params=2"})
    with pytest.raises(PrunekitError, match="without a base-model fingerprint"):
        run(tiny_doc(), tmp_path)


def test_rows_of_an_older_prunekit_are_adopted_when_base_metrics_names_this_base(tmp_path):
    from prunekit.bench.runner import _legacy_cell_id, _legacy_fingerprint, plan_cells

    run(tiny_doc(), tmp_path)
    exp = load_experiment(tiny_doc())
    base = load(next((tmp_path / "base").glob("*.pt")))
    fp = _legacy_fingerprint(base)
    cells = {c.cell_id: c for c in plan_cells(exp, R.load_rows(tmp_path)[0]["base_fingerprint"])}
    legacy = []
    for r in R.load_rows(tmp_path):  # what prunekit wrote before: path-based ids, no binding columns
        r = {k: v for k, v in r.items() if k not in ("base_fingerprint", "cell_config_hash", "seed_group")}
        legacy.append({**r, "cell_id": _legacy_cell_id(exp, cells[r["cell_id"]])})
    R.write_rows_jsonl(tmp_path, legacy)
    metrics = json.loads((tmp_path / "base_metrics.json").read_text())
    (tmp_path / "base_metrics.json").write_text(json.dumps({**metrics, "fingerprint": fp}))
    CALLS.clear()
    s = run(tiny_doc(), tmp_path)
    assert s.done_before == 6 and CALLS == []
    assert {r["cell_id"] for r in R.load_rows(tmp_path)} == set(cells)
    _assert_clean(tmp_path, 6)
    # with a base_metrics.json of another model the old rows cannot be trusted
    R.write_rows_jsonl(tmp_path, legacy)
    (tmp_path / "base_metrics.json").write_text(json.dumps({**metrics, "fingerprint": "0" * 64}))
    with pytest.raises(PrunekitError, match="does not show they come from this run's base model"):
        run(tiny_doc(), tmp_path)


def test_merge_refuses_shards_of_different_bases(tmp_path, capsys):
    a = _checkpoint(tmp_path, "a.pt")
    run(_ckpt_doc(a), tmp_path / "s0", shard="0/2")
    shutil.copy(_checkpoint(tmp_path, "b.pt", bump=0.01), a)  # "retrained" at the same path
    run(_ckpt_doc(a), tmp_path / "s1", shard="1/2")
    fps = [next(iter(R.base_fingerprints(R.load_rows(tmp_path / d)))) for d in ("s0", "s1")]
    assert fps[0] != fps[1]
    with pytest.raises(PrunekitError, match="different base models") as e:
        R.merge([tmp_path / "s0", tmp_path / "s1"], tmp_path / "m")
    msg = str(e.value)
    assert fps[0][:16] in msg and fps[1][:16] in msg and "s0" in msg and "s1" in msg
    assert not (tmp_path / "m" / R.JSONL).exists()
    from prunekit.cli import main

    assert main(["bench", "merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "m")]) == 2
    assert "different base models" in capsys.readouterr().err
    # shards of one base merge, and equal the unsharded run
    run(_ckpt_doc(a), tmp_path / "s0b", shard="0/2")
    merged = R.merge([tmp_path / "s0b", tmp_path / "s1"], tmp_path / "m2")
    run(_ckpt_doc(a), tmp_path / "full")
    assert {r["cell_id"] for r in merged} == {r["cell_id"] for r in R.load_rows(tmp_path / "full")}


def test_report_refuses_rows_of_different_bases_and_non_benchmark_folders(tmp_path, capsys):
    from prunekit.cli import main

    a = _checkpoint(tmp_path, "a.pt")
    b = _checkpoint(tmp_path, "b.pt", bump=0.01)
    run(_ckpt_doc(a), tmp_path / "x")
    run(_ckpt_doc(b), tmp_path / "y")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / R.JSONL).write_bytes((tmp_path / "x" / R.JSONL).read_bytes() + (tmp_path / "y" / R.JSONL).read_bytes())
    assert main(["bench", "report", str(mixed)]) == 2
    err = capsys.readouterr().err
    assert "2 base models" in err and "Traceback" not in err and not (mixed / "report.md").exists()
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    assert main(["bench", "report", str(plain)]) == 2
    assert "not a benchmark output directory" in capsys.readouterr().err
    assert sorted(p.name for p in plain.iterdir()) == ["notes.txt"]  # nothing written
    assert main(["bench", "report", str(tmp_path / "missing")]) == 2 and not (tmp_path / "missing").exists()
    assert main(["bench", "report", str(tmp_path / "x")]) == 0


def test_base_metrics_atomic_and_rewritten_when_damaged(tmp_path):
    run(tiny_doc(seeds=[0]), tmp_path)
    path = tmp_path / "base_metrics.json"
    good = json.loads(path.read_text())
    path.write_text(path.read_text()[:30])  # truncated by a crash of an older version
    s = run(tiny_doc(seeds=[0, 1]), tmp_path)
    assert s.ran == 3 and s.done_before == 3
    assert json.loads(path.read_text())["fingerprint"] == good["fingerprint"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_damaged_base_metrics_no_longer_lets_another_base_in(tmp_path):
    a = _checkpoint(tmp_path, "a.pt")
    run(_ckpt_doc(a, seeds=[0]), tmp_path / "o")
    (tmp_path / "o" / "base_metrics.json").write_text('{"top1": 0.9, "finger')  # truncated (was: check skipped)
    shutil.copy(_checkpoint(tmp_path, "b.pt", bump=0.01), a)
    with pytest.raises(PrunekitError, match="base model differs"):
        run(_ckpt_doc(a, seeds=[0, 1]), tmp_path / "o")
    (tmp_path / "o" / "base_metrics.json").unlink()  # missing altogether: the rows still carry the fingerprint
    with pytest.raises(PrunekitError, match="base model differs"):
        run(_ckpt_doc(a, seeds=[0, 1]), tmp_path / "o")
    assert len(R.load_rows(tmp_path / "o")) == 3


# --------------------------------------------------------------------------------------------- seeds only
def test_report_averages_only_rows_that_differ_in_seed(tmp_path):
    run(tiny_doc(), tmp_path)
    run(tiny_doc(prune={"prune_set": 64}), tmp_path)  # another setting, same folder, same base
    rows = R.load_rows(tmp_path)
    assert len(rows) == 12
    aggs = aggregate(rows)
    # before: 3 (label, target) pairs each averaging 4 rows of two configurations as if they were 4 seeds
    assert len(aggs) == 6 and all(a["n"] == 2 for a in aggs)
    labels = {a["label"] for a in aggs}
    assert len(labels) == 4 and all("[" in lb for lb in labels)
    assert "Pareto" in (tmp_path / "report.md").read_text()


def test_aggregate_keeps_one_label_when_configurations_do_not_differ():
    rows = [{"status": "ok", "method": "m", "label": "m", "target": "params=2", "seed": s, "seed_group": "g",
             "top1_final": 0.5 + s / 10} for s in (0, 1)]
    (a,) = aggregate(rows)
    assert a["label"] == "m" and a["n"] == 2 and a["top1_final"] == pytest.approx(0.55)


# --------------------------------------------------------------------------------------------- locks
def test_second_process_on_the_same_shard_is_refused_naming_the_holder(tmp_path):
    with R.RunLock(tmp_path, "all"):
        with pytest.raises(R.LockHeld, match=f"pid {os.getpid()} on host") as e:
            run(tiny_doc(), tmp_path)
        assert "since 20" in str(e.value)
        run(tiny_doc(), tmp_path, shard="0/2")  # another shard into the same folder is allowed
    assert len(R.load_rows(tmp_path)) == 3
    run(tiny_doc(), tmp_path)  # released: the full run completes the grid
    _assert_clean(tmp_path, 6)


def test_a_cell_held_by_another_process_is_left_to_it(tmp_path):
    import subprocess
    import sys

    from prunekit.bench.runner import _CellLocks

    out = tmp_path / "o"
    run(tiny_doc(), out, shard="0/2")  # trains (caches) the base, so that the cell ids are known
    done = {r["cell_id"] for r in R.load_rows(out)}
    cells = Runner(load_experiment(tiny_doc()), out, progress=False, log=lambda m: None).cells()
    busy = next(c for c in cells if c.cell_id not in done)
    holder = subprocess.Popen(  # another process "computing" that cell: it holds the cell's lock
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
         "fcntl.lockf(fd, fcntl.LOCK_EX, 1, int(sys.argv[2])); print('locked', flush=True); sys.stdin.read()",
         str(out / ".cells.lock"), str(_CellLocks._offset(busy.cell_id))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        CALLS.clear()
        s = run(tiny_doc(), out)
        assert s.elsewhere == 1 and s.ran == 2 and s.done_before == 3
        assert busy.cell_id not in {r["cell_id"] for r in R.load_rows(out)}
    finally:
        holder.communicate("")
    s = run(tiny_doc(), out)  # the holder is gone: the cell runs now
    assert s.elsewhere == 0 and s.ran == 1
    _assert_clean(out, 6)


# --------------------------------------------------------------------------------------------- files
def test_outputs_have_usual_permissions_and_stale_tmp_files_are_cleaned(tmp_path):
    old = os.umask(0o022)
    try:
        (tmp_path / ".results.csv.deadbeef.tmp").write_text("half a csv")  # left by a killed run
        (tmp_path / "report.mdx1y2z3.tmp").write_text("half a report")  # ... of an older version
        run(tiny_doc(seeds=[0]), tmp_path)
    finally:
        os.umask(old)
    for name in (R.JSONL, R.CSV, "config.yaml", "base_metrics.json", "base_predictions.pt", "report.md"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_save_with_metrics_writes_a_checked_pair(tmp_path):
    from prunekit.errors import CheckpointError
    from prunekit.models import create_model

    m = create_model("lenet_300_100", num_classes=10, in_channels=1, width=0.1)
    (tmp_path / ".model.pt.0123.tmp").write_bytes(b"junk")  # a killed run's leftover
    pt, mj = save_with_metrics(m, tmp_path, {"top1": 0.5})
    assert read_metrics(tmp_path)["top1"] == 0.5 and load(pt).prunekit_meta["metrics"]["top1"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "model.pt"]
    assert (pt.stat().st_mode & 0o777) == 0o666 & ~_umask() and (mj.stat().st_mode & 0o777) == 0o666 & ~_umask()
    save(create_model("lenet_300_100", num_classes=10, in_channels=1, width=0.2), pt)  # killed between renames
    with pytest.raises(CheckpointError, match="describes another checkpoint"):
        read_metrics(tmp_path)


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


# --------------------------------------------------------------------------------------------- CLI
def test_bench_exits_1_when_cells_failed_and_says_where(tmp_path, capsys):
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump(tiny_doc(methods=["bench_broken", "bench_zero"])))
    rc = _cli(["bench", str(exp), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "4 of 8 cell(s) failed" in err and "results.csv" in err and "report.md" in err
    rc = _cli(["bench", str(exp), "--out", str(tmp_path / "o"), "--quiet"])  # still failed: still 1
    assert rc == 1 and "4 earlier" in capsys.readouterr().err
    exp.write_text(yaml.safe_dump(tiny_doc(methods=["bench_zero"])))
    assert _cli(["bench", str(exp), "--out", str(tmp_path / "o2"), "--quiet"]) == 0


def test_mistyped_method_option_is_rejected_before_any_cell(tmp_path, capsys):
    from prunekit.cli import main

    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump(tiny_doc(methods=[{"name": "taylor", "options": {"samples": "abc"}}])))
    assert main(["bench", str(exp), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "methods[0].options" in err and "samples='abc'" in err and "int >= 1" in err
    assert not (tmp_path / "o").exists()  # nothing ran, nothing was written
    exp.write_text(yaml.safe_dump(tiny_doc(methods=["bench_zero"])))
    assert main(["bench", str(exp), "--out", str(tmp_path / "o"), "--set", "methods.0.options.boom_after=x",
                 "--quiet"]) == 2
    assert "boom_after" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_out_is_checked_before_any_work(tmp_path, capsys):
    from prunekit.cli import main

    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump(tiny_doc()))
    f = tmp_path / "a_file"
    f.write_text("x")
    assert main(["bench", str(exp), "--out", str(f), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "is an existing file" in err and "Traceback" not in err and CALLS == []
    assert main(["bench", str(exp), "--out", str(f / "sub"), "--quiet"]) == 2
    assert "cannot be written" in capsys.readouterr().err and CALLS == []
    with pytest.raises(ConfigError, match="existing file"):
        run(tiny_doc(), f)  # the API checks too


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_refused_before_any_work(tmp_path, capsys):
    from prunekit.cli import main

    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump(tiny_doc()))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["bench", str(exp), "--out", str(ro), "--quiet"]) == 2
        assert "cannot be written" in capsys.readouterr().err and CALLS == []
    finally:
        ro.chmod(0o755)


def test_non_utf8_experiment_file_is_a_config_error(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_bytes(b"name: \xff\xfe bad\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_experiment(str(p))


# --------------------------------------------------------------------------------------------- properties
@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 6), cut=st.floats(0, 1), junk=st.binary(max_size=40))
def test_any_truncation_then_append_keeps_whole_rows_only(n, cut, junk):
    """Cut ``results.jsonl`` anywhere (plus random bytes, as a dying disk might leave), append: every line of the
    file is a whole row, the rows are the fully written ones plus the new one."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        rows = [{"cell_id": f"c{i}", "status": "ok", "v": "x" * (i * 7)} for i in range(n)]
        for r in rows:
            R.append_row(out, r)
        data = (out / R.JSONL).read_bytes()
        k = int(cut * len(data))
        (out / R.JSONL).write_bytes(data[:k] + junk.replace(b"\n", b" "))
        whole = [r["cell_id"] for r in R.read_jsonl(out / R.JSONL)]
        R.append_row(out, {"cell_id": "new", "status": "ok"})
        final = (out / R.JSONL).read_bytes()
        assert final.endswith(b"\n")
        lines = final.split(b"\n")[:-1]
        got = [json.loads(line)["cell_id"] for line in lines]  # no torn line survives
        assert got == whole + ["new"]
        assert whole == [r["cell_id"] for r in rows][: len(whole)]


def test_a_whole_last_row_with_trailing_junk_whitespace_is_completed_cleanly(tmp_path):
    """Found by the property test above: a row whose newline was lost and a vertical tab written after it."""
    R.append_row(tmp_path, {"cell_id": "c0", "status": "ok", "v": ""})
    data = (tmp_path / R.JSONL).read_bytes()
    (tmp_path / R.JSONL).write_bytes(data[:-1] + b"\x0b")
    R.append_row(tmp_path, {"cell_id": "new", "status": "ok"})
    lines = (tmp_path / R.JSONL).read_bytes().split(b"\n")[:-1]
    assert [json.loads(line)["cell_id"] for line in lines] == ["c0", "new"]
