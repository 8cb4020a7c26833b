"""The benchmark runner: config validation, overrides, resume, failures, shards, merge, report.

Everything runs on a tiny synthetic setup (an 8x8 one-channel dataset, a narrow LeNet-300-100)
with a stand-in prune function injected into the runner and throw-away methods registered here.
"""

from __future__ import annotations

import argparse
import json
import types
import warnings
from pathlib import Path

import pytest
import torch

from prunekit.bench import results as R
from prunekit.bench.config import apply_overrides, list_presets, load_experiment
from prunekit.bench.report import aggregate, pareto_front, render_report
from prunekit.bench.runner import Runner, parse_shard, plan_cells, shard_cells
from prunekit.errors import ConfigError
from prunekit.methods import register_method, unregister_method
from prunekit.methods.base import Method, PruneContext, Target
from prunekit.surgery.plan import Plan

# --------------------------------------------------------------------------------------------- doubles
CALLS: list[tuple[str, str, int]] = []


class _Zeroing(Method):
    """Keep the largest |w| of every linear weight, so that compression is ~ the target."""

    defaults = {"boom_after": -1}

    def plan(self, model: torch.nn.Module, ctx: PruneContext) -> Plan:
        keep = 1.0 / ctx.target.value if ctx.target.kind in ("params", "flops") else 1.0 - ctx.target.value
        masks = {}
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.ndim == 2:
                k = max(1, int(p.numel() * keep))
                thr = p.detach().abs().flatten().kthvalue(p.numel() - k + 1).values
                masks[name] = p.detach().abs() >= thr
        return Plan(method=self.name, masks=masks)


class _Broken(Method):
    defaults: dict = {}

    def plan(self, model: torch.nn.Module, ctx: PruneContext) -> Plan:
        raise RuntimeError("scoring exploded on purpose")


@pytest.fixture(autouse=True)
def _doubles():
    names = {"bench_zero": ("weight", _Zeroing, None), "bench_zero_ch": ("channel", _Zeroing, None),
             "bench_broken": ("weight", _Broken, None),
             "bench_missing": ("weight", _Zeroing, "a_package_that_is_not_installed_xyz")}
    for name, (gran, cls, req) in names.items():
        register_method(name, granularity=gran, family="test", requires=req)(type(f"T_{name}", (cls,), {}))
    CALLS.clear()
    MODES.clear()
    yield
    for name in names:
        unregister_method(name)


MODES: list[str] = []


def stub_prune(model, method, target, data=None, *, input_shape, mode="physical", **options):
    """Stand-in for prunekit.api.prune: plan with the registered method, apply masks in place."""
    from prunekit.methods import create_method
    from prunekit.surgery.masks import apply_masks_

    seed = int(torch.initial_seed())
    CALLS.append((method, target, seed))
    MODES.append(f"{method}:{mode}")
    boom = options.get("boom_after", -1)
    if boom >= 0 and len(CALLS) > boom:
        raise KeyboardInterrupt  # simulates the user killing the run mid-sweep
    warnings.warn(f"stub warning from {method}", UserWarning, stacklevel=1)
    plan = create_method(method, **options).plan(model, PruneContext(Target.parse(target), input_shape, data=data))
    apply_masks_(model, plan.masks)
    return types.SimpleNamespace(model=model, plan=plan, report={"prune_seconds": 0.001})


def tiny_doc(**over) -> dict:
    doc = {
        "name": "tiny", "model": "lenet_300_100", "model_kwargs": {"width": 0.1}, "dataset": "synthetic",
        "dataset_kwargs": {"in_channels": 1, "image_size": 8, "n": 128},
        "base": {"train": {"epochs": 1, "lr": 0.05, "batch_size": 64}},
        "methods": ["bench_zero", "bench_zero_ch"],
        "targets": {"weight": ["params=2", "params=4"], "channel": ["flops=2"]},
        "seeds": [0, 1], "finetune": {"epochs": 0}, "prune": {"prune_set": 32},
        "measure": {"latency": False},
    }
    doc.update(over)
    return doc


def run(doc: dict, out: Path, **kw):
    shard = kw.pop("shard", None)
    methods = kw.pop("methods", None)
    return Runner(load_experiment(doc), out, prune_fn=stub_prune, progress=False, log=lambda m: None,
                  **kw).run(shard=shard, methods=methods)


