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
