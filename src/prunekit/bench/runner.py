"""The benchmark runner: method x target x seed cells, each independent, resumable and shardable.

>>> from prunekit.bench import load_experiment, Runner
>>> Runner(load_experiment("quick"), "runs/quick").run()

Every cell deep-copies the base model, prunes it with :func:`prunekit.api.prune` (or an
injected ``prune_fn`` with the same signature), evaluates it, fine-tunes it with the budget
shared by all methods, evaluates again and measures size, FLOPs and latency. The finished row
is appended to ``results.jsonl`` before the next cell starts, so a killed run loses at most the
cell in progress and a rerun of the same command skips every finished cell (by ``cell_id``).
A cell that raises is recorded as ``failed`` with the error and the sweep goes on.

Every row is bound to its inputs: ``base_fingerprint`` (SHA-256 of the base model's state dict,
computed once per run), ``cell_config_hash`` (the cell's resolved configuration) and ``cell_id``
(both together), so a replaced checkpoint at the same path is never taken for the old one. One
process runs one shard of a folder (an OS lock, :class:`~prunekit.bench.results.RunLock`); processes
running different shards into one folder share it (appends are locked, and a cell another process
is computing is left to it).
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import os
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from prunekit.bench import results as R
from prunekit.bench.config import Experiment, MethodSpec, dump_experiment, stable_hash
from prunekit.errors import ConfigError, PrunekitError
from prunekit.io import atomic_file, atomic_write_text, clean_stale_tmp

PruneFn = Callable[..., Any]
PREDICTIONS_FILE = "base_predictions.pt"


# --------------------------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class Cell:
    """One unit of work: a method (with options) at one target for one seed, on one base model.

    ``config_hash`` hashes the cell's resolved configuration (base model excluded); ``cell_id`` hashes it
    together with the base model's content fingerprint; ``seed_group`` hashes everything but the seed and the
    target: cells of one target and one seed group differ in their seed alone (the report averages those).
    """

    method: str
    label: str
    options: dict[str, Any]
    target: str
    seed: int
    granularity: str
    family: str
    cell_id: str
    then: tuple[dict[str, Any], ...] = ()  # methods applied after this one ({name, target, options})
    config_hash: str = ""
    seed_group: str = ""
    base_fingerprint: str = ""

    def describe(self) -> str:
        return f"{self.label} {self.target} seed={self.seed}"


def cell_id(config_hash: str, base_fingerprint: str) -> str:
    """The id of a cell: its resolved configuration and the content of its base model."""
    return stable_hash({"cell": config_hash, "base": base_fingerprint}, n=16)


def plan_cells(exp: Experiment, base_fingerprint: str = "") -> list[Cell]:
    """Every cell of the experiment, in a stable order (methods, then targets, then seeds).

    ``base_fingerprint`` (see :func:`model_fingerprint`) binds the cells to one base model; without it the
    ids are provisional (a dry run before the base model exists).
    """
    from prunekit.methods import get_method_info

    cells = []
    for spec in exp.method_specs():
        info = get_method_info(spec.name)
        then = tuple(t.model_dump(mode="json") for t in spec.then)
        for target in exp.targets_for(spec):
            for seed in exp.seeds:
                cfg = exp.cell_config(spec, target, seed)
                h = stable_hash(cfg, n=16)
                group = stable_hash({**cfg, "seed": None, "target": None, "base": base_fingerprint}, n=16)
                cells.append(Cell(spec.name, spec.display, dict(spec.options), target, seed, info.granularity,
                                  info.family, cell_id(h, base_fingerprint), then, h, group, base_fingerprint))
    return cells


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``."""
    if not text:
        return None
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard expects i/n (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {text}: need n >= 1 and 0 <= i < n")
    return i, n


def shard_cells(cells: Sequence[Cell], shard: tuple[int, int] | None) -> list[Cell]:
    """The ``i``-th of every ``n`` cells sorted by config hash: shards ``0/n .. n-1/n`` partition the grid."""
    if shard is None:
        return list(cells)
    i, n = shard
    return sorted(cells, key=lambda c: c.config_hash)[i::n]  # independent of the base model


def filter_methods(cells: Sequence[Cell], methods: Sequence[str] | None) -> list[Cell]:
    """Keep the cells of the named methods (registered name or label)."""
    if not methods:
        return list(cells)
    known = {c.method for c in cells} | {c.label for c in cells}
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ConfigError(f"--methods: {', '.join(unknown)} not in this experiment; its methods: "
                          f"{', '.join(sorted({c.label for c in cells}))}")
    return [c for c in cells if c.method in methods or c.label in methods]


# --------------------------------------------------------------------------------------------- machine
def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from prunekit._version import __version__

    return {"cpu": cpu, "machine": f"{cpu} ({os.cpu_count()} logical cores, {platform.system()})",
            "prunekit_version": __version__, "torch_version": torch.__version__}


def _log(msg: str) -> None:
    """Print to stderr without breaking a running progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(msg, file=sys.stderr)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _short_traceback(exc: BaseException, limit: int = 6, width: int = 2000) -> str:
    frames = traceback.extract_tb(exc.__traceback__)[-limit:]
    text = "".join(traceback.format_list(frames)) + f"{type(exc).__name__}: {exc}"
    return text[-width:]


# --------------------------------------------------------------------------------------------- the run
@dataclass
class RunSummary:
    """What :meth:`Runner.run` did."""

    total: int = 0  # cells in the selected grid (after shard / method filter)
    done_before: int = 0  # finished in an earlier run, not recomputed
    ran: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    failed_before: int = 0  # recorded as failed in an earlier run and not retried
    elsewhere: int = 0  # being computed by another process (another shard into the same folder)
    seconds: float = 0.0
    out: str = ""
    base_fingerprint: str = ""
    outputs: list[str] = field(default_factory=list)

    @property
    def failed_total(self) -> int:
        """Cells of the selected grid whose recorded result is a failure (this run's and earlier ones)."""
        return self.failed + self.failed_before


@dataclass
class _Env:
    """Data, base model and base metrics shared by every cell of a run."""

    device: torch.device
    info: Any
    input_shape: tuple[int, int, int]
    train_ds: Any
    eval_loader: Any
    base_model: nn.Module
    base: dict[str, Any]
    base_preds: torch.Tensor
    prune_loaders: dict[int, Any] = field(default_factory=dict)
    trajectory: Any = None  # the base model's recorded trajectory (Koopman methods), if any


class Runner:
    """Run (or resume) an experiment into ``out``.

    ``prune_fn`` defaults to :func:`prunekit.api.prune`; tests inject a stand-in with the same
    signature ``prune_fn(model, method, target, data=None, *, input_shape, ...) -> result`` whose
    result has ``.model`` and ``.report``. ``retry_failed`` recomputes cells recorded as failed.
    """

    def __init__(
        self,
        exp: Experiment,
        out: str | os.PathLike,
        *,
        prune_fn: PruneFn | None = None,
        progress: bool = True,
        retry_failed: bool = False,
        source: str = "",
        overrides: Sequence[str] = (),
        log: Callable[[str], None] | None = None,
        make_report: bool = True,
    ):
        self.exp = exp
        self.out = Path(out)
        self._prune_fn = prune_fn
        self.progress = progress
        self.retry_failed = retry_failed
        self.source = source
        self.overrides = list(overrides)
        self.log = log or _log
        self.make_report = make_report
        self.machine = machine_info()
        self._fingerprint = ""  # the base model's content fingerprint, computed once per run
        self._base_source = ""
        self._base_loaded: nn.Module | None = None

    # -- public -------------------------------------------------------------------------------------
    def cells(self, shard: tuple[int, int] | None = None, methods: Sequence[str] | None = None) -> list[Cell]:
        """The selected cells, bound to the base model when it is already available (else provisional ids)."""
        fp = self._fingerprint or self._peek_fingerprint()
        return filter_methods(shard_cells(plan_cells(self.exp, fp), shard), methods)

    def run(self, shard: tuple[int, int] | str | None = None, methods: Sequence[str] | None = None) -> RunSummary:
        """Run every pending cell of the (sharded, filtered) grid; returns a summary.

        Raises :class:`~prunekit.bench.results.LockHeld` when another process runs the same selection into
        ``out``, and :class:`~prunekit.errors.PrunekitError` when ``out`` holds results of another base model.
        """
        t_start = time.time()
        if isinstance(shard, str):
            shard = parse_shard(shard)
        check_out_dir(self.out)
        with R.RunLock(self.out, _lock_key(shard, methods)):
            summary = self._run_locked(shard, methods)
        summary.seconds = time.time() - t_start
        return summary

    def _run_locked(self, shard: tuple[int, int] | None, methods: Sequence[str] | None) -> RunSummary:
        from prunekit.methods import get_method_info

        with R.appending(self.out):
            _clean_leftovers(self.out)  # every writer of these files holds this lock
            self._write_config()
        env: _Env | None = None
        model = self._available_base()
        if model is None:  # the base model must be trained first (the data is needed anyway)
            env = self._prepare()
        cells = self.cells(shard, methods)
        existing = {r["cell_id"]: r for r in self._rows_checked()}
        finished = {R.STATUS_OK} if self.retry_failed else {R.STATUS_OK, R.STATUS_FAILED}
        summary = RunSummary(total=len(cells), out=str(self.out), base_fingerprint=self._fingerprint)
        pending: list[Cell] = []
        for c in cells:
            prev = existing.get(c.cell_id)
            if prev is not None and prev.get("status") in finished:
                summary.done_before += 1
                summary.failed_before += prev.get("status") == R.STATUS_FAILED
                continue
            reason = self._skip_reason(get_method_info(c.method))
            if reason:
                summary.skipped += 1
                if prev is None or prev.get("status") != R.STATUS_SKIPPED or prev.get("error") != reason:
                    self._append(self._skipped_row(c, reason))
                continue
            pending.append(c)
        if summary.done_before:
            self.log(f"bench: {summary.done_before} of {len(cells)} cell(s) already finished in {self.out}; "
                     "skipping them")
        threads_before = torch.get_num_threads()
        if pending:
            prune_fn = self._resolve_prune_fn()
            bar = None
            try:
                if self.exp.threads:
                    torch.set_num_threads(self.exp.threads)
                env = env or self._prepare()
                bar = self._bar(len(pending))
                with _CellLocks(self.out) as locks:
                    for c in pending:
                        if bar is not None:
                            bar.set_postfix_str(c.describe(), refresh=True)
                        status = self._run_one(c, env, prune_fn, locks, finished)
                        if status == "elsewhere":
                            summary.elsewhere += 1
                        elif status == "done":
                            summary.done_before += 1
                        else:
                            summary.ran += 1
                            summary.ok += status == R.STATUS_OK
                            summary.failed += status != R.STATUS_OK
                        if bar is not None:
                            bar.update(1)
            finally:
                if bar is not None:
                    bar.close()
                torch.set_num_threads(threads_before)
        if summary.elsewhere:
            self.log(f"bench: {summary.elsewhere} cell(s) were being computed by another process writing into "
                     f"{self.out}; their rows appear when it finishes")
        with R.appending(self.out):
            R.write_csv(self.out)
            if self.make_report:
                summary.outputs = self.report()
        return summary

    def _run_one(self, c: Cell, env: _Env, prune_fn: PruneFn, locks: _CellLocks, finished: set[str]) -> str:
        """Run one cell unless another process is computing it or finished it meanwhile; returns its status,
        ``"elsewhere"`` or ``"done"``."""
        if not locks.try_lock(c.cell_id):
            return "elsewhere"
        try:
            prev = {r["cell_id"]: r for r in R.load_rows(self.out)}.get(c.cell_id)
            if prev is not None and prev.get("status") in finished:
                return "done"
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                row = self.run_cell(c, env, prune_fn)
            if caught:  # kept with the row instead of cluttering the progress display
                msgs = list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))
                row["warnings"] = " | ".join(msgs)[:2000]
            self._append(row)
        finally:
            locks.unlock(c.cell_id)
        if row["status"] != R.STATUS_OK:
            self.log(f"bench: cell {c.describe()} failed: {row['error']}")
        return str(row["status"])

    def _adopt_legacy_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows an older prunekit wrote (no base fingerprint, path-based cell ids), bound to this run's base.

        They are adopted only when the folder's ``base_metrics.json`` names this very base model (by the old
        fingerprint) and every such row is a cell of this experiment; ``results.jsonl`` is then rewritten with
        the new ids and columns (atomically, under the append lock). Otherwise they cannot be trusted: refused.
        """
        legacy = [r for r in rows if not r.get("base_fingerprint")]
        old_base = read_base_metrics(self.out) or {}
        assert self._base_loaded is not None
        if old_base.get("fingerprint") != _legacy_fingerprint(self._base_loaded):
            raise PrunekitError(
                f"{self.out / R.JSONL} holds {len(legacy)} row(s) written by an older prunekit without a base-model "
                f"fingerprint, and {self.out / BASE_METRICS} does not show they come from this run's base model "
                f"({self._base_source}); use a new --out directory (or move the old results away)")
        by_old_id = {_legacy_cell_id(self.exp, c): c for c in plan_cells(self.exp, self._fingerprint)}
        unknown = [r for r in legacy if r["cell_id"] not in by_old_id]
        if unknown:
            raise PrunekitError(
                f"{self.out / R.JSONL} holds {len(unknown)} row(s) written by an older prunekit for cells that are "
                f"not in this experiment (e.g. {unknown[0].get('label') or unknown[0].get('method')} "
                f"{unknown[0].get('target')} seed={unknown[0].get('seed')}); they cannot be bound to a base model: "
                "use a new --out directory")
        upgraded = []
        for r in rows:
            c = by_old_id.get(r["cell_id"]) if not r.get("base_fingerprint") else None
            if c is not None:
                r = {**r, "cell_id": c.cell_id, "legacy_cell_id": r["cell_id"], "base_fingerprint": c.base_fingerprint,
                     "cell_config_hash": c.config_hash, "seed_group": c.seed_group}
            upgraded.append(r)
        R.write_rows_jsonl(self.out, upgraded)
        self.log(f"bench: bound {len(legacy)} row(s) of an older prunekit to this base model "
                 f"({self._fingerprint[:16]}) in {self.out / R.JSONL}")
        return R.dedupe(upgraded)

    def _rows_checked(self) -> list[dict[str, Any]]:
        """The rows of ``out``, refused when they come from another base model than this run's."""
        rows = R.load_rows(self.out)
        fps = R.base_fingerprints(rows)
        if "none" in fps:
            rows = self._adopt_legacy_rows(rows)
            fps = R.base_fingerprints(rows)
        other = [fp for fp in fps if fp != self._fingerprint]
        if other:
            old = other[0]
            raise PrunekitError(
                f"the base model differs from the one the finished cells in {self.out} were computed from "
                f"(weights fingerprint {old[:16]} in {self.out / R.JSONL}, {self._fingerprint[:16]} for this run's "
                f"base from {self._base_source}: was the checkpoint replaced or retrained?); use a new --out "
                "directory, or delete the old results to recompute them all")
        return rows

    def report(self) -> list[str]:
        """Rebuild report.md, the plots and TensorBoard scalars from the results; returns the files written."""
        return build_outputs(self.out, self.log)

    # -- helpers ------------------------------------------------------------------------------------
    def _write_config(self) -> None:
        path = self.out / "config.yaml"
        old_hash = None
        if path.is_file():
            import yaml

            try:
                old = yaml.safe_load(path.read_text()) or {}
                old_hash = Experiment.model_validate(old).config_hash()
            except Exception:  # noqa: BLE001 - an unreadable old config is simply replaced
                old_hash = None
        new_hash = self.exp.config_hash()
        if old_hash is not None and old_hash != new_hash:
            self.log(f"bench: note: {path} described a different experiment (hash {old_hash}, now {new_hash}); "
                     "finished cells of the old one stay in the results but are not recomputed")
        header = (f"# resolved by prunekit bench from {self.source or 'a mapping'}"
                  + (f" with --set {' '.join(self.overrides)}" if self.overrides else "")
                  + f"\n# config hash {new_hash}")
        dump_experiment(self.exp, path, header)

    def _append(self, row: dict[str, Any]) -> None:
        R.append_row(self.out, row, rebuild_csv=True)

    def _skip_reason(self, info: Any) -> str | None:
        if not info.available():
            return (f"skipped: optional package {info.requires!r} is not installed "
                    f"(pip install {info.requires.replace('_', '-')})")
        if getattr(info, "needs_trajectory", False) and self._trajectory_source() is None:
            return ("skipped: the method needs the parameter trajectory of the base model and none was found: "
                    "record one with `prunekit train ... --record-trajectory` (saved beside model.pt), give "
                    "base.trajectory, or let the benchmark train the base (base.train) to record it")
        return None

    def _needs_trajectory(self) -> bool:
        from prunekit.methods import get_method_info

        return any(get_method_info(m.name).needs_trajectory for m in self.exp.method_specs())

    def _trajectory_source(self) -> Path | str | None:
        """Where the base model's trajectory comes from: a folder, ``"record"`` (base trained here), or None."""
        from prunekit.train.trajectory import find_trajectory

        spec = self.exp.base
        if spec.trajectory:
            p = Path(spec.trajectory).expanduser()
            if not p.is_absolute() and self.source and not self.source.startswith("preset:") \
                    and not p.exists():
                p = Path(self.source).parent / p
            return p
        if spec.checkpoint:
            path = self._resolve_checkpoint(spec.checkpoint)
            if path is not None:
                return find_trajectory(path)
        return "record" if spec.train is not None else None

    def _bar(self, total: int) -> Any:
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="bench", unit="cell", dynamic_ncols=True)

    def _resolve_prune_fn(self) -> PruneFn:
        if self._prune_fn is not None:
            return self._prune_fn
        try:
            from prunekit.api import prune
        except ImportError as e:
            raise PrunekitError(f"the pruning engine (prunekit.api.prune) is not available: {e}") from None
        return prune

    def _device(self) -> torch.device:
        if self.exp.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.exp.device)

    def _row_header(self, c: Cell) -> dict[str, Any]:
        from prunekit.methods.base import Target

        t = Target.parse(c.target)
        ft = self.exp.finetune
        return {
            "cell_id": c.cell_id, "method": c.method, "label": c.label, "granularity": c.granularity,
            "family": c.family, "options": json.dumps(c.options, sort_keys=True, default=str),
            "model": self.exp.model, "dataset": self.exp.dataset, "seed": c.seed, "target": c.target,
            "target_kind": t.kind, "target_value": t.value, "finetune_epochs": ft.epochs, "finetune_lr": ft.lr,
            "config_hash": self.exp.config_hash(), "experiment": self.exp.name, "flops_unit": "MACs",
            "base_fingerprint": c.base_fingerprint, "cell_config_hash": c.config_hash, "seed_group": c.seed_group,
            **self.machine,
        }

    def _skipped_row(self, c: Cell, reason: str) -> dict[str, Any]:
        return {**self._row_header(c), "status": R.STATUS_SKIPPED, "error": reason, "timestamp": _now(),
                "duration_s": 0.0}

    # -- data and base model -------------------------------------------------------------------------
    def _prepare(self) -> _Env:
        from prunekit.data import BatchLoader, get_dataset, train_holdout_split
        from prunekit.metrics import count_flops, count_params, evaluate, predictions

        exp = self.exp
        device = self._device()
        kw: dict[str, Any] = dict(exp.dataset_kwargs)
        if exp.dataset != "synthetic":
            kw.update(data_dir=exp.data_dir, download=exp.download)
        self.log(f"bench: loading {exp.dataset}")
        train_ds = get_dataset(exp.dataset, "train", **kw)
        test_ds = get_dataset(exp.dataset, "test", **kw)
        if exp.measure.eval_subset and exp.measure.eval_subset < len(test_ds):
            test_ds = train_holdout_split(test_ds, exp.measure.eval_subset, seed=0)[1]
        info = train_ds.info
        input_shape = tuple(int(s) for s in info.input_size)
        eval_loader = BatchLoader(test_ds, batch_size=exp.measure.eval_batch_size, device=device)
        if self._base_loaded is not None:
            base_model = self._base_loaded
        else:
            base_model = self._base_model(train_ds, test_ds, device)
            self._set_base(base_model, self._base_source or "the base model trained here")
        base_model = base_model.to(device).eval()
        fingerprint = self._fingerprint
        self._rows_checked()  # before anything is written: refuse results of another base model
        self.log("bench: measuring the base model")
        ev = evaluate(base_model, eval_loader, device=device)
        preds, _ = predictions(base_model, eval_loader, device=device)
        sizes = count_params(base_model)
        base = {"top1": ev["top1"], "top5": ev["top5"], "per_class": ev.get("per_class"), "params": sizes["params"],
                "nonzero_params": sizes["nonzero_params"], "flops": count_flops(base_model, input_shape),
                "latency": self._latency(base_model, input_shape, device), "fingerprint": fingerprint}
        if exp.measure.epoch_time:
            base["epoch_seconds"] = self._epoch_seconds(base_model, train_ds, device)
            self.log(f"bench: one training epoch of the base model took {base['epoch_seconds']:.1f} s")
        self._write_base_files(base, preds)
        self.log(f"bench: base model top1={base['top1']:.4f} params={base['params']:,} flops={base['flops']:,}")
        env = _Env(device, info, input_shape, train_ds, eval_loader, base_model, base, preds)
        env.trajectory = self._load_trajectory()
        return env

    def _load_trajectory(self) -> Any:
        if not self._needs_trajectory():
            return None
        from prunekit.train.trajectory import Trajectory, TrajectoryError, find_trajectory

        src = self._trajectory_source()
        if src == "record":  # the base was trained (or found in the cache) here
            src = find_trajectory(self._cached_base_path())
        if src is None:
            return None
        try:
            traj = Trajectory.load(src)
        except TrajectoryError as e:
            raise ConfigError(f"base.trajectory: {e}") from None
        self.log(f"bench: parameter trajectory from {traj.path} ({traj.t} snapshots)")
        return traj

    def _epoch_seconds(self, base_model: nn.Module, train_ds: Any, device: torch.device) -> float:
        """Wall time of one training epoch of a copy of the base model (the fine-tuning spec, or the default
        one when fine-tuning is off), so that pruning times can be compared with training in the same run."""
        from prunekit.bench.config import TrainSpec

        spec = self.exp.finetune if self.exp.finetune.epochs > 0 else TrainSpec()
        spec = spec.model_copy(update={"epochs": 1.0})
        model = copy.deepcopy(base_model).to(device)
        cfg = train_config(spec, seed=0)
        t0 = time.perf_counter()
        _trainer(model, cfg, self._train_loader(train_ds, spec, 0, device), device, quiet=True).fit()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    def _write_base_files(self, base: dict[str, Any], preds: torch.Tensor) -> None:
        """``base_metrics.json`` and ``base_predictions.pt``, each atomically, under the append lock; an existing
        ``base_metrics.json`` of another base model (no rows refer to it: checked before) is replaced with a note."""
        path = self.out / BASE_METRICS
        with R.appending(self.out):
            old = read_base_metrics(self.out)
            if old is not None and old.get("fingerprint") not in (
                    base["fingerprint"], self._base_loaded is not None and _legacy_fingerprint(self._base_loaded)):
                self.log(f"bench: note: {path} described another base model (fingerprint "
                         f"{str(old.get('fingerprint'))[:16]}); replacing it")
            with atomic_file(self.out / PREDICTIONS_FILE) as f:
                torch.save(preds, f)
            atomic_write_text(path, json.dumps(base, indent=2, default=str) + "\n")

    def _set_base(self, model: nn.Module, source: str) -> None:
        self._base_loaded = model
        self._fingerprint = model_fingerprint(model)
        self._base_source = source

    def _available_base(self) -> nn.Module | None:
        """The base model when it exists on disk (the checkpoint, or the cached trained one), loaded and
        fingerprinted; None when it has to be trained first."""
        from prunekit.io import load

        if self._base_loaded is not None:
            return self._base_loaded
        spec = self.exp.base
        path = self._resolve_checkpoint(spec.checkpoint) if spec.checkpoint else None
        if path is None and spec.train is not None:
            cached = self._cached_base_path()
            path = cached if cached.is_file() else None
        if path is None:
            if spec.train is None:
                raise ConfigError(f"base.checkpoint {spec.checkpoint!r} does not exist and no base.train spec is given")
            return None
        self.log(f"bench: base model from {path}")
        model = load(path)
        self._check_base(model, str(path))
        self._set_base(model.eval(), str(path))
        return model

    def _peek_fingerprint(self) -> str:
        """The base fingerprint when the base model is on disk, else "" (nothing is trained for a dry run)."""
        try:
            return self._fingerprint if self._available_base() is not None else ""
        except PrunekitError:
            return ""

    def _base_model(self, train_ds: Any, test_ds: Any, device: torch.device) -> nn.Module:
        """The base model: the checkpoint when it exists, else trained here (once: cached by configuration)."""
        spec = self.exp.base
        if spec.checkpoint:
            path = self._resolve_checkpoint(spec.checkpoint)
            if path is not None:
                model = self._available_base()
                assert model is not None
                return model
            if spec.train is None:
                raise ConfigError(f"base.checkpoint {spec.checkpoint!r} does not exist and no base.train spec is given")
            self.log(f"bench: {spec.checkpoint} not found; training the base model instead")
        assert spec.train is not None
        path = self._cached_base_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(path.with_name(f".{path.name}.lock")):  # one process trains, the others wait for it
            return self._train_base(path, train_ds, device)

    def _train_base(self, path: Path, train_ds: Any, device: torch.device) -> nn.Module:
        from prunekit.io import load, save
        from prunekit.models import create_model_for_dataset
        from prunekit.train import config_dict, seed_everything

        exp, spec = self.exp, self.exp.base
        assert spec.train is not None
        key = path.stem.rpartition("-")[2]
        if path.is_file():
            self.log(f"bench: base model from cache {path}")
            model = load(path)
            self._check_base(model, str(path))
            self._base_source = str(path)
            return model
        self.log(f"bench: training base model {exp.model} on {exp.dataset} for {spec.train.epochs:g} epoch(s)")
        seed_everything(spec.train.seed)
        model = create_model_for_dataset(exp.model, train_ds.info, **exp.model_kwargs)
        t0 = time.time()
        cfg = train_config(spec.train, seed=spec.train.seed)
        callbacks = []
        if self._needs_trajectory() and not spec.trajectory:
            from prunekit.train.trajectory import TrajectoryRecorder

            callbacks.append(TrajectoryRecorder(path.with_name(path.stem + ".trajectory")))
            self.log("bench: recording the parameter trajectory of the last epoch (Koopman methods)")
        _trainer(model, cfg, self._train_loader(train_ds, spec.train, spec.train.seed, device), device,
                 quiet=not self.progress, callbacks=callbacks).fit()
        model.to("cpu").eval()
        if cfg.channels_last:
            model.to(memory_format=torch.contiguous_format)
        save(model, path, meta={"dataset": exp.dataset, "train_config": config_dict(cfg),
                                "train_seconds": round(time.time() - t0, 1), "bench_key": key})
        self.log(f"bench: base model trained in {time.time() - t0:.0f} s, cached at {path}")
        self._base_source = str(path)
        return model

    def _cached_base_path(self) -> Path:
        """Where a base model trained by the benchmark is cached (by the hash of its configuration)."""
        exp, spec = self.exp, self.exp.base
        found = self._resolve_checkpoint(spec.checkpoint) if spec.checkpoint else None
        if found is not None or spec.train is None:
            return found or Path(str(spec.checkpoint))
        key = stable_hash({"model": exp.model, "model_kwargs": exp.model_kwargs, "dataset": exp.dataset,
                           "dataset_kwargs": exp.dataset_kwargs, "train": spec.train.model_dump(mode="json")})
        cache = Path(spec.cache_dir).expanduser() if spec.cache_dir else self.out / "base"
        return cache / f"{exp.model}-{exp.dataset}-{key}.pt"

    def _resolve_checkpoint(self, ckpt: str) -> Path | None:
        p = Path(ckpt).expanduser()
        candidates = [p]
        if not p.is_absolute() and self.source and not self.source.startswith("preset:"):
            candidates.append(Path(self.source).parent / p)
        for c in candidates:
            if c.is_file():
                return c
        return None

    def _check_base(self, model: nn.Module, where: str) -> None:
        cfg = getattr(model, "prunekit_config", {}) or {}
        if cfg.get("name") and cfg["name"] != self.exp.model:
            raise ConfigError(f"{where} holds a {cfg['name']!r} model but the experiment says model: "
                              f"{self.exp.model!r}")
        ds = (getattr(model, "prunekit_meta", {}) or {}).get("dataset")
        if ds and ds != self.exp.dataset:
            raise ConfigError(f"{where} was trained on {ds!r} but the experiment says dataset: {self.exp.dataset!r}")

    @staticmethod
    def _train_loader(ds: Any, spec: Any, seed: int, device: torch.device) -> Any:
        from prunekit.data import BatchLoader

        augment = True if spec.augment is None else bool(spec.augment)
        return BatchLoader(ds, batch_size=spec.batch_size, shuffle=True, augment=augment, seed=seed,
                           drop_last=len(ds) > spec.batch_size, device=device)

    def _prune_loader(self, env: _Env, seed: int) -> Any:
        from prunekit.data import BatchLoader, train_holdout_split

        n = self.exp.prune.prune_set
        if n <= 0:
            return None
        if seed not in env.prune_loaders:
            ds = env.train_ds if n >= len(env.train_ds) else train_holdout_split(env.train_ds, n, seed=seed)[1]
            env.prune_loaders[seed] = BatchLoader(ds, batch_size=self.exp.prune.batch_size, shuffle=False,
                                                  augment=False, seed=seed, device=env.device)
        return env.prune_loaders[seed]

    def _latency(self, model: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> dict[str, Any]:
        """CPU latency (and GPU latency when running on CUDA) of a copy with masks baked in."""
        from prunekit.metrics import measure_latency

        m = self.exp.measure
        if not m.latency:
            return {}
        kw = {"batch_sizes": m.latency_batch_sizes, "warmup": m.latency_warmup, "repeats": m.latency_repeats,
              "time_budget_s": m.latency_budget_s}
        plain = _baked_copy(model, "cpu")
        out: dict[str, Any] = {"cpu": measure_latency(plain, input_shape, threads=m.threads, **kw)}
        if device.type == "cuda" and m.gpu_latency:
            out["gpu"] = measure_latency(plain.to(device), input_shape, **kw)
        return out

    def _runtime_columns(self, base: nn.Module, pruned: nn.Module, input_shape: tuple[int, ...],
                         row: dict[str, Any]) -> dict[str, Any]:
        """Latency in the deployment runtimes (base and pruned alternately) and the headline speed-up:
        the pruned model in its fastest runtime against the base in its fastest (eager included)."""
        from prunekit.deploy import measure_runtimes

        m = self.exp.measure
        lat = measure_runtimes({"base": base, "pruned": pruned}, input_shape, runtimes=list(m.runtimes),
                               batch_sizes=m.latency_batch_sizes, threads=m.threads, rounds=1,
                               warmup=m.latency_warmup, repeats=m.latency_repeats, time_budget_s=m.latency_budget_s)
        return _runtime_row(lat, row, m.latency_batch_sizes)

    def _engine_kwargs(self, prune_fn: PruneFn, c: Cell, device: torch.device) -> dict[str, Any]:
        """Engine options for one cell, limited to those ``prune_fn`` names in its signature.

        Weight (unstructured) methods are applied masked so that fine-tuning keeps the pruned
        weights at zero; structured methods physically, so that latency can improve.
        """
        import inspect

        p = self.exp.prune
        mode = p.mode or ("masked" if c.granularity == "weight" else "physical")
        wanted = {"mode": mode, "scope": p.scope, "round_to": p.round_to, "rounds": p.rounds, "floor": p.floor,
                  "cap": p.cap, "latency_aware": p.latency_aware, "device": device, "copy": False}
        try:
            names = set(inspect.signature(prune_fn).parameters)
        except (TypeError, ValueError):
            names = set()
        return {k: v for k, v in wanted.items() if v is not None and k in names}

    def _cascade_kwargs(self, prune_fn: PruneFn, c: Cell, env: _Env) -> dict[str, Any]:
        """``prune.round_epochs``: the engine's retraining between rounds (the cascade), none after the last."""
        import inspect

        p = self.exp.prune
        if not p.round_epochs or (p.rounds or 1) < 2 or self.exp.prune_train is not None:
            return {}
        try:
            names = set(inspect.signature(prune_fn).parameters)
        except (TypeError, ValueError):
            names = set()
        if not {"finetune", "finetune_last"} <= names:
            raise ConfigError("prune.round_epochs needs a prune function that takes finetune / finetune_last")
        return {"finetune": _RoundRetrain(self, c, env, float(p.round_epochs)), "finetune_last": False}

    # -- one cell ------------------------------------------------------------------------------------
    def run_cell(self, c: Cell, env: _Env, prune_fn: PruneFn) -> dict[str, Any]:
        """Prune, measure, fine-tune and measure one cell; never raises for a failing method."""
        from prunekit.methods import get_method_info
        from prunekit.metrics import count_flops, count_params, effective_flops, evaluate
        from prunekit.train import seed_everything

        exp, base = self.exp, env.base
        row = self._row_header(c)
        row.update({"top1_base": base["top1"], "top5_base": base["top5"], "params_base": base["params"],
                    "flops_base": base["flops"], "device": env.device.type, "threads": torch.get_num_threads()})
        t_cell = time.time()
        try:
            seed_everything(c.seed)
            model = copy.deepcopy(env.base_model).to(env.device)
            data = self._prune_loader(env, c.seed)
            engine_kw = self._engine_kwargs(prune_fn, c, env.device)
            engine_kw.update(self._cascade_kwargs(prune_fn, c, env))
            row["prune_mode"] = engine_kw.get("mode")
            if env.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(env.device)
            t0 = time.perf_counter()
            if exp.prune_train is not None:  # prune-and-train instead of one-shot pruning
                result = self._prune_train(c, env, model)
                row.update(result.columns)
            else:
                if env.trajectory is not None and get_method_info(c.method).needs_trajectory:
                    engine_kw["trajectory"] = env.trajectory
                result = prune_fn(model, c.method, c.target, data=data, input_shape=env.input_shape, **engine_kw,
                                  **c.options)
                if c.then:
                    result = self._then(c, env, prune_fn, result, data, row)
                row.update(_score_memory_columns([getattr(p, "meta", {}) or {}
                                                  for p in getattr(result, "plans", None) or []]))
            prune_wall = time.perf_counter() - t0
            pruned: nn.Module = getattr(result, "model", result)
            report = dict(getattr(result, "report", None) or {})
            row["prune_seconds"] = _first(report, ("prune_seconds", "seconds", "time_s")) or prune_wall
            row.update(_cascade_columns(engine_kw, report, self.exp.prune.round_epochs))
            row["prune_peak_mem_mb"] = _peak_mb(report, env.device)
            if base.get("epoch_seconds"):
                row["epoch_seconds"] = base["epoch_seconds"]
                row["prune_epoch_ratio"] = row["prune_seconds"] / base["epoch_seconds"]
            pruned.to(env.device).eval()

            ev = evaluate(pruned, env.eval_loader, reference=env.base_preds, device=env.device)
            row.update({"top1_pruned": ev["top1"], "top5_pruned": ev["top5"], "agreement_pruned": ev["agreement"]})
            ft = exp.finetune
            if ft.epochs > 0:
                t1 = time.time()
                cfg = train_config(ft, seed=c.seed)
                _trainer(pruned, cfg, self._train_loader(env.train_ds, ft, c.seed, env.device), env.device,
                         quiet=True).fit()
                if cfg.channels_last:
                    pruned.to(memory_format=torch.contiguous_format)
                pruned.eval()
                row["finetune_seconds"] = time.time() - t1
                ev = evaluate(pruned, env.eval_loader, reference=env.base_preds, device=env.device)
                row.update({"top1_finetuned": ev["top1"], "top5_finetuned": ev["top5"],
                            "agreement_finetuned": ev["agreement"]})
            row["top1_final"] = row.get("top1_finetuned", row["top1_pruned"])
            row["agreement_final"] = row.get("agreement_finetuned", row["agreement_pruned"])
            if ev.get("per_class") and base.get("per_class"):  # per-class top-1, base and final
                row["per_class_final"] = ev["per_class"]
                row["per_class_base"] = base["per_class"]

            sizes = count_params(pruned)
            flops_dense = count_flops(pruned, env.input_shape)
            flops_eff = effective_flops(pruned, env.input_shape)
            row.update({
                "params_dense": sizes["params"], "params_nonzero": sizes["nonzero_params"],
                "flops_dense": flops_dense, "flops_effective": flops_eff,
                "compression": base["params"] / max(1, sizes["nonzero_params"]),
                "flops_speedup": base["flops"] / max(1, flops_eff),
                "dense_flops_speedup": base["flops"] / max(1, flops_dense),
            })
            if exp.measure.latency:
                # the base model is timed again right before the pruned one, so that the speedup compares
                # two measurements under the same machine load
                base_lat = (self._latency(env.base_model, env.input_shape, env.device)
                            if exp.measure.rebase_latency else base["latency"])
                row.update(_latency_columns(base_lat, self._latency(pruned, env.input_shape, env.device)))
                row.update(self._runtime_columns(env.base_model, pruned, env.input_shape, row))
            for k in _REPORT_KEYS:  # the engine's own view, for reference
                v = report.get(k)
                if isinstance(v, (int, float, str, bool)):
                    row[f"report_{k}"] = v
            if report.get("warnings"):
                row["report_warnings"] = len(report["warnings"])
            if isinstance(report.get("layers"), dict):  # per layer [out, in] before / after, weight sparsity
                row["layers"] = {p: {"before": v.get("before"), "after": v.get("after"),
                                     "sparsity": v.get("sparsity")} for p, v in report["layers"].items()}
            row["status"] = R.STATUS_OK
            row["error"] = None
        except Exception as e:  # noqa: BLE001 - a failing cell is recorded, the sweep goes on
            row.update({"status": R.STATUS_FAILED, "error": f"{type(e).__name__}: {e}"[:1000],
                        "traceback": _short_traceback(e)})
        row["duration_s"] = round(time.time() - t_cell, 3)
        row["timestamp"] = _now()
        return row


    # -- prune-and-train cells ----------------------------------------------------------------------
    def _then(self, c: Cell, env: _Env, prune_fn: PruneFn, result: Any, data: Any, row: dict[str, Any]) -> Any:
        """Apply the cell's ``then`` methods in turn to the pruned model; returns the last result, whose report
        gets the summed pruning time. ``row["chain"]`` records every step's target, time and size."""
        from prunekit.methods import get_method_info

        steps = [{"method": c.method, "target": c.target, **self._step_summary(result)}]
        total = steps[0]["prune_seconds"]
        for step in c.then:
            info = get_method_info(step["name"])
            kw = self._engine_kwargs(prune_fn, replace(c, granularity=info.granularity), env.device)
            result = prune_fn(getattr(result, "model", result), step["name"], step["target"], data=data,
                              input_shape=env.input_shape, **kw, **step["options"])
            steps.append({"method": step["name"], "target": step["target"], **self._step_summary(result)})
            total += steps[-1]["prune_seconds"]
        row["chain"] = json.dumps(steps)
        report = getattr(result, "report", None)
        if isinstance(report, dict):
            report["prune_seconds"] = total
        return result

    @staticmethod
    def _step_summary(result: Any) -> dict[str, Any]:
        from prunekit.metrics import count_params

        report = dict(getattr(result, "report", None) or {})
        return {"prune_seconds": float(_first(report, ("prune_seconds", "seconds", "time_s")) or 0.0),
                "params": count_params(getattr(result, "model", result))["params"]}

    def _prune_train(self, c: Cell, env: _Env, base_copy: nn.Module) -> _PruneTrainResult:
        """Prune-and-train one cell (``exp.prune_train``): from a fresh init (seeded by the cell's seed) or the
        base model, the rounds of training + scoring + removal; the final training is the cell's fine-tuning."""
        from prunekit.methods.base import Target
        from prunekit.models import create_model_for_dataset
        from prunekit.prune_train import prune_and_train

        exp, pt = self.exp, self.exp.prune_train
        assert pt is not None
        if pt.start == "init":
            model = create_model_for_dataset(exp.model, env.train_ds.info, **exp.model_kwargs).to(env.device)
        else:
            model = base_copy
        t = Target.parse(c.target)
        if t.kind != "ratio":
            raise ConfigError(f"prune_train needs a ratio=P target (fraction of filters removed), not {c.target}")
        loader = self._train_loader(env.train_ds, pt, c.seed, env.device)
        t0 = time.perf_counter()
        model, hist = prune_and_train(
            model, c.method, t.value, pt.rounds, loader, None, epochs_per_round=pt.epochs_per_round,
            final_epochs=0, lr=pt.lr, momentum=pt.momentum, wd=pt.weight_decay, batch_size=pt.batch_size,
            thresholds=pt.thresholds, preserve_moment=pt.preserve_moment, warmup_epochs=pt.warmup_epochs,
            train_temperature=pt.train_temperature, input_shape=env.input_shape, device=env.device, seed=c.seed,
            progress=False, **c.options)
        wall = time.perf_counter() - t0
        rounds = hist.get("rounds") or []
        score_s = sum(float(r.get("score_seconds") or 0.0) for r in rounds)
        ch = hist.get("channels") or {}
        cols: dict[str, Any] = {
            "pt_from": pt.start, "pt_rounds": len(rounds), "pt_epochs_per_round": pt.epochs_per_round,
            "pt_warmup_epochs": pt.warmup_epochs, "pt_lr": pt.lr, "pt_score_seconds": score_s,
            "pt_train_seconds": wall - score_s, "pt_preserve_moment": hist.get("preserve_moment"),
            "filters_original": ch.get("original"), "filters_kept": ch.get("final"),
            "filter_fraction_removed": (1 - ch["final"] / ch["original"]) if ch.get("original") else None,
            "pt_widths": json.dumps(ch.get("widths") or {}, sort_keys=True),
        }
        cols.update(_score_memory_columns([r.get("plan_meta") or {} for r in rounds]))
        report = {"prune_seconds": wall}
        if cols.get("score_mem_mb") is not None:
            report.update(peak_memory_delta_mb=cols["score_mem_mb"],
                          peak_memory_method=f"{cols.get('score_mem_source')} (scoring pass, max over rounds)")
        return _PruneTrainResult(model, report, cols)


def _cascade_columns(engine_kw: dict[str, Any], report: dict[str, Any], epochs: Any) -> dict[str, Any]:
    """A cascade cell's retraining between rounds and the reduction reached after each round."""
    if "finetune" not in engine_kw:
        return {}
    return {"cascade_round_epochs": epochs, "cascade_retrain_seconds": report.get("finetune_seconds"),
            "round_achieved": json.dumps(report.get("round_achieved"))}


class _RoundRetrain:
    """The cascade's retraining after a round: ``epochs`` epochs with the experiment's fine-tuning settings on the
    training set (a fresh data order per round), as the cell's final fine-tune trains."""

    def __init__(self, runner: Runner, c: Cell, env: _Env, epochs: float):
        self.runner, self.cell, self.env, self.epochs = runner, c, env, epochs
        self.calls = 0

    def __call__(self, model: nn.Module, epochs: float) -> None:
        ft, seed = self.runner.exp.finetune, self.cell.seed + 1000 * (self.calls + 1)
        cfg = replace(train_config(ft, seed=seed), epochs=epochs)
        loader = self.runner._train_loader(self.env.train_ds, ft, seed, self.env.device)
        _trainer(model, cfg, loader, self.env.device, quiet=True).fit()
        if cfg.channels_last:
            model.to(memory_format=torch.contiguous_format)
        self.calls += 1


@dataclass
class _PruneTrainResult:
    model: nn.Module
    report: dict[str, Any]
    columns: dict[str, Any]


def _score_memory_columns(metas: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Peak memory of the gradient-flow scoring passes (``meta["score_memory"]`` / ``["grasp_memory"]`` of the
    plans or rounds; see :class:`prunekit.methods.gradflow.PeakMemory`), the maximum over rounds, in MiB:
    ``score_mem_mb`` (torch's own allocations on CPU, from the profiler; CUDA peak allocation on a GPU),
    ``score_rss_mem_mb`` (increase of the process's sampled resident set), and ``grasp_mem_mb`` for the
    Hessian-gradient measures (gf_grasp, gf_grad_preserve)."""
    out: dict[str, Any] = {}
    for key, col in (("score_memory", "score_mem"), ("grasp_memory", "grasp_mem")):
        mems = []
        for m in metas:
            mem = m.get(key) or (m.get("gradflow") or {}).get(key)
            if isinstance(mem, dict) and isinstance(mem.get("increase_bytes"), (int, float)):
                mems.append(mem)
        if not mems:
            continue
        top = max(mems, key=lambda d: d["increase_bytes"])
        out[f"{col}_mb"] = top["increase_bytes"] / 2**20
        out[f"{col}_source"] = top.get("source")
        rss = [d["rss_increase_bytes"] for d in mems if isinstance(d.get("rss_increase_bytes"), (int, float))]
        if rss:
            out[f"{col.replace('_mem', '_rss_mem')}_mb"] = max(rss) / 2**20
    return out


# --------------------------------------------------------------------------------------------- helpers
def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over a model's state dict (sorted names, dtypes, shapes, bytes): the base model's content
    fingerprint (see :func:`prunekit.io.state_fingerprint`)."""
    from prunekit.io import state_fingerprint

    return state_fingerprint(model)


BASE_METRICS = "base_metrics.json"


def _legacy_fingerprint(model: nn.Module) -> str:
    """The base fingerprint prunekit wrote into ``base_metrics.json`` before rows carried one (to adopt old rows)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _legacy_cell_id(exp: Experiment, c: Cell) -> str:
    """The path-based cell id of prunekit before rows were bound to their base model (to adopt old rows)."""
    return stable_hash({"method": c.method, "options": c.options, "target": c.target, "seed": c.seed,
                        "config": exp.config_hash(), **({"then": list(c.then)} if c.then else {})})


def read_base_metrics(out: Path, fingerprint: str | None = None) -> dict[str, Any] | None:
    """``OUT/base_metrics.json``, or None when it is missing, unreadable or -- with ``fingerprint`` -- of
    another base model."""
    try:
        d = json.loads((Path(out) / BASE_METRICS).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(d, dict) or (fingerprint is not None and d.get("fingerprint") != fingerprint):
        return None
    return d


def check_out_dir(out: Path) -> None:
    """``--out``: a directory that can be created and written, checked before any work (else exit 2)."""
    from prunekit.io import writable_dir

    writable_dir(out, ConfigError)


def _clean_leftovers(out: Path) -> list[Path]:
    """Temporary files a killed run left in ``out`` (hidden ``.NAME.*.tmp``, and the ``NAME*.tmp`` of older
    versions for the files the benchmark writes); call with the append lock held."""
    removed = clean_stale_tmp(out)
    for name in (R.JSONL, R.CSV, "config.yaml", "report.md", BASE_METRICS, PREDICTIONS_FILE):
        for p in out.glob(f"{name}*.tmp"):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def _lock_key(shard: tuple[int, int] | None, methods: Sequence[str] | None) -> str:
    """The run-lock name of a selection: the shard, and the method filter when there is one."""
    key = "all" if shard is None else f"shard{shard[0]}of{shard[1]}"
    return key + (f"-{stable_hash(sorted(methods), n=8)}" if methods else "")


class _file_lock:  # noqa: N801 - a context manager
    """A blocking exclusive ``flock`` on ``path`` (created); released on exit."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> _file_lock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl = R._fcntl()
        if fcntl is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX)
            except OSError as e:
                os.close(self.fd)
                raise PrunekitError(R._no_locks(self.path.parent, e)) from None
        return self

    def __exit__(self, *exc: Any) -> None:
        os.close(self.fd)


class _CellLocks:
    """Non-blocking per-cell locks: a byte-range lock per cell id in ``OUT/.cells.lock`` (one file, however
    many cells). A cell another process holds is left to it."""

    def __init__(self, out: Path):
        self.path = Path(out) / ".cells.lock"
        self.fd: int | None = None

    def __enter__(self) -> _CellLocks:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases every lock of this process on the file
            self.fd = None

    @staticmethod
    def _offset(cid: str) -> int:
        return int(hashlib.sha1(cid.encode()).hexdigest()[:8], 16)

    def try_lock(self, cid: str) -> bool:
        fcntl = R._fcntl()
        if fcntl is None or self.fd is None:
            return True
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, self._offset(cid))
        except OSError as e:
            if not R._busy(e):
                raise PrunekitError(R._no_locks(self.path.parent, e)) from None
            return False
        return True

    def unlock(self, cid: str) -> None:
        fcntl = R._fcntl()
        if fcntl is not None and self.fd is not None:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, self._offset(cid))


def train_config(spec: Any, seed: int) -> Any:
    """A :class:`prunekit.train.TrainConfig` from a :class:`~prunekit.bench.config.TrainSpec`."""
    from prunekit.train import TrainConfig

    return TrainConfig(epochs=spec.epochs, lr=spec.lr, optimizer=spec.optimizer, momentum=spec.momentum,
                       nesterov=spec.nesterov, weight_decay=spec.weight_decay, schedule=spec.schedule,
                       milestones=tuple(spec.milestones), gamma=spec.gamma, warmup_epochs=spec.warmup_epochs,
                       label_smoothing=spec.label_smoothing, channels_last=spec.channels_last, amp=spec.amp,
                       seed=seed)


def _trainer(model: nn.Module, cfg: Any, loader: Any, device: torch.device, quiet: bool,
             callbacks: Sequence[Any] = ()) -> Any:
    """A :class:`prunekit.train.Trainer`; ``quiet`` turns off its progress bar and per-epoch lines."""
    from prunekit.train import Trainer

    return Trainer(model, cfg, loader, device=device, progress=not quiet, log_epochs=not quiet,
                   callbacks=callbacks)


def _baked_copy(model: nn.Module, device: str | torch.device) -> nn.Module:
    """A copy on ``device`` with masks folded into plain weights (no parametrization overhead)."""
    m = copy.deepcopy(model).to(device).eval()
    try:
        from prunekit.surgery.masks import remove_masks_

        remove_masks_(m)
    except Exception:  # noqa: BLE001 - a model without masks needs nothing
        pass
    return m


def _first(d: dict[str, Any], keys: Sequence[str]) -> Any:
    for k in keys:
        if isinstance(d.get(k), (int, float)) and not isinstance(d.get(k), bool):
            return d[k]
    return None


_REPORT_KEYS = ("mode", "scope", "round_to", "rounds", "achieved", "target_error", "peak_memory_mb",
                "peak_memory_delta_mb", "peak_memory_method", "peak_cuda_memory_mb")


def _peak_mb(report: dict[str, Any], device: torch.device) -> float | None:
    """Peak memory of the pruning step itself, in MiB.

    On a GPU the engine's (else torch's) peak CUDA allocation; on the CPU the engine's increase of
    the resident-set high-water mark over the step (the process's own baseline excluded).
    """
    keys = ("peak_cuda_memory_mb",) if device.type == "cuda" else ("peak_memory_delta_mb", "peak_memory_mb")
    for k in keys:
        v = report.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def _latency_columns(base: dict[str, Any], pruned: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dev, prefix in (("cpu", ""), ("gpu", "gpu_")):
        b, p = base.get(dev) or {}, pruned.get(dev) or {}
        for k, v in p.items():
            if not k.isdigit():
                continue
            out[f"{prefix}latency_b{k}_pruned_ms"] = v
            if isinstance(b.get(k), (int, float)):
                out[f"{prefix}latency_b{k}_base_ms"] = b[k]
                out[f"{prefix}latency_speedup_b{k}"] = b[k] / v if v > 0 else None
        if dev == "cpu" and "threads" in p:
            out["latency_threads"] = p["threads"]
    return out


_RUNTIME_PREFIX = {"onnxruntime": "ort_", "torchscript": "ts_"}


def _runtime_row(lat: dict[str, Any], row: dict[str, Any], batch_sizes: list[int]) -> dict[str, Any]:
    """Columns ``ort_latency_b64_pruned_ms`` ... from :func:`prunekit.deploy.measure_runtimes`, and the headline
    ``latency_speedup`` (largest batch) with ``latency_runtime_base`` / ``latency_runtime_pruned``."""
    out: dict[str, Any] = {}
    times: dict[str, dict[str, tuple[float, float]]] = {}  # batch -> runtime -> (base, pruned)
    for bs in map(str, batch_sizes):
        b, p = row.get(f"latency_b{bs}_base_ms"), row.get(f"latency_b{bs}_pruned_ms")
        if isinstance(b, (int, float)) and isinstance(p, (int, float)):
            times.setdefault(bs, {})["eager"] = (b, p)
    for rt, res in lat.get("runtimes", {}).items():
        pre = _RUNTIME_PREFIX[rt]
        for bs, p in res["pruned"].items():
            b = res["base"][bs]
            out.update({f"{pre}latency_b{bs}_base_ms": b, f"{pre}latency_b{bs}_pruned_ms": p,
                        f"{pre}latency_speedup_b{bs}": b / p if p > 0 else None})
            times.setdefault(bs, {})[rt] = (b, p)
    for rt, why in lat.get("skipped", {}).items():
        out[f"{_RUNTIME_PREFIX[rt]}latency_skipped"] = why
    if times:
        bs = str(max(int(k) for k in times))
        fb = min(times[bs], key=lambda r: times[bs][r][0])
        fp = min(times[bs], key=lambda r: times[bs][r][1])
        out.update({"latency_speedup": times[bs][fb][0] / times[bs][fp][1], "latency_runtime_base": fb,
                    "latency_runtime_pruned": fp, "latency_speedup_batch": int(bs)})
    return out


def build_outputs(out: Path, log: Callable[[str], None] | None = None) -> list[str]:
    """report.md, report.html, plots and TensorBoard scalars from ``out/results.jsonl``; failures only warn."""
    from prunekit.bench.html import write_html
    from prunekit.bench.plots import write_plots, write_tensorboard
    from prunekit.bench.report import write_report

    log = log or (lambda m: print(m, file=sys.stderr))
    rows = R.load_rows(out)
    fps = R.base_fingerprints(rows)
    if len(fps) > 1:
        listed = ", ".join(f"{fp[:16]} ({n} row(s))" for fp, n in sorted(fps.items()))
        raise PrunekitError(f"{out / R.JSONL} mixes results of {len(fps)} base models (fingerprints {listed}); "
                            "a report would compare them as one: split the rows by base_fingerprint into separate "
                            "folders first")
    written: list[str] = []
    for name, fn in (("report", write_report), ("html report", write_html), ("plots", write_plots),
                     ("tensorboard", write_tensorboard)):
        try:
            res = fn(rows, out)
        except Exception as e:  # noqa: BLE001 - results are safe on disk; the report can be rebuilt
            log(f"bench: warning: could not write the {name}: {type(e).__name__}: {e}")
            continue
        written.extend(str(p) for p in (res if isinstance(res, list) else [res]) if p)
    _usual_permissions([Path(p) for p in written])
    return written


def _usual_permissions(paths: Sequence[Path]) -> None:
    """Give files written through ``mkstemp`` (0600) the permissions the umask asks for."""
    mask = os.umask(0)
    os.umask(mask)
    for p in paths:
        try:
            if p.is_file() and (p.stat().st_mode & 0o777) == 0o600:
                p.chmod(0o666 & ~mask)
        except OSError:
            pass


def run_experiment(exp: Experiment, out: str | os.PathLike, **kwargs: Any) -> RunSummary:
    """Convenience: ``Runner(exp, out, ...).run(shard=..., methods=...)``."""
    shard = kwargs.pop("shard", None)
    methods = kwargs.pop("methods", None)
    return Runner(exp, out, **kwargs).run(shard=shard, methods=methods)


__all__ = ["Cell", "MethodSpec", "RunSummary", "Runner", "build_outputs", "cell_id", "check_out_dir", "filter_methods",
           "machine_info", "model_fingerprint", "parse_shard", "plan_cells", "read_base_metrics", "run_experiment",
           "shard_cells", "train_config"]
