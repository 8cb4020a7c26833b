"""SiPP / PFP: vectorised sensitivities against a plain loop, the allocation against brute force,
unbiased sampling, budgets, masked == physical."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from prunekit.errors import PruningError
from prunekit.sensitivity import LayerSensitivity, collect_sensitivities, sample_size, split_points


# --------------------------------------------------------------------------------------------- naive reference
def _naive_conv(conv: nn.Conv2d, x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SiPP (per weight) and PFP (per input channel) sensitivities with plain loops, float64."""
    w = conv.weight.detach().double()
    f_out, cg, kh, kw = w.shape
    groups = conv.groups
    fg = f_out // groups
    sh, sw = conv.stride
    ph, pw = conv.padding
    sipp = torch.zeros_like(w)
    pfp = torch.zeros(cg * groups, dtype=torch.float64)
    points = []
    for a in x.double():
        pos, neg = a.clamp(min=0), (-a).clamp(min=0)
        points += [pos, neg] if bool((x < 0).any()) else [pos]
    for a in points:
        a = nn.functional.pad(a, (pw, pw, ph, ph))
        ho = (a.shape[1] - kh) // sh + 1
        wo = (a.shape[2] - kw) // sw + 1
        for f in range(f_out):
            g0 = (f // fg) * cg
            mean = torch.zeros(cg, kh, kw, dtype=torch.float64)
            for i in range(ho):
                for j in range(wo):
                    patch = a[g0:g0 + cg, i * sh:i * sh + kh, j * sw:j * sw + kw]
                    zp = float((w[f].clamp(min=0) * patch).sum())
                    zm = float((w[f].clamp(max=0) * patch).sum())
                    for c in range(cg):
                        for u in range(kh):
                            for v in range(kw):
                                wt = float(w[f, c, u, v])
                                z = zp if wt > 0 else zm
                                g = 0.0 if abs(z) <= eps or wt == 0 else wt * float(patch[c, u, v]) / z
                                mean[c, u, v] += g / (ho * wo)
                                pfp[g0 + c] = max(float(pfp[g0 + c]), g)
            sipp[f] = torch.maximum(sipp[f], mean)
    return sipp, pfp


def _naive_linear(lin: nn.Linear, x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    w = lin.weight.detach().double()
    sipp = torch.zeros_like(w)
    pfp = torch.zeros(w.shape[1], dtype=torch.float64)
    rows = x.double().reshape(-1, x.shape[-1])
    points = [rows.clamp(min=0), (-rows).clamp(min=0)] if bool((x < 0).any()) else [rows]
    for pts in points:
        for a in pts:
            for f in range(w.shape[0]):
                zp = float((w[f].clamp(min=0) * a).sum())
                zm = float((w[f].clamp(max=0) * a).sum())
                for j in range(w.shape[1]):
                    wt = float(w[f, j])
                    z = zp if wt > 0 else zm
                    g = 0.0 if abs(z) <= eps or wt == 0 else wt * float(a[j]) / z
                    sipp[f, j] = max(float(sipp[f, j]), g)
                    pfp[j] = max(float(pfp[j]), g)
    return sipp, pfp


@pytest.mark.parametrize("kw", [
    dict(in_channels=3, out_channels=4, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=2, padding=(1, 0), groups=2),
])
def test_conv_sensitivities_match_naive_loop(kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(**kw).double()
    x = torch.randn(3, kw["in_channels"], 5, 6, dtype=torch.float64)  # negative inputs: split points
    x[0, 0, 0, 0] = 0.0
    t = LayerSensitivity(conv, "conv", eps=1e-7)
    t.update(x[:2])
    t.update(x[2:])  # streamed: running maxima over batches
    sipp, pfp = _naive_conv(conv, x, 1e-7)
    assert t.num_points == 6
    torch.testing.assert_close(t.weight_scores(), sipp, atol=1e-6, rtol=0)
    torch.testing.assert_close(t.channel_scores(), pfp, atol=1e-6, rtol=0)
    assert float(t.channel_scores().max()) <= 1 + 1e-9


@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 5)])
def test_linear_sensitivities_match_naive_loop(shape):
    torch.manual_seed(1)
    lin = nn.Linear(5, 3).double()
    x = torch.randn(*shape, dtype=torch.float64)
    t = LayerSensitivity(lin, "fc", eps=1e-7)
    t.update(x)
    sipp, pfp = _naive_linear(lin, x, 1e-7)
    torch.testing.assert_close(t.weight_scores(), sipp, atol=1e-6, rtol=0)
    torch.testing.assert_close(t.channel_scores(), pfp, atol=1e-6, rtol=0)


