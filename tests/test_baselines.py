"""Baseline criteria (prunekit.methods.baselines) against hand-computed values on a tiny net.

The net is conv(2->3, 3x3) -> BN -> ReLU -> conv(3->4, 3x3, bias) -> ReLU(inplace) -> flatten -> linear,
on 2x6x6 inputs, so the second conv's 4 channels reach the classifier as 4 x (2*2) features. The
channel graph is a hand-written stand-in with the fields of ``prunekit.surgery.ChannelGroup``.
"""

from __future__ import annotations

import contextlib
import sys
import types
import warnings
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from prunekit.methods import BudgetOptions, PruneContext, Target, create_method, get_method_info, list_methods

CHANNEL_METHODS = ["random_channel", "l1", "l2", "bn_scale", "activation", "taylor", "obd", "obs"]
WEIGHT_METHODS = ["random", "magnitude", "magnitude_layerwise", "grad_x_weight", "grad_x_weight_layerwise"]


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.relu1 = nn.ReLU()
        self.c2 = nn.Conv2d(3, 4, 3)
        self.relu2 = nn.ReLU(inplace=True)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.relu2(self.c2(self.relu1(self.bn(self.c1(x)))))))


def _group(key: str, size: int, producers: list[str], consumers: list[str],
           norms: list[str]) -> SimpleNamespace:
    return SimpleNamespace(key=key, size=size, producers=producers, consumers=consumers, norms=norms,
                           depthwise=[], prunable=True)


def _setup(seed: int = 0) -> tuple[TinyNet, PruneContext, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(seed)
    model = TinyNet()
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        model.bn.weight.copy_(torch.tensor([-0.5, 2.0, 1.0]))
        model.bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        model.bn.running_mean.copy_(torch.tensor([0.2, -0.1, 0.0]))
        model.bn.running_var.copy_(torch.tensor([1.5, 0.5, 2.0]))
    data = [(torch.randn(3, 2, 6, 6), torch.randint(0, 5, (3,))) for _ in range(2)]
    graph = SimpleNamespace(groups={
        "c1": _group("c1", 3, ["c1"], ["c2"], ["bn"]),
        "c2": _group("c2", 4, ["c2"], ["fc"], []),
        "fc": SimpleNamespace(key="fc", size=5, producers=["fc"], consumers=[], norms=[], depthwise=[],
                              prunable=False),
    })
    ctx = PruneContext(target=Target.parse("flops=2"), input_shape=(2, 6, 6), data=data, graph=graph)
    return model, ctx, data


def _all(data: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])


def _weights(model: nn.Module) -> dict[str, nn.Parameter]:
    return {k: p for k, p in model.named_parameters() if k.endswith("weight") and p.dim() > 1}


def _weight_method(name: str, model: nn.Module, **opts: Any) -> Any:
    m = create_method(name, **opts)
    m.prunable_params = lambda model_, ctx_: _weights(model_)  # the engine's allocator may not exist yet
    return m


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    torch.testing.assert_close(a.double(), b.detach().double(), rtol=rtol, atol=1e-7)


def _no_side_effects(model: nn.Module, training: bool = True) -> None:
    for m in model.modules():
        assert m.training is training
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


# --------------------------------------------------------------------------------------------- metadata
def test_registered_with_metadata() -> None:
    assert set(CHANNEL_METHODS + WEIGHT_METHODS) <= set(list_methods(family="baseline"))
    for name in CHANNEL_METHODS:
        assert get_method_info(name).granularity == "channel"
    for name in WEIGHT_METHODS:
        assert get_method_info(name).granularity == "weight"
    for name in CHANNEL_METHODS + WEIGHT_METHODS:
        assert get_method_info(name).description
    for name in ("grad_x_weight", "grad_x_weight_layerwise", "taylor", "obd", "obs"):
        info = get_method_info(name)
        assert info.needs_grad and info.needs_data
    assert get_method_info("grad_x_weight").needs_labels and get_method_info("taylor").needs_labels
    for name in ("obd", "obs"):
        assert get_method_info(name).needs_second_order
    act = get_method_info("activation")
    assert act.needs_data and not act.needs_grad and not act.needs_labels
    for name in ("random", "magnitude", "magnitude_layerwise", "random_channel", "l1", "l2", "bn_scale"):
        info = get_method_info(name)
        assert not (info.needs_data or info.needs_grad or info.needs_second_order or info.needs_trajectory)
    assert create_method("activation").samples == 1024
    assert create_method("obs").damping == 1e-3


