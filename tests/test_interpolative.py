"""Interpolative-decomposition pruning: the numerics (prunekit.linalg) against dense references, the
folding of the interpolation matrix into consumers, and ``id`` / ``id_iter`` end to end."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import prunekit
from prunekit.errors import PruningError
from prunekit.linalg import (
    TSQR,
    id_error,
    interpolation_matrix,
    interpolative_decomposition,
    pivoted_qr,
    tsqr_r,
)
from prunekit.methods import create_method, get_method_info
from prunekit.models import create_model
from prunekit.surgery.apply import apply_plan


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _qr_r(a: torch.Tensor) -> torch.Tensor:
    r = torch.linalg.qr(a, mode="r")[1]
    return r * torch.sign(torch.diagonal(r)).unsqueeze(1)


# --------------------------------------------------------------------------------------------- numerics
def test_id_reproduces_low_rank_matrix_exactly():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(300, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 12, generator=g, dtype=torch.float64)
    for source in (z, tsqr_r(z.split(70)), tsqr_r(z.float().split(70), block="gram")):
        keep, t = interpolative_decomposition(source, 5)
        assert keep.tolist() == sorted(keep.tolist()) and t.shape == (5, 12)
        assert torch.allclose(t[:, keep], torch.eye(5, dtype=torch.float64))
        err = (z[:, keep] @ t - z).norm() / z.norm()
        assert err < 1e-5


def test_id_error_is_the_least_squares_optimum():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(400, 10, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 10, dtype=torch.float64)
    res = interpolative_decomposition(z, 6, return_info=True)
    best = torch.linalg.lstsq(z[:, res.keep], z).solution
    assert torch.allclose((z[:, res.keep] @ res.T - z).norm(), (z[:, res.keep] @ best - z).norm(), rtol=1e-10)
    assert torch.allclose(res.T, best, atol=1e-8)
    # the same decomposition from R alone, and the proxy |R[k, k] / R[0, 0]|
    r_piv, perm = pivoted_qr(z)
    assert torch.all(torch.diagonal(r_piv).abs().diff() <= 1e-12)
    assert res.error == pytest.approx(abs(float(r_piv[6, 6] / r_piv[0, 0])))
    assert id_error(r_piv, 10) == 0.0
    assert torch.allclose(interpolation_matrix(_qr_r(z), res.keep), res.T, atol=1e-8)


def test_id_guards_rank_deficiency():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(50, 6, generator=g, dtype=torch.float64)
    z[:, 2] = 0  # a dead channel
    z[:, 4] = 3 * z[:, 0]  # a duplicate
    for k in (4, 5, 6):
        keep, t = interpolative_decomposition(z, k)
        assert torch.isfinite(t).all() and t.abs().max() < 10
        assert (z[:, keep] @ t - z).abs().max() < 1e-10
    keep, t = interpolative_decomposition(torch.zeros(8, 3), 1)
    assert torch.isfinite(t).all()


def test_tsqr_matches_one_qr_of_the_stacked_matrix():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1000, 8, generator=g, dtype=torch.float64) * torch.logspace(0, -3, 8, dtype=torch.float64)
    ref = _qr_r(z)
    assert torch.allclose(tsqr_r(z.split(97)), ref, atol=1e-12)  # QR each block, stack, QR again
    assert torch.allclose(tsqr_r(z.split(97), block="gram"), ref, rtol=1e-6, atol=1e-9)
    acc, other = TSQR(), TSQR()
    acc.update(z[:400])
    other.update(z[400:])
    assert torch.allclose(acc.merge(other).r(), ref, atol=1e-12) and acc.rows == 1000
    # an activation tensor N x C x H x W: channels are columns, examples x positions are rows
    x = torch.relu(torch.randn(6, 5, 4, 4, generator=g, dtype=torch.float64))
    rows = x.movedim(1, -1).reshape(-1, 5)
    for block in ("qr", "gram"):
        assert torch.allclose(TSQR(block=block).update_channels(x).r(), _qr_r(rows), atol=1e-9)
    with pytest.raises(ValueError):
        TSQR().update(torch.zeros(3, 4)).update(torch.zeros(3, 5))


# --------------------------------------------------------------------------------------------- folding
class _Chain(nn.Module):
    """conv -> ReLU -> conv -> ReLU -> pool -> flatten -> linear, with exactly redundant channels: channels
    4-7 of each conv are positive multiples of channels 0-3, so a rank-4 ID is exact."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3)
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8 * 3 * 3, 5)
        with torch.no_grad():
            for conv, scale in ((self.c1, 2.0), (self.c2, 3.0)):
                conv.weight[4:] = scale * conv.weight[:4]
                conv.bias[4:] = scale * conv.bias[:4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        return self.fc(self.flatten(self.pool(torch.relu(self.c2(x)))))


def test_folding_interpolation_is_exact_for_redundant_channels():
    torch.manual_seed(0)
    model = _Chain().eval()
    x = torch.randn(64, 2, 8, 8)
    res = prunekit.prune(model, "id", "ratio=0.5", data=(x, torch.zeros(64, dtype=torch.long)),
                         input_shape=(2, 8, 8))
    assert res.model.c1.out_channels == 4 and res.model.fc.in_features == 4 * 9  # T (x) I_HW folded into fc
    with torch.no_grad():
        assert torch.allclose(res.model(x), model(x), atol=1e-4, rtol=1e-4)


def test_folded_consumer_output_error_is_the_reconstruction_error():
    """conv2(Z) vs conv2 with W T^T on Z[:, S]: the difference is conv2 applied to Z[:, S] T - Z."""
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 3, 3, bias=False)
    z = torch.relu(torch.randn(20, 6, 7, 7))
    keep, t = interpolative_decomposition(TSQR().update_channels(z).r(), 4)
    folded = torch.einsum("ocij,sc->osij", conv.weight.double(), t).float()
    out = nn.functional.conv2d(z[:, keep], folded)
    approx = torch.einsum("nsij,sc->ncij", z[:, keep].double(), t).float()
    assert torch.allclose(out - conv(z), conv(approx - z), atol=1e-5)
    rel = (out - conv(z)).norm() / conv(z).norm()
    assert 0 < rel < 1