def _dense_channel_scores(conv: nn.Conv2d, batches: list[torch.Tensor], eps: float) -> torch.Tensor:
    """PFP's channel scores as one plain broadcast product over (points, filters, taps, patches), in the
    float operations of the layer's dtype (the form the bounded computation must reproduce bitwise)."""
    w = conv.weight.detach()
    g = conv.groups
    f, cg = w.shape[0] // g, w.shape[1]
    taps = w.shape[2] * w.shape[3]
    ws = w.reshape(g, f, -1)
    best = torch.zeros(g * cg, dtype=w.dtype)
    for x in batches:
        u = nn.functional.unfold(split_points(x), conv.kernel_size, conv.dilation, conv.padding, conv.stride)
        u = u.view(u.shape[0], g, -1, u.shape[-1])  # (N, G, J, P)
        terms = []
        for part in (ws.clamp(min=0), ws.clamp(max=0)):
            z = torch.matmul(part, u)
            r = torch.where(z.abs() > eps, 1 / torch.where(z.abs() > eps, z, torch.ones_like(z)), 0 * z)
            # (N, G, F, J, P) -> max over filters
            terms.append((part.abs().unsqueeze(0).unsqueeze(-1) * r.abs().unsqueeze(3)).amax(2))
        gmax = torch.maximum(*terms) * u
        best = torch.maximum(best, gmax.reshape(len(u), g, cg, taps * u.shape[-1]).amax((0, 3)).reshape(-1))
    return best


@pytest.mark.parametrize("kw", [
    dict(in_channels=8, out_channels=12, kernel_size=3, padding=1),
    dict(in_channels=8, out_channels=6, kernel_size=3, stride=2, dilation=2, padding=2, groups=2),
])
def test_bounded_channel_scores_equal_the_dense_product_bitwise(kw, monkeypatch):
    torch.manual_seed(3)
    conv = nn.Conv2d(**kw)
    batches = [torch.relu(torch.randn(5, 8, 12, 11)) for _ in range(3)]
    batches[1][:, :, :4] = 0.0  # zero patches: zero bounds
    exact_calls: list[int] = []
    original = LayerSensitivity._exact

    def counting(self, u, sides, rows, pos):
        exact_calls.append(len(rows))
        return original(self, u, sides, rows, pos)

    monkeypatch.setattr(LayerSensitivity, "_exact", counting)
    t = LayerSensitivity(conv, "conv", weights=False, chunk=1 << 9)  # small blocks: the block loops run
    for x in batches:
        t.update(x)
    assert torch.equal(t.channel_scores(), _dense_channel_scores(conv, batches, t.eps))
    triples = sum(5 * 8 * t.num_patches for _ in batches)
    assert 0 < sum(exact_calls) < triples / 2  # the bound spared most of the exact terms


def test_zero_denominator_gives_zero_not_inf():
    lin = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -1.0, 0.5], [-2.0, -1.0, -1.0]]))
    t = LayerSensitivity(lin, "fc")
    t.update(torch.tensor([[0.0, 2.0, 0.0]]))  # z+ of filter 0 is 0
    s = t.weight_scores()
    assert torch.isfinite(s).all()
    assert float(s[0, 0]) == 0.0 and float(s[0, 2]) == 0.0
    assert float(s[0, 1]) == pytest.approx(1.0)


def test_split_points_and_errors():
    a = torch.tensor([[1.0, -2.0]])
    assert torch.equal(split_points(a), torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    assert split_points(a.abs()) is not None and split_points(a.abs()).shape == (1, 2)
    with pytest.raises(PruningError, match="Conv2d and Linear"):
        LayerSensitivity(nn.Conv1d(2, 2, 3), "c1")
    with pytest.raises(PruningError, match="never called"):
        LayerSensitivity(nn.Linear(2, 2), "fc").weight_scores()


def test_collect_streams_hooks_and_restores_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).double()
    model.train()
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    tr = collect_sensitivities(model, [(x[:3], None), (x[3:], None)], ["0", "3"], batch_size=2)
    assert model.training and not model[0]._forward_hooks
    one = LayerSensitivity(model[3], "3")
    one.update(model[2](model[1](model[0](x))))
    torch.testing.assert_close(tr["3"].weight_scores(), one.weight_scores())
    assert tr["0"].num_points == 10 and tr["3"].num_points == 5