# --------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("doc_over, needles", [
    ({"epochz": 3}, ["unknown key 'epochz'", "valid keys", "finetune", "methods"]),
    ({"finetune": {"epoch": 1}}, ["unknown key 'finetune.epoch'", "epochs", "lr"]),
    ({"finetune": {"epochs": "lots"}}, ["finetune.epochs"]),
    ({"finetune": {"schedule": "linear"}}, ["finetune.schedule", "cosine"]),
    ({"methods": ["no_such_method"]}, ["methods[0].name", "no_such_method", "valid methods", "bench_zero"]),
    ({"methods": [{"name": "bench_zero", "options": {"nope": 1}}]}, ["methods[0].options", "boom_after"]),
    ({"model": "resnet9000"}, ["model", "resnet9000", "valid models", "resnet20"]),
    ({"dataset": "imagenet"}, ["dataset", "imagenet", "fashion-mnist"]),
    ({"targets": {"weight": ["params=0.5"]}}, ["targets.weight[0]", "must be > 1"]),
    ({"seeds": [0, 0]}, ["seeds", "distinct"]),
    ({"base": {}}, ["base", "checkpoint", "train"]),
])
def test_config_errors_name_key_and_choices(doc_over, needles):
    with pytest.raises(ConfigError) as e:
        load_experiment(tiny_doc(**doc_over))
    msg = str(e.value)
    for n in needles:
        assert n in msg, (n, msg)


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="valid presets: .*quick"):
        load_experiment("definitely-not-a-preset")


def test_set_overrides():
    doc = apply_overrides(tiny_doc(), ["finetune.epochs=0.5", "seeds=[3, 4]", "measure.latency_batch_sizes=[1,8]",
                                       "methods.0.options.boom_after=7", "targets.weight=[params=8]", "name=x y"])
    exp = load_experiment(doc)
    assert exp.finetune.epochs == 0.5 and exp.seeds == [3, 4] and exp.measure.latency_batch_sizes == [1, 8]
    assert exp.methods[0].options == {"boom_after": 7} and exp.targets.weight == ["params=8"]
    assert exp.name == "x y"
    exp2 = load_experiment("quick", ["finetune.lr=0.02", "methods=[magnitude, l1]", "seeds=1"])
    assert exp2.finetune.lr == 0.02 and [m.name for m in exp2.methods] == ["magnitude", "l1"] and exp2.seeds == [1]
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["no_equals_sign"])
    with pytest.raises(ConfigError, match="unknown key 'finetune.lrr'"):
        load_experiment(tiny_doc(), ["finetune.lrr=1"])


def test_presets_load_and_quick_grid():
    names = list_presets()
    assert {"quick", "cifar10-resnet20", "cifar10-resnet56", "cifar10-vgg16", "cifar100-wrn32"} <= set(names)
    for n in names:
        load_experiment(n)
    q = load_experiment("quick")
    assert q.model == "lenet5" and q.dataset == "fashion-mnist" and q.methods == "all" and q.seeds == [0]
    assert all(len(q.targets.for_granularity(g)) == 3 for g in ("weight", "channel", "lowrank"))
    w = load_experiment("cifar100-wrn32")
    assert w.model_kwargs == {"width": 4} and w.dataset == "cifar100"


