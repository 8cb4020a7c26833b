"""``prunekit bench``: run, resume, shard and merge benchmark sweeps.

Usage::

    prunekit bench EXPERIMENT_OR_PRESET --out DIR [--set key=value ...] [--shard i/n] [--methods a,b]
    prunekit bench merge OUT1 OUT2 ... --out DIR     # merge results (dedupe by cell id), rebuild the report
    prunekit bench report OUT                        # rebuild report.md and the plots of OUT
    prunekit bench list                              # the bundled presets

Exit status: 0 when every cell of the selection is done; 1 when some cells failed (their errors are in
results.csv and report.md; --retry-failed recomputes them); 2 for bad input (experiment, flags, --out), a
folder another process is running the same shard into, or results of another base model.

One process per shard and output folder (an OS lock; a second one is refused naming the holder). Several
shards may run into one folder at once. Rows are bound to the base model's content fingerprint: a replaced
checkpoint is refused on resume, and `bench merge` refuses shards of different base models.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError

_KEYWORDS = ("merge", "report", "list")


def add_commands(subparsers: Any) -> None:
    """Add the ``bench`` sub-command to the ``prunekit`` parser's sub-parsers."""
    s = subparsers.add_parser(
        "bench", help="run a benchmark sweep (method x target x seed); also `bench merge`, `bench report`",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("experiment", metavar="EXPERIMENT_OR_PRESET",
                   help="an experiment YAML file or a bundled preset name (see `prunekit bench list`); "
                        "or one of: merge, report, list")
    s.add_argument("inputs", nargs="*", metavar="DIR", help="for merge / report: result directories")
    s.add_argument("--out", help="output directory (results.jsonl/csv, config.yaml, report.md, plots/)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (dotted key, YAML value), e.g. --set finetune.epochs=0.5; repeatable")
    s.add_argument("--shard", default=None, metavar="I/N", help="run only the I-th of N deterministic slices")
    s.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="run the sweep as N processes on this machine (shards 0/N .. N-1/N into --out, each with "
                        "its share of the CPU threads), then rebuild the report")
    s.add_argument("--methods", default=None, help="comma-separated method names or labels to run")
    s.add_argument("--retry-failed", action="store_true", help="recompute cells recorded as failed")
    s.add_argument("--dry-run", action="store_true", help="list the cells that would run and exit")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(fn=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.experiment == "list":
        return _cmd_list()
    if args.experiment == "merge":
        return _cmd_merge(args)
    if args.experiment == "report":
        return _cmd_report(args)
    if args.inputs:
        raise PrunekitError(f"unexpected argument(s) {' '.join(args.inputs)} (did you mean "
                            f"`prunekit bench merge {' '.join(args.inputs)} --out DIR`?)")
    if not args.out:
        raise PrunekitError("prunekit bench needs --out DIR")
    from prunekit.bench.config import load_experiment
    from prunekit.bench.runner import Runner, check_out_dir, parse_shard

    # everything a user typed is checked before any work: the experiment (methods' typed options included),
    # the shard, the method filter and the output folder
    exp = load_experiment(args.experiment, args.overrides)
    shard = parse_shard(args.shard)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    runner = Runner(exp, args.out, progress=not args.quiet, retry_failed=args.retry_failed,
                    source=_source(args.experiment), overrides=args.overrides)
    if args.dry_run:
        cells = runner.cells(shard, methods)
        bound = bool(cells) and bool(cells[0].base_fingerprint)
        for c in cells:
            print(f"{c.cell_id if bound else c.config_hash}  {c.label:<20} {c.target:<12} seed={c.seed}")
        print(f"{len(cells)} cell(s)" + ("" if bound or not cells else
                                         " (config hashes: the base model is not trained yet, so the cell ids "
                                         "are not known)"))
        return 0
    check_out_dir(Path(args.out))
    runner.cells(shard, methods)  # --methods names checked before the base model is trained
    if args.jobs != 1:
        return _run_jobs(args, exp)
    s = runner.run(shard=shard, methods=methods)
    extra = f", {s.elsewhere} left to another process" if s.elsewhere else ""
    print(f"bench: {s.total} cell(s): {s.ok} ok, {s.failed} failed, {s.skipped} skipped, "
          f"{s.done_before} already done{extra}; {s.seconds:.0f} s")
    print(f"bench: results in {Path(args.out) / 'results.csv'}, report in {Path(args.out) / 'report.md'}")
    if s.failed_total:
        print(f"bench: {s.failed_total} of {s.total} cell(s) failed ({s.failed} in this run, {s.failed_before} "
              f"earlier); their errors are in the error/traceback columns of {Path(args.out) / 'results.csv'} and "
              f"under 'Failed cells' in {Path(args.out) / 'report.md'} (rerun with --retry-failed to recompute them)",
              file=sys.stderr)
        return EXIT_CELLS_FAILED
    return 0


#: exit status of a sweep in which some cells failed (bad input is 2, as everywhere in prunekit)
EXIT_CELLS_FAILED = 1


def _run_jobs(args: argparse.Namespace, exp: Any) -> int:
    """``--jobs N``: N shard processes into one folder (their own locks keep cells and rows apart), the CPU
    threads split between them; then one report over all the rows. Exit status: the worst of the shards'."""
    import os
    import subprocess

    from prunekit.bench.runner import build_outputs

    n = int(args.jobs)
    if n < 1:
        raise PrunekitError(f"--jobs must be >= 1, got {n}")
    if args.shard:
        raise PrunekitError("--jobs starts its own shards: drop --shard (or run the shards yourself with --shard)")
    threads = max(1, (os.cpu_count() or 1) // n)
    cmd = [sys.executable, "-m", "prunekit", "bench", args.experiment, "--out", str(args.out), "--quiet"]
    for o in args.overrides:
        cmd += ["--set", o]
    if args.methods:
        cmd += ["--methods", args.methods]
    if args.retry_failed:
        cmd.append("--retry-failed")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    print(f"bench: {n} processes (shards 0/{n} .. {n - 1}/{n}, {threads} thread(s) each) into {args.out}")
    procs = [subprocess.Popen([*cmd, "--shard", f"{i}/{n}"], env=env)  # OMP_NUM_THREADS: torch's default threads
             for i in range(n)]
    codes = [p.wait() for p in procs]
    build_outputs(Path(args.out))
    bad = [f"{i}/{n}: exit {c}" for i, c in enumerate(codes) if c]
    print(f"bench: {n} shard(s) finished" + (f"; {', '.join(bad)}" if bad else "") +
          f"; report in {Path(args.out) / 'report.md'} and {Path(args.out) / 'report.html'}")
    return max(codes) if codes else 0


def _source(experiment: str) -> str:
    return experiment if Path(experiment).is_file() else f"preset:{experiment}"


def _cmd_list() -> int:
    from prunekit.bench.config import list_presets, read_experiment_file

    for name in list_presets():
        doc, _ = read_experiment_file(name)
        print(f"{name:<20} {doc.get('description', '')}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from prunekit.bench.results import appending, merge
    from prunekit.bench.runner import build_outputs, check_out_dir

    if not args.inputs or not args.out:
        raise PrunekitError("usage: prunekit bench merge OUT1 OUT2 ... --out DIR")
    out = Path(args.out)
    for d in args.inputs:
        if not Path(d).is_dir():
            raise PrunekitError(f"bench merge: {d!r} is not a directory (give benchmark output directories)")
    check_out_dir(out)
    rows = merge([Path(p) for p in args.inputs], out)
    _copy_config(args.inputs, out)
    with appending(out):
        build_outputs(out)
    print(f"bench: merged {len(rows)} cell(s) from {len(args.inputs)} director(ies) into {out}")
    return 0


def _copy_config(inputs: list[str], out: Path) -> None:
    from prunekit.io import atomic_write_text

    if (out / "config.yaml").exists():
        return
    for d in inputs:
        src = Path(d) / "config.yaml"
        if src.is_file():
            atomic_write_text(out / "config.yaml", src.read_text(encoding="utf-8", errors="replace"))
            return


def _cmd_report(args: argparse.Namespace) -> int:
    from prunekit.bench.results import JSONL, appending, is_benchmark_dir
    from prunekit.bench.runner import build_outputs

    dirs = args.inputs or ([args.out] if args.out else [])
    if len(dirs) != 1:
        raise PrunekitError("usage: prunekit bench report OUT")
    d = Path(dirs[0])
    if not d.is_dir():
        raise PrunekitError(f"bench report: {str(d)!r} is not a directory")
    if not is_benchmark_dir(d):
        raise PrunekitError(f"bench report: {str(d)!r} is not a benchmark output directory (no {JSONL}); "
                            "give the --out of a `prunekit bench` run")
    with appending(d):
        written = build_outputs(d)
    for p in written:
        print(p)
    return 0


__all__ = ["add_commands", "cmd_bench"]
