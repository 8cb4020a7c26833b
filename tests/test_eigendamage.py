"""EigenDamage / Improved EigenDamage (prunekit.methods.eigendamage)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import prunekit
from prunekit import curvature
from prunekit.errors import PruningError
from prunekit.methods import PruneContext, Target, create_method, get_method_info
from prunekit.methods.eigendamage import _Directions, eigen_factors, hooi
from prunekit.models import create_model, get_model_info
from prunekit.surgery.apply import apply_plan
from prunekit.surgery.lowrank import factors_to_module


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.relu = nn.ReLU()
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.fc1 = nn.Linear(8 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.c2(self.relu(self.c1(x))))
        return self.fc2(self.relu(self.fc1(h.flatten(1))))


def _data(n: int = 2, b: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(b, 3, 8, 8, generator=g), torch.randint(0, 5, (b,), generator=g)) for _ in range(n)]


def _small() -> Small:
    torch.manual_seed(0)
    return Small().eval()


def _full_chain(model: nn.Module, path: str, data: list, use_pre: bool = True, use_post: bool = True):
    layer = model.get_submodule(path)
    f = curvature.kfac_factors(model, data, [path], fisher="empirical")[path]
    _, q_a = curvature.eigh(f.A[0])
    _, q_g = curvature.eigh(f.G)
    wt = curvature.weight_taps(layer, layer.weight.detach().double(),
                               None if layer.bias is None else layer.bias.detach().double())
    w_star = curvature.rotate(wt, q_g, q_a)
    if isinstance(layer, nn.Conv2d):
        d = _Directions(None, layer.in_channels, layer.out_channels, tuple(layer.kernel_size))  # type: ignore[arg-type]
    else:
        d = _Directions(None, layer.in_features, layer.out_features, ())  # type: ignore[arg-type]
    d.bias = None if layer.bias is None else layer.bias.detach().clone()
    c_in = layer.weight.shape[1]
    return layer, eigen_factors(d, q_a[:c_in], q_g, w_star, use_pre, use_post)


@pytest.mark.parametrize("path", ["c1", "c2", "fc1"])
@pytest.mark.parametrize(("use_pre", "use_post"), [(True, True), (False, True), (True, False)])
def test_unpruned_chain_reproduces_the_layer(path: str, use_pre: bool, use_post: bool) -> None:
    model, data = _small(), _data()
    layer, f = _full_chain(model, path, data, use_pre, use_post)
    chain = factors_to_module(layer, f).eval()
    x = torch.randn(4, 3, 8, 8)
    store = {}
    h = layer.register_forward_pre_hook(lambda m, a: store.setdefault("x", a[0]))
    model(x)
    h.remove()
    with torch.no_grad():
        assert (chain(store["x"]) - layer(store["x"])).abs().max() < 1e-5
    assert (f.pre is None) != use_pre and (f.post is None) != use_post


def test_saliencies_are_rotated_weights_times_eigenvalues() -> None:
    model, data = _small(), _data()
    ctx = PruneContext(target=Target.parse("params=2"), input_shape=(3, 8, 8), data=data)
    method = create_method("eigendamage", fisher="empirical")
    from prunekit.methods.eigendamage import _new_directions
    from prunekit.methods.lowrank import _eligible

    layers, _ = _eligible(model, ctx, "eigendamage")
    dirs = [_new_directions(model, layer, True) for layer in layers]
    method._measure(model, ctx, dirs, {}, 0)
    d = next(d for d in dirs if d.layer.path == "c1")
    f = curvature.kfac_factors(model, data, ["c1"], fisher="empirical")["c1"]
    lam_a, q_a = curvature.eigh(f.A[0])
    lam_g, q_g = curvature.eigh(f.G)
    w = torch.cat([model.c1.weight.detach().double().flatten(2),
                   model.c1.bias.detach().double()[:, None, None].expand(-1, 1, 9)], 1)  # (out, C+1, taps)
    rot = torch.stack([q_g.T @ w[:, :, t] @ q_a for t in range(9)], -1)
    sal = (rot ** 2 * (lam_g[:, None] * lam_a[None, :])[..., None]).sum(-1)
    torch.testing.assert_close(d.out_scores, sal.sum(1))
    torch.testing.assert_close(d.in_scores, sal.sum(0))


def _tiny(name: str) -> tuple[nn.Module, tuple[int, ...], list]:
    info = get_model_info(name)
    torch.manual_seed(0)
    model = create_model(name, in_channels=info.input_size[0], **info.tiny_kwargs)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, *info.input_size, generator=g), torch.arange(16) % 10) for _ in range(2)]
    return model, info.input_size, data


@pytest.mark.parametrize(("method", "opts"), [("eigendamage", {}), ("eigendamage", {"iterative": 2}),
                                              ("eigendamage_improved", {})])
@pytest.mark.parametrize("target", ["params=2", "flops=2"])
def test_target_met_and_masked_equals_physical(method: str, opts: dict, target: str) -> None:
    model, shape, data = _tiny("resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = prunekit.prune(model, method, target, data, **opts)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the method edits a copy
    achieved = res.report["compression"] if target.startswith("params") else res.report["flops_speedup"]
    assert abs(achieved / 2 - 1) <= 0.05
    plan = res.plan
    assert plan.lowrank and all(f.num_params() < model.get_submodule(p).weight.numel() for p, f in plan.lowrank.items())
    assert "fc" not in plan.lowrank  # the classifier is excluded
    x = data[0][0][:4]
    phys = apply_plan(model, plan, mode="physical").eval()
    masked = apply_plan(model, plan, mode="masked").eval()
    with torch.no_grad():
        assert (phys(x) - masked(x)).abs().max() < 1e-4


def test_one_shot_cap_and_at_least_one_direction() -> None:
    model, _, data = _tiny("resnet20")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = prunekit.prune(model, "eigendamage", "params=2", data, ratio_limit=0.5)
    for path, f in res.plan.lowrank.items():
        layer = model.get_submodule(path)
        r_out, r_in = f.core.shape[:2]
        assert r_out >= layer.out_channels - int(0.5 * layer.out_channels) or f.post is None
        assert r_in >= 1 and r_out >= 1


def test_improved_is_deterministic() -> None:
    model, _, data = _tiny("resnet20")
    plans = []
    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plans.append(prunekit.prune(model, "eigendamage_improved", "params=2", data).plan)
    a, b = plans
    assert set(a.lowrank) == set(b.lowrank)
    for p in a.lowrank:
        assert torch.equal(a.lowrank[p].core, b.lowrank[p].core)
        assert torch.equal(a.lowrank[p].pre, b.lowrank[p].pre) if a.lowrank[p].pre is not None else True


def test_finetune_between_rounds_changes_weights_and_applies() -> None:
    model, _, data = _tiny("resnet20")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = prunekit.prune(model, "eigendamage", "params=2", data, iterative=2, finetune_batches=2)
    assert res.plan.weights and not any(k.startswith(tuple(f"{p}." for p in res.plan.lowrank))
                                        for k in res.plan.weights)
    assert abs(res.report["compression"] / 2 - 1) <= 0.05


def test_hooi_deterministic_and_no_worse_than_truncated_svds() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 6, 9, generator=g, dtype=torch.float64)
    w[:3] *= 5  # some structure
    r_out, r_in = 3, 2
    u1, v1, c1 = hooi(w, r_out, r_in)
    u2, v2, c2 = hooi(w, r_out, r_in)
    assert torch.equal(u1, u2) and torch.equal(v1, v2) and torch.equal(c1, c2)
    torch.testing.assert_close(u1.T @ u1, torch.eye(r_out, dtype=torch.float64))
    rec = torch.einsum("kjt,ok,ij->oit", c1, u1, v1)
    err_hooi = float((w - rec).norm())
    uo = torch.linalg.svd(w.reshape(7, -1), full_matrices=False)[0][:, :r_out]
    ui = torch.linalg.svd(w.transpose(0, 1).reshape(6, -1), full_matrices=False)[0][:, :r_in]
    hosvd = torch.einsum("oit,ok,ij,pk,qj->pqt", w, uo, ui, uo, ui)
    assert err_hooi <= float((w - hosvd).norm()) + 1e-10
    # never better than the best rank-r_out approximation of the out-unfolding alone (a lower bound)
    s = torch.linalg.svdvals(w.reshape(7, -1))
    assert err_hooi >= float(s[r_out:].pow(2).sum().sqrt()) - 1e-10


def test_metadata_options_and_errors() -> None:
    info = get_method_info("eigendamage")
    assert info.granularity == "lowrank" and info.needs_second_order and not info.needs_labels
    imp = create_method("eigendamage_improved")
    assert (imp.damping, imp.average, imp.decay, imp.ekfac, imp.tucker, imp.back_ratio, imp.step_ratio) == (
        1e-3, "ema", 0.9, True, True, 0.25, 0.2)
    assert imp.default_cap() == 0.5 and create_method("eigendamage").default_cap() == 0.95
    with pytest.raises(PruningError):
        create_method("eigendamage", bogus=1)
    with pytest.raises(PruningError):
        create_method("eigendamage", average="mean")
    model, _, data = _tiny("resnet20")
    with pytest.raises(PruningError, match="iterative"):
        prunekit.prune(model, "eigendamage", "params=2", data, iterative=0)
    with pytest.raises(PruningError, match="needs data"):
        prunekit.prune(model, "eigendamage", "params=2")
    with pytest.raises(PruningError, match="cannot reach"):
        prunekit.prune(model, "eigendamage", "params=50", data)


@pytest.mark.parametrize("method", ["eigendamage", "eigendamage_improved"])
def test_aligned_ranks_are_multiples_and_chains_faster_by_the_latency_model(method: str) -> None:
    """aligned_ranks: every kept side is a multiple of the runtime's rank step (or the whole side), every chain
    is faster than its layer by the proxy, masked == physical, and without it the ranks are free."""
    from prunekit.surgery.cost import LayerShape, dense_latency, proxy_layer_latency

    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=prunekit.surgery.graph.PruningWarning)  # no fallback here
        res = prunekit.prune(model, method, "flops=1.5", data=data, aligned_ranks=True, samples=32)
    mult = res.plan.meta["rank_multiple"]
    assert mult >= 4 and res.plan.lowrank
    lat = proxy_layer_latency()
    for path, f in res.plan.lowrank.items():
        layer = model.get_submodule(path)
        r_out, r_in = f.core.shape[:2]
        full_out, full_in = layer.out_channels, layer.in_channels
        assert r_out % mult == 0 or r_out == full_out, path
        assert r_in % mult == 0 or r_in == full_in, path
        shape = LayerShape(full_in, full_out, 9, layer.stride[0] * layer.stride[1])
        chain = 0.0
        if f.pre is not None:
            chain += lat(full_in, r_in, 1, float(shape.stride_area))
        chain += lat(r_in if f.pre is not None else full_in, r_out if f.post is not None else full_out, 9, 1.0)
        if f.post is not None:
            chain += lat(r_out, full_out, 1, 1.0)
        assert chain < dense_latency(shape, lat), path
    x = torch.randn(4, 3, 32, 32)
    masked = apply_plan(model, res.plan, mode="masked").eval()
    with torch.no_grad():
        assert (masked(x) - res.model(x)).abs().max() < 1e-4
    free = prunekit.prune(model, method, "flops=1.5", data=data, samples=32)
    assert free.plan.meta["rank_multiple"] == 1
