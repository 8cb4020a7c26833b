"""Peer libraries as methods: Torch-Pruning's MetaPruner and torch.nn.utils.prune produce valid plans."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from prunekit.methods import create_method, get_method_info, list_methods
from prunekit.methods.base import PruneContext, Target
from prunekit.metrics import count_flops, count_params
from prunekit.models import create_model

TP_METHODS = ["tp_l1", "tp_l2", "tp_taylor", "tp_hessian", "tp_lamp"]


def _tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    m = create_model("resnet20", width=0.25).eval()
    with torch.no_grad():  # non-trivial BN statistics so that scores differ between channels
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m


def _data(shape=(3, 32, 32), n=2, bs=8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(bs, *shape, generator=g), torch.randint(0, 10, (bs,), generator=g)) for _ in range(n)]


def _options(name: str) -> dict:
    return {"samples": 8} if get_method_info(name).needs_grad else {}


def test_peers_registered_with_metadata():
    names = list_methods(family="peer")
    assert set(TP_METHODS + ["torch_prune_l1"]) <= set(names)
    for n in TP_METHODS:
        info = get_method_info(n)
        assert info.granularity == "channel" and info.requires is None  # torch-pruning is a hard dependency
    assert get_method_info("tp_taylor").needs_grad and get_method_info("tp_hessian").needs_grad
    assert get_method_info("torch_prune_l1").granularity == "weight"


@pytest.mark.parametrize("name", TP_METHODS)
def test_tp_peer_plan_is_valid_and_meets_flops_target(name):
    from prunekit.surgery.apply import apply_plan
    from prunekit.surgery.graph import analyze

    model = _tiny_resnet()
    before = copy.deepcopy(model.state_dict())
    ctx = PruneContext(Target.parse("flops=2"), (3, 32, 32), data=_data())
    plan = create_method(name, **_options(name)).plan(model, ctx)
    # the user's model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    graph = analyze(model, (3, 32, 32), warn=False)
    assert plan.channels and not plan.masks
    for key, keep in plan.channels.items():
        g = graph.groups[key]
        assert g.prunable and keep.dtype == torch.long and 0 < len(keep) < g.size
        assert torch.equal(keep, keep.sort().values) and int(keep.max()) < g.size
    pruned = apply_plan(model, plan, graph, mode="physical")
    assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    reduction = count_flops(model, (3, 32, 32)) / count_flops(pruned, (3, 32, 32))
    assert abs(reduction / 2 - 1) <= 0.05, reduction


def test_tp_peer_matches_torch_pruning_itself():
    """Our plan, applied by prunekit, gives every layer the width Torch-Pruning's own pruning gives it."""
    import torch_pruning as tp

    from prunekit.surgery.apply import apply_plan

    model = _tiny_resnet()
    plan = create_method("tp_l2").plan(model, PruneContext(Target.parse("flops=2"), (3, 32, 32)))
    ours = apply_plan(model, plan, mode="physical")
    theirs = copy.deepcopy(model)
    pruner = tp.pruner.MetaPruner(theirs, torch.randn(1, 3, 32, 32), tp.importance.GroupMagnitudeImportance(p=2),
                                  global_pruning=True, pruning_ratio=plan.meta["tp_pruning_ratio"],
                                  max_pruning_ratio=0.95, ignored_layers=[theirs.fc])
    pruner.step()
    for (n, a), (_, b) in zip(ours.named_modules(), theirs.named_modules()):
        if isinstance(a, nn.Conv2d):
            assert a.out_channels == b.out_channels, n
            w_ours, w_theirs = a.weight, b.weight
            assert torch.allclose(w_ours, w_theirs), n  # the same channels were kept, not just as many


def test_tp_peer_params_target_and_lenet():
    from prunekit.surgery.apply import apply_plan

    torch.manual_seed(0)
    model = create_model("lenet5").eval()
    ctx = PruneContext(Target.parse("params=3"), (1, 28, 28), data=_data((1, 28, 28)))
    plan = create_method("tp_taylor", samples=8).plan(model, ctx)
    pruned = apply_plan(model, plan, mode="physical")
    ratio = count_params(model)["params"] / count_params(pruned)["params"]
    assert abs(ratio / 3 - 1) <= 0.05, ratio
    with pytest.raises(Exception, match="needs data"):
        m = create_method("tp_taylor")
        m.check(PruneContext(Target.parse("flops=2"), (1, 28, 28)))


def test_tp_unreachable_target_is_a_clear_error():
    from prunekit.errors import PruningError

    with pytest.raises(PruningError, match="reaches the target"):
        create_method("tp_l1", max_pruning_ratio=0.1).plan(_tiny_resnet(),
                                                            PruneContext(Target.parse("flops=4"), (3, 32, 32)))


@pytest.mark.parametrize("target", ["params=4", "ratio=0.5", "flops=2"])
def test_torch_prune_l1_masks(target):
    from torch.nn.utils import prune

    from prunekit.metrics import effective_flops
    from prunekit.surgery.masks import apply_masks_

    model = _tiny_resnet()
    before = copy.deepcopy(model.state_dict())
    plan = create_method("torch_prune_l1").plan(model, PruneContext(Target.parse(target), (3, 32, 32)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert plan.masks and not plan.channels and "fc.weight" not in plan.masks
    for k, m in plan.masks.items():
        assert m.dtype == torch.bool and m.shape == model.get_submodule(k.rpartition(".")[0]).weight.shape
    masked = apply_masks_(copy.deepcopy(model), plan.masks)
    t = Target.parse(target)
    if t.kind == "params":
        c = count_params(masked)  # relative to the model as given (its zeros, e.g. BatchNorm betas, count), as
        assert abs(count_params(model)["nonzero_params"] / c["nonzero_params"] / 4 - 1) < 0.01  # allocate_weights
    elif t.kind == "flops":
        red = count_flops(model, (3, 32, 32)) / effective_flops(masked, (3, 32, 32))
        assert abs(red / 2 - 1) <= 0.05
    else:  # the same masks as calling torch.nn.utils.prune directly
        ref = copy.deepcopy(model)
        pairs = [(ref.get_submodule(k.rpartition(".")[0]), "weight") for k in plan.masks]
        total = sum(m.weight.numel() for m, _ in pairs)
        prune.global_unstructured(pairs, pruning_method=prune.L1Unstructured, amount=round(0.5 * total))
        for k, (mod, _) in zip(plan.masks, pairs):
            assert torch.equal(plan.masks[k], mod.weight_mask.bool())