def test_sample_size_formula():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    eta_star, eta = 4 * 8 * 8, 4 * 8 * 8 + 10
    want = math.ceil(3 * math.log(8 * eta_star * eta / 1e-16))
    assert sample_size(model, (1, 8, 8)) == want
    with pytest.raises(PruningError):
        sample_size(model, (1, 8, 8), delta=0)


# --------------------------------------------------------------------------------------------- allocation
from prunekit.methods import provable as pv  # noqa: E402


def _objective(m, a, lead):
    return float((lead * pv.error_rand(a, m)).sum())


def test_lagrangian_allocation_equals_brute_force():
    a = torch.tensor([40.0, 5.0, 120.0], dtype=torch.float64)
    lead = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    cost = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    nnz = torch.tensor([10.0, 6.0, 12.0], dtype=torch.float64)
    budget = 14.0
    m = pv.allocate_samples(a, lead, cost, nnz, budget)
    assert float((cost * m).sum()) == pytest.approx(budget, rel=1e-6)
    assert bool((m >= 0).all() and (m <= nnz + 1e-9).all())
    # brute force on a grid: m1, m2 free, m3 takes the rest of the budget (the objective decreases in m)
    g1 = torch.linspace(0.01, 10, 1000, dtype=torch.float64)
    g2 = torch.linspace(0.01, 6, 600, dtype=torch.float64)
    m1, m2 = torch.meshgrid(g1, g2, indexing="ij")
    m3 = budget - m1 - 2 * m2
    ok = (m3 > 0) & (m3 <= 12)
    obj = sum(lead[i] * pv.error_rand(a[i].expand_as(mi), mi) for i, mi in enumerate((m1, m2, m3.clamp(min=1e-9))))
    obj = torch.where(ok, obj, torch.full_like(obj, math.inf))
    best = int(obj.argmin())
    brute = torch.stack((m1.flatten()[best], m2.flatten()[best], m3.flatten()[best]))
    assert _objective(m, a, lead) <= float(obj.min()) + 1e-9
    torch.testing.assert_close(m, brute, atol=0.05, rtol=0)


def test_allocation_saturates_and_handles_zero_rows():
    a = torch.tensor([3.0, 0.0], dtype=torch.float64)
    one = torch.ones(2, dtype=torch.float64)
    m = pv.allocate_samples(a, one, one, torch.tensor([4.0, 4.0], dtype=torch.float64), 100.0)
    assert m.tolist() == [4.0, 0.0]


# --------------------------------------------------------------------------------------------- unbiased sampling
def _within_three_se(samples: torch.Tensor, truth: torch.Tensor) -> None:
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])
    assert bool(((mean - truth).abs() <= 3 * se + 1e-9).all()), (mean - truth) / se


def _sipp_rows(seed: int, lin: nn.Linear, sens: torch.Tensor) -> pv._Rows:
    gen = torch.Generator().manual_seed(seed)
    return pv._Rows.build("fc.weight", lin.weight, sens, alpha=10.0, unit=1.0, gen=gen, draw_cap=1)


def test_sipp_rand_is_unbiased():
    torch.manual_seed(0)
    lin = nn.Linear(8, 3, bias=False)
    x = torch.rand(16, 8) + 0.1
    t = LayerSensitivity(lin, "fc")
    t.update(x)
    sens = t.weight_scores()
    truth = (lin.weight @ x[0]).detach().double()
    m = torch.tensor([3.0, 2.0, 4.0, 3.0, 2.0, 3.0], dtype=torch.float64)  # 3 filters x (plus, minus)
    outs = []
    for seed in range(2000):
        fac = _sipp_rows(seed, lin, sens).factors(m, hybrid=False)
        outs.append((lin.weight.detach().double() * fac) @ x[0].double())
    _within_three_se(torch.stack(outs), truth)


@pytest.mark.parametrize("variant", ["pfp_rand", "pfp_top"])
def test_pfp_sampling_is_unbiased(variant):
    torch.manual_seed(0)
    scores = torch.tensor([0.9, 0.5, 0.05, 0.3, 0.2, 0.1], dtype=torch.float64)
    w = torch.randn(4, 6, dtype=torch.float64)
    a = torch.rand(6, dtype=torch.float64) + 0.1
    truth = w @ a
    outs = []
    gen = torch.Generator().manual_seed(0)
    for _ in range(2000):
        g = pv._Group("g", scores, coeff=1.0, lo=1, hi=6, mult=1,
                      uniforms=torch.rand(256, generator=gen, dtype=torch.float64),
                      alive=torch.ones(6, dtype=torch.bool))
        keep, scale = g.choose(eps=3.0, variant=variant)  # m = ceil(3 * 12 / 9) = 4 draws
        col = torch.zeros(6, dtype=torch.float64)
        col[keep] = scale[keep]
        outs.append(w @ (a * col))
    _within_three_se(torch.stack(outs), truth)


