"""K-FAC / EKFAC statistics (prunekit.curvature) against explicit per-sample computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from prunekit import curvature
from prunekit.errors import PruningError


class Net(nn.Module):
    """conv(2->3, 3x3, bias, pad 1, stride 2) -> BN -> ReLU(inplace) -> conv(3->4, 3x3) -> flatten -> linear."""

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.c2 = nn.Conv2d(4, 4, 2, groups=groups, bias=False)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.c2(self.relu(self.bn(self.c1(x)))).flatten(1))


def _data(n_batches: int = 2, b: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(b, 2, 6, 6, generator=g), torch.randint(0, 5, (b,), generator=g)) for _ in range(n_batches)]


def _model(groups: int = 1) -> Net:
    torch.manual_seed(0)
    m = Net(groups)
    with torch.no_grad():
        m.bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        m.bn.running_var.copy_(torch.tensor([1.5, 0.5, 2.0, 1.0]))
    return m


def _explicit(model: Net, data: list, layer: str) -> dict[str, torch.Tensor]:
    """Inputs and per-example output gradients of ``layer`` (eval mode, empirical labels)."""
    model.eval()
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    store = {}

    def hook(mod, args, out):
        store["in"] = args[0].detach().clone()
        out.retain_grad()
        store["out"] = out
        return None

    mod = model.get_submodule(layer)
    h = mod.register_forward_hook(hook)
    logits = model(x)
    h.remove()
    # per-example losses summed: the gradient w.r.t. the output is dl_n/dy for each example n
    F.cross_entropy(logits, y, reduction="sum").backward()
    model.zero_grad(set_to_none=True)
    return {"in": store["in"], "grad": store["out"].grad.detach(), "n": len(x)}


def _outer_mean(vectors: list[torch.Tensor]) -> torch.Tensor:
    acc = sum(torch.outer(v, v) for v in vectors)
    return acc / len(vectors)


def test_conv_channel_mode_factors_match_explicit() -> None:
    model, data = _model(), _data()
    f = curvature.kfac_factors(model, data, ["c1"], mode="channel", fisher="empirical")["c1"]
    e = _explicit(model, data, "c1")
    conv = model.c1
    patches = F.unfold(e["in"], 3, padding=1, stride=2).double()  # (N, C*9, L)
    vecs = []
    for n in range(e["n"]):
        for s in range(patches.shape[2]):
            p = patches[n, :, s].reshape(2, 9)
            for t in range(9):
                vecs.append(torch.cat([p[:, t], torch.tensor([1 / 9], dtype=torch.float64)]))
    a = _outer_mean(vecs)
    g = e["grad"].double()
    gvecs = [g[n, :, i, j] for n in range(e["n"]) for i in range(g.shape[2]) for j in range(g.shape[3])]
    gg = sum(torch.outer(v, v) for v in gvecs) / e["n"]
    torch.testing.assert_close(f.A[0], a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f.G, gg, atol=1e-5, rtol=1e-5)
    assert f.taps == 9 and f.bias and f.A.shape == (1, 3, 3) and f.examples == 6
    assert f.in_positions == 36 and f.out_positions == 9
    assert conv.weight.grad is None


def test_conv_patch_mode_factors_match_explicit() -> None:
    model, data = _model(), _data()
    f = curvature.kfac_factors(model, data, ["c1"], mode="patch", fisher="empirical")["c1"]
    e = _explicit(model, data, "c1")
    patches = F.unfold(e["in"], 3, padding=1, stride=2).double()
    vecs = [torch.cat([patches[n, :, s], torch.ones(1, dtype=torch.float64)])
            for n in range(e["n"]) for s in range(patches.shape[2])]
    torch.testing.assert_close(f.A[0], _outer_mean(vecs), atol=1e-5, rtol=1e-5)
    assert f.A.shape == (1, 19, 19) and f.taps == 1


@pytest.mark.parametrize("mode", ["channel", "patch"])
def test_grouped_conv_factors_per_group(mode: str) -> None:
    model, data = _model(groups=2), _data()
    f = curvature.kfac_factors(model, data, ["c2"], mode=mode, fisher="empirical")["c2"]
    e = _explicit(model, data, "c2")
    patches = F.unfold(e["in"], 2).double()  # (N, 4*4, L); channels 0-1 -> group 0, 2-3 -> group 1
    for grp in range(2):
        vecs = []
        for n in range(e["n"]):
            for s in range(patches.shape[2]):
                p = patches[n, :, s].reshape(4, 4)[2 * grp: 2 * grp + 2]  # (C/g, taps)
                if mode == "channel":
                    vecs.extend(p[:, t] for t in range(4))
                else:
                    vecs.append(p.reshape(-1))
        torch.testing.assert_close(f.A[grp], _outer_mean(vecs), atol=1e-5, rtol=1e-5)
    g = e["grad"].double()
    gg = sum(torch.outer(g[n, :, i, j], g[n, :, i, j]) for n in range(e["n"]) for i in range(2)
             for j in range(2)) / e["n"]
    torch.testing.assert_close(f.G, gg, atol=1e-5, rtol=1e-5)


def test_linear_factors_match_explicit() -> None:
    model, data = _model(), _data()
    f = curvature.kfac_factors(model, data, ["fc"], fisher="empirical")["fc"]
    e = _explicit(model, data, "fc")
    vecs = [torch.cat([e["in"][n].double(), torch.ones(1, dtype=torch.float64)]) for n in range(e["n"])]
    torch.testing.assert_close(f.A[0], _outer_mean(vecs), atol=1e-5, rtol=1e-5)
    g = e["grad"].double()
    torch.testing.assert_close(f.G, g.T @ g / e["n"], atol=1e-5, rtol=1e-5)


def test_ema_of_batch_factors() -> None:
    model, data = _model(), _data()
    first = curvature.kfac_factors(model, data[:1], ["fc"], fisher="empirical")["fc"]
    second = curvature.kfac_factors(model, data[1:], ["fc"], fisher="empirical")["fc"]
    ema = curvature.kfac_factors(model, data, ["fc"], fisher="empirical", average="ema", decay=0.9)["fc"]
    torch.testing.assert_close(ema.A, 0.9 * first.A + 0.1 * second.A)
    torch.testing.assert_close(ema.G, 0.9 * first.G + 0.1 * second.G)


def test_true_fisher_seeded_and_state_untouched() -> None:
    model, data = _model(), _data()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = curvature.kfac_factors(model, data, ["c1", "c2", "fc"], seed=3)
    b = curvature.kfac_factors(model, data, ["c1", "c2", "fc"], seed=3)
    assert all(torch.equal(a[k].G, b[k].G) for k in a)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats included
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


def test_bad_options_and_layers() -> None:
    model, data = _model(), _data()
    with pytest.raises(PruningError, match="mode"):
        curvature.kfac_factors(model, data, ["fc"], mode="bogus")
    with pytest.raises(PruningError, match="Conv2d and Linear"):
        curvature.kfac_factors(model, data, ["bn"])
    with pytest.raises(PruningError, match="empty"):
        curvature.kfac_factors(model, [], ["fc"])


def test_damping_and_eigh() -> None:
    a = torch.diag(torch.tensor([4.0, 2.0], dtype=torch.float64))
    g = torch.diag(torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))
    da, dg = curvature.pi_damping(a, g, 1e-2)
    pi = (3.0 / 1.0) ** 0.5
    assert da == pytest.approx((1e-2 * pi) ** 0.5) and dg == pytest.approx((1e-2 / pi) ** 0.5)
    vals, vecs = curvature.eigh(torch.diag(torch.tensor([3.0, 1e-12, -1e-9])))
    assert vals.tolist() == [3.0, 0.0, 0.0]
    assert torch.allclose(vecs.abs().sum(0), torch.ones(3, dtype=torch.float64))


def _brute_ekfac(model: Net, data: list, path: str, q_a: torch.Tensor, q_g: torch.Tensor, mode: str) -> torch.Tensor:
    model.eval()
    mod = model.get_submodule(path)
    sq = []
    for x, y in data:
        for n in range(len(x)):
            loss = F.cross_entropy(model(x[n:n + 1]), y[n:n + 1])
            params = [mod.weight] + ([mod.bias] if mod.bias is not None else [])
            grads = torch.autograd.grad(loss, params)
            gw, gb = grads[0].double(), grads[1].double() if len(grads) > 1 else None
            wt = curvature.weight_taps(mod, gw, gb, mode, gradient=True)
            sq.append(torch.einsum("oi,odt,dj->ijt", q_g, wt, q_a) ** 2)
    return torch.stack(sq).mean(0)


@pytest.mark.parametrize(("path", "mode"), [("c1", "channel"), ("c1", "patch"), ("fc", "channel")])
def test_ekfac_matches_brute_force(path: str, mode: str) -> None:
    model, data = _model(), _data()
    f = curvature.kfac_factors(model, data, [path], mode=mode, fisher="empirical")[path]
    _, q_a = curvature.eigh(f.A[0])
    _, q_g = curvature.eigh(f.G)
    s = curvature.ekfac_eigenvalues(model, data, {path: (q_a, q_g)}, mode=mode, fisher="empirical",
                                    num_batches=2, chunk=2)[path]
    brute = _brute_ekfac(model, data, path, q_a, q_g, mode).clamp_min(1e-15)
    torch.testing.assert_close(s, brute, atol=1e-9, rtol=1e-5)
    assert all(p.grad is None for p in model.parameters())


def test_weight_taps_channel_mode_reproduces_conv() -> None:
    """``sum_t [W_t, b] [a_t; 1/T]`` is the conv output: the bias column is ``b`` for weights."""
    model = _model()
    x = torch.randn(2, 2, 6, 6)
    rows = curvature.input_rows(model.c1, x, "channel")[0]  # (B*L*T, C+1)
    wt = curvature.weight_taps(model.c1, model.c1.weight.detach(), model.c1.bias.detach(), "channel")
    rows = rows.reshape(2, 9, 9, 3)  # (B, L, T, C+1)
    y = torch.einsum("bltc,oct->bol", rows, wt).reshape(2, 4, 3, 3)
    torch.testing.assert_close(y, model.c1(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [dict(kernel_size=3, padding=1), dict(kernel_size=3, padding=1, stride=2),
                                dict(kernel_size=1), dict(kernel_size=3, padding=2, dilation=2, groups=2),
                                dict(kernel_size=(3, 5), padding=(1, 2), stride=(2, 1), bias=False),
                                dict(kernel_size=3, padding=1, padding_mode="reflect"),
                                dict(kernel_size=4, stride=2, padding=0)])
def test_channel_gram_equals_the_unfolded_rows(kw) -> None:
    # the fast channel-mode sum (weighted Gram of the input) against rows^T rows of the F.unfold patches
    torch.manual_seed(0)
    m = nn.Conv2d(4, 6, **kw).double()
    x = torch.randn(3, 4, 9, 11, dtype=torch.float64)
    rows = curvature.input_rows(m, x, "channel")
    got, count = curvature.channel_gram(m, x)
    assert count == rows.shape[1]
    assert torch.allclose(got, rows.transpose(1, 2) @ rows, rtol=1e-10, atol=1e-9)
