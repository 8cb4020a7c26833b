"""``prunekit inspect`` and :mod:`prunekit.inspection`: per-layer widths before and after, ranks, sparsity,
parameters, multiply-adds (summing to the model's count) and measured latency; the chart in prune outputs."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn as nn

import prunekit
from prunekit.cli import main
from prunekit.inspection import inspect_model, layer_modules, plot_layers
from prunekit.metrics import count_flops, count_params, effective_flops

R20 = {"width": 0.25}
SHAPE = (3, 32, 32)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    """A briefly trained narrow ResNet-20 on synthetic data, pruned with l1 to flops=2 through the CLI."""
    root = tmp_path_factory.mktemp("inspect")
    common = ["--dataset", "synthetic", "--threads", "1", "--no-latency", "--quiet"]
    assert main(["train", "--model", "resnet20", "--model-kwargs", json.dumps(R20), "--epochs", "0.1",
                 "--out", str(root / "base"), *common]) == 0
    assert main(["prune", "--checkpoint", str(root / "base" / "model.pt"), "--method", "l1", "--target", "flops=2",
                 "--prune-samples", "64", "--out", str(root / "l1"), *common]) == 0
    return root


def _convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def test_inspect_shows_every_conv_before_and_after(pruned_run, capsys):
    ckpt = pruned_run / "l1" / "model.pt"
    capsys.readouterr()
    assert main(["inspect", str(ckpt), "--repeats", "3", "--png", str(pruned_run / "inspect.png")]) == 0
    out = capsys.readouterr().out
    base = prunekit.load(pruned_run / "base" / "model.pt")
    pruned = prunekit.load(ckpt)
    convs, before = _convs(pruned), _convs(base)
    assert len(convs) == 21 and set(convs) == set(before)
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.split() and ln.split()[0] in convs}
    assert set(rows) == set(convs)
    narrowed = 0
    for name, m in convs.items():
        cells = rows[name]
        assert cells[1] == "Conv2d"
        assert cells[2] == f"{before[name].out_channels}→{m.out_channels}", cells
        assert cells[3] == f"{before[name].in_channels}→{m.in_channels}", cells
        narrowed += m.out_channels < before[name].out_channels
        assert re.fullmatch(r"\d+\.\d{3}→\d+\.\d{3}", cells[-1]), cells  # latency before → after, ms
    assert narrowed >= 3  # l1 at flops=2 did narrow layers, and the table shows it
    assert "ms (batch 1)" in out and "widths before pruning: the checkpoint's prune report" in out
    assert "latency: eager PyTorch on cpu, batch 1, 1 thread(s), median of 3 passes" in out
    assert "architecture resnet20, method l1, target flops=2" in out
    assert (pruned_run / "inspect.png").read_bytes()[:8] == PNG
    assert f"wrote {pruned_run / 'inspect.png'}" in out


def test_inspect_json_sums_to_the_models_flops_and_params(pruned_run, capsys):
    ckpt = pruned_run / "l1" / "model.pt"
    capsys.readouterr()
    assert main(["inspect", str(ckpt), "--json", "--repeats", "3", "--latency-batch-size", "4"]) == 0
    rep = json.loads(capsys.readouterr().out)
    pruned = prunekit.load(ckpt)
    arch = prunekit.create_model("resnet20", **R20)
    layers = rep["layers"]
    assert [r["name"] for r in layers] == list(layer_modules(pruned))
    assert sum(r["flops"] for r in layers) == rep["totals"]["flops"] == count_flops(pruned, SHAPE)
    assert sum(r["effective_flops"] for r in layers) == rep["totals"]["effective_flops"] == effective_flops(
        pruned, SHAPE)
    assert sum(r["flops_before"] for r in layers) == rep["totals"]["flops_before"] == count_flops(arch, SHAPE)
    assert rep["totals"]["flops_before"] / rep["totals"]["flops"] == pytest.approx(2.0, rel=0.06)  # the target
    assert rep["totals"]["nonzero_params"] == count_params(pruned)["nonzero_params"]
    assert sum(r["params"] for r in layers) == sum(
        p.numel() for m in layer_modules(pruned).values() for p in m.parameters())
    for r in layers:
        m = pruned.get_submodule(r["name"])
        assert r["params"] == sum(p.numel() for p in m.parameters())
        assert 0 < r["latency_ms"] < rep["totals"]["latency_ms"]
        assert r["latency_before_ms"] > 0
        assert r["sparsity"] == 0.0 and r["rank"] is None  # channel pruning: dense, smaller layers
    assert 0 < rep["totals"]["layer_latency_ms"]
    assert rep["latency"] == {"runtime": "eager", "batch_size": 4, "repeats": 3, "warmup": 3, "threads": 1,
                              "device": "cpu"}
    assert rep["input_shape"] == list(SHAPE) and rep["info"]["method"] == "l1"


def test_inspect_with_base_and_prune_writes_the_chart(pruned_run, capsys):
    base_ckpt = pruned_run / "base" / "model.pt"
    capsys.readouterr()
    assert main(["inspect", str(pruned_run / "l1" / "model.pt"), "--base", str(base_ckpt), "--json",
                 "--no-latency"]) == 0
    rep = json.loads(capsys.readouterr().out)
    base = prunekit.load(base_ckpt)
    assert rep["widths_source"] == f"--base {base_ckpt}" and rep["latency"] is None
    assert rep["totals"]["params_before"] == count_params(base)["params"]
    by_name = {r["name"]: r for r in rep["layers"]}
    for name, m in _convs(base).items():
        assert (by_name[name]["out_before"], by_name[name]["in_before"]) == (m.out_channels, m.in_channels)
    chart = pruned_run / "l1" / "layers.png"  # prunekit prune drew it beside model.pt
    assert chart.read_bytes()[:8] == PNG and chart.stat().st_size > 10_000


def test_inspect_bad_input_exits_2_with_one_line(tmp_path, capsys, pruned_run):
    missing = tmp_path / "missing.pt"
    assert main(["inspect", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == f"prunekit: error: checkpoint {str(missing)!r} does not exist"
    foreign = tmp_path / "state.pt"
    torch.save(prunekit.create_model("lenet5").state_dict(), foreign)
    assert main(["inspect", str(foreign)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a prunekit checkpoint" in err[0] and "bare state_dict" in err[0]
    other = tmp_path / "lenet.pt"
    prunekit.save(prunekit.create_model("lenet5"), other)
    assert main(["inspect", str(pruned_run / "l1" / "model.pt"), "--base", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a 'lenet5' model" in err[0]
    assert main(["inspect", str(other), "--png", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_lowrank_chains_are_one_layer_with_their_ranks():
    torch.manual_seed(0)
    model = prunekit.create_model("resnet20", **R20)
    res = prunekit.prune(model, "svd", "flops=1.5", input_shape=SHAPE)
    insp = inspect_model(res.model, SHAPE, base=model, latency=False)
    names = [r.name for r in insp.layers]
    assert not any(n.endswith((".pre", ".core", ".post")) for n in names)  # factors are not listed apart
    chains = [r for r in insp.layers if r.type == "LowRankConv2d"]
    assert chains
    for r in chains:
        m = res.model.get_submodule(r.name)
        assert r.rank == {k: v for k, v in (("r_in", m.r_in), ("r_out", m.r_out)) if v is not None}
        assert (r.out_after, r.in_after) == (r.out_before, r.in_before)  # a chain keeps the layer's interface
        assert r.flops < r.flops_before
    assert sum(r.flops for r in insp.layers) == count_flops(res.model, SHAPE)
    table = insp.table()
    first = chains[0]
    row = next(ln for ln in table.splitlines() if ln.startswith(first.name + " "))
    assert " ".join(f"{k[2:]} {v}" for k, v in first.rank.items()) in row


def test_weight_sparsity_and_masked_channels(tmp_path):
    torch.manual_seed(0)
    model = prunekit.create_model("lenet5")
    res = prunekit.prune(model, "magnitude", "params=4", input_shape=(1, 28, 28))
    insp = inspect_model(res.model, (1, 28, 28), latency=False)
    for r in insp.layers:
        w = res.model.get_submodule(r.name).weight
        assert r.sparsity == pytest.approx(1 - int(torch.count_nonzero(w)) / w.numel())
        assert (r.out_after, r.in_after) == (r.out_before, r.in_before)
    assert sum(r.effective_flops for r in insp.layers) == effective_flops(res.model, (1, 28, 28))
    assert insp.totals["flops"] == count_flops(res.model, (1, 28, 28))
    masked = prunekit.prune(model, "l1", "flops=2", input_shape=(1, 28, 28), mode="masked")
    mi = inspect_model(masked.model, (1, 28, 28), latency=False)
    conv1 = next(r for r in mi.layers if r.name == "conv1")
    assert conv1.out_after == 6 and conv1.out_live < 6  # masked rows are zero, not removed
    assert f"6→6 ({conv1.out_live} live)" in mi.table()
    assert plot_layers(mi, tmp_path / "m.png").read_bytes()[:8] == PNG