# --------------------------------------------------------------------------------------------- end to end
def _data(shape: tuple[int, ...], n: int = 96, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    return [(x[i:i + 32], torch.arange(32) % 10) for i in range(0, n, 32)]


def _model(name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    m = create_model(name, **kw).eval()
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():  # non-trivial BatchNorm statistics
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2, generator=g)
            mod.running_var.uniform_(0.5, 2.0, generator=g)
    return m


def _l1_plan_error(model, plan, graph, x):
    """Relative output error of keeping, per group, the same number of channels by filter L1 norm."""
    from prunekit.surgery.plan import Plan

    channels = {}
    for key, keep in plan.channels.items():
        g = graph.groups[key]
        score = sum(g.rows(model, p).abs().sum(1) for p in g.producers)
        channels[key] = score.topk(len(keep)).indices.sort().values
    pruned = apply_plan(model, Plan(channels=channels), graph)
    with torch.no_grad():
        return float((pruned(x) - model(x)).norm() / model(x).norm())


@pytest.mark.parametrize("name,kw,shape", [("lenet5", {}, (1, 28, 28)), ("resnet20", {"width": 0.5}, (3, 32, 32))])
@pytest.mark.parametrize("method", ["id", "id_iter"])
def test_id_meets_flops_target_and_beats_l1(method, name, kw, shape):
    model = _model(name, **kw)
    data = _data(shape)
    res = prunekit.prune(model, method, "flops=1.5", data=data, samples=96)
    assert abs(res.report["flops_speedup"] / 1.5 - 1) <= 0.05
    x = torch.cat([b for b, _ in data])
    with torch.no_grad():
        y0, y1 = model(x), res.model(x)
    err = float((y1 - y0).norm() / y0.norm())
    assert err < 0.5 * _l1_plan_error(model, res.plan, res.graph, x)  # measured: 3-8x lower
    meta = res.plan.meta
    assert set(meta["widths"]) == set(res.plan.channels) | {k for k, (a, b) in meta["widths"].items() if a == b}
    if method == "id_iter":
        assert meta["steps"] and all(e >= 0 for _, _, e in meta["steps"])


def test_plan_replays_on_the_original_model_masked_or_physical():
    model = _model("resnet20", width=0.25)
    data = _data((3, 32, 32), n=64)
    method = create_method("id_iter", samples=64)
    from prunekit.methods import PruneContext, Target
    from prunekit.surgery.graph import analyze

    ctx = PruneContext(target=Target.parse("flops=1.4"), input_shape=(3, 32, 32), data=data,
                       graph=analyze(model, (3, 32, 32)))
    plan = method.plan(model, ctx)
    x = torch.cat([b for b, _ in data])
    physical = apply_plan(model, plan, ctx.graph, mode="physical")
    masked = apply_plan(model, plan, ctx.graph, mode="masked")
    with torch.no_grad():
        assert torch.allclose(physical(x), masked(x), atol=1e-5)
    # the coupled residual streams were handled: a stream group is among the pruned ones
    streams = [k for k, g in ctx.graph.groups.items() if len(g.producers) > 1]
    assert any(k in plan.channels for k in streams) and plan.meta["runner"] == "FxRunner"


def test_vit_mlp_and_mobilenet_groups():
    vit = _model("vit_tiny", dim=32, depth=2, heads=2)
    res = prunekit.prune(vit, "id", "ratio=0.25", data=_data((3, 32, 32), n=32), samples=32)
    pruned = [k for k in res.plan.channels]
    assert pruned and all(k.endswith("mlp.fc1") for k in pruned)  # LayerNorm-coupled dims are left alone
    assert res.model.blocks[0].mlp.fc2.in_features == 48
    mnet = _model("mobilenet_v2", width=0.25)
    res = prunekit.prune(mnet, "id", "ratio=0.25", data=_data((3, 32, 32), n=32), samples=32)
    dw = [k for k, g in res.graph.groups.items() if g.depthwise and k in res.plan.channels]
    assert dw  # groups through depthwise convolutions were pruned (Z read after the depthwise block)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert res.model(x).shape == (8, 10)


class _Untraceable(nn.Module):
    """The lenet-like chain with data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() > -1e30):
            return self.inner(x)
        return -self.inner(x)


def test_hook_fallback_gives_the_fx_result():
    from prunekit.methods import PruneContext, Target
    from prunekit.surgery.graph import analyze

    base = _model("lenet5", width=0.5)
    plans = []
    for model, prefix in ((base, ""), (_Untraceable(base), "inner.")):
        ctx = PruneContext(target=Target.parse("flops=1.3"), input_shape=(1, 28, 28), data=_data((1, 28, 28), 64),
                           graph=analyze(model, (1, 28, 28)))
        plans.append((create_method("id_iter", samples=64).plan(model, ctx), prefix))
    (fx, _), (hook, prefix) = plans
    assert hook.meta["runner"] == "HookRunner" and fx.meta["runner"] == "FxRunner"
    assert {prefix + k: v.tolist() for k, v in fx.channels.items()} == {k: v.tolist() for k, v in hook.channels.items()}
    for k, w in fx.weights.items():
        assert torch.allclose(hook.weights[prefix + k], w, atol=1e-5)


def test_options_and_errors():
    info = get_method_info("id_iter")
    assert info.needs_data and not info.needs_labels and info.family == "interpolative"
    assert get_method_info("id").granularity == "channel"
    model = _model("lenet5", width=0.5)
    with pytest.raises(PruningError):
        create_method("id_iter", bogus=1)
    with pytest.raises(PruningError):
        prunekit.prune(model, "id_iter", "flops=2")  # no data
    with pytest.raises(PruningError, match=r"option k=1\.5 is invalid"):
        prunekit.prune(model, "id_iter", "flops=2", data=_data((1, 28, 28), 32), k=1.5)
    with pytest.raises(PruningError, match="cannot reach"):
        prunekit.prune(model, "id_iter", "flops=500", data=_data((1, 28, 28), 32))
    res = prunekit.prune(model, "id", "flops=2", data=_data((1, 28, 28), 32), k=0.5)  # k overrides the target
    assert all(len(v) == max(1, g // 2) for (g, _), v in zip(res.plan.meta["widths"].values(),
                                                              res.plan.channels.values()))


def _id_state(model: nn.Module, shape: tuple[int, ...], data, method: str = "id_iter", **kw):
    from prunekit.methods import PruneContext, Target
    from prunekit.methods.interpolative import _IDState
    from prunekit.surgery.graph import analyze

    ctx = PruneContext(target=Target.parse("flops=1.5"), input_shape=shape, data=data, graph=analyze(model, shape))
    st = _IDState(model, ctx, create_method(method, samples=96, **kw))
    st.refresh()
    return st


def test_output_error_is_the_consumer_output_error_for_a_linear_consumer():
    """For a linear consumer (one tap) the proxy is exact: ||(Z - Z[:, S] T) W^T||^2 / ||Z W^T||^2."""
    model = _model("lenet5", width=0.5)
    data = _data((1, 28, 28))
    st = _id_state(model, (1, 28, 28), data)
    key = next(k for k, g in st.groups.items() if g.read_points[0].consumers == ["fc2"])  # fc1's outputs
    x = torch.cat([b for b, _ in data])
    feats = {}
    h = model.fc2.register_forward_pre_hook(lambda m, a: feats.__setitem__("z", a[0].detach().double()))
    with torch.no_grad():
        model(x)
    h.remove()
    z, w = feats["z"], model.fc2.weight.detach().double()
    _, perm = st.pivoted(key)
    for k in (3, 10, 40):
        keep = perm[:k]
        t = torch.linalg.lstsq(z[:, keep], z).solution
        expected = float(((z - z[:, keep] @ t) @ w.T).norm() ** 2 / (z @ w.T).norm() ** 2)
        assert st.output_error(key, k) == pytest.approx(expected, rel=1e-4, abs=1e-9)
    assert st.output_error(key, len(st.groups[key].kept)) == 0.0


def test_output_gain_simulates_the_decomposition():
    """The consumer-input hooks of output_gain give the outputs of the ID applied for real."""
    model = _model("resnet20", width=0.25)
    data = _data((3, 32, 32), n=64)
    st = _id_state(model, (3, 32, 32), data)
    x = torch.cat([b for b, _ in data])
    with torch.no_grad():
        ref = model(x)
    for key in list(st.groups)[:2]:  # the first stream (several consumers) and an inner group
        k = len(st.groups[key].kept) // 2
        gain = st.output_gain(key, k, [x], [ref])
        measured = gain * st.output_error(key, k)
        st.prune(key, k)
        with torch.no_grad():
            out = st.model(x)
        lp, lq = torch.log_softmax(ref.double(), 1), torch.log_softmax(out.double(), 1)
        kl = float((lp.exp() * (lp - lq)).sum(1).mean())  # logits: the mean KL divergence
        assert measured == pytest.approx(kl, rel=1e-3)
        ref = out


@pytest.mark.parametrize("opts", [{"criterion": "paper"}, {"remeasure": None, "calibrate": 0}, {"remeasure": 1}])
def test_id_iter_variants_meet_the_target(opts):
    model = _model("resnet20", width=0.5)
    res = prunekit.prune(model, "id_iter", "flops=1.5", data=_data((3, 32, 32)), samples=96, **opts)
    assert abs(res.report["flops_speedup"] / 1.5 - 1) <= 0.05
    meta = res.plan.meta
    assert meta["criterion"] == opts.get("criterion", "output")
    if "remeasure" in opts and opts["remeasure"] is None:
        assert meta["rounds"] == len(meta["steps"])  # one greedy step per measurement: the seed's loop
    elif "remeasure" in opts:
        assert meta["rounds"] == 1


def test_id_iter_option_errors():
    model = _model("lenet5", width=0.5)
    for bad, match in (({"criterion": "magic"}, "criterion"), ({"remeasure": 0}, "remeasure")):
        with pytest.raises(PruningError, match=match):
            prunekit.prune(model, "id_iter", "flops=2", data=_data((1, 28, 28), 32), **bad)


def test_tsqr_gram_after_a_run_under_inference_mode():
    """The reused scratch buffer of the Gram route, first made under torch.inference_mode() (an earlier prune or
    a forward check), must not break a later TSQR outside it ("inplace update to inference tensor")."""
    from prunekit.linalg import release_workspace

    release_workspace()
    z = torch.randn(500, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        inside = tsqr_r(z.split(50), block="gram")
    outside = tsqr_r(z.split(50), block="gram")
    assert torch.allclose(inside, outside) and torch.allclose(outside.T @ outside, z.T @ z, rtol=1e-6, atol=1e-8)
