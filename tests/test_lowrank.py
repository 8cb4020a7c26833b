"""Low-rank methods (svd, pca, lrank): factors against dense references, targets, composition with ID."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import prunekit
from prunekit.budget import BudgetOptions
from prunekit.errors import PruningError
from prunekit.methods import PruneContext, Target, create_method, get_method_info
from prunekit.metrics import count_params
from prunekit.models import create_model
from prunekit.surgery.apply import apply_plan
from prunekit.surgery.graph import analyze
from prunekit.surgery.lowrank import LowRankConv2d, LowRankLinear


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _data(shape: tuple[int, ...], n: int = 64, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    return [(x[i:i + 32], torch.arange(32) % 10) for i in range(0, n, 32)]


class _LowRankNet(nn.Module):
    """conv (weights of rank 2 as a (out, in*k*k) matrix, with bias) -> ReLU -> flatten -> linear of rank 3."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 12, 3)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(12 * 4 * 4, 40)
        self.head = nn.Linear(40, 10)
        with torch.no_grad():
            w = torch.randn(12, 2, generator=g) @ torch.randn(2, 27, generator=g)
            self.conv.weight.copy_(w.view(12, 3, 3, 3))
            self.conv.bias.uniform_(-1, 1, generator=g)
            self.fc.weight.copy_(torch.randn(40, 3, generator=g) @ torch.randn(3, 192, generator=g) / 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(self.flatten(torch.relu(self.conv(x))))))


def _plan(method: str, model: nn.Module, target: str, shape, data=None, latency_aware="off", **opts):
    """A plan on a toy model; ``latency_aware="off"`` (the factor tests): ranks exactly as the energy says."""
    ctx = PruneContext(target=Target.parse(target), input_shape=shape, data=data, graph=analyze(model, shape),
                       budget=BudgetOptions(latency_aware=latency_aware))
    return create_method(method, **opts).plan(model, ctx), ctx


def test_svd_factors_are_the_truncated_svd():
    model = _LowRankNet()
    plan, ctx = _plan("svd", model, "params=1.5", (3, 6, 6))
    f = plan.lowrank["conv"]
    assert f.core.shape == (2, 3, 3, 3) and f.post.shape == (12, 2)  # exact rank found by the energy threshold
    assert torch.allclose(f.dense_weight(), model.conv.weight, atol=1e-5)
    assert torch.equal(f.bias, model.conv.bias)
    w = model.fc.weight.detach().double()
    u, s, vh = torch.linalg.svd(w)
    r = plan.lowrank["fc"].core.shape[0]
    assert torch.allclose(plan.lowrank["fc"].dense_weight().double(), (u[:, :r] * s[:r]) @ vh[:r], atol=1e-5)
    assert "head" not in plan.lowrank  # the classifier is left alone


def test_pca_reproduces_low_rank_outputs_and_masked_equals_physical():
    model = _LowRankNet().eval()
    data = _data((3, 6, 6))
    plan, ctx = _plan("pca", model, "params=1.5", (3, 6, 6), data=data)
    assert plan.lowrank["conv"].core.shape[0] == 2 and plan.lowrank["fc"].core.shape[0] == 3
    x = torch.cat([b for b, _ in data])
    physical = apply_plan(model, plan, ctx.graph)
    masked = apply_plan(model, plan, ctx.graph, mode="masked")
    assert isinstance(physical.conv, LowRankConv2d) and isinstance(physical.fc, LowRankLinear)
    with torch.no_grad():
        ref = model(x)
        assert torch.allclose(physical(x), ref, atol=1e-4)  # mean + principal directions: exact here
        assert torch.allclose(masked(x), physical(x), atol=1e-5)
    for name in ("conv", "fc"):  # the factors' dense weight is what masked mode loads
        f = plan.lowrank[name]
        assert torch.allclose(masked.get_submodule(name).weight, f.dense_weight().reshape(f.dense_weight().shape),
                              atol=1e-6)


