"""Prune-and-train cells of the benchmark runner (experiment section ``prune_train``).

A tiny synthetic setup (28x28 one-channel images, a half-width LeNet-5) and the real engine: the cells train,
score with gradient-flow measures, remove filters physically and fine-tune.
"""

from __future__ import annotations

import json

import pytest
import torch

from prunekit.bench import results as R
from prunekit.bench.config import load_experiment
from prunekit.bench.runner import Runner
from prunekit.errors import ConfigError


def pt_doc(**over) -> dict:
    doc = {
        "name": "pt-tiny", "model": "lenet5", "model_kwargs": {"width": 0.5}, "dataset": "synthetic",
        "dataset_kwargs": {"in_channels": 1, "image_size": 28, "n": 96},
        "base": {"train": {"epochs": 1, "lr": 0.05, "batch_size": 32}},
        "methods": ["gf_l1", {"name": "gf_grasp", "options": {"imp_samples": 20}},
                    {"name": "gf_bn", "options": {"norm_fallback": True}}],
        "targets": {"channel": ["ratio=0.5"]},
        "seeds": [0], "finetune": {"epochs": 0.5, "lr": 0.02, "batch_size": 32},
        "prune": {"prune_set": 16},
        "prune_train": {"from": "init", "rounds": 2, "epochs_per_round": 0.5, "batch_size": 32, "lr": 0.05},
        "measure": {"latency": False},
        "device": "cpu",
    }
    doc.update(over)
    return doc


def _run(doc: dict, out):
    return Runner(load_experiment(doc), out, progress=False, log=lambda m: None, make_report=False).run()


def test_prune_train_from_init(tmp_path):
    s = _run(pt_doc(), tmp_path)
    rows = {r["method"]: r for r in R.load_rows(tmp_path)}
    assert (s.ok, s.failed) == (3, 0), [r.get("error") for r in rows.values()]
    # half-width LeNet-5: conv2 (8), fc1 (60), fc2 (42) are scored; the stem conv1 is kept
    n0 = 8 + 60 + 42
    for r in rows.values():
        assert r["pt_from"] == "init" and r["pt_rounds"] == 2 and r["filters_original"] == n0
        assert r["filters_kept"] == round(n0 * 0.5) and r["filter_fraction_removed"] == pytest.approx(0.5, abs=0.01)
        assert r["top1_finetuned"] is not None and r["agreement_finetuned"] is not None
        assert r["flops_speedup"] > 1.1 and r["compression"] > 1.1
        assert r["prune_seconds"] >= r["pt_score_seconds"] >= 0
        assert sum(json.loads(r["pt_widths"]).values()) == round(n0 * 0.5) + 3 + 10  # + stem, classifier
    g = rows["gf_grasp"]
    assert g["grasp_mem_mb"] > 0 and g["score_mem_mb"] == g["grasp_mem_mb"]
    assert g["grasp_mem_source"] in ("torch_profiler", "rss_sampled", "getrusage_maxrss")
    assert g["prune_peak_mem_mb"] == pytest.approx(g["grasp_mem_mb"])
    assert rows["gf_l1"].get("grasp_mem_mb") is None and rows["gf_l1"].get("score_mem_mb") is None
    from prunekit.bench.report import render_report

    md = render_report(list(rows.values()))
    assert "## Scoring memory and prune-and-train" in md and "from **init**, 2 round(s) of 0.5 epoch(s)" in md
    line = next(x for x in md.splitlines() if x.startswith("| gf_grasp | `ratio=0.5` | 55/110 |"))
    assert f"{g['grasp_mem_mb']:.1f}" in line


def test_prune_train_from_base_one_shot_matches_global_fraction(tmp_path):
    doc = pt_doc(methods=["gf_loss"], prune_train={"start": "base", "rounds": 1, "epochs_per_round": 0},
                 finetune={"epochs": 0})
    s = _run(doc, tmp_path)
    (r,) = R.load_rows(tmp_path)
    assert s.ok == 1, r.get("error")
    assert r["pt_from"] == "base" and r["filters_kept"] == 55 and r["score_mem_mb"] > 0
    assert r["top1_final"] == r["top1_pruned"]