# --------------------------------------------------------------------------------------------- data-free
def test_l1_exact_value() -> None:
    model, ctx, _ = _setup()
    with torch.no_grad():
        model.c1.weight.copy_(torch.arange(1.0, 4.0).view(3, 1, 1, 1).expand(3, 2, 3, 3))
        model.c1.weight[1, 0, 0, 0] = -2.0  # |.| is used
    s = create_method("l1").score(model, ctx)
    assert set(s) == {"c1", "c2"}  # the non-prunable group is not scored
    _close(s["c1"], torch.tensor([1.0, 2.0, 3.0]))
    _close(s["c2"], model.c2.weight.abs().sum((1, 2, 3)) / (3 * 9))


def test_l1_l2_sum_over_coupled_producers() -> None:
    model, ctx, _ = _setup()
    model.c1b = nn.Conv2d(2, 3, 1, bias=False)  # a second producer of the same channels (as a shortcut)
    ctx.graph.groups["c1"].producers = ["c1", "c1b"]
    l1 = create_method("l1").score(model, ctx)["c1"]
    _close(l1, model.c1.weight.abs().sum((1, 2, 3)) / 18 + model.c1b.weight.abs().sum((1, 2, 3)) / 2)
    l2 = create_method("l2").score(model, ctx)["c1"]
    _close(l2, (model.c1.weight.pow(2).sum((1, 2, 3)) + model.c1b.weight.pow(2).sum((1, 2, 3))).sqrt())


def test_l2() -> None:
    model, ctx, _ = _setup()
    s = create_method("l2").score(model, ctx)
    _close(s["c2"], torch.linalg.vector_norm(model.c2.weight.flatten(1), dim=1))


def test_bn_scale_and_l1_fallback_warns() -> None:
    model, ctx, _ = _setup()
    with pytest.warns(UserWarning, match="no affine BatchNorm.*c2"):
        s = create_method("bn_scale").score(model, ctx)
    _close(s["c1"], torch.tensor([0.5, 2.0, 1.0]))
    _close(s["c2"], create_method("l1").score(model, ctx)["c2"])


def test_random_reproducible() -> None:
    model, ctx, _ = _setup()
    a = create_method("random_channel", seed=3).score(model, ctx)
    b = create_method("random_channel", seed=3).score(model, ctx)
    c = create_method("random_channel", seed=4).score(model, ctx)
    assert {k: v.shape for k, v in a.items()} == {"c1": (3,), "c2": (4,)}
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["c2"], c["c2"])
    wa = _weight_method("random", model, seed=1).score(model, ctx)
    wb = _weight_method("random", model, seed=1).score(model, ctx)
    assert {k: v.shape for k, v in wa.items()} == {k: p.shape for k, p in _weights(model).items()}
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_magnitude() -> None:
    model, ctx, _ = _setup()
    for name in ("magnitude", "magnitude_layerwise"):
        s = _weight_method(name, model).score(model, ctx)
        assert set(s) == set(_weights(model))
        for k, p in _weights(model).items():
            assert torch.equal(s[k], p.detach().abs())


def test_layerwise_variants_force_scope(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def fake_allocate(model: nn.Module, ctx: PruneContext, scores: dict[str, torch.Tensor]) -> dict:
        seen.append(ctx.budget.scope)
        return {k: v > v.median() for k, v in scores.items()}

    fake = types.ModuleType("prunekit.surgery.allocate")
    fake.allocate_weights = fake_allocate  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "prunekit.surgery.allocate", fake)
    model, ctx, _ = _setup()
    ctx.budget = BudgetOptions(scope="global")
    for name in ("magnitude", "magnitude_layerwise", "grad_x_weight_layerwise"):
        plan = _weight_method(name, model).plan(model, ctx)
        assert set(plan.masks) == set(_weights(model))
    assert seen == ["global", "layerwise", "layerwise"]
    assert ctx.budget.scope == "global"  # the caller's context is untouched


