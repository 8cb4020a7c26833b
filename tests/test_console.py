"""What the command line prints: ``--version``, ``--quiet`` / ``--verbose`` on every command, warnings once each
on one line, no profiler chatter from the gradient-flow memory measurement, and a benchmark run whose every
output line is prunekit's own or its progress bar.

The console tests run ``python -m prunekit`` in a subprocess: the chatter is written by C++ to file descriptor
2, which in-process capture would not see reliably, and the console warning format is only installed for the
real command line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from prunekit._version import __version__
from prunekit.cli import _register_extra_commands, build_parser, main

SRC = Path(__file__).resolve().parents[1] / "src"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    env["PYTHONPATH"] = str(SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.update(extra)
    return env


def _run(args: list[str], cwd: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def _lines(text: str) -> list[str]:
    """Output lines as a terminal would show them: progress bars redraw with carriage returns."""
    return [ln.strip() for ln in re.split(r"[\r\n]+", text) if ln.strip()]


# ------------------------------------------------------------------------------------------------ version
def test_version_flag(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"prunekit {__version__}"
    r = _run(["-m", "prunekit", "--version"], tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"prunekit {__version__}", r.stderr
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)*", __version__)


# ------------------------------------------------------------------------------------------ quiet / verbose
def test_every_command_has_quiet_and_verbose():
    _register_extra_commands()
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"models", "datasets", "train", "eval", "export", "methods", "prune", "bench", "inspect"} <= set(sub.choices)
    for name, p in sub.choices.items():
        opts = p._option_string_actions
        assert "--quiet" in opts and "--verbose" in opts, name
        args = p.parse_args(["--verbose"] + (["x"] if name in ("export", "bench", "inspect") else [])
                            + (["--method", "l1", "--out", "o"] if name == "prune" else [])
                            + (["--model", "m", "--dataset", "d", "--out", "o"] if name == "train" else [])
                            + (["--checkpoint", "c"] if name == "eval" else []))
        assert args.verbose is True and args.quiet is False, name


def test_verbose_error_shows_traceback_default_does_not(tmp_path):
    missing = str(tmp_path / "nope.pt")
    r = _run(["-m", "prunekit", "export", missing], tmp_path)
    assert r.returncode == 2
    assert _lines(r.stderr) == [f"prunekit: error: checkpoint {missing!r} does not exist"]
    r = _run(["-m", "prunekit", "export", missing, "--verbose"], tmp_path)
    assert r.returncode == 2 and "Traceback (most recent call last)" in r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"prunekit: error: checkpoint {missing!r} does not exist"


# -------------------------------------------------------------------------------------------------- warnings
_WARN_TWICE = textwrap.dedent("""
    import sys, warnings
    import prunekit.cli as cli

    def noisy(args):
        for i in range(3):
            warnings.warn("the same thing again", UserWarning)   # one location, one text: shown once
            warnings.warn(f"item {i} differs", RuntimeWarning)   # three texts: three lines
        warnings.warn("first line\\nsecond line", UserWarning)
        print("done")
        return 0

    cli.cmd_datasets = noisy
    sys.argv = ["prunekit", "datasets"] + sys.argv[1:]
    sys.exit(cli.main())
""")


def test_warnings_once_each_on_one_line(tmp_path):
    script = tmp_path / "noisy.py"
    script.write_text(_WARN_TWICE)
    r = _run([str(script)], tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "done", r.stderr
    lines = _lines(r.stderr)
    assert lines == [
        "prunekit: warning: the same thing again [UserWarning, from noisy.py]",
        "prunekit: warning: item 0 differs [RuntimeWarning, from noisy.py]",
        "prunekit: warning: item 1 differs [RuntimeWarning, from noisy.py]",
        "prunekit: warning: item 2 differs [RuntimeWarning, from noisy.py]",
        "prunekit: warning: first line (+1 line; --verbose shows all) [UserWarning, from noisy.py]",
    ], r.stderr
    r = _run([str(script), "--verbose"], tmp_path)
    assert r.returncode == 0
    assert r.stderr.count("UserWarning: the same thing again") == 3  # every time, Python's own format
    assert r.stderr.count("RuntimeWarning: item 1 differs") == 1


def test_programmatic_main_keeps_the_callers_warning_settings():
    import warnings

    import prunekit.cli as cli

    def warn(args):
        warnings.warn("from a command", UserWarning, stacklevel=1)
        return 0

    old = cli.cmd_datasets
    cli.cmd_datasets = warn
    try:
        with pytest.warns(UserWarning, match="from a command"):
            assert main(["datasets"]) == 0
    finally:
        cli.cmd_datasets = old


# ------------------------------------------------------------------------------------ profiler chatter
_PEAK = textwrap.dedent("""
    import os, sys
    import torch
    from prunekit.methods.gradflow import PeakMemory

    if "profiled-before" in sys.argv:  # the process's first profiler (which fixes kineto's log level) is not ours
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]):
            pass
        sys.stderr.write("---\\n")
        sys.stderr.flush()
    for _ in range(3):
        with PeakMemory("cpu") as mem:
            x = torch.ones(1000, 1000)  # 4 MB held at the peak
            y = x * 2
            del x, y
            sys.stderr.write("own line\\n")
            sys.stderr.flush()
        print(mem.result["source"], mem.result["increase_bytes"])
    print("level", os.environ.get("KINETO_LOG_LEVEL"))
