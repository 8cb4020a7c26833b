"""Result rows: the BENCHMARK.md schema, crash-safe locked appends, CSV rebuild, loading and merging.

Every finished cell is one JSON line appended to ``results.jsonl`` under a short exclusive OS lock
(``.results.lock``), so that processes running different shards into one folder never interleave
lines. Before appending, a torn last line (a writer killed mid-line: the file does not end in a
newline) is repaired -- completed with a newline when it is a whole row, dropped otherwise -- so it
can never swallow the next row; readers never take a torn or foreign line for a row. ``results.csv``
is rebuilt from the JSONL through a temporary file and ``os.replace``. Rows are identified by
``cell_id`` (a hash of the cell's resolved configuration *and* the base model's content fingerprint);
when a cell appears more than once the best row wins (ok > failed > skipped, then the newest).

:class:`RunLock` is the per-sweep lock (one process per shard of one output folder).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import os
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError
from prunekit.io import atomic_file, atomic_write_text

JSONL = "results.jsonl"
CSV = "results.csv"
APPEND_LOCK = ".results.lock"
#: keys every result row has (a line without them is not a row of ours)
ROW_KEYS = ("cell_id", "status")

STATUS_OK, STATUS_FAILED, STATUS_SKIPPED = "ok", "failed", "skipped"
_STATUS_RANK = {STATUS_OK: 2, STATUS_FAILED: 1, STATUS_SKIPPED: 0}

#: Column order of ``results.csv`` (the BENCHMARK.md row schema); extra keys follow, sorted.
COLUMNS: tuple[str, ...] = (
    "cell_id", "status", "method", "label", "granularity", "family", "options",
    "model", "dataset", "seed", "target", "target_kind", "target_value",
    # achieved ratios (FLOPs are multiply-adds, MACs; flops_speedup skips zero weights)
    "flops_speedup", "dense_flops_speedup", "compression",
    # accuracy and agreement with the base model
    "top1_base", "top5_base", "top1_pruned", "top5_pruned", "top1_finetuned", "top5_finetuned",
    "agreement_pruned", "agreement_finetuned", "top1_final", "agreement_final",
    # size and FLOPs
    "params_base", "params_dense", "params_nonzero", "flops_base", "flops_dense", "flops_effective", "flops_unit",
    # measured CPU latency (median ms) and speedups
    "latency_b1_base_ms", "latency_b1_pruned_ms", "latency_speedup_b1",
    "latency_b64_base_ms", "latency_b64_pruned_ms", "latency_speedup_b64",
    "latency_threads",
    # deployed latency: ONNX Runtime (and TorchScript when asked), and the headline speed-up -- the pruned
    # model in its fastest runtime against the base model in its fastest
    "ort_latency_b1_base_ms", "ort_latency_b1_pruned_ms", "ort_latency_speedup_b1",
    "ort_latency_b64_base_ms", "ort_latency_b64_pruned_ms", "ort_latency_speedup_b64",
    "latency_speedup", "latency_runtime_base", "latency_runtime_pruned", "latency_speedup_batch",
    # GPU latency when the run device is CUDA
    "gpu_latency_b1_base_ms", "gpu_latency_b1_pruned_ms", "gpu_latency_speedup_b1",
    "gpu_latency_b64_base_ms", "gpu_latency_b64_pruned_ms", "gpu_latency_speedup_b64",
    # pruning cost and fine-tuning budget
    "prune_seconds", "prune_peak_mem_mb", "prune_mode", "finetune_epochs", "finetune_lr", "finetune_seconds",
    # bookkeeping
    "error", "traceback", "warnings", "duration_s", "timestamp", "prunekit_version", "torch_version", "machine", "cpu",
    "threads", "device", "config_hash", "experiment",
    # what the row is bound to: the base model's content fingerprint, the hash of the cell's resolved
    # configuration, and the hash of everything but seed and target (rows of one target averaged as seeds share it)
    "base_fingerprint", "cell_config_hash", "seed_group",
)


# --------------------------------------------------------------------------------------------- locks
def _fcntl() -> Any:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no OS locks, a single writer is assumed
        return None
    return fcntl


@contextlib.contextmanager
def appending(out: Path) -> Iterator[None]:
    """Hold the short exclusive lock under which rows are appended and ``results.csv`` is rebuilt."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrunekitError(f"cannot create {str(out)!r}: {e.strerror or e}") from None
    fcntl = _fcntl()
    try:
        fd = os.open(out / APPEND_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise PrunekitError(f"cannot write in {str(out)!r}: {e.strerror or e}") from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as e:
                raise PrunekitError(_no_locks(out, e)) from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _no_locks(out: Path, e: OSError) -> str:
    return (f"cannot lock files in {str(out)!r} ({e.strerror or e}): the file system does not support locks; "
            "write the benchmark to a local directory")


def _busy(e: OSError) -> bool:
    import errno

    return e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)