def test_prune_train_config_checks():
    with pytest.raises(ConfigError, match="ratio=P"):
        load_experiment(pt_doc(targets={"channel": ["flops=2"]}))
    with pytest.raises(ConfigError, match="channel methods"):
        load_experiment(pt_doc(methods=["magnitude"]))
    with pytest.raises(ConfigError, match="prune_train.epochs_per_rond"):
        load_experiment(pt_doc(prune_train={"epochs_per_rond": 1}))
    exp = load_experiment(pt_doc())
    assert exp.prune_train.start == "init" and exp.prune_train.rounds == 2
    # the section changes the cell ids; without it, one-shot experiments keep their old hashes
    doc = pt_doc()
    doc.pop("prune_train")
    plain = load_experiment(doc)
    assert "prune_train" not in plain.relevant() and exp.config_hash() != plain.config_hash()


def test_oneshot_cells_report_score_memory(tmp_path):
    doc = pt_doc(methods=[{"name": "gf_grad_preserve", "options": {"imp_samples": 20, "prune_percent": 0.5}}],
                 finetune={"epochs": 0})
    doc.pop("prune_train")
    s = _run(doc, tmp_path)
    (r,) = R.load_rows(tmp_path)
    assert s.ok == 1, r.get("error")
    assert r["grasp_mem_mb"] > 0 and "pt_from" not in r
    torch.testing.assert_close(r["compression"] > 1.2, True)


def test_cascade_cells_retrain_between_geometric_rounds(tmp_path, monkeypatch):
    """``prune.rounds`` + ``prune.round_epochs``: the prune -> retrain cascade as a one-shot cell, for a filter
    (pfp) and a weight (sipp) method; the final retraining is the finetune section."""
    from prunekit.bench import runner as runner_mod

    calls: list[tuple[float, int]] = []
    original = runner_mod._RoundRetrain.__call__

    def spy(self, model, epochs):
        calls.append((epochs, self.calls))
        return original(self, model, epochs)

    monkeypatch.setattr(runner_mod._RoundRetrain, "__call__", spy)
    doc = pt_doc(methods=[{"name": "pfp", "options": {"samples": 16}}, {"name": "sipp", "options": {"samples": 16}}],
                 targets={"channel": ["flops=2"], "weight": ["params=8"]},
                 prune={"prune_set": 16, "rounds": 3, "round_epochs": 0.5}, prune_train=None)
    s = _run(doc, tmp_path)
    rows = {r["method"]: r for r in R.load_rows(tmp_path)}
    assert (s.ok, s.failed) == (2, 0), [r.get("error") for r in rows.values()]
    assert len(calls) == 4 and {e for e, _ in calls} == {0.5}  # 2 retrainings per cell: between its 3 rounds
    for name, value in (("pfp", 2.0), ("sipp", 8.0)):
        r = rows[name]
        achieved = json.loads(r["round_achieved"])
        assert len(achieved) == 3 and r["report_rounds"] == 3
        for k, a in enumerate(achieved, 1):  # geometric: value^(k/3) after round k
            assert abs(a / value ** (k / 3) - 1) <= 0.05, (name, k, a)
        final = r["flops_speedup"] if name == "pfp" else r["compression"]
        assert abs(final / value - 1) <= 0.05
        assert r["cascade_round_epochs"] == 0.5 and r["cascade_retrain_seconds"] > 0
        assert r["top1_finetuned"] is not None  # the finetune section retrains after the last round


def test_cascade_config_needs_rounds():
    with pytest.raises(ConfigError, match="rounds >= 2"):
        load_experiment(pt_doc(prune={"round_epochs": 1}, prune_train=None))