def test_pca_centres_with_the_output_mean():
    """A conv whose outputs are a constant plus rank-1 variation: PCA at rank 1 keeps the constant in the bias."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.outer(torch.randn(16), torch.randn(8)).view(16, 8, 1, 1))
        conv.bias.copy_(torch.linspace(-3, 3, 16))
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4, 10))
    data = _data((8, 2, 2))
    plan, _ = _plan("pca", model, "params=1.1", (8, 2, 2), data=data)
    f = plan.lowrank["0"]
    assert f.core.shape[0] == 1
    x = torch.cat([b for b, _ in data])
    y = conv(x)
    rebuilt = nn.functional.conv2d(x, f.dense_weight(), f.bias)
    assert torch.allclose(rebuilt, y, atol=1e-4)


@pytest.mark.parametrize("method", ["svd", "pca", "lrank"])
def test_lowrank_methods_meet_params_target(method):
    torch.manual_seed(0)
    model = create_model("resnet20", width=0.5)
    opts = {"steps": 2, "l_steps": 2} if method == "lrank" else {}
    res = prunekit.prune(model, method, "params=1.5", data=_data((3, 32, 32)), **opts)
    assert abs(res.report["compression"] / 1.5 - 1) <= 0.05
    assert res.plan.lowrank and all(f.num_params() < sum(t.numel() for t in model.get_submodule(p).parameters())
                                    for p, f in res.plan.lowrank.items())  # only where the factors are smaller
    with torch.no_grad():
        assert res.model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_lrank_c_step_and_options():
    from prunekit.methods.lowrank import _c_step, _Layer

    layer = _Layer("w", out=10, cols=20, uses=1.0, has_bias=False, nonzero=200)
    sigma = {"w": torch.tensor([5.0, 4.0, 0.1, 0.05, 0.04, 0.03, 0.02, 0.01, 0.01, 0.01], dtype=torch.float64)}
    # no cost pressure: the full (dense) layer; huge pressure: rank 1; in between, the knee at rank 2
    assert _c_step([layer], sigma, mu=1.0, lam=0.0, kind="params")["w"] == 10
    assert _c_step([layer], sigma, mu=1.0, lam=1e6, kind="params")["w"] == 1
    assert _c_step([layer], sigma, mu=1.0, lam=1e-3, kind="params")["w"] == 2
    info = get_method_info("lrank")
    assert info.needs_grad and info.needs_labels and info.granularity == "lowrank"
    assert not get_method_info("svd").needs_data and get_method_info("pca").needs_data
    model = create_model("lenet_300_100", width=0.1)
    res = prunekit.prune(model, "lrank", "params=2", data=_data((1, 28, 28)), steps=2, l_steps=1, keep_ratio=0.6)
    assert res.report["compression"] >= 1 / 0.6 * 0.95  # keep_ratio overrides the target
    assert len(res.plan.meta["history"]) == 1 and "lam" in res.plan.meta


def test_unreachable_target_and_bad_options():
    model = _LowRankNet()
    with pytest.raises(PruningError, match="cannot reach"):
        prunekit.prune(model, "svd", "params=50", input_shape=(3, 6, 6))
    with pytest.raises(PruningError):
        prunekit.prune(model, "svd", "params=2", input_shape=(3, 6, 6), keep_ratio=1.5)
    with pytest.raises(PruningError):
        prunekit.prune(model, "pca", "params=2", input_shape=(3, 6, 6))  # needs data


def test_composition_after_id_iter():
    torch.manual_seed(0)
    model = create_model("resnet20", width=0.5).eval()
    data = _data((3, 32, 32))
    first = prunekit.prune(model, "id_iter", "flops=1.5", data=data, samples=64).model
    n_first = count_params(first)["params"]
    for method, opts in (("pca", {}), ("svd", {}), ("lrank", {"steps": 2, "l_steps": 1})):
        second = prunekit.prune(first, method, "params=1.3", data=data, **opts)
        assert count_params(second.model)["params"] < n_first / 1.25
        with torch.no_grad():
            assert second.model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


class _InputRankNet(nn.Module):
    """A strided 3x3 conv whose weight has rank 2 on its input side (``W[o, i] = sum_r C[o, r] P[r, i]``)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.conv = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(16 * 2 * 2, 10)
        with torch.no_grad():
            core = torch.randn(16, 2, 3, 3, generator=g)
            pre = torch.randn(2, 16, generator=g)
            self.conv.weight.copy_(torch.einsum("orhw,ri->oihw", core, pre))
            self.conv.bias.uniform_(-1, 1, generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(torch.relu(self.conv(x))).flatten(1))


@pytest.mark.parametrize("method", ["svd", "pca"])
def test_input_side_factors_are_exact_and_cost_as_predicted(method):
    """side='input': 1x1 pre (r x in) + core (out x r, the kernel); a weight of input rank 2 (svd) or inputs in a
    2-dim channel subspace (pca) are reproduced exactly, masked == physical, and the chain's parameters and
    multiply-adds are what the plan predicted."""
    from prunekit.metrics import count_flops

    model = _InputRankNet().eval()
    shape = (16, 8, 8)
    g = torch.Generator().manual_seed(2)
    basis = torch.randn(2, 16, generator=g)
    data = [(torch.einsum("nrhw,ri->nihw", torch.randn(32, 2, 8, 8, generator=g), basis), torch.arange(32) % 10)
            for _ in range(2)]
    if method == "pca":  # a full-rank weight: only the inputs are low rank
        with torch.no_grad():
            model.conv.weight.normal_(generator=g)
    plan, ctx = _plan(method, model, "params=2", shape, data=data, side="input")
    f = plan.lowrank["conv"]
    assert f.pre is not None and f.post is None
    assert f.pre.shape == (2, 16, 1, 1) or f.pre.shape == (2, 16)
    assert f.core.shape == (16, 2, 3, 3) and plan.meta["input_side"] == ["conv"]
    assert plan.meta["ranks"]["conv"] == [2, 16]
    assert torch.equal(f.bias, model.conv.bias)
    x = torch.cat([b for b, _ in data])
    physical = apply_plan(model, plan, ctx.graph)
    masked = apply_plan(model, plan, ctx.graph, mode="masked")
    assert isinstance(physical.conv, LowRankConv2d)
    with torch.no_grad():
        ref = model(x)
        assert torch.allclose(physical(x), ref, atol=1e-4)
        assert torch.allclose(masked(x), physical(x), atol=1e-5)
    if method == "svd":
        assert torch.allclose(f.dense_weight(), model.conv.weight, atol=1e-5)
    # 1x1 pre at the input resolution (8x8, 16 -> 2) + 3x3 core at the output's (4x4, 2 -> 16) + the head
    chain = 2 * 16 * 64 + 16 * 2 * 9 * 16
    assert count_flops(physical, shape) == count_flops(model, shape) - 16 * 16 * 9 * 16 + chain
    assert plan.meta["predicted"]["params"] == pytest.approx(count_params(physical)["params"])


def test_side_option_is_validated_and_auto_without_a_latency_model_is_the_output_side():
    model = _InputRankNet()
    with pytest.raises(PruningError, match="side"):
        _plan("svd", model, "params=2", (16, 8, 8), side="left")
    plan, _ = _plan("svd", model, "params=2", (16, 8, 8))
    assert plan.meta["input_side"] == [] and plan.lowrank["conv"].post is not None