# --------------------------------------------------------------------------------------------- runner
def test_run_writes_rows_and_resumes(tmp_path):
    s = run(tiny_doc(), tmp_path)
    assert (s.total, s.ok, s.failed) == (6, 6, 0)
    assert len(CALLS) == 6
    rows = R.load_rows(tmp_path)
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    r = next(r for r in rows if r["method"] == "bench_zero" and r["target"] == "params=4")
    for key in ("top1_base", "top1_pruned", "agreement_pruned", "params_dense", "params_nonzero", "flops_base",
                "flops_effective", "compression", "flops_speedup", "prune_seconds", "finetune_epochs",
                "prunekit_version", "cpu", "threads", "timestamp", "cell_id", "duration_s"):
        assert r.get(key) is not None, key
    assert r["compression"] > 2.5 and r["params_dense"] == r["params_base"]
    assert "stub warning from bench_zero" in r["warnings"]  # warnings are kept with the row
    assert {c["seed"] for c in rows} == {0, 1}
    assert {seed for *_, seed in CALLS} == {0, 1}  # each cell seeds its own RNG
    # weight methods are applied masked (fine-tuning keeps the zeros), structured ones physically
    assert set(MODES) == {"bench_zero:masked", "bench_zero_ch:physical"}
    assert "Time per method" in (tmp_path / "report.md").read_text()
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert header[: len(R.COLUMNS)] == list(R.COLUMNS)
    assert (tmp_path / "config.yaml").is_file() and "bench_zero" in (tmp_path / "config.yaml").read_text()
    assert len(list((tmp_path / "base").glob("*.pt"))) == 1  # the base model was trained once and cached
    CALLS.clear()
    s2 = run(tiny_doc(), tmp_path)
    assert CALLS == [] and s2.done_before == 6 and s2.ran == 0
    s3 = run(tiny_doc(), tmp_path, methods=["bench_zero"])  # --methods: a subset, all done already
    assert s3.total == 4 and CALLS == []


def test_killed_run_resumes_without_recomputing(tmp_path):
    doc = tiny_doc(methods=[{"name": "bench_zero", "options": {"boom_after": 3}}])
    with pytest.raises(KeyboardInterrupt):
        run(doc, tmp_path)
    done = R.load_rows(tmp_path)
    assert len(done) == 3 and len(CALLS) == 4  # the 4th cell was in progress when the run was killed
    CALLS.clear()
    s = run(doc, tmp_path)  # the same command again: only the unfinished cell runs
    assert s.done_before == 3 and s.ran == 1 and len(CALLS) == 1
    assert len(R.load_rows(tmp_path)) == 4 and all(r["status"] == "ok" for r in R.load_rows(tmp_path))


def test_failing_cell_recorded_and_sweep_goes_on(tmp_path):
    s = run(tiny_doc(methods=["bench_broken", "bench_zero", "bench_missing"]), tmp_path)
    rows = R.load_rows(tmp_path)
    bad = [r for r in rows if r["method"] == "bench_broken"]
    assert len(bad) == 4 and all(r["status"] == "failed" for r in bad)
    assert all("scoring exploded on purpose" in r["error"] and "RuntimeError" in r["error"] for r in bad)
    assert all("_Broken" in r["traceback"] or "plan" in r["traceback"] for r in bad)
    assert all(r["status"] == "ok" for r in rows if r["method"] == "bench_zero")
    skipped = [r for r in rows if r["method"] == "bench_missing"]
    assert len(skipped) == 4 and all(r["status"] == "skipped" and "not installed" in r["error"] for r in skipped)
    assert (s.ok, s.failed, s.skipped) == (4, 4, 4)
    report = (tmp_path / "report.md").read_text()
    assert "Failed cells" in report and "scoring exploded" in report and "Skipped methods" in report
    # failed cells count as finished; --retry-failed recomputes them; skipped rows are not duplicated
    n_lines = len(R.read_jsonl(tmp_path / R.JSONL))
    CALLS.clear()
    run(tiny_doc(methods=["bench_broken", "bench_zero", "bench_missing"]), tmp_path)
    assert CALLS == [] and len(R.read_jsonl(tmp_path / R.JSONL)) == n_lines
    run(tiny_doc(methods=["bench_broken", "bench_zero", "bench_missing"]), tmp_path, retry_failed=True)
    assert [c[0] for c in CALLS] == ["bench_broken"] * 4


