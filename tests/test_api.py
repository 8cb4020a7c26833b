"""The Python API (prunekit.prune), schedules, optimizer-state slicing, fine-tuning and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

import prunekit
from prunekit.errors import PrunekitError, PruningError
from prunekit.methods import ChannelScorer, WeightScorer, register_method, unregister_method
from prunekit.metrics import count_flops
from prunekit.models import create_model, get_model_info
from prunekit.schedule import (
    FineTuner,
    cumulative_fractions,
    round_fractions,
    slice_optimizer_state_,
)
from prunekit.surgery import Plan, analyze, apply_plan_


class _L1(ChannelScorer):
    """Test-only L1 filter norm."""

    def score(self, model, ctx):
        return {g.key: ctx.producer_rows(model, g).abs().mean(1) for g in ctx.groups()}


class _NeedsData(ChannelScorer):
    """Test-only channel scorer that reads the prune set (mean |activation| proxy via the loss)."""

    defaults = {"samples": 64}

    def score(self, model, ctx):
        n = sum(len(x) for x, _ in ctx.batches(self.samples))
        assert n > 0
        return {g.key: ctx.producer_rows(model, g).abs().mean(1) for g in ctx.groups()}


class _Magnitude(WeightScorer):
    """Test-only |w|."""

    def score(self, model, ctx):
        return {p: w.detach().abs() for p, w in self.prunable_params(model, ctx).items()}


TEST_METHODS = {
    "_api_l1": dict(cls=_L1, granularity="channel"),
    "_api_data": dict(cls=_NeedsData, granularity="channel", needs_data=True),
    "_api_magnitude": dict(cls=_Magnitude, granularity="weight"),
}


@pytest.fixture(autouse=True, scope="module")
def _methods_and_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    for name, spec in TEST_METHODS.items():
        spec = dict(spec)
        register_method(
            name,
            granularity=spec.pop("granularity"),
            family="test",
            **spec.pop("extra", {}),
            needs_data=spec.pop("needs_data", False),
        )(spec.pop("cls"))
    yield
    for name in TEST_METHODS:
        unregister_method(name)
    torch.set_num_threads(old)


def tiny(name: str, **kw) -> nn.Module:
    info = get_model_info(name)
    torch.manual_seed(0)
    return create_model(name, in_channels=info.input_size[0], **{**info.tiny_kwargs, **kw})


def batches(shape, n: int = 2, bs: int = 16, classes: int = 10) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(bs, *shape, generator=g), torch.randint(0, classes, (bs,), generator=g))
        for _ in range(n)
    ]


# --------------------------------------------------------------------------------------------- prune()
def test_prune_report_and_copy_semantics() -> None:
    model = tiny("resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = prunekit.prune(model, "_api_l1", "flops=2")
    rep = res.report
    assert abs(rep["flops_speedup"] / 2 - 1) <= 0.05 and rep["target_error"] == pytest.approx(
        rep["flops_speedup"] / 2 - 1
    )
    for key in (
        "compression",
        "base_flops",
        "base_params",
        "params",
        "nonzero_params",
        "flops",
        "effective_flops",
        "prune_seconds",
        "peak_memory_mb",
        "warnings",
        "layers",
        "skipped",
    ):
        assert key in rep
    assert rep["layers"]["layer1.0.conv1"]["before"] == [4, 4] and "fc" in rep["skipped"]
    assert res.model.prunekit_config == model.prunekit_config
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # copy=True left it alone
    assert res.plan.channels and res.plan.method == "_api_l1"
    same = prunekit.prune(model, "_api_l1", "flops=2", copy=False)
    assert same.model is model and count_flops(model, (3, 32, 32)) == rep["flops"]


def test_prune_masked_mode_and_weight_methods() -> None:
    model = tiny("vgg11")
    res = prunekit.prune(model, "_api_l1", "flops=2", mode="masked")
    assert abs(res.report["flops_speedup"] / 2 - 1) <= 0.05
    assert res.report["params"] == res.report["base_params"]  # shapes kept
    res = prunekit.prune(model, "_api_magnitude", "params=4")
    assert abs(res.report["compression"] / 4 - 1) <= 0.05
    assert not prunekit.surgery.get_masks(res.model)  # physical mode bakes weight masks
    res = prunekit.prune(model, "_api_magnitude", "params=4", mode="masked", scope="layerwise")
    assert prunekit.surgery.get_masks(res.model)


def test_prune_errors() -> None:
    model = tiny("lenet5")
    with pytest.raises(PruningError, match="needs data"):
        prunekit.prune(model, "_api_data", "flops=1.5")
    with pytest.raises(PruningError, match="no option"):
        prunekit.prune(model, "_api_l1", "flops=1.5", bogus=1)
    with pytest.raises(PrunekitError, match="unknown method"):
        prunekit.prune(model, "no_such_method", "flops=1.5")
    with pytest.raises(PruningError, match="largest reachable"):
        prunekit.prune(model, "_api_l1", "params=1000")
    with pytest.raises(PruningError, match="must be > 1"):
        prunekit.prune(model, "_api_l1", "flops=1")
    with pytest.raises(PruningError, match="input shape"):
        prunekit.prune(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), "_api_l1", "flops=1.2")


def test_data_forms_and_plain_modules() -> None:
    from prunekit.data import get_dataset

    model = tiny("resnet20")
    ds = get_dataset("synthetic", "train", n=64)
    res = prunekit.prune(model, "_api_data", "flops=1.5", data=ds)  # a dataset is batched for the method
    assert abs(res.report["flops_speedup"] / 1.5 - 1) <= 0.05
    x, y = batches((3, 32, 32), n=1)[0]
    prunekit.prune(model, "_api_data", "flops=1.5", data=(x, y))
    plain = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    res = prunekit.prune(plain, "_api_data", "flops=1.5", data=[(torch.randn(4, 8), torch.zeros(4).long())])
    assert res.model[-1].out_features == 3 and res.model(torch.randn(2, 8)).shape == (2, 3)


def test_vit_heads_and_save_load(tmp_path) -> None:
    model = tiny("vit_tiny")
    res = prunekit.prune(model, "_api_l1", "flops=1.3", heads=True, round_to=1)
    assert abs(res.report["flops_speedup"] / 1.3 - 1) <= 0.05
    prunekit.save(res.model, tmp_path / "v.pt")
    back = prunekit.load(tmp_path / "v.pt").eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(back(x), res.model.eval()(x))


# --------------------------------------------------------------------------------------------- schedules
def test_round_fractions() -> None:
    p, n = 0.7, 4
    for schedule in ("geometric", "linear", "gradflow"):
        r = round_fractions(p, n, schedule)
        assert math.prod(1 - x for x in r) == pytest.approx(1 - p)
    assert round_fractions(p, n, "gradflow") == pytest.approx(
        [p / (k * p + n * (1 - p)) for k in range(1, n + 1)]
    )
    assert cumulative_fractions(0.5, 2, "linear") == [0.25, 0.5]
    assert cumulative_fractions(0.5, 1, thresholds=[0.2, 0.5]) == [0.2, 0.5]
    with pytest.raises(PruningError):
        cumulative_fractions(0.5, 2, thresholds=[0.3, 0.4])
    with pytest.raises(PruningError):
        cumulative_fractions(0.5, 2, "cubic")


@pytest.mark.parametrize("schedule", ["geometric", "gradflow"])
def test_rounds_leave_exactly_the_requested_fraction(schedule: str) -> None:
    model = tiny("resnet20", width=1.0)
    g0 = analyze(model, (3, 32, 32))
    calls = []
    res = prunekit.prune(
        model,
        "_api_l1",
        "ratio=0.5",
        rounds=3,
        schedule=schedule,
        round_to=1,
        finetune=lambda m, e: calls.append(sum(p.numel() for p in m.parameters())),
    )
    assert len(calls) == 3 and calls[0] > calls[1] > calls[2]  # between rounds and after the last
    g1 = analyze(res.model, (3, 32, 32))
    for key, grp in g0.groups.items():
        if grp.prunable:
            assert g1.groups[key].size == round(grp.size * 0.5)
    res = prunekit.prune(model, "_api_l1", "flops=2", rounds=3, schedule=schedule)
    assert abs(res.report["flops_speedup"] / 2 - 1) <= 0.05 and len(res.plans) == 3


def test_masked_rounds_meet_the_target() -> None:
    model = tiny("resnet20", width=1.0)
    res = prunekit.prune(model, "_api_l1", "flops=2", rounds=2, mode="masked")
    assert abs(res.report["flops_speedup"] / 2 - 1) <= 0.05
    res = prunekit.prune(model, "_api_magnitude", "params=4", rounds=3)
    assert abs(res.report["compression"] / 4 - 1) <= 0.05


# --------------------------------------------------------------------------------------------- optimizer
def test_optimizer_momentum_is_sliced_with_the_channels() -> None:
    model = tiny("resnet20")
    x, y = batches((3, 32, 32), n=1)[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    old = dict(model.named_parameters())
    old_buf = {n: opt.state[p]["momentum_buffer"].clone() for n, p in old.items()}
    g = analyze(model, (3, 32, 32))
    keep = {"conv1": torch.tensor([0, 2]), "layer2.0.conv1": torch.tensor([1, 3, 4, 7])}
    apply_plan_(model, Plan(channels=keep), g)
    slice_optimizer_state_(opt, old, model, g.kept_dims(keep))
    new = dict(model.named_parameters())
    buf = opt.state[new["layer1.0.conv1.weight"]]["momentum_buffer"]
    assert torch.equal(buf, old_buf["layer1.0.conv1.weight"][:, [0, 2]])
    buf = opt.state[new["layer2.0.conv1.weight"]]["momentum_buffer"]
    assert torch.equal(buf, old_buf["layer2.0.conv1.weight"][[1, 3, 4, 7]][:, [0, 2]])
    assert torch.equal(opt.state[new["bn1.weight"]]["momentum_buffer"], old_buf["bn1.weight"][[0, 2]])
    assert {id(p) for grp in opt.param_groups for p in grp["params"]} == {id(p) for p in model.parameters()}
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # the optimizer works on the pruned model


def test_finetuner_keeps_optimizer_state_across_rounds() -> None:
    model = tiny("lenet5")
    data = batches((1, 28, 28), n=2)
    tuner = FineTuner(data, epochs=1, lr=0.01)
    res = prunekit.prune(model, "_api_l1", "flops=1.5", data, rounds=2, finetune=tuner)
    assert len(tuner.history) == 2 and tuner.optimizer is not None
    ids = {id(p) for grp in tuner.optimizer.param_groups for p in grp["params"]}
    assert ids == {id(p) for p in res.model.parameters()}
    assert all(p in tuner.optimizer.state for p in res.model.parameters() if p.dim() > 1)
    assert res.report["finetune_seconds"] > 0


# --------------------------------------------------------------------------------------------- CLI
def test_cli_methods_and_prune(tmp_path, capsys) -> None:
    from prunekit.cli import main

    assert main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"_api_l1", "_api_magnitude"} <= {r["name"] for r in rows}
    assert main(["methods", "--granularity", "weight"]) == 0
    assert "_api_magnitude" in capsys.readouterr().out

    model = create_model("resnet20", width=0.25)
    prunekit.save(model, tmp_path / "base.pt", meta={"dataset": "synthetic"})
    out = tmp_path / "out"
    rc = main(
        [
            "prune",
            "--checkpoint",
            str(tmp_path / "base.pt"),
            "--method",
            "_api_data",
            "--target",
            "flops=2",
            "--prune-samples",
            "64",
            "--finetune-epochs",
            "0.25",
            "--batch-size",
            "32",
            "--out",
            str(out),
            "--option",
            "samples=32",
            "--quiet",
            "--device",
            "cpu",
            "--latency-repeats",
            "1",
        ]
    )
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in (
        "top1",
        "top5",
        "params",
        "nonzero_params",
        "flops",
        "effective_flops",
        "latency_ms",
        "per_class",
        "base_top1",
        "agreement",
        "agreement_per_class",
        "flops_speedup",
        "compression",
        "latency_speedup",
        "latency_speedup_b1",
        "prune_seconds",
        "top1_after_prune",
        "agreement_after_prune",
    ):
        assert key in m, key
    assert abs(m["flops_speedup"] / 2 - 1) <= 0.05
    back = prunekit.load(out / "model.pt")
    assert back.prunekit_meta["plan"]["method"] == "_api_data" and "report" in back.prunekit_meta
    rc = main(
        [
            "prune",
            "--checkpoint",
            str(tmp_path / "base.pt"),
            "--method",
            "_api_l1",
            "--target",
            "params=1e6",
            "--out",
            str(out),
            "--no-latency",
        ]
    )
    assert rc == 2 and "largest reachable" in capsys.readouterr().err
