"""Typed method options, `prunekit methods NAME`, and a criterion defined in a test run end to end.

The last test is the extension contract: one ~10-line class registered inside the test runs
through ``prunekit.prune``, the CLI and a benchmark cell with no other edit anywhere.
"""

from __future__ import annotations

import json

import pytest
import torch

import prunekit
from prunekit.errors import PruningError
from prunekit.methods import ChannelScorer, create_method, get_method_info, list_methods, register_method
from prunekit.methods.options import OptionType, option_specs, validate_options
from prunekit.methods.registry import unregister_method
from prunekit.models import create_model


# --------------------------------------------------------------------------------------------- validation
def test_every_registered_option_has_a_type_and_help() -> None:
    for name in list_methods():
        for spec in option_specs(get_method_info(name).cls):
            assert spec.type.kind in ("bool", "int", "float", "str", "floats", "any"), (name, spec)
            # the default itself must be valid for its declared type
            validate_options(get_method_info(name).cls, name, {spec.name: spec.default})
            if spec.type.kind != "any":
                assert spec.help, f"{name}.{spec.name} has no help line"


def test_cli_strings_are_converted_to_the_declared_types() -> None:
    m = create_method("id_iter", k="0.9", remeasure="none", per_read_point="false", samples="64")
    assert m.options["k"] == 0.9 and m.options["remeasure"] is None
    assert m.options["per_read_point"] is False and m.options["samples"] == 64 and isinstance(m.samples, int)
    assert create_method("taylor", samples=2048.0).samples == 2048


@pytest.mark.parametrize("method, options, needles", [
    ("l1", {"nosuch": 1}, ["no option(s) ['nosuch']", "valid options: none"]),
    ("id_iter", {"nosuch": 1}, ["nosuch", "k (float in [0, 1] or None, default 0.95)"]),
    ("id_iter", {"k": "abc"}, ["k='abc'", "not a number", "float in [0, 1]"]),
    ("id_iter", {"k": 1.5}, ["k=1.5", "out of range"]),
    ("taylor", {"samples": "abc"}, ["samples='abc'", "int >= 1"]),
    ("taylor", {"samples": 2.5}, ["not an integer"]),
    ("taylor", {"samples": float("nan")}, ["NaN"]),
    ("taylor", {"samples": True}, ["boolean is not a number"]),
    ("taylor", {"at": "nowhere"}, ["at='nowhere'", "producer|norm"]),
    ("gf_fisher", {"use_l2": "maybe"}, ["use_l2", "not a boolean"]),
    ("gf_fisher", {"thresholds": "abc"}, ["thresholds", "list of float"]),
])
def test_bad_options_name_the_option_and_what_is_allowed(method, options, needles) -> None:
    with pytest.raises(PruningError) as e:
        create_method(method, **options)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_declared_types_override_inference() -> None:
    class _M(ChannelScorer):
        defaults = {"mode": None, "scale": 1.0}
        option_types = {"mode": OptionType("str", choices=("a", "b"), optional=True)}
        option_help = {"mode": "which mode", "scale": "a factor"}

    specs = {s.name: s for s in option_specs(_M)}
    assert specs["mode"].type.describe() == "a|b or None" and specs["scale"].help == "a factor"
    assert validate_options(_M, "m", {"mode": "b"}) == {"mode": "b", "scale": 1.0}
    with pytest.raises(PruningError, match="not one of"):
        validate_options(_M, "m", {"mode": "c"})


# --------------------------------------------------------------------------------------------- CLI
def test_cli_methods_name_shows_typed_options(capsys) -> None:
    from prunekit.cli import main

    assert main(["methods", "id_iter"]) == 0
    out = capsys.readouterr().out
    assert "id_iter:" in out and "options (--option NAME=VALUE)" in out
    k_line = next(line for line in out.splitlines() if line.strip().startswith("k "))
    assert "0.95" in k_line and "float" in k_line
    assert main(["methods", "id_iter", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    k = next(o for o in row["options"] if o["name"] == "k")
    assert k["default"] == 0.95 and k["type"].startswith("float") and k["help"]
    assert main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert all("options" in r for r in rows)
    assert main(["methods", "no_such_method"]) == 2
    assert "valid methods" in capsys.readouterr().err


def test_cli_prune_bad_option_exits_2_before_any_work(tmp_path, capsys) -> None:
    from prunekit.cli import main

    base = tmp_path / "base.pt"
    prunekit.save(create_model("lenet_300_100", width=0.1), base, meta={"dataset": "synthetic"})
    out = tmp_path / "out"
    rc = main(["prune", "--checkpoint", str(base), "--method", "id_iter", "--target", "flops=2",
               "--option", "nosuch=1", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "nosuch" in err and "k (float" in err
    assert not (out / "model.pt").exists()


# --------------------------------------------------------------------------------------------- extension
class _RowMax(ChannelScorer):
    """Largest |w| of each channel's producer rows (defined in a test)."""

    defaults = {"power": 1.0}
    option_help = {"power": "exponent applied to the score"}

    def score(self, model, ctx):
        return {g.key: ctx.producer_rows(model, g).abs().amax(1) ** self.power for g in ctx.groups()}


@pytest.fixture
def row_max():
    register_method("_test_row_max", granularity="channel", family="test")(_RowMax)
    yield "_test_row_max"
    unregister_method("_test_row_max")


def test_a_criterion_defined_in_a_test_runs_everywhere(row_max, tmp_path, capsys) -> None:
    from prunekit.bench.config import load_experiment
    from prunekit.bench.runner import Runner
    from prunekit.cli import main

    # 1. the Python API
    model = create_model("lenet_300_100", width=0.25, in_channels=3, image_size=32)  # the synthetic default
    res = prunekit.prune(model, row_max, "flops=2", input_shape=(3, 32, 32), power=2.0)
    assert abs(res.report["flops_speedup"] / 2 - 1) <= 0.05
    assert res.model(torch.randn(2, 3, 32, 32)).shape == (2, 10)

    # 2. the CLI, with its typed option
    base = tmp_path / "base.pt"
    prunekit.save(model, base, meta={"dataset": "synthetic"})
    out = tmp_path / "cli"
    rc = main(["prune", "--checkpoint", str(base), "--method", row_max, "--target", "flops=2", "--option",
               "power=2", "--dataset", "synthetic", "--prune-samples", "32", "--out", str(out), "--no-latency",
               "--quiet", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert abs(json.loads((out / "metrics.json").read_text())["flops_speedup"] / 2 - 1) <= 0.05
    assert main(["methods", row_max]) == 0 and "exponent applied" in capsys.readouterr().out

    # 3. a benchmark cell with the real pruning pipeline
    doc = {"name": "ext", "model": "lenet_300_100", "model_kwargs": {"width": 0.1}, "dataset": "synthetic",
           "dataset_kwargs": {"in_channels": 1, "image_size": 8, "n": 128},
           "base": {"train": {"epochs": 1, "lr": 0.05, "batch_size": 64}},
           "methods": [{"name": row_max, "options": {"power": 2.0}}], "targets": {"channel": ["flops=2"]},
           "seeds": [0], "finetune": {"epochs": 0}, "prune": {"prune_set": 32}, "measure": {"latency": False}}
    Runner(load_experiment(doc), tmp_path / "bench", progress=False, log=lambda m: None).run()
    rows = [json.loads(line) for line in (tmp_path / "bench" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["status"] == "ok", rows
    assert rows[0]["method"] == row_max and abs(rows[0]["flops_speedup"] / 2 - 1) <= 0.05