def test_shards_partition_the_grid_and_merge_dedupes(tmp_path):
    exp = load_experiment(tiny_doc())
    cells = plan_cells(exp)
    a, b = shard_cells(cells, parse_shard("0/2")), shard_cells(cells, parse_shard("1/2"))
    ids = lambda cs: {c.config_hash for c in cs}  # noqa: E731  (cell ids also need the base model)
    assert ids(a).isdisjoint(ids(b)) and ids(a) | ids(b) == ids(cells) and len(ids(cells)) == len(cells)
    assert shard_cells(cells, (0, 2)) == a  # deterministic
    with pytest.raises(ConfigError):
        parse_shard("2/2")
    s0 = run(tiny_doc(), tmp_path / "s0", shard="0/2")
    s1 = run(tiny_doc(), tmp_path / "s1", shard="1/2")
    assert s0.ran + s1.ran == len(cells) and len(CALLS) == len(cells)
    merged = R.merge([tmp_path / "s0", tmp_path / "s1", tmp_path / "s0"], tmp_path / "all")
    assert len(merged) == len(cells) and {r["cell_config_hash"] for r in merged} == ids(cells)
    assert len({r["base_fingerprint"] for r in merged}) == 1 and len({r["cell_id"] for r in merged}) == len(cells)
    assert len(R.read_jsonl(tmp_path / "all" / R.JSONL)) == len(cells)
    # a shard then the full grid: the full run only computes what the shard did not
    CALLS.clear()
    s = run(tiny_doc(), tmp_path / "s0")
    assert s.done_before == len(a) and len(CALLS) == len(b)


def test_dedupe_prefers_ok_then_newest():
    rows = [{"cell_id": "a", "status": "failed", "timestamp": "2"}, {"cell_id": "a", "status": "ok", "timestamp": "1"},
            {"cell_id": "b", "status": "ok", "timestamp": "1"}, {"cell_id": "b", "status": "ok", "timestamp": "3"}]
    out = {r["cell_id"]: r for r in R.dedupe(rows)}
    assert out["a"]["status"] == "ok" and out["b"]["timestamp"] == "3"


def test_torn_last_line_is_ignored(tmp_path):
    R.append_row(tmp_path, {"cell_id": "x", "status": "ok"})
    with open(tmp_path / R.JSONL, "a") as f:
        f.write('{"cell_id": "y", "sta')  # a writer killed mid-line
    assert [r["cell_id"] for r in R.load_rows(tmp_path)] == ["x"]


def test_report_and_plots(tmp_path):
    run(tiny_doc(methods=["bench_zero", "bench_zero_ch", "bench_broken"], finetune={"epochs": 0.5, "lr": 0.01},
                 measure={"latency": True, "latency_repeats": 1, "latency_warmup": 0}), tmp_path)
    rows = R.load_rows(tmp_path)
    report = (tmp_path / "report.md").read_text()
    for needle in ("## Target `params=2`", "## Target `flops=2`", "top-1 fine-tuned %", "latency × b1",
                   "Pareto front", "±", "**"):
        assert needle in report, needle
    pngs = list((tmp_path / "plots").glob("*.png"))
    assert len(pngs) >= 4 and all(p.stat().st_size > 1000 for p in pngs)
    r = next(r for r in rows if r["status"] == "ok")
    assert r["top1_finetuned"] is not None and r["latency_speedup_b64"] > 0 and r["finetune_epochs"] == 0.5
    if "ort_latency_skipped" not in r:  # onnxruntime installed (the dev extra): deployed latency in every row
        assert r["ort_latency_b64_pruned_ms"] > 0 and r["ort_latency_speedup_b1"] > 0 and "ORT × b64" in report
        fastest_base = min(r["latency_b64_base_ms"], r["ort_latency_b64_base_ms"])
        fastest_pruned = min(r["latency_b64_pruned_ms"], r["ort_latency_b64_pruned_ms"])
        assert r["latency_speedup"] == pytest.approx(fastest_base / fastest_pruned)
    aggs = aggregate(rows)
    assert all(a["n"] == 2 for a in aggs)
    front = pareto_front(aggs)
    assert front and all(not any(q["flops_speedup"] > p["flops_speedup"] and q["top1_final"] > p["top1_final"]
                                 for q in aggs) for p in front)
    assert render_report([]).startswith("# Benchmark")
    # the summary: one line per method, one column per target of its granularity, top-1 % of the mean
    summary = report.split("## Summary", 1)[1].split("## Target", 1)[0]
    assert "| weight method | `params=2` | `params=4` |" in summary and "| channel method | `flops=2` |" in summary
    a = next(a for a in aggs if a["label"] == "bench_zero" and a["target"] == "params=4")
    assert f"{100 * a['top1_final']:.1f} ({a['compression']:.2f}x)" in summary