def _pread(fd: int, n: int, offset: int) -> bytes:
    os.lseek(fd, offset, os.SEEK_SET)
    return os.read(fd, n)


class LockHeld(PrunekitError):
    """Another process holds the lock of this sweep (shard) of this output folder."""


class RunLock:
    """An OS lock (``flock``) on ``OUT/.bench-KEY.lock`` held for a whole run of one shard.

    The lock file records the holder (pid, host, start time, command line); a second process asking
    for the same lock gets :class:`LockHeld` naming it. The OS releases the lock when the holder exits
    or is killed, so a stale file never blocks a rerun.
    """

    def __init__(self, out: Path, key: str):
        self.path = Path(out) / f".bench-{key}.lock"
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        import sys

        fcntl = _fcntl()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if not _busy(e):
                    raise PrunekitError(_no_locks(self.path.parent, e)) from None
                raise LockHeld(f"another prunekit bench is already running this sweep into {str(self.path.parent)!r} "
                               f"({describe_holder(self.path)}); wait for it to finish, or use another --out "
                               "or another --shard") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "argv": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(info) + "\n").encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def describe_holder(path: Path) -> str:
    """``pid 123 on host h since 2026-...`` from a lock file (the holder writes it just after locking)."""
    import time

    info: Any = None
    for _ in range(20):  # the holder may be between taking the lock and writing its details
        try:
            info = json.loads(Path(path).read_text() or "null")
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict):
            break
        time.sleep(0.05)
    if not isinstance(info, dict):
        return f"holder unknown, lock file {str(path)!r}"
    return (f"pid {info.get('pid')} on host {info.get('host')} since {info.get('started')}"
            + (f": {info['argv']}" if info.get("argv") else ""))


# --------------------------------------------------------------------------------------------- writing
def append_row(out: Path, row: dict[str, Any], rebuild_csv: bool = False) -> None:
    """Append one row to ``out/results.jsonl`` durably, under the append lock, after repairing a torn last
    line; ``rebuild_csv`` also rebuilds ``results.csv`` under the same lock (so the last writer's CSV has
    every row)."""
    out = Path(out)
    line = (json.dumps(row, sort_keys=True, default=_json_default, allow_nan=True) + "\n").encode()
    with appending(out):
        _append_locked(out / JSONL, line)
        if rebuild_csv:
            write_csv(out)


def _append_locked(path: Path, line: bytes) -> None:
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        repair_torn_tail(fd)
        view = memoryview(line)
        while view:  # one write in practice; a short write (signal, full disk) continues
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def repair_torn_tail(fd: int) -> str | None:
    """Make the file behind ``fd`` end in a newline; returns what was done (None: nothing to do).

    A last line without its newline is what a writer killed mid-``write`` leaves. When it is a whole
    JSON row it is completed ("completed"); otherwise the fragment is cut off ("dropped").
    """
    size = os.fstat(fd).st_size
    if size == 0 or _pread(fd, 1, size - 1) == b"\n":
        return None
    # find the start of the last line
    start, pos, block = 0, size, 1 << 16
    while pos > 0:
        lo = max(0, pos - block)
        chunk = _pread(fd, pos - lo, lo)
        i = chunk.rfind(b"\n")
        if i >= 0:
            start = lo + i + 1
            break
        pos = lo
    tail = _pread(fd, size - start, start)
    if _parse_row(tail) is not None:  # a whole row: rewritten without any trailing junk whitespace (e.g. \x0b)
        clean = tail.strip()
        if clean != tail:
            os.ftruncate(fd, start)
            os.write(fd, clean)
        os.write(fd, b"\n")
        return "completed"
    os.ftruncate(fd, start)
    return "dropped"


