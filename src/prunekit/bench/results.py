"""Result rows: the BENCHMARK.md schema, crash-safe appends, CSV rebuild, loading and merging.

Every finished cell is one JSON line appended to ``results.jsonl`` (one ``write`` + flush +
fsync, so a killed run leaves whole lines only); ``results.csv`` is rebuilt from the JSONL
through a temporary file and ``os.replace``. Rows are identified by ``cell_id``; when a cell
appears more than once the best row wins (ok > failed > skipped, then the newest).
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

JSONL = "results.jsonl"
CSV = "results.csv"

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
)


# --------------------------------------------------------------------------------------------- writing
def append_row(out: Path, row: dict[str, Any]) -> None:
    """Append one row to ``out/results.jsonl`` durably (single write, flush, fsync)."""
    out.mkdir(parents=True, exist_ok=True)
    line = json.dumps(row, sort_keys=True, default=_json_default, allow_nan=True) + "\n"
    fd = os.open(out / JSONL, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


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
    """Rewrite ``out/results.jsonl`` with ``rows`` (atomically)."""
    text = "".join(json.dumps(r, sort_keys=True, default=_json_default) + "\n" for r in rows)
    _atomic_write(out / JSONL, text)


def write_csv(out: Path, rows: list[dict[str, Any]] | None = None) -> Path:
    """Rebuild ``out/results.csv`` from the (deduplicated) rows of ``out/results.jsonl``."""
    rows = load_rows(out) if rows is None else rows
    extra = sorted({k for r in rows for k in r} - set(COLUMNS))
    cols = list(COLUMNS) + extra
    out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out, prefix=CSV, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: _csv_value(r.get(k)) for k in cols})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out / CSV)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out / CSV


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    if isinstance(v, str):
        return v.replace("\r", " ")
    return v


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --------------------------------------------------------------------------------------------- reading
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All rows of a JSONL file in order; a torn last line (killed writer) is ignored."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "cell_id" in row:
            rows.append(row)
    return rows


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


def merge(inputs: Iterable[Path], out: Path) -> list[dict[str, Any]]:
    """Merge the results of several output directories into ``out`` (dedupe by cell id).

    Rows already in ``out`` take part, so merging into an existing directory adds to it.
    """
    from prunekit.errors import PrunekitError

    out = Path(out)
    rows: list[dict[str, Any]] = read_jsonl(out / JSONL)
    for d in inputs:
        d = Path(d)
        if not (d / JSONL).is_file():
            raise PrunekitError(f"{str(d)!r} holds no {JSONL} (not a benchmark output directory)")
        rows.extend(read_jsonl(d / JSONL))
    merged = dedupe(rows)
    write_rows_jsonl(out, merged)
    write_csv(out, merged)
    return merged


__all__ = ["COLUMNS", "CSV", "JSONL", "STATUS_FAILED", "STATUS_OK", "STATUS_SKIPPED", "append_row", "dedupe",
           "load_rows", "merge", "read_jsonl", "write_csv", "write_rows_jsonl"]
