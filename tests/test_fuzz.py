"""Fuzzing the command line and checkpoint loading: zero uncaught exceptions.

* ``test_fuzzed_cli_invocations_exit_cleanly``: generated ``prunekit train | prune | eval | export | inspect |
  bench | methods`` invocations (flags with good and bad values, ``--option`` values drawn against each
  method's typed options, targets, model kwargs, good / damaged / misfit checkpoints, experiment YAML files),
  run in-process through :func:`prunekit.cli.main`. Every one must end with exit 0 (it ran) or exit 2 with a
  ``prunekit...: error: ...`` line (bench: 1 when cells failed); any other exception fails the test.
* ``test_fuzzed_checkpoints_load_or_raise_checkpoint_errors``: random byte corruption, truncation, garbage,
  foreign pickles, wrong-typed entries and crafted layer specs / shapes / state dicts. Loading must raise a
  :class:`PrunekitError` or give a model that takes its dataset's images (checked as the CLI checks it).

``PRUNEKIT_FUZZ_EXAMPLES=N`` sets the number of examples of each test (default: the CI numbers below).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import json
import os
import pickle
import random
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prunekit
from prunekit.cli import main
from prunekit.errors import PrunekitError
from prunekit.models import create_model

CI_CLI_EXAMPLES, CI_CHECKPOINT_EXAMPLES = 150, 1000
_N = os.environ.get("PRUNEKIT_FUZZ_EXAMPLES")
CLI_EXAMPLES = int(_N) if _N else CI_CLI_EXAMPLES
CHECKPOINT_EXAMPLES = int(_N) if _N else CI_CHECKPOINT_EXAMPLES
FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    return make_files(tmp_path_factory.mktemp("fuzz"))


def make_files(d: Path) -> dict[str, str]:
    """Checkpoints (good, pruned, misfit, NaN, damaged, foreign), experiment files and folders to point at."""
    out: dict[str, str] = {"dir": str(d / "adir"), "missing": str(d / "missing.pt"), "file": str(d / "afile")}
    (d / "adir").mkdir()
    (d / "afile").write_text("x")
    good = create_model("lenet5", in_channels=3, image_size=32)
    prunekit.save(good, d / "good.pt", meta={"dataset": "synthetic"})
    out["good"] = str(d / "good.pt")
    pruned = prunekit.prune(good, "l1", "flops=2", input_shape=(3, 32, 32)).model
    prunekit.save(pruned, d / "pruned.pt", meta={"dataset": "synthetic"})
    out["pruned"] = str(d / "pruned.pt")
    prunekit.save(create_model("lenet5", in_channels=1, image_size=28), d / "gray.pt", meta={"dataset": "synthetic"})
    out["gray"] = str(d / "gray.pt")
    prunekit.save(create_model("lenet5", in_channels=3, image_size=32), d / "nometa.pt")
    out["nometa"] = str(d / "nometa.pt")
    bad = create_model("lenet5", in_channels=3, image_size=32)
    with torch.no_grad():
        bad.conv1.weight.fill_(float("nan"))
    prunekit.save(bad, d / "nan.pt", meta={"dataset": "synthetic"})
    out["nan"] = str(d / "nan.pt")
    raw = (d / "good.pt").read_bytes()
    (d / "trunc.pt").write_bytes(raw[: len(raw) // 2])
    out["trunc"] = str(d / "trunc.pt")
    (d / "pickle.pt").write_bytes(pickle.dumps({"format": "prunekit-checkpoint", "arch": [1, 2]}))
    out["pickle"] = str(d / "pickle.pt")
    torch.save({"state_dict": good.state_dict()}, d / "bare.pt")
    out["bare"] = str(d / "bare.pt")
    (d / "bad.yaml").write_bytes(b"name: x\nmodel: \xff\xfe\n")
    out["bad_yaml"] = str(d / "bad.yaml")
    (d / "list.yaml").write_text("- 1\n- 2\n")
    out["list_yaml"] = str(d / "list.yaml")
    (d / "broken.yaml").write_text("name: [unclosed\n")
    out["broken_yaml"] = str(d / "broken.yaml")
    out["tmp"] = str(d)
    return out


# --------------------------------------------------------------------------------- value strategies
_GARBAGE = st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1e309", "abc", "", "1.5", "-0", "1e-300",
                            "2**40", "None", "true", "[1, 2]", "{}", "0x10", "１", " 3", "3 ", "\x00", "é"])
_NUMBER = st.one_of(_GARBAGE, st.integers(-5, 10).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                    st.text(max_size=5))
_SMALL = st.one_of(st.sampled_from(["1", "2", "0.01", "0.05", "0.5"]), _NUMBER)
_TARGET = st.one_of(
    st.sampled_from(["flops=2", "params=2", "ratio=0.5", "sparsity=0.5", "flops=1", "flops=0.5", "flops=1e9",
                     "params=abc", "ratio=1", "ratio=-0.1", "latency=nan", "latency@nosuch=2", "flops", "=2",
                     "flops=2=3", "FLOPS=2", "nosuch=2", "flops=nan", "flops=inf", "ratio=0.999999", ""]),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["flops", "params", "ratio", "latency", "sparsity"]),
              _NUMBER))
_JSON_VALUE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 2**40), st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=4)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=2)),
    max_leaves=4)
_MODEL_KWARGS = st.one_of(
    st.dictionaries(st.sampled_from(["width", "depth", "nosuch", "num_classes", "in_channels", "image_size",
                                     "dropout", "hidden", "patch_size"]), _JSON_VALUE, max_size=3)
    .map(lambda d: json.dumps(d)),
    st.sampled_from(["{bad", "[1, 2]", "null", "1", '"x"', '{"width": NaN}', '{"width": Infinity}', "", "{}"]))
_MODELS = st.sampled_from(["lenet5", "lenet5", "lenet_300_100", "nosuch", "", "resnet20", "vit_tiny"])
_DATASETS = st.sampled_from(["synthetic", "synthetic", "synthetic", "nosuch", "folder:", "folder:/nonexistent",
                             "cifar10", "FOLDER:x"])
_CHECKPOINTS = st.sampled_from(["good", "good", "pruned", "gray", "nometa", "nan", "trunc", "pickle", "bare",
                                "missing", "dir", "file"])


def _methods() -> list[str]:
    from prunekit.methods import list_methods

    return list_methods()


def _option_value(t) -> st.SearchStrategy[str]:
    """A value for one typed option: often valid, often just outside what it allows, often garbage."""
    good: list[str] = []
    if t.kind == "bool":
        good = ["true", "false", "yes", "0"]
    elif t.kind in ("int", "float"):
        lo = t.low if t.low is not None else -3
        hi = t.high if t.high is not None else lo + 8
        good = [f"{lo:g}", f"{hi:g}", f"{(lo + hi) / 2:g}", f"{lo - 1:g}", f"{hi + 1:g}"]
    elif t.choices:
        good = [str(c) for c in t.choices] + [str(t.choices[0]).upper()]
    elif t.kind == "floats":
        good = ["[0.5, 0.7]", "[]", "[nan]", "0.5", "[1, 2, 3]"]
    if t.optional:
        good.append("none")
    return st.one_of(st.sampled_from(good or ["x"]), _NUMBER)


@st.composite
def _options(draw, method: str) -> list[str]:
    from prunekit.methods import get_method_info
    from prunekit.methods.options import option_specs

    try:
        specs = {s.name: s.type for s in option_specs(get_method_info(method).cls)}
    except PrunekitError:
        specs = {}
    out = []
    for _ in range(draw(st.integers(0, 3))):
        if specs and draw(st.integers(0, 4)):
            name = draw(st.sampled_from(sorted(specs)))
            out += ["--option", f"{name}={draw(_option_value(specs[name]))}"]
        else:
            out += ["--option", draw(st.sampled_from(["nosuch=1", "=1", "samples", "a=b=c", "SEED=1", "seed=",
                                                      "prune-percent=50"]))]
    return out


def _flags(draw, table: dict[str, st.SearchStrategy[str] | None], most: int = 4) -> list[str]:
    out: list[str] = []
    for flag in draw(st.lists(st.sampled_from(sorted(table)), max_size=most, unique=True)):
        value = table[flag]
        out += [flag] if value is None else [flag, draw(value)]
    return out


_RUNTIME_FLAGS = {"--batch-size": _SMALL, "--eval-batch-size": _SMALL, "--threads": _SMALL,
                  "--device": st.sampled_from(["cpu", "cuda", "cuda:7", "banana", "meta", "auto", "mps", ""]),
                  "--runtimes": st.sampled_from(["eager", "nosuch", "", ",", "eager,eager"]), "--data-dir": None}


@st.composite
def _train_argv(draw, f: dict[str, str], out: str) -> list[str]:
    argv = ["train", "--model", draw(_MODELS), "--dataset", draw(_DATASETS), "--out", out, "--epochs",
            draw(st.sampled_from(["0.01", "0.01", "0.02", "nan", "-1", "abc"]))]
    table = {"--lr": _SMALL, "--momentum": _SMALL, "--weight-decay": _SMALL, "--seed": _SMALL,
             "--warmup-epochs": _SMALL, "--label-smoothing": _SMALL, "--temperature": _SMALL,
             "--swa-start": _SMALL, "--optimizer": st.sampled_from(["sgd", "adam", "lion"]),
             "--schedule": st.sampled_from(["cosine", "step", "onecycle", "constant", "x"]),
             "--model-kwargs": _MODEL_KWARGS, "--resume": None, "--no-augment": None, "--channels-last": None,
             "--init-from": _CHECKPOINTS.map(lambda k: f[k]), "--trajectory-window": _SMALL,
             "--prune-at-epoch": _SMALL, "--prune-method": st.sampled_from(_methods() + ["nosuch"]),
             "--prune-target": _TARGET, "--prune-samples": _SMALL, "--record-trajectory": None,
             **{k: v for k, v in _RUNTIME_FLAGS.items() if k != "--data-dir"}}
    return argv + _flags(draw, table)


@st.composite
def _prune_argv(draw, f: dict[str, str], out: str) -> list[str]:
    method = draw(st.sampled_from(_methods() + ["nosuch"]))
    argv = ["prune", "--method", method, "--out", out, "--prune-samples",
            draw(st.sampled_from(["32", "32", "64", "0", "abc"]))]
    if draw(st.integers(0, 5)):
        argv += ["--checkpoint", f[draw(_CHECKPOINTS)]]
    if draw(st.integers(0, 5)):
        argv += ["--target", draw(_TARGET)]
    argv += draw(_options(method))
    table = {"--mode": st.sampled_from(["physical", "masked", "x"]),
             "--scope": st.sampled_from(["global", "layerwise", "x"]),
             "--round-to": st.sampled_from(["auto", "1", "8", "0", "-8", "x", "1.5"]), "--floor": _SMALL,
             "--rounds": st.sampled_from(["1", "2", "0", "x"]), "--schedule": st.sampled_from(["geometric", "x"]),
             "--finetune-epochs": st.sampled_from(["0", "0.01", "-1", "nan", "x"]), "--finetune-lr": _SMALL,
             "--momentum": _SMALL, "--weight-decay": _SMALL, "--seed": _SMALL, "--latency-repeats": _SMALL,
             "--latency-model": st.sampled_from(["proxy", "off", "x"]), "--dataset": _DATASETS,
             "--model": _MODELS, "--model-kwargs": _MODEL_KWARGS, "--heads": None, "--json": None,
             "--epochs-per-round": st.sampled_from(["0.01", "-1", "nan", "0"]), "--final-epochs": _SMALL,
             "--trajectory": st.sampled_from([f["dir"], f["missing"], f["file"]]), **_RUNTIME_FLAGS}
    return argv + _flags(draw, table)


@st.composite
def _eval_argv(draw, f: dict[str, str]) -> list[str]:
    argv = ["eval", "--checkpoint", f[draw(_CHECKPOINTS)]]
    table = {"--dataset": _DATASETS, "--json": None, **_RUNTIME_FLAGS}
    return argv + _flags(draw, table)


@st.composite
def _export_argv(draw, f: dict[str, str]) -> list[str]:
    argv = ["export", f[draw(_CHECKPOINTS)]]
    shape = st.one_of(st.sampled_from(["3,32,32", "1,28,28", "3,16,16", "0,1", "x", "3,32", "3,2**40,2", ""]),
                      st.lists(st.integers(-2, 40), min_size=1, max_size=4).map(lambda v: ",".join(map(str, v))))
    table = {"--format": st.sampled_from(["onnx", "torchscript", "x"]), "--input-shape": shape,
             "--dataset": _DATASETS, "--atol": _SMALL, "--no-fold-bn": None, "--json": None,
             "--merge-lowrank": st.sampled_from(["auto", "always", "never", "x"]),
             "--out": st.sampled_from([f["dir"], f["file"] + "/x.onnx", f["tmp"] + "/e.onnx", f["tmp"] + "/e.ts",
                                       f["tmp"] + "/new/x.onnx", f["good"], "/proc/x.onnx"])}
    return argv + _flags(draw, table)


@st.composite
def _inspect_argv(draw, f: dict[str, str]) -> list[str]:
    argv = ["inspect", f[draw(_CHECKPOINTS)], "--no-latency"]
    table = {"--base": _CHECKPOINTS.map(lambda k: f[k]), "--json": None, "--dataset": _DATASETS,
             "--input-shape": st.sampled_from(["3,32,32", "1,28,28", "x", "0"]),
             "--png": st.sampled_from([f["dir"], f["tmp"] + "/l.png", f["file"] + "/l.png"])}
    return argv + _flags(draw, table, most=2)


def _yaml_value(text: str):
    """What the text reads as in YAML (as a user would write it there), or the text itself."""
    try:
        return yaml.safe_load(text or "null")
    except yaml.YAMLError:
        return text


def _experiment(draw, f: dict[str, str]) -> str:
    """An experiment: a preset name, a damaged file, or a generated YAML (often slightly wrong)."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.sampled_from(["quick", "nosuch", f["bad_yaml"], f["list_yaml"], f["broken_yaml"], f["dir"],
                                     f["missing"]]))
    methods = _methods()
    entries = []
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(methods + ["nosuch"]))
        entry: dict = {"name": name}
        opts = draw(_options(name))
        if opts:
            entry["options"] = {o.split("=", 1)[0]: _yaml_value(o.split("=", 1)[1]) if "=" in o else None
                                for o in opts[1::2]}
        if draw(st.booleans()):
            entry["targets"] = draw(st.lists(_TARGET, max_size=2))
        entries.append(entry if draw(st.integers(0, 3)) else name)
    doc = {"name": "fuzz", "model": draw(_MODELS), "dataset": draw(_DATASETS), "methods": entries,
           "targets": {"channel": draw(st.lists(_TARGET, min_size=1, max_size=2)), "weight": ["params=2"],
                       "lowrank": ["flops=2"]},
           "seeds": draw(st.sampled_from([[0], [0, 1], [], "x", [-1], [0.5]])),
           "base": {"checkpoint": f[draw(_CHECKPOINTS)]} if draw(st.booleans()) else
           {"train": {"epochs": draw(st.sampled_from([0.01, -1, "x", float("nan")]))}},
           "finetune": draw(st.sampled_from([{"epochs": 0}, {"epochs": -1}, {"epochs": "x"}, {"lr": float("inf")},
                                             {}, None, []])),
           "prune": {"prune_set": draw(st.sampled_from([32, 0, -1, "x", 10**12]))}}
    for key in draw(st.lists(st.sampled_from(sorted(doc)), max_size=2, unique=True)):
        doc[key] = draw(st.sampled_from([None, [], "x", 1, {"a": 1}]))  # a whole section of the wrong type
    path = os.path.join(f["tmp"], f"exp{draw(st.integers(0, 3))}.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(doc, fh, allow_unicode=True)
    return path


@st.composite
def _bench_argv(draw, f: dict[str, str], out: str) -> list[str]:
    sub = draw(st.sampled_from(["run", "run", "run", "merge", "report", "list"]))
    dirs = st.sampled_from([f["dir"], f["tmp"], f["missing"], f["file"], out])
    if sub == "list":
        return ["bench", "list"]
    if sub in ("merge", "report"):
        argv = ["bench", sub, *draw(st.lists(dirs, max_size=2))]
        return argv + (["--out", draw(dirs)] if draw(st.booleans()) else [])
    argv = ["bench", _experiment(draw, f), "--out", out, "--dry-run"]  # every check, no cell runs
    table = {"--set": st.sampled_from(["seeds=[0]", "finetune.epochs=-1", "finetune.epochs=x", "x", "=1",
                                       "prune.prune_set=abc", "methods=[l1]", "model=nosuch", "a.b.c=1"]),
             "--shard": st.sampled_from(["0/1", "1/2", "2/2", "-1/2", "x", "0/0", "1"]),
             "--methods": st.sampled_from(["l1", "nosuch", "", ",", "l1,l1"]), "--retry-failed": None,
             "--jobs": st.sampled_from(["1", "0", "x"])}
    return argv + _flags(draw, table, most=3)


def _valid_option_value(t) -> st.SearchStrategy[str]:
    """A value an option accepts (bounds, middle, choices, None where optional)."""
    if t.kind == "bool":
        return st.sampled_from(["true", "false"])
    if t.kind in ("int", "float"):
        lo = t.low if t.low is not None else 0
        hi = t.high if t.high is not None else lo + 4
        vals = [lo, hi, (lo + hi) / 2] if t.kind == "float" else [int(lo), int(hi), int((lo + hi) // 2)]
        return st.sampled_from([f"{v:g}" for v in vals] + (["none"] if t.optional else []))
    if t.choices:
        return st.sampled_from([str(c) for c in t.choices])
    return st.sampled_from(["none"] if t.optional else ["[0.5]"])


@st.composite
def _valid_prune_argv(draw, f: dict[str, str], out: str) -> list[str]:
    """A prune a user could well type: a good checkpoint, a method, a target of its granularity, options of
    the right type (their values at the bounds of what they allow) -- it runs, or is refused with a reason."""
    from prunekit.methods import get_method_info
    from prunekit.methods.options import option_specs

    method = draw(st.sampled_from([m for m in _methods() if m not in _SLOW_METHODS]))
    info = get_method_info(method)
    target = {"weight": "params=2", "channel": "flops=1.5", "lowrank": "flops=1.5"}.get(info.granularity, "flops=2")
    argv = ["prune", "--checkpoint", f[draw(st.sampled_from(["good", "pruned"]))], "--method", method, "--target",
            draw(st.sampled_from([target, "ratio=0.3"])), "--out", out, "--prune-samples", "32",
            "--batch-size", "32"]
    specs = option_specs(info.cls)
    for spec in draw(st.lists(st.sampled_from(specs), max_size=2, unique_by=lambda s: s.name)) if specs else []:
        argv += ["--option", f"{spec.name}={draw(_valid_option_value(spec.type))}"]
    return argv + draw(st.sampled_from([[], ["--mode", "masked"], ["--scope", "layerwise"], ["--round-to", "1"],
                                        ["--finetune-epochs", "0.01"], ["--rounds", "2"], ["--json"]]))


# methods whose valid runs take tens of seconds even on LeNet-5 (they train or fit curvature for many steps):
# their options are still fuzzed with bad values, which stop before any work
_SLOW_METHODS = ("lrank", "eigendamage", "eigendamage_improved", "id_iter", "sipp_hybrid")


@st.composite
def _invocation(draw, f: dict[str, str], out: str) -> list[str]:
    if draw(st.integers(0, 9)) < 3:
        return [*draw(_valid_prune_argv(f, out)), "--quiet", "--no-latency"]
    cmd = draw(st.sampled_from(["train", "prune", "prune", "eval", "export", "inspect", "bench", "bench",
                                "methods"]))
    if cmd == "methods":
        return ["methods", *draw(st.lists(st.sampled_from(_methods() + ["nosuch", "--json", "--granularity=x"]),
                                          max_size=1))]
    builder = {"train": lambda: _train_argv(f, out), "prune": lambda: _prune_argv(f, out),
               "eval": lambda: _eval_argv(f), "export": lambda: _export_argv(f), "inspect": lambda: _inspect_argv(f),
               "bench": lambda: _bench_argv(f, out)}[cmd]
    return [*draw(builder()), "--quiet", "--no-latency"] if cmd in ("train", "prune", "eval") \
        else [*draw(builder()), "--quiet"] if cmd == "bench" else draw(builder())


# ------------------------------------------------------------------------------------------ the tests
@settings(FUZZ, max_examples=CLI_EXAMPLES)
@given(data=st.data())
def test_fuzzed_cli_invocations_exit_cleanly(files, tmp_path_factory, data) -> None:
    out = str(tmp_path_factory.mktemp("o") / "out")
    run_one_invocation(data.draw(_invocation(files, out), label="argv"))


def run_one_invocation(argv: list[str]) -> int:
    """``prunekit ARGV`` in-process: exit 0, or 2 with one error line (bench: 1 when cells failed)."""
    err, threads = io.StringIO(), torch.get_num_threads()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = main(argv)
            except SystemExit as e:  # argparse: exit 2 (bad flag) or 0 (--help)
                rc = int(e.code or 0)
    finally:
        torch.set_num_threads(threads)  # --threads N changes this process's setting
    text = err.getvalue()
    assert "Traceback" not in text, text
    allowed = (0, 1, 2) if argv[0] == "bench" else (0, 2)
    assert rc in allowed, (argv, rc, text)
    if rc == 2:  # one error naming the problem (an invalid experiment lists its problems on the next lines)
        heads = [ln for ln in text.splitlines() if ln.startswith("prunekit") and "error: " in ln]
        assert len(heads) == 1 and heads[0].split("error: ", 1)[1].strip(), (argv, text)
    return rc


def _random_value(rng: random.Random, depth: int = 0):
    """A value of a random type for a checkpoint entry (what a crafted or confused writer could store)."""
    kinds = ["none", "int", "float", "str", "bool", "list", "dict", "tensor", "bytes"]
    k = rng.choice(kinds if depth < 2 else kinds[:5])
    if k == "none":
        return None
    if k == "int":
        return rng.choice([0, 1, -1, 3, 300, 2**31, 2**63 - 1, -(2**40)])
    if k == "float":
        return rng.choice([0.0, -1.5, float("nan"), float("inf"), 1e300])
    if k == "str":
        return rng.choice(["", "x", "Linear", "lenet5", "prunekit-checkpoint", "fc1", "../..", "\x00"])
    if k == "bool":
        return rng.choice([True, False])
    if k == "bytes":
        return bytes(rng.randrange(256) for _ in range(rng.randrange(6)))
    if k == "list":
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if k == "dict":
        return {rng.choice(["a", "name", "type", "args", "fc1", "in_features", "kwargs", "weight"]):
                _random_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    shape = [rng.choice([0, 1, 2, 3, 300]) for _ in range(rng.randrange(4))]
    dtype = rng.choice([torch.float32, torch.float64, torch.int64, torch.bool, torch.float16, torch.uint8])
    return torch.zeros(shape, dtype=dtype)


_SPEC_TYPES = ["Linear", "Conv2d", "BatchNorm2d", "LayerNorm", "Identity", "Sequential", "LowRankLinear",
               "LowRankConv2d", "Nope", "", None, 3]
_SIZES = [0, 1, 2, 3, 6, 16, 84, 120, 400, -1, 10**9, 2**40, "x", None, 1.5, True]


def _crafted(payload: dict, rng: random.Random) -> dict:
    """A well-formed pickle whose entries lie: wrong types, crafted layer specs, shapes and state dicts."""
    p = {k: (dict(v) if isinstance(v, dict) else v) for k, v in payload.items()}
    kind = rng.choice(["entry", "entry", "spec", "spec", "shape", "state", "state", "arch", "masks", "version"])
    if kind == "entry":
        p[rng.choice(sorted(p) + ["extra"])] = _random_value(rng)
    elif kind == "spec":
        path = rng.choice(["conv1", "conv2", "fc1", "fc2", "fc3", "features", "nosuch", "", "fc1.x", "a..b"])
        args = {rng.choice(["in_features", "out_features", "in_channels", "out_channels", "kernel_size",
                            "num_features", "groups", "bias", "rank", "normalized_shape", "stride", "padding",
                            "nosuch"]): rng.choice(_SIZES) for _ in range(rng.randrange(5))}
        spec = rng.choice([{"type": rng.choice(_SPEC_TYPES), "args": args}, {"type": "Linear"},
                           {"args": args}, _random_value(rng), {"type": "Linear", "args": args,
                                                                "attrs": _random_value(rng)}])
        p["modules"] = {**(p.get("modules") or {}), path: spec}
    elif kind == "shape":
        name = rng.choice(["fc1.weight", "conv1.weight", "nosuch.weight", "fc1.bias", "weight"])
        p["tensor_shapes"] = {name: rng.choice([[120, 400], [2**40, 2], [-1], [], "x", None, [1.5], [0, 0],
                                                [3, 3, 3, 3, 3]])}
    elif kind == "state":
        sd = dict(p["state_dict"])
        key = rng.choice(sorted(sd))
        action = rng.choice(["drop", "extra", "value", "shape", "dtype"])
        if action == "drop":
            sd.pop(key)
        elif action == "extra":
            sd["nosuch.weight"] = torch.zeros(2)
        elif action == "value":
            sd[key] = _random_value(rng)
        elif action == "shape":
            sd[key] = torch.zeros([d + rng.choice([1, -1, 0]) if d > 1 else d for d in sd[key].shape] + [1])
        else:
            sd[key] = sd[key].to(rng.choice([torch.int64, torch.float64, torch.bool, torch.float16]))
        p["state_dict"] = sd
    elif kind == "arch":
        arch = dict(p["arch"])
        arch[rng.choice(["name", "num_classes", "in_channels", "kwargs", "image_size", "nosuch"])] = rng.choice(
            [_random_value(rng), {"width": rng.choice(_SIZES)}, {"nosuch": 1}, "resnet20", 0, -1, 10**9])
        p["arch"] = arch
    elif kind == "masks":
        p["masks"] = rng.choice([{"fc1.weight": torch.ones(2, 2, dtype=torch.bool)}, {"nosuch": torch.ones(1)},
                                 _random_value(rng), {"fc1.weight": "x"}])
    else:
        p["format_version"] = rng.choice(["x", None, 2, -1, 1.5, [1], 10**30])
    return p


class _Evil:
    def __reduce__(self):
        return (print, ("this-must-never-run",))


def _foreign(rng: random.Random, payload: dict) -> bytes:
    obj = rng.choice([
        {"format": "prunekit-checkpoint", "x": _Evil()}, _Evil(), [1, 2, 3], "prunekit-checkpoint", 42,
        {"format": "prunekit-checkpoint", "arch": {"name": "lenet5"}, "state_dict": {}, "fn": print},
        {"format": "prunekit-checkpoint", **{k: v for k, v in payload.items() if k != "format"}, "y": random.Random},
        create_model("lenet5"), {k: v for k, v in payload.items() if k != "format"}, payload["state_dict"],
    ])
    buf = io.BytesIO()
    if rng.random() < 0.5:
        torch.save(obj, buf)
    else:
        buf.write(pickle.dumps(obj, protocol=rng.choice([0, 2, 4, 5])))
    return buf.getvalue()


@functools.cache
def good_checkpoints() -> list[tuple[bytes, dict]]:
    """Checkpoints to damage: dense, channel-pruned, low-rank and masked LeNet-5 (not a fixture: hypothesis
    would print them with every failure)."""
    d = Path(tempfile.mkdtemp(prefix="prunekit-fuzz-"))
    atexit.register(shutil.rmtree, d, True)
    out = []
    base = create_model("lenet5", in_channels=3, image_size=32)
    for i, model in enumerate([base, prunekit.prune(base, "l1", "flops=2", input_shape=(3, 32, 32)).model,
                               prunekit.prune(base, "svd", "flops=2", input_shape=(3, 32, 32)).model,
                               prunekit.prune(base, "magnitude", "params=2", mode="masked",
                                              input_shape=(3, 32, 32)).model]):
        prunekit.save(model, d / f"{i}.pt", meta={"dataset": "synthetic"})
        raw = (d / f"{i}.pt").read_bytes()
        out.append((raw, torch.load(io.BytesIO(raw), weights_only=True)))
    return out


@settings(FUZZ, max_examples=CHECKPOINT_EXAMPLES)
@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(["truncate", "flip", "garbage", "foreign", "crafted",
                                                              "crafted", "crafted"]))
def test_fuzzed_checkpoints_load_or_raise_checkpoint_errors(tmp_path_factory, seed, kind) -> None:
    fuzz_one_checkpoint(seed, kind, tmp_path_factory.mktemp("f") / "fuzz.pt")


def fuzz_one_checkpoint(seed: int, kind: str, path: Path) -> None:
    """One damaged checkpoint from ``seed``: loads to a model that fits its dataset, or a PrunekitError."""
    from prunekit.cli import check_fits
    from prunekit.data import dataset_info

    rng = random.Random(seed)
    raw, payload = rng.choice(good_checkpoints())
    if kind == "truncate":
        blob = raw[: rng.randrange(len(raw))]
    elif kind == "flip":
        b = bytearray(raw)
        for _ in range(rng.randint(1, 16)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        blob = bytes(b)
    elif kind == "garbage":
        blob = bytes(rng.randrange(256) for _ in range(rng.randrange(600)))
    elif kind == "foreign":
        blob = _foreign(rng, payload)
    else:
        buf = io.BytesIO()
        torch.save(_crafted(payload, rng), buf)
        blob = buf.getvalue()
    path.write_bytes(blob)
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(err):  # a pickle that runs code would print here
            model = prunekit.load(path, require_finite=True)
        check_fits(model, dataset_info("synthetic"), str(path))  # what the CLI checks before any work
    except PrunekitError:
        return
    finally:
        assert "this-must-never-run" not in err.getvalue()
    assert isinstance(model, torch.nn.Module)