def _json_default(o: Any) -> Any:
    try:
        import torch

        if isinstance(o, torch.Tensor):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def write_rows_jsonl(out: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Rewrite ``out/results.jsonl`` with ``rows`` (atomically, under the append lock)."""
    text = "".join(json.dumps(r, sort_keys=True, default=_json_default) + "\n" for r in rows)
    with appending(Path(out)):
        atomic_write_text(Path(out) / JSONL, text)


def write_csv(out: Path, rows: list[dict[str, Any]] | None = None) -> Path:
    """Rebuild ``out/results.csv`` from the (deduplicated) rows of ``out/results.jsonl`` (atomically)."""
    out = Path(out)
    rows = load_rows(out) if rows is None else rows
    extra = sorted({k for r in rows for k in r} - set(COLUMNS))
    cols = list(COLUMNS) + extra
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / CSV, "w") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore", lineterminator="\r\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k)) for k in cols})
    return out / CSV


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    if isinstance(v, str):
        return v.replace("\r", " ")
    return v


# --------------------------------------------------------------------------------------------- reading
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All rows of a JSONL file in order; a torn line (killed writer) or a line that is not a row is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_bytes().split(b"\n"):
        row = _parse_row(line)
        if row is not None:
            rows.append(row)
    return rows


def _parse_row(line: bytes) -> dict[str, Any] | None:
    line = line.strip()
    if not line:
        return None
    try:
        row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(row, dict) and all(isinstance(row.get(k), str) for k in ROW_KEYS):
        return row
    return None


def better(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The row to keep of two rows of one cell: ok > failed > skipped, then the later one."""
    ra, rb = _STATUS_RANK.get(a.get("status", ""), -1), _STATUS_RANK.get(b.get("status", ""), -1)
    if ra != rb:
        return a if ra > rb else b
    return a if str(a.get("timestamp", "")) > str(b.get("timestamp", "")) else b


def dedupe(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per ``cell_id`` (see :func:`better`), in first-seen order."""
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        cid = r["cell_id"]
        best[cid] = better(best[cid], r) if cid in best else r
    return list(best.values())


def load_rows(out: Path) -> list[dict[str, Any]]:
    """The deduplicated rows of ``out/results.jsonl``."""
    return dedupe(read_jsonl(Path(out) / JSONL))


def base_fingerprints(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    """The base-model fingerprints of ``rows`` and how many rows each has (``"none"``: rows written before
    prunekit recorded fingerprints)."""
    out: dict[str, int] = {}
    for r in rows:
        fp = str(r.get("base_fingerprint") or "none")
        out[fp] = out.get(fp, 0) + 1
    return out


def is_benchmark_dir(d: Path) -> bool:
    """A benchmark output folder: it has ``results.jsonl`` (possibly empty) or the runner's ``config.yaml``."""
    d = Path(d)
    return d.is_dir() and ((d / JSONL).is_file() or ((d / "config.yaml").is_file()
                                                     and "prunekit bench" in _head(d / "config.yaml")))


def _head(path: Path) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(300)
    except OSError:
        return ""


def merge(inputs: Iterable[Path], out: Path) -> list[dict[str, Any]]:
    """Merge the results of several output directories into ``out`` (dedupe by cell id).

    Rows already in ``out`` take part, so merging into an existing directory adds to it. Every row must
    come from the same base model: results of different bases (another checkpoint, even at the same path)
    are refused, naming both fingerprints and where they come from.
    """
    out = Path(out)
    sources: list[tuple[str, list[dict[str, Any]]]] = []
    if (out / JSONL).is_file():
        sources.append((str(out / JSONL), read_jsonl(out / JSONL)))
    for d in inputs:
        d = Path(d)
        if not (d / JSONL).is_file():
            raise PrunekitError(f"{str(d)!r} holds no {JSONL} (not a benchmark output directory)")
        sources.append((str(d / JSONL), read_jsonl(d / JSONL)))
    seen: dict[str, str] = {}  # fingerprint -> first file with it
    for where, rows in sources:
        for fp in base_fingerprints(rows):
            if fp not in seen:
                seen[fp] = where
    if len(seen) > 1:
        (fa, wa), (fb, wb) = list(seen.items())[:2]
        raise PrunekitError(f"refusing to merge results of different base models: {wa} has base fingerprint "
                            f"{fa[:16]}, {wb} has {fb[:16]} (another checkpoint or a retrained base); merge "
                            "shards of one base model only")
    merged = dedupe(r for _, rows in sources for r in rows)
    write_rows_jsonl(out, merged)
    with appending(out):
        write_csv(out, merged)
    return merged


__all__ = ["COLUMNS", "CSV", "JSONL", "STATUS_FAILED", "STATUS_OK", "STATUS_SKIPPED", "LockHeld", "RunLock",
           "append_row", "appending", "base_fingerprints", "dedupe", "describe_holder", "is_benchmark_dir", "load_rows",
           "merge", "read_jsonl", "repair_torn_tail", "write_csv", "write_rows_jsonl"]