# --------------------------------------------------------------------------------------------- CLI
def _cli(argv: list[str]) -> int:
    from prunekit.bench.cli import add_commands

    p = argparse.ArgumentParser(prog="prunekit")
    add_commands(p.add_subparsers(dest="command"))
    args = p.parse_args(argv)
    return args.fn(args)


def test_cli_dry_run_merge_report_list(tmp_path, capsys):
    exp_file = tmp_path / "exp.yaml"
    import yaml

    exp_file.write_text(yaml.safe_dump(tiny_doc()))
    assert _cli(["bench", str(exp_file), "--out", str(tmp_path / "o"), "--dry-run", "--shard", "1/2",
                 "--set", "seeds=[0]"]) == 0
    out = capsys.readouterr().out
    assert "cell(s)" in out and out.count("seed=0") >= 1 and "seed=1" not in out
    run(tiny_doc(), tmp_path / "a", shard="0/2")
    run(tiny_doc(), tmp_path / "b", shard="1/2")
    assert _cli(["bench", "merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")]) == 0
    assert len(R.load_rows(tmp_path / "m")) == 6
    assert (tmp_path / "m" / "report.md").is_file() and (tmp_path / "m" / "config.yaml").is_file()
    assert _cli(["bench", "report", str(tmp_path / "m")]) == 0
    assert _cli(["bench", "list"]) == 0 and "quick" in capsys.readouterr().out
    csv_rows = (tmp_path / "m" / "results.csv").read_text().splitlines()
    assert len(csv_rows) == 7
    assert json.loads(json.dumps(R.load_rows(tmp_path / "m")[0]))["status"] == "ok"


def test_tensorboard_scalars_when_available(tmp_path, monkeypatch):
    import sys

    from prunekit.bench.plots import write_tensorboard

    rows = [{"cell_id": "a", "status": "ok", "method": "m", "label": "m", "target": "flops=2", "target_kind": "flops",
             "target_value": 2.0, "top1_pruned": 0.5, "top1_final": 0.6, "flops_speedup": 2.0}]
    scalars: list[tuple[str, float, int]] = []

    class FakeWriter:
        def __init__(self, log_dir: str):
            self.log_dir = log_dir

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            scalars.append((tag, value, step))

        def close(self) -> None:
            pass

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    assert write_tensorboard(rows, tmp_path) == [tmp_path / "tb"]
    assert ("flops/top1_pruned/m", 0.5, 200) in scalars and ("flops/flops_speedup/m", 2.0, 200) in scalars
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed: silently nothing
    assert write_tensorboard(rows, tmp_path) == []


def test_replaced_base_model_is_refused_on_resume(tmp_path):
    import torch

    from prunekit.errors import PrunekitError
    from prunekit.io import load, save

    run(tiny_doc(seeds=[0]), tmp_path)
    (cached,) = (tmp_path / "base").glob("*.pt")
    m = load(cached)
    with torch.no_grad():
        next(m.parameters()).add_(0.01)  # "the checkpoint was retrained"
    save(m, cached)
    with pytest.raises(PrunekitError, match="base model differs"):
        run(tiny_doc(seeds=[0, 1]), tmp_path)
    s = run(tiny_doc(seeds=[0, 1]), tmp_path / "fresh")  # a new --out works
    assert s.ok == 6


def test_method_overrides_with_all():
    from prunekit.errors import ConfigError

    over = [{"name": "bench_zero", "options": {"boom_after": 99}, "targets": ["params=3"]}]
    exp = load_experiment(tiny_doc(methods="all", method_overrides=over))
    specs = {s.name: s for s in exp.method_specs()}
    assert specs["bench_zero"].options == {"boom_after": 99} and specs["bench_zero"].targets == ["params=3"]
    assert "bench_zero_ch" in specs and specs["bench_zero_ch"].options == {}
    listed = load_experiment(tiny_doc(method_overrides=over))  # with a list, the list's entries are used as given
    assert [s.options for s in listed.method_specs()] == [{}, {}]
    with pytest.raises(ConfigError, match=r"method_overrides\[0\].options"):
        load_experiment(tiny_doc(methods="all", method_overrides=[{"name": "bench_zero", "options": {"x": 1}}]))