""")


@pytest.mark.parametrize("case", ["fresh", "profiled-before"])
def test_peak_memory_prints_no_profiler_chatter(tmp_path, case):
    script = tmp_path / "peak.py"
    script.write_text(_PEAK)
    r = _run([str(script), case], tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout.split()
    assert out[-2:] == ["level", "6"]
    for i in range(3):  # the measurement itself is unchanged: the profiler saw both 4 MB tensors
        assert out[2 * i] == "torch_profiler"
        assert int(out[2 * i + 1]) >= 8_000_000
    ours = r.stderr.split("---\n")[-1]
    assert "USDT" not in ours and "profiler_st" not in ours, r.stderr
    assert _lines(ours) == ["own line"] * 3  # what the block itself writes to stderr is kept


def test_user_kineto_level_is_respected(tmp_path):
    script = tmp_path / "peak.py"
    script.write_text(_PEAK)
    r = _run([str(script), "fresh"], tmp_path, KINETO_LOG_LEVEL="5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-2:] == ["level", "5"]
    assert "USDT" in r.stderr  # the user asked for kineto's messages: nothing is filtered


# --------------------------------------------------------------------------------------- a whole bench run
_TINY = """
name: console
description: the console test's benchmark
model: lenet5
dataset: synthetic
dataset_kwargs: {in_channels: 1, image_size: 28, n: 256}
base:
  train: {epochs: 1, lr: 0.05, batch_size: 64}
methods: [l1, gf_loss, gf_grasp, magnitude, svd, tp_l1, torch_prune_l1, pfp]
targets:
  weight: ["params=2"]
  channel: ["flops=2"]
  lowrank: ["flops=1.5"]
seeds: [0]
finetune: {epochs: 0.25, lr: 0.01, batch_size: 64}
prune: {prune_set: 64, batch_size: 64}
measure: {latency_warmup: 1, latency_repeats: 2, latency_budget_s: 0.05, threads: 1, eval_batch_size: 256}
device: cpu
threads: 1
"""

# every line a bench run may print: its own messages and the progress bars (tqdm redraws)
_OURS = [
    r"bench: .*",  # the runner's messages and its cell progress bar
    r"epoch \d+: .*\|.*",  # the training / fine-tuning progress bar
    r"epoch=\d+ train_loss=[\d.]+ .*",  # the base model's epoch summary
]


def test_bench_run_prints_only_its_own_lines(tmp_path):
    cfg = tmp_path / "console.yaml"
    cfg.write_text(_TINY)
    out = tmp_path / "out"
    r = _run(["-m", "prunekit", "bench", str(cfg), "--out", str(out)], tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = _lines(r.stdout) + _lines(r.stderr)
    strangers = [ln for ln in lines if not any(re.fullmatch(p, ln) for p in _OURS)]
    assert not strangers, strangers
    text = r.stdout + r.stderr
    for noise in ("USDT", "profiler_start", "Warning:", "warnings.warn", "Traceback"):
        assert noise not in text
    assert "bench: 8 cell(s): 8 ok, 0 failed" in r.stdout
    assert f"bench: results in {out / 'results.csv'}, report in {out / 'report.md'}" in r.stdout
    assert (out / "results.csv").is_file() and (out / "report.md").is_file()