# --------------------------------------------------------------------------------------------- data-driven
def test_grad_x_weight_matches_autograd() -> None:
    model, ctx, data = _setup()
    model.train()
    model.c1.weight.requires_grad_(False)  # requires_grad is restored, gradients still computed
    s = _weight_method("grad_x_weight", model).score(model, ctx)
    model.c1.weight.requires_grad_(True)
    _no_side_effects(model, training=True)

    ref = TinyNet()
    ref.load_state_dict(model.state_dict())
    ref.eval()  # BN uses running statistics while scoring
    x, y = _all(data)
    F.cross_entropy(ref(x), y).backward()  # mean loss over the whole prune set
    for k, p in _weights(ref).items():
        _close(s[k], (p * p.grad).abs(), rtol=1e-4)
    s2 = _weight_method("grad_x_weight", model, samples=3).score(model, ctx)  # first batch only
    ref.zero_grad()
    F.cross_entropy(ref(data[0][0]), data[0][1]).backward()
    _close(s2["fc.weight"], (ref.fc.weight * ref.fc.weight.grad).abs(), rtol=1e-4)


def test_activation_matches_manual_forward() -> None:
    model, ctx, data = _setup()
    model.train()
    s = create_method("activation", samples=4).score(model, ctx)  # 3 + 1 examples
    _no_side_effects(model, training=True)
    model.eval()
    x = _all(data)[0][:4]
    with torch.no_grad():
        h1 = F.relu(model.bn(model.c1(x)))  # what c2 reads
        h2 = F.relu(model.c2(h1))  # what fc reads, 4 channels x 4 positions
    _close(s["c1"], h1.abs().mean((0, 2, 3)))
    _close(s["c2"], h2.abs().mean((0, 2, 3)))


def test_taylor_matches_manual_computation() -> None:
    model, ctx, data = _setup()
    model.train()
    s = create_method("taylor").score(model, ctx)
    _no_side_effects(model, training=True)
    model.eval()
    x, y = _all(data)
    a1 = model.c1(x)
    a2 = model.c2(F.relu(model.bn(a1)))
    a1.retain_grad()
    a2.retain_grad()
    loss = F.cross_entropy(model.fc(F.relu(a2).flatten(1)), y, reduction="sum")  # per-sample gradients
    loss.backward()
    _close(s["c1"], (a1 * a1.grad).abs().mean((2, 3)).mean(0), rtol=1e-4)
    _close(s["c2"], (a2 * a2.grad).abs().mean((2, 3)).mean(0), rtol=1e-4)
    # at the norm outputs where a group has one (BN output of c1), producers elsewhere
    model.zero_grad()
    sn = create_method("taylor", at="norm").score(model, ctx)
    b1 = model.bn(model.c1(x))
    b1.retain_grad()
    out = model.fc(F.relu(model.c2(F.relu(b1))).flatten(1))
    F.cross_entropy(out, y, reduction="sum").backward()
    _close(sn["c1"], (b1 * b1.grad).abs().mean((2, 3)).mean(0), rtol=1e-4)
    _close(sn["c2"], s["c2"], rtol=1e-6)


