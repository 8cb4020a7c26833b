"""The built package works outside the checkout: ``python -m build`` makes an sdist and, from it, a wheel; the
wheel installs (``--no-deps``) into a fresh virtual environment outside the checkout, and there, with the
working directory elsewhere and no PYTHONPATH, ``prunekit --version``, ``prunekit methods``, ``prunekit bench
list`` (the presets are in the wheel) and a one-cell benchmark on the synthetic dataset run from the installed
copy.

No downloads: the build runs without isolation when this environment has setuptools >= 77 (the dev extra
installs it), and the fresh environment reuses this one's packages (torch, ...) through a ``.pth`` file,
after its own site-packages, so that the wheel's prunekit is the one imported.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _build_frontend() -> None:
    try:
        import build  # noqa: F401
    except ImportError:
        pytest.skip("the `build` package is not installed (pip install build, or pip install -e '.[dev]'); "
                    "the wheel test needs it")


def _setuptools_ok() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV",
                                                            "PYTHONSAFEPATH", "PRUNEKIT_DATA")}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.update(extra)
    return env


def _run(cmd: list[str], cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=_clean_env(**env), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout[-2000:]}\n" \
                              f"{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """sdist and wheel, built from a copy of the sources (the build writes egg-info and build/ where it runs)."""
    _build_frontend()
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src-copy"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    out = tmp / "dist"
    cmd = [sys.executable, "-m", "build", "--outdir", str(out), str(src)]
    if _setuptools_ok():
        cmd.insert(3, "--no-isolation")  # offline: this environment's setuptools
    _run(cmd, tmp, timeout=600)
    wheels, sdists = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(out.iterdir())
    return {"wheel": wheels[0], "sdist": sdists[0], "tmp": tmp}


def test_wheel_and_sdist_hold_the_package_and_its_data(dist):
    from prunekit._version import __version__

    assert dist["wheel"].name == f"prunekit-{__version__}-py3-none-any.whl"
    names = set(zipfile.ZipFile(dist["wheel"]).namelist())
    presets = sorted(p.name for p in (ROOT / "src" / "prunekit" / "bench" / "presets").glob("*.yaml"))
    assert presets and {f"prunekit/bench/presets/{p}" for p in presets} <= names
    sources = {p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src" / "prunekit").rglob("*.py")}
    assert sources <= names, sorted(sources - names)
    assert "prunekit/py.typed" in names and "prunekit/inspection.py" in names
    meta = zipfile.ZipFile(dist["wheel"]).read(f"prunekit-{__version__}.dist-info/METADATA").decode()
    assert f"Version: {__version__}" in meta and "Provides-Extra: deploy" in meta
    entry = zipfile.ZipFile(dist["wheel"]).read(f"prunekit-{__version__}.dist-info/entry_points.txt").decode()
    assert "prunekit = prunekit.cli:main" in entry
    members = set(tarfile.open(dist["sdist"]).getnames())
    base = f"prunekit-{__version__}"
    assert {f"{base}/pyproject.toml", f"{base}/README.md", f"{base}/src/prunekit/cli.py"} <= members
    assert {f"{base}/src/prunekit/bench/presets/{p}" for p in presets} <= members


_ONE_CELL = """
name: wheel
description: one cell on generated data, from the installed wheel
model: lenet5
model_kwargs: {width: 0.5}
dataset: synthetic
dataset_kwargs: {in_channels: 1, image_size: 28, n: 128}
base:
  train: {epochs: 1, lr: 0.05, batch_size: 64}
methods: [l1]
targets:
  channel: ["flops=2"]
seeds: [0]
finetune: {epochs: 0}
prune: {prune_set: 32, batch_size: 32}
measure: {latency: false, eval_batch_size: 128}
device: cpu
threads: 1
"""


def test_wheel_installs_and_runs_outside_the_checkout(dist):
    tmp = dist["tmp"]
    venv = tmp / "venv"
    assert ROOT not in venv.parents
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], tmp)
    py = venv / "bin" / "python"
    if not py.exists():  # Windows layout
        py = venv / "Scripts" / "python.exe"
    purelib = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        tmp).stdout.strip())
    # this environment's dependencies (torch, numpy, ...), searched after the venv's own site-packages; a .pth
    # line only adds the folder, so an editable prunekit there (its own .pth) is not picked up
    (purelib / "zz_prunekit_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
          "--disable-pip-version-check", "-q", str(dist["wheel"])], tmp)
    work = tmp / "elsewhere"
    work.mkdir()
    bindir = py.parent
    prunekit_exe = bindir / ("prunekit.exe" if os.name == "nt" else "prunekit")
    assert prunekit_exe.exists()

    where = _run([str(py), "-c", "import prunekit, prunekit.bench.config as c; print(prunekit.__file__); "
                                 "print(c.__file__)"], work).stdout.split()
    for f in where:
        assert Path(f).resolve().is_relative_to(venv.resolve()), where  # the wheel's copy, not the checkout's
        assert not Path(f).resolve().is_relative_to(ROOT), where

    from prunekit._version import __version__

    assert _run([str(prunekit_exe), "--version"], work).stdout.strip() == f"prunekit {__version__}"
    methods = _run([str(prunekit_exe), "methods"], work).stdout
    for name in ("l1", "magnitude", "svd", "gf_loss", "tp_l1"):
        assert re.search(rf"^{name}\s", methods, re.M), name
    presets = _run([str(prunekit_exe), "bench", "list"], work).stdout
    assert re.search(r"^quick\s", presets, re.M) and re.search(r"^cifar10-resnet20\s", presets, re.M)

    (work / "one.yaml").write_text(_ONE_CELL)
    r = _run([str(prunekit_exe), "bench", "one.yaml", "--out", "out", "--quiet"], work, timeout=600,
             PRUNEKIT_CACHE=str(tmp / "cache"), PRUNEKIT_LATENCY_CACHE=str(tmp / "latency"))
    assert "bench: 1 cell(s): 1 ok, 0 failed" in r.stdout, r.stdout + r.stderr
    rows = (work / "out" / "results.csv").read_text().splitlines()
    assert len(rows) == 2 and "l1" in rows[1]
    assert (work / "out" / "report.md").is_file()