def test_pfp_top_keeps_the_certain_channels():
    scores = torch.tensor([0.9, 0.05, 0.05], dtype=torch.float64)
    g = pv._Group("g", scores, coeff=1.0, lo=1, hi=3, mult=1, uniforms=torch.rand(64, dtype=torch.float64),
                  alive=torch.ones(3, dtype=torch.bool))
    keep, scale = g.choose(eps=3.0, variant="pfp_top")
    assert 0 in keep.tolist() and float(scale[0]) == 1.0


# --------------------------------------------------------------------------------------------- on a model
import warnings  # noqa: E402

import prunekit  # noqa: E402
from prunekit.models import create_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = create_model("resnet20", width=0.5).eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(32, 3, 32, 32, generator=g), torch.arange(32) % 10)]
    return model, data


@pytest.mark.parametrize("method", ["sipp", "sipp_rand", "sipp_hybrid"])
def test_weight_budgets(tiny, method):
    model, data = tiny
    for value in (2, 4, 8, 16):
        r = prunekit.prune(model, method, f"params={value}", data, samples=32)
        assert abs(r.report["compression"] / value - 1) <= 0.05, (method, value, r.report["compression"])


@pytest.mark.parametrize("method", ["pfp", "pfp_rand", "pfp_top"])
def test_filter_budgets_and_physical_removal(tiny, method):
    model, data = tiny
    for value in (1.5, 2, 3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = prunekit.prune(model, method, f"flops={value}", data, samples=32)
        assert abs(r.report["flops_speedup"] / value - 1) <= 0.05, (method, value, r.report["flops_speedup"])
        assert r.report["dense_flops_speedup"] == pytest.approx(r.report["flops_speedup"])  # really removed
        assert "epsilon" in r.report["allocation"]


@pytest.mark.parametrize("method", ["pfp_rand", "sipp_rand", "pfp_top"])
def test_masked_and_physical_agree(tiny, method):
    model, data = tiny
    target = "flops=2" if method.startswith("pfp") else "params=4"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        phys = prunekit.prune(model, method, target, data, samples=32, mode="physical").model.eval()
        masked = prunekit.prune(model, method, target, data, samples=32, mode="masked").model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(phys(x), masked(x), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(phys(x), model(x))


def test_pfp_reweights_consumers_and_sipp_rand_reweights_weights(tiny):
    model, data = tiny
    r = prunekit.prune(model, "pfp_rand", "flops=2", data, samples=32, mode="masked")
    assert r.plan.weights and r.plan.channels
    r = prunekit.prune(model, "sipp_rand", "params=4", data, samples=32)
    assert set(r.plan.weights) == set(r.plan.masks)


def test_default_sample_set_and_bad_options(tiny):
    model, data = tiny
    with pytest.raises(PruningError, match="needs data"):
        prunekit.prune(model, "pfp", "flops=2")
    with pytest.raises(PruningError, match="delta"):
        prunekit.prune(model, "sipp", "params=2", data, delta=2.0)
    with pytest.raises(PruningError, match="draw_cap"):
        prunekit.prune(model, "sipp_rand", "params=2", data, draw_cap=0)
    r = prunekit.prune(model, "sipp", "params=2", data)  # |S| from the formula: the 32 examples there are
    assert r.report["compression"] == pytest.approx(2, rel=0.05)


def test_sensitivity_cache_is_exact_and_keyed_by_weights_and_data(tiny, monkeypatch):
    """A sweep re-prunes the same base with the same sample set: the second call reuses the sensitivities
    (same plan), a changed weight, BatchNorm statistic or sample set computes them again."""
    import copy

    model, data = tiny
    pv._SENS_CACHE.clear()
    calls = []
    real = pv.collect_sensitivities
    monkeypatch.setattr(pv, "collect_sensitivities", lambda *a, **k: calls.append(1) or real(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = prunekit.prune(model, "pfp", "flops=2", data, samples=32)
        again = prunekit.prune(copy.deepcopy(model), "pfp", "flops=2", data, samples=32)
        assert len(calls) == 1
        assert (first.plan.meta["sensitivities"], again.plan.meta["sensitivities"]) == ("computed", "cache")
        assert first.plan.channels.keys() == again.plan.channels.keys()
        for k, v in first.plan.channels.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(again.plan.channels[k]))
        prunekit.prune(model, "pfp_top", "flops=3", data, samples=32)  # the same channel scores
        assert len(calls) == 1
        w1 = prunekit.prune(model, "sipp", "params=4", data, samples=32)
        w2 = prunekit.prune(model, "sipp", "params=4", data, samples=32)
        assert len(calls) == 2  # weight scores: another kind of tracker
        for k in w1.plan.masks:
            assert torch.equal(w1.plan.masks[k], w2.plan.masks[k])
        other = copy.deepcopy(model)
        with torch.no_grad():
            other.get_submodule("fc").weight.mul_(1.5)
        prunekit.prune(other, "pfp", "flops=2", data, samples=32)
        assert len(calls) == 3
        bn = copy.deepcopy(model)
        next(m for m in bn.modules() if isinstance(m, nn.BatchNorm2d)).running_mean.add_(0.1)
        prunekit.prune(bn, "pfp", "flops=2", data, samples=32)
        assert len(calls) == 4
        shifted = [(data[0][0] + 0.01, data[0][1])]
        prunekit.prune(model, "pfp", "flops=2", shifted, samples=32)
        assert len(calls) == 5
        monkeypatch.setenv("PRUNEKIT_SENSITIVITY_CACHE", "0")  # off: computed every time
        prunekit.prune(model, "pfp", "flops=2", data, samples=32)
        assert len(calls) == 6
    assert len(pv._SENS_CACHE) <= pv._SENS_CACHE_SIZE
    pv.clear_sensitivity_cache()
    assert not pv._SENS_CACHE


# --------------------------------------------------------------------------------------------- the cascade
class _Spy:
    """Wraps the cascade's fine-tuner: the reduction each retraining starts from, and whether it trained."""

    def __init__(self, inner, kind, shape):
        self.inner, self.epochs, self.kind, self.shape = inner, inner.epochs, kind, shape
        self.costs: list[float] = []
        self.changed: list[bool] = []

    def pruned(self, *args):
        self.inner.pruned(*args)

    def __call__(self, model, epochs):
        from prunekit.metrics import count_params, effective_flops

        nonzero = count_params(model)["nonzero_params"]
        self.costs.append(effective_flops(model, self.shape) if self.kind == "flops" else nonzero)
        before = [p.detach().clone() for p in model.parameters()]
        self.inner(model, epochs)
        self.changed.append(any(not torch.equal(a, b) for a, b in zip(before, model.parameters())))
        assert count_params(model)["nonzero_params"] <= nonzero  # retraining keeps pruned weights at zero


@pytest.mark.parametrize("method,target", [("pfp", "flops=3"), ("sipp", "params=8"), ("magnitude", "params=8")])
def test_cascade_geometric_rounds_retrain_between_and_meet_the_budget(method, target):
    from prunekit.metrics import count_params, effective_flops
    from prunekit.schedule import cascade

    torch.manual_seed(0)
    model = create_model("lenet5", num_classes=10)
    g = torch.Generator().manual_seed(0)
    train = [(torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(2)]
    shape = (1, 28, 28)
    kind, value = target.split("=")
    rounds = 3
    kw = cascade(train, rounds=rounds, epochs=1, lr=0.01)
    spy = _Spy(kw["finetune"], kind, shape)
    kw["finetune"] = spy
    base = effective_flops(model, shape) if kind == "flops" else count_params(model)["nonzero_params"]
    opts = {"samples": 32} if method != "magnitude" else {}
    r = prunekit.prune(model, method, target, train[:1], input_shape=shape, **opts, **kw)
    per_round = float(value) ** (1 / rounds)  # the geometric keep ratio of every round
    achieved = r.report["round_achieved"]
    assert len(achieved) == rounds and len(r.plans) == rounds
    for k, a in enumerate(achieved, 1):
        assert abs(a / per_round ** k - 1) <= 0.05, (k, a, per_round ** k)
    assert abs(r.report["achieved"] / float(value) - 1) <= 0.05
    # retrained after every round (the last included: retrain_last), starting from that round's pruned model
    assert len(spy.costs) == rounds and all(spy.changed)
    assert [base / c for c in spy.costs] == pytest.approx(achieved, rel=1e-9)
    assert len(spy.inner.history) >= rounds and r.report["finetune_seconds"] > 0