def _manual_kfac_conv2(model: TinyNet, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K-FAC factors of ``c2`` with explicit loops over examples and output positions."""
    h1 = F.relu(model.bn(model.c1(x))).detach()
    a2 = model.c2(h1)
    a2.retain_grad()
    F.cross_entropy(model.fc(F.relu(a2).flatten(1)), y, reduction="sum").backward()
    rows, grads = [], []
    for n in range(len(x)):
        for i in range(2):
            for j in range(2):
                rows.append(torch.cat([h1[n, :, i:i + 3, j:j + 3].reshape(-1), torch.ones(1)]))
                grads.append(a2.grad[n, :, i, j])
    rows_t, grads_t = torch.stack(rows).double(), torch.stack(grads).double()
    a = rows_t.T @ rows_t / len(rows)  # E over examples and positions
    g = grads_t.T @ grads_t / len(x)  # 1/N sum over examples and positions
    return a, g


def test_obd_obs_match_manual_kfac() -> None:
    model, ctx, data = _setup()
    model.train()
    obd = create_method("obd", fisher="empirical").score(model, ctx)
    obs = create_method("obs", fisher="empirical", damping=0.1).score(model, ctx)
    _no_side_effects(model, training=True)
    model.eval()
    x, y = _all(data)
    a, g = _manual_kfac_conv2(model, x, y)
    w = torch.cat([model.c2.weight.flatten(1), model.c2.bias[:, None]], 1).detach().double()
    quad = torch.einsum("cd,de,ce->c", w, a, w)
    _close(obd["c2"], quad * g.diagonal(), rtol=1e-4)
    damped = g + 0.1 * g.diagonal().mean() * torch.eye(4, dtype=torch.float64)
    _close(obs["c2"], quad / torch.linalg.inv(damped).diagonal(), rtol=1e-4)
    assert obd["c1"].shape == (3,) and (obd["c1"] >= 0).all()


def test_obd_true_fisher_is_seeded() -> None:
    model, ctx, _ = _setup()
    a = create_method("obd", seed=1).score(model, ctx)
    b = create_method("obd", seed=1).score(model, ctx)
    assert all(torch.equal(a[k], b[k]) and torch.isfinite(a[k]).all() for k in a)


def test_data_methods_need_data() -> None:
    from prunekit.errors import PruningError

    model, ctx, _ = _setup()
    ctx.data = []
    with pytest.raises(PruningError, match="no examples"):
        create_method("taylor").score(model, ctx)
    _no_side_effects(model)


def test_grad_x_weight_on_masked_weights() -> None:
    from prunekit.surgery.masks import apply_masks_

    model, ctx, data = _setup()
    mask = torch.rand(model.c2.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    apply_masks_(model, {"c2.weight": mask})
    m = create_method("grad_x_weight")
    m.prunable_params = lambda model_, ctx_: {"c2.weight": model_.c2.weight, "fc.weight": model_.fc.weight}
    s = m.score(model, ctx)["c2.weight"]
    assert (s[~mask] == 0).all()
    model.eval()
    x, y = _all(data)
    w = model.c2.weight  # the masked weight, a non-leaf tensor
    w.retain_grad()
    out = model.fc(F.relu(F.conv2d(F.relu(model.bn(model.c1(x))), w, model.c2.bias)).flatten(1))
    F.cross_entropy(out, y).backward()
    _close(s, (w * w.grad).abs(), rtol=1e-4)


def test_member_index_tables_are_used() -> None:
    """Channels spread over several rows / features (an attention head) follow the group's member table."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Linear(6, 2))
    heads = torch.tensor([[0, 3, 4], [1, 2, 5]])  # 2 channels of 3 rows each, interleaved
    members = [SimpleNamespace(tensor="0.weight", dim=0, index=heads, role="producer"),
               SimpleNamespace(tensor="1.weight", dim=1, index=heads, role="consumer")]
    group = SimpleNamespace(key="0", size=2, producers=["0"], consumers=["1"], norms=[], depthwise=[],
                            prunable=True, members=members)
    x = torch.randn(5, 3)
    data = [(x, torch.zeros(5, dtype=torch.long))]
    ctx = PruneContext(target=Target.parse("flops=2"), input_shape=(3,), data=data,
                       graph=SimpleNamespace(groups={"0": group}))
    w = model[0].weight.detach()
    _close(create_method("l1").score(model, ctx)["0"], w[heads].abs().mean((1, 2)))
    with torch.no_grad():
        h = model[0](x)
    _close(create_method("activation").score(model, ctx)["0"], h[:, heads].abs().mean((0, 2)))


def test_engine_graph_gives_the_same_scores() -> None:
    graph_mod = pytest.importorskip("prunekit.surgery.graph")
    model, ctx, _ = _setup()
    real = graph_mod.analyze(model, (2, 6, 6))
    assert {g.key for g in real.groups.values() if g.prunable} == {"c1", "c2"}
    real_ctx = PruneContext(target=ctx.target, input_shape=ctx.input_shape, data=ctx.data, graph=real)
    for name in CHANNEL_METHODS:
        with pytest.warns(UserWarning) if name == "bn_scale" else contextlib.nullcontext():
            a, b = create_method(name).score(model, ctx), create_method(name).score(model, real_ctx)
        assert set(a) == set(b)
        for k in a:
            _close(b[k], a[k], rtol=1e-6)


@pytest.mark.parametrize("name", CHANNEL_METHODS + WEIGHT_METHODS)
def test_end_to_end(name: str) -> None:
    prunekit = pytest.importorskip("prunekit")
    if not hasattr(prunekit, "prune"):
        pytest.skip("the engine (prunekit.prune) is not available")
    model, _, data = _setup()
    target = "flops=1.5" if name in CHANNEL_METHODS else "params=2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = prunekit.prune(model, name, target, data=data, input_shape=(2, 6, 6))
    assert result.model(data[0][0]).shape == (3, 5)
    achieved = result.report["achieved"]
    assert (1.3 < achieved < 1.7) if name in CHANNEL_METHODS else abs(achieved / 2 - 1) < 0.05
    _no_side_effects(model)  # prune works on a copy


# --------------------------------------------------------------------------------------------- OBS update
def _kfac_quadratic(delta: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The known quadratic loss increase ``1/2 tr(G dW A dW^T)`` (Fisher ``A (x) G``)."""
    return 0.5 * torch.trace(g @ delta @ a @ delta.T)


def test_obs_update_lowers_the_quadratic_loss_increase() -> None:
    from prunekit.methods.baselines import obs_update

    gen = torch.Generator().manual_seed(0)
    out, d = 6, 5
    m = torch.randn(out, out, generator=gen, dtype=torch.float64)
    g = m @ m.T + 0.1 * torch.eye(out, dtype=torch.float64)  # correlated output factor
    n = torch.randn(d, d, generator=gen, dtype=torch.float64)
    a = n @ n.T + 0.1 * torch.eye(d, dtype=torch.float64)
    w = torch.randn(out, d, generator=gen, dtype=torch.float64)
    removed = torch.tensor([1, 4])
    no_update = w.clone()
    no_update[removed] = 0
    updated = obs_update(w, torch.linalg.inv(g), removed)
    assert torch.equal(updated[removed], torch.zeros(2, d, dtype=torch.float64))
    loss_none = _kfac_quadratic(no_update - w, a, g)
    loss_obs = _kfac_quadratic(updated - w, a, g)
    assert loss_obs < loss_none
    kept = torch.tensor([0, 2, 3, 5])
    for _ in range(20):  # the update is the minimiser over the kept rows
        other = updated.clone()
        other[kept] += 1e-2 * torch.randn(4, d, generator=gen, dtype=torch.float64)
        assert _kfac_quadratic(other - w, a, g) >= loss_obs - 1e-12
    one = obs_update(w, torch.linalg.inv(g), torch.tensor([2]))  # the seed's single-row formula
    gi = torch.linalg.inv(g)
    torch.testing.assert_close(one, w - gi[:, 2:3] @ (w[2:3] / gi[2, 2]))


def test_obs_plan_carries_weights_masked_equals_physical() -> None:
    graph_mod = pytest.importorskip("prunekit.surgery.graph")
    from prunekit.surgery.apply import apply_plan

    model, ctx, data = _setup()
    real = graph_mod.analyze(model, (2, 6, 6))
    ctx = PruneContext(target=Target.parse("flops=1.5"), input_shape=(2, 6, 6), data=data, graph=real,
                       budget=BudgetOptions(latency_aware=False))
    plan = create_method("obs", fisher="empirical").plan(model, ctx)
    assert {"c2.weight", "c2.bias"} <= set(plan.weights) or {"c1.weight"} <= set(plan.weights)
    for path, w in plan.weights.items():
        layer = model.get_submodule(path.rpartition(".")[0])
        assert w.shape[0] < getattr(layer, path.rpartition(".")[2]).shape[0]
    x = data[0][0]
    phys = apply_plan(model, plan, graph=real, mode="physical", example_input=x).eval()
    masked = apply_plan(model, plan, graph=real, mode="masked", example_input=x).eval()
    with torch.no_grad():
        torch.testing.assert_close(phys(x), masked(x), atol=1e-5, rtol=1e-5)
    plain = create_method("obs", fisher="empirical", update=False).plan(model, ctx)
    assert not plain.weights and {k: v.tolist() for k, v in plain.channels.items()} == {
        k: v.tolist() for k, v in plan.channels.items()}
