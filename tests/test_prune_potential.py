"""Prune potential in the benchmark report (torchprune's definition) on synthetic result rows."""

from __future__ import annotations

import pytest

from prunekit.bench.report import prune_potential, prune_potential_section, render_report

BASE_PARAMS = 1000


def row(label, target, kept, top1, base=0.90, pruned=None, seed=0, status="ok", granularity="weight"):
    return {"status": status, "method": label.split("-")[0], "label": label, "target": target, "seed": seed,
            "granularity": granularity, "params_base": BASE_PARAMS, "params_nonzero": kept,
            "top1_base": base, "top1_final": top1, "top1_pruned": top1 if pruned is None else pruned}


def by_label(rows, **kw):
    return {p["label"]: p for p in prune_potential(rows, **kw)}


def test_largest_fraction_within_tolerance():
    rows = [row("a", "params=2", 500, 0.901), row("a", "params=4", 250, 0.897),   # -0.3 points: within
            row("a", "params=8", 125, 0.880), row("a", "params=16", 62, 0.850)]   # -2 / -5 points: out
    p = by_label(rows)["a"]
    assert p["potential"] == pytest.approx(0.75)
    assert p["target"] == "params=4" and p["top1"] == pytest.approx(0.897)
    assert not p["at_grid_edge"] and not p["none_within"]
    assert [w for _, _, w in p["ratios"]] == [True, True, False, False]


def test_not_monotone_takes_largest_qualifying_and_tolerance_edges():
    # the 8x cell recovers (within 0.5 points) although the 4x one does not: the largest qualifying counts
    rows = [row("b", "params=2", 500, 0.899), row("b", "params=4", 250, 0.890),
            row("b", "params=8", 125, 0.8951), row("b", "params=16", 62, 0.80)]
    assert by_label(rows)["b"]["potential"] == pytest.approx(0.875)
    # exactly 0.5 points below the base is within; a wider / narrower tolerance moves the answer
    edge = [row("c", "params=2", 500, 0.895), row("c", "params=4", 250, 0.889)]
    assert by_label(edge)["c"]["potential"] == pytest.approx(0.5)
    assert by_label(edge, delta=0.02)["c"]["potential"] == pytest.approx(0.75)
    assert by_label(edge, delta=0.001)["c"]["none_within"]


def test_none_within_grid_edge_and_pruned_key():
    rows = [row("d", "params=2", 500, 0.85, pruned=0.85), row("d", "params=4", 250, 0.80, pruned=0.70),
            row("e", "params=2", 500, 0.91, pruned=0.89), row("e", "params=4", 250, 0.905, pruned=0.60)]
    p = by_label(rows)
    assert p["d"]["potential"] == 0.0 and p["d"]["none_within"] and p["d"]["target"] is None
    assert p["e"]["potential"] == pytest.approx(0.75) and p["e"]["at_grid_edge"]
    q = by_label(rows, key="top1_pruned")
    assert q["e"]["potential"] == pytest.approx(0.0) and q["e"]["none_within"]  # 0.89 < 0.895


def test_seeds_are_averaged_and_failed_cells_ignored():
    rows = [row("f", "params=4", 250, 0.90, seed=0), row("f", "params=4", 250, 0.88, seed=1),  # mean 0.89: out
            row("f", "params=2", 500, 0.899, seed=0), row("f", "params=2", 500, 0.897, seed=1),
            row("f", "params=8", None, None, status="failed")]
    p = by_label(rows)["f"]
    assert p["potential"] == pytest.approx(0.5) and len(p["ratios"]) == 2


def test_filter_methods_use_remaining_parameters_and_report_section():
    # a physically pruned model: params_nonzero is its (smaller) dense count; the fraction is of the base
    rows = [row("pfp", "flops=1.5", 700, 0.899, granularity="channel"),
            row("pfp", "flops=2", 550, 0.893, granularity="channel"),
            row("sipp", "params=2", 500, 0.90), row("sipp", "params=16", 62, 0.86)]
    p = by_label(rows)
    assert p["pfp"]["potential"] == pytest.approx(0.3) and p["sipp"]["potential"] == pytest.approx(0.5)
    lines = prune_potential_section(rows)
    text = "\n".join(lines)
    assert lines[0] == "## Prune potential"
    assert "| pfp | channel | 30.0 % | `flops=1.5` | 89.90 |" in text
    assert "| sipp | weight | 50.0 % | `params=2` | 90.00 |" in text
    assert "## Prune potential" in render_report(rows)
    assert prune_potential_section([]) == []


def test_provable_preset_grid():
    """The SiPP / PFP preset validates and holds the comparison of issue 14 with one shared budget."""
    from prunekit.bench.config import list_presets, load_experiment

    assert "cifar10-resnet20-provable" in list_presets()
    e = load_experiment("cifar10-resnet20-provable")
    assert e.model == "resnet20" and e.dataset == "cifar10-jpeg"
    assert e.base.checkpoint == "benchmarks/checkpoints/resnet20-cifar10.pt"
    cells = {s.name: e.targets_for(s) for s in e.method_specs()}
    weight, flops = ["params=2", "params=4", "params=8", "params=16"], ["flops=1.5", "flops=2", "flops=3"]
    assert cells == {**dict.fromkeys(["sipp", "sipp_rand", "magnitude", "torch_prune_l1"], weight),
                     **dict.fromkeys(["pfp", "pfp_rand", "pfp_top", "l1", "tp_l1"], flops)}
    assert 0 < e.finetune.epochs <= 1 and all(not s.options for s in e.method_specs())
    assert e.measure.eval_subset is None or e.measure.eval_subset >= 2000  # (a stratified part of) the test set
