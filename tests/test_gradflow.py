"""Gradient-flow importance family (prunekit.methods.gradflow) and prune-and-train (prunekit.prune_train).

Scores are checked against hand-computed values on a tiny Conv-BN-ReLU-Conv-BN-ReLU-pool-Linear net (gradients
from autograd on the whole prune set at once, formulas by explicit loops); the Hessian-gradient product against
``torch.autograd.functional.hessian`` / ``hvp`` on a net small enough to form H. The channel graph of the tiny net
is a hand-written stand-in with the fields of ``prunekit.surgery.ChannelGroup``; the prune-and-train tests use the
engine's graph on a tiny ResNet-20.
"""

from __future__ import annotations

import math
import sys
import types
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from prunekit.errors import PruningError
from prunekit.methods import PruneContext, Target, create_method, get_method_info, list_methods
from prunekit.methods.gradflow import class_balanced_batches, schedule_ratios

GF = ["gf_magnitude", "gf_l1", "gf_bn", "gf_loss", "gf_biased_loss", "gf_tfo", "gf_fisher", "gf_nvidia",
      "gf_grasp", "gf_grad_preserve", "gf_biased_loss_tracked"]


class TinyNet(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))
        return self.fc(self.pool(x).flatten(1))


def _group(key: str, size: int, producers: list[str], norms: list[str], consumers: list[str],
           prunable: bool = True) -> SimpleNamespace:
    return SimpleNamespace(key=key, size=size, producers=producers, consumers=consumers, norms=norms,
                           depthwise=[], prunable=prunable)


def _tiny(seed: int = 0, n_batches: tuple[int, ...] = (4, 2)) -> tuple[TinyNet, PruneContext]:
    torch.manual_seed(seed)
    model = TinyNet().double()
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        for bn in (model.bn1, model.bn2):
            bn.weight.copy_(torch.randn(bn.num_features, dtype=torch.double))
            bn.bias.copy_(0.3 * torch.randn(bn.num_features, dtype=torch.double))
            bn.running_mean.copy_(0.2 * torch.randn(bn.num_features, dtype=torch.double))
            bn.running_var.copy_(0.5 + torch.rand(bn.num_features, dtype=torch.double))
    data = [(torch.randn(n, 2, 5, 5, dtype=torch.double), torch.randint(0, 5, (n,))) for n in n_batches]
    graph = SimpleNamespace(groups={
        "conv1": _group("conv1", 3, ["conv1"], ["bn1"], ["conv2"]),
        "conv2": _group("conv2", 4, ["conv2"], ["bn2"], ["fc"]),
        "fc": _group("fc", 5, ["fc"], [], [], prunable=False),
    })
    ctx = PruneContext(target=Target.parse("ratio=0.5"), input_shape=(2, 5, 5), data=data, graph=graph)
    model.train()  # scoring must switch BN to eval mode itself
    return model, ctx


def _grads(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], T: float) -> dict[str, torch.Tensor]:
    """Gradient of the mean loss over all examples at once, BN in eval mode."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    model.eval()
    params = dict(model.named_parameters())
    g = torch.autograd.grad(F.cross_entropy(model(x) / T, y), list(params.values()))
    model.train()
    return dict(zip(params, g))


def _mean_sq_grads(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], T: float) -> dict:
    """E_batch[g^2]: squared minibatch gradients, weighted by batch size."""
    n = sum(len(b[0]) for b in batches)
    out: dict[str, torch.Tensor] = {}
    for b in batches:
        for k, g in _grads(model, [b], T).items():
            out[k] = out.get(k, 0) + g.square() * len(b[0]) / n
    return out


def _rows(fn: Any, *tensors: torch.Tensor) -> torch.Tensor:
    """Per row i: fn(list of (t1_ij, t2_ij, ...)) by explicit loops over j."""
    flat = [t.detach().reshape(t.shape[0], -1) for t in tensors]
    return torch.tensor([fn([tuple(float(f[i, j]) for f in flat) for j in range(flat[0].shape[1])])
                         for i in range(flat[0].shape[0])], dtype=torch.double)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-7) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=1e-12)


def _score(name: str, model: nn.Module, ctx: PruneContext, **opts: Any) -> dict[str, torch.Tensor]:
    method = create_method(name, keep_stem=False, **opts)
    method.check(ctx)
    return method.score(model, ctx)


# ------------------------------------------------------------------------------------------------ metadata
def test_registry_metadata() -> None:
    assert set(GF) <= set(list_methods(family="gradflow"))
    for name in GF:
        info = get_method_info(name)
        assert info.granularity == "channel" and info.family == "gradflow"
        data_free = name in ("gf_magnitude", "gf_l1", "gf_bn")
        assert info.needs_data is not data_free and info.needs_grad is not data_free
        assert info.needs_second_order is (name in ("gf_grasp", "gf_grad_preserve"))
        for opt in ("imp_samples", "temperature", "grasp_T", "track_batches", "alpha", "use_l2", "use_init",
                    "preserve_moment", "warmup_epochs", "thresholds", "n_rounds", "prune_percent", "min_width",
                    "normalize"):
            assert opt in info.cls.defaults
    assert get_method_info("gf_grasp").cls.defaults["grasp_T"] == 200
    assert get_method_info("gf_grad_preserve").cls.defaults["grasp_T"] == 1
    assert get_method_info("gf_loss").cls.defaults["temperature"] == 5
    assert get_method_info("gf_biased_loss_tracked").cls.defaults["track_batches"] == 20
    with pytest.raises(PruningError):
        create_method("gf_loss", normalize="bogus")


# ------------------------------------------------------------------------------------------------ scores
def test_data_free_scores() -> None:
    model, ctx = _tiny()
    for key in ("conv1", "conv2"):
        w = model.get_submodule(key).weight
        bn = model.get_submodule(key.replace("conv", "bn"))
        _close(_score("gf_magnitude", model, ctx)[key], _rows(lambda r: math.sqrt(sum(t * t for t, in r)), w))
        _close(_score("gf_l1", model, ctx)[key], _rows(lambda r: sum(abs(t) for t, in r), w))
        _close(_score("gf_bn", model, ctx)[key], bn.weight.detach().abs())


@pytest.mark.parametrize("n_batches", [(4,), (4, 2)])
def test_first_order_scores(n_batches: tuple[int, ...]) -> None:
    model, ctx = _tiny(n_batches=n_batches)
    T = 5.0
    g = _grads(model, ctx.data, T)
    g2 = _mean_sq_grads(model, ctx.data, T)
    scores = {n: _score(n, model, ctx) for n in ("gf_loss", "gf_biased_loss", "gf_tfo", "gf_fisher", "gf_nvidia")}
    assert model.training  # the training flag is restored
    for key in ("conv1", "conv2"):
        w, gw, g2w = model.get_submodule(key).weight, g[f"{key}.weight"], g2[f"{key}.weight"]
        _close(scores["gf_loss"][key], _rows(lambda r: sum(abs(t * d) for t, d in r), w, gw))
        _close(scores["gf_biased_loss"][key], _rows(lambda r: sum(abs(t * t * d) for t, d in r), w, gw))
        _close(scores["gf_tfo"][key], _rows(lambda r: abs(sum(t * d for t, d in r)), w, gw))
        _close(scores["gf_fisher"][key], _rows(lambda r: sum(t * t * d for t, d in r), w, g2w))
        bn = key.replace("conv", "bn")
        gamma, beta = model.get_submodule(bn).weight.detach(), model.get_submodule(bn).bias.detach()
        expect = gamma ** 2 * g2[f"{bn}.weight"] + beta ** 2 * g2[f"{bn}.bias"]
        _close(scores["gf_nvidia"][key], expect)


def test_temperature_and_imp_samples() -> None:
    model, ctx = _tiny(n_batches=(4, 4))
    g = _grads(model, [(ctx.data[0][0][:3], ctx.data[0][1][:3])], 2.0)  # only the first 3 samples
    s = _score("gf_loss", model, ctx, temperature=2.0, imp_samples=3)
    _close(s["conv2"], _rows(lambda r: sum(abs(t * d) for t, d in r), model.conv2.weight, g["conv2.weight"]))


def test_use_l2_and_use_init() -> None:
    model, ctx = _tiny()
    g = _grads(model, ctx.data, 5.0)
    w0 = {k: v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items() if v.is_floating_point()}
    method = create_method("gf_biased_loss", use_init=True, keep_stem=False)
    with pytest.raises(PruningError, match="initial"):
        method.check(ctx)
    ctx.initial_state = w0
    s = _score("gf_biased_loss", model, ctx, use_init=True)
    for key in ("conv1", "conv2"):
        p = f"{key}.weight"
        expect = _rows(lambda r: sum(abs(t - t0) * abs(t * d) for t, t0, d in r),
                       model.get_submodule(key).weight, w0[p], g[p])
        _close(s[key], expect)
    # use_l2 on another measure: element-wise |theta| before the reduction
    s = _score("gf_tfo", model, ctx, use_l2=True)
    _close(s["conv2"], _rows(lambda r: abs(sum(t * d * abs(t) for t, d in r)), model.conv2.weight,
                             g["conv2.weight"]))
    ctx.initial_state = {k: v[:1] for k, v in w0.items()}  # wrong shapes: a clear error
    with pytest.raises(PruningError, match="shape"):
        _score("gf_loss", model, ctx, use_init=True)


def test_coupled_group_and_stem_and_normalize() -> None:
    model, ctx = _tiny()
    # keep_stem (default): the group fed by the first conv is not scored
    s = create_method("gf_l1").score(model, ctx)
    assert set(s) == {"conv2"}
    # a coupled group: rows of both producers are concatenated, so sums run over both
    ctx.graph.groups = {"res": _group("res", 3, ["conv1", "conv1b"], ["bn1"], [])}
    model.conv1b = nn.Conv2d(2, 3, 1, bias=False).double()
    l1 = _score("gf_l1", model, ctx)["res"]
    w1, w1b = model.conv1.weight.detach(), model.conv1b.weight.detach()
    _close(l1, w1.abs().flatten(1).sum(1) + w1b.abs().flatten(1).sum(1))
    mag = _score("gf_magnitude", model, ctx)["res"]
    _close(mag, torch.cat([model.conv1.weight.flatten(1), model.conv1b.weight.flatten(1)], 1).detach().norm(dim=1))
    n = _score("gf_l1", model, ctx, normalize="max")["res"]
    _close(n, l1 / l1.max())


# ------------------------------------------------------------------------------------------------ second order
class HessNet(nn.Module):
    """Small enough to form the full Hessian (39 parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 2, bias=False)
        self.bn1 = nn.BatchNorm2d(2)
        self.act = nn.Tanh()
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.bn1(self.conv1(x))).flatten(1))


def _hess_setup() -> tuple[HessNet, PruneContext]:
    torch.manual_seed(1)
    model = HessNet().double()
    with torch.no_grad():
        model.bn1.running_mean.copy_(torch.tensor([0.1, -0.2]))
        model.bn1.running_var.copy_(torch.tensor([0.7, 1.3]))
    labels = torch.tensor([0, 0, 1, 2, 1, 0, 2, 2, 1, 0])
    x = torch.randn(len(labels), 1, 3, 3, dtype=torch.double)
    data = [(x[:4], labels[:4]), (x[4:], labels[4:])]
    graph = SimpleNamespace(groups={"conv1": _group("conv1", 2, ["conv1"], ["bn1"], ["fc"])})
    ctx = PruneContext(target=Target.parse("ratio=0.5"), input_shape=(1, 3, 3), data=data, graph=graph)
    return model, ctx


def _full_hg(model: nn.Module, x: torch.Tensor, y: torch.Tensor, T: float) -> dict[str, torch.Tensor]:
    """H g over all parameters, with H from torch.autograd.functional.hessian (and checked against hvp)."""
    model.eval()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().flatten() for _, p in model.named_parameters()])

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[i: i + math.prod(s)].view(s)
            i += math.prod(s)
        return F.cross_entropy(functional_call(model, params, (x,)) / T, y)

    flat = flat0.clone().requires_grad_(True)
    g = torch.autograd.grad(loss(flat), flat)[0].detach()
    H = torch.autograd.functional.hessian(loss, flat0)
    hg = H @ g
    _, hvp = torch.autograd.functional.hvp(loss, flat0, g)
    _close(hg, hvp, rtol=1e-6)
    out, i = {}, 0
    for n, s in zip(names, shapes):
        out[n] = hg[i: i + math.prod(s)].view(s)
        i += math.prod(s)
    return out


def test_hessian_gradient_product_against_autograd_hessian() -> None:
    model, ctx = _hess_setup()
    T = 3.0
    method = create_method("gf_grasp", grasp_T=T, keep_stem=False)
    paths = ["conv1.weight", "fc.weight", "bn1.weight"]
    stats = method.hessian_grad(model, ctx, ctx.data, paths)
    ref = _full_hg(model, torch.cat([b[0] for b in ctx.data]), torch.cat([b[1] for b in ctx.data]), T)
    for p in paths:
        _close(stats["hg"][p], ref[p], rtol=1e-6)


def test_class_balanced_batches() -> None:
    labels = torch.tensor([2, 0, 0, 1, 0, 2, 1, 1, 0, 2, 2, 1])
    x = torch.arange(len(labels), dtype=torch.float).view(-1, 1)
    data = [(x[i: i + 5], labels[i: i + 5]) for i in range(0, len(labels), 5)]
    batches, counts = class_balanced_batches(data, num_classes=3, per_class=2, batch_size=4)
    assert counts == [2, 2, 2]
    X = torch.cat([b[0] for b in batches]).flatten().tolist()
    Y = torch.cat([b[1] for b in batches]).tolist()
    assert Y == [0, 0, 1, 1, 2, 2]
    assert X == [1, 2, 3, 6, 0, 5]  # the first examples of each class in loader order
    assert [len(b[0]) for b in batches] == [4, 2]
    # a class missing from the data: what was found is used and reported
    _, counts = class_balanced_batches(data, num_classes=4, per_class=2)
    assert counts == [2, 2, 2, 0]


@pytest.mark.parametrize("name", ["gf_grasp", "gf_grad_preserve"])
def test_grasp_scores_use_class_balanced_data(name: str) -> None:
    model, ctx = _hess_setup()
    method = create_method(name, imp_samples=6, keep_stem=False)  # 3 classes -> 2 per class
    T = float(method.grasp_T)
    method.check(ctx)
    s = method.score(model, ctx)["conv1"]
    batches, counts = class_balanced_batches(ctx.data, 3, 2)
    assert counts == [2, 2, 2] and method.meta["class_balanced"]["per_class"] == 2
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    hg = _full_hg(model, x, y, T)["conv1.weight"]
    signed = _rows(lambda r: sum(t * h for t, h in r), model.conv1.weight, hg)
    _close(s, signed if name == "gf_grasp" else signed.abs(), rtol=1e-6)


def test_grasp_plan_reports_peak_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    model, ctx = _hess_setup()
    fake = types.ModuleType("prunekit.surgery.allocate")  # the plan's allocation is not under test here
    fake.allocate_channels = lambda model, ctx, scores: {k: torch.arange(1) for k in scores}  # type: ignore
    monkeypatch.setitem(sys.modules, "prunekit.surgery.allocate", fake)
    plan = create_method("gf_grasp", imp_samples=6, keep_stem=False).plan(model, ctx)
    mem = plan.meta["grasp_memory"]
    assert mem["peak_bytes"] > 0 and mem["source"] in ("torch_profiler", "rss_sampled", "getrusage_maxrss",
                                                       "cuda_max_memory_allocated")
    assert mem["increase_bytes"] > 0 and plan.meta["gradflow"]["score_memory"] == mem
    assert plan.meta["temperature"] == 200


def test_peak_memory_sees_torch_allocations() -> None:
    from prunekit.methods.gradflow import PeakMemory

    keep = torch.zeros(1 << 20)  # allocated before: not counted
    with PeakMemory("cpu") as mem:
        a = torch.ones(8 << 20)  # 32 MiB, freed inside the block
        b = a * 2  # 32 MiB more at the peak
        del a, b
        c = torch.ones(1 << 20)  # 4 MiB, smaller than the peak
    del keep, c
    r = mem.result
    if r["source"] == "torch_profiler":
        assert 64 << 20 <= r["increase_bytes"] < 72 << 20
        assert r["rss_peak_bytes"] >= r["rss_increase_bytes"] >= 0
    else:  # pragma: no cover - profiler unavailable
        assert r["peak_bytes"] > 0


# ------------------------------------------------------------------------------------------------ tracking
def test_tracking_ema_over_minibatches() -> None:
    model, ctx = _tiny(n_batches=(4, 3, 2))
    alpha = 0.8
    s = _score("gf_biased_loss_tracked", model, ctx, track_batches=2, alpha=alpha)
    per_batch = []
    for b in ctx.data[:2]:
        g = _grads(model, [b], 5.0)["conv2.weight"]
        per_batch.append(_rows(lambda r: sum(abs(t * d) * abs(t) for t, d in r), model.conv2.weight, g))
    _close(s["conv2"], alpha * per_batch[1] + (1 - alpha) * per_batch[0])
    # tracking works for any measure, e.g. fisher (per-batch E[g^2] = g_b^2)
    s = _score("gf_fisher", model, ctx, track_batches=3, alpha=0.5)
    ema = None
    for b in ctx.data:
        g = _grads(model, [b], 5.0)["conv1.weight"]
        cur = _rows(lambda r: sum(t * t * d * d for t, d in r), model.conv1.weight, g)
        ema = cur if ema is None else 0.5 * cur + 0.5 * ema
    _close(s["conv1"], ema)


# ------------------------------------------------------------------------------------------------ schedule
@pytest.mark.parametrize("p,n", [(0.75, 25), (0.5, 3), (0.9, 1), (0.3, 7)])
def test_schedule_leaves_requested_fraction(p: float, n: int) -> None:
    r = schedule_ratios(p, n)
    assert len(r) == n
    assert math.isclose(math.prod(1 - x for x in r), 1 - p, rel_tol=1e-12)
    # r_k = p / (k p + n (1 - p)): 1 / (fraction left after k rounds) grows linearly, by p / (n (1 - p)) a round
    left = [math.prod(1 - x for x in r[:k]) for k in range(n + 1)]
    assert all(math.isclose(1 / left[k], 1 + k * p / (n * (1 - p)), rel_tol=1e-9) for k in range(n + 1))
    assert math.isclose(sum(schedule_ratios(p * 100, n)), sum(r))  # percentages accepted


def test_schedule_thresholds_override() -> None:
    r = schedule_ratios(0.9, 10, thresholds=[0.1, 0.5, 0.8])
    assert len(r) == 3
    left = 1.0
    for cum, x in zip([0.1, 0.5, 0.8], r):
        left *= 1 - x
        assert math.isclose(1 - left, cum)
    assert schedule_ratios(0.0, 1, thresholds=[10, 50, 80]) == pytest.approx(r)
    with pytest.raises(PruningError):
        schedule_ratios(0.5, 2, thresholds=[0.5, 0.2])


# ------------------------------------------------------------------------------------------------ prune-and-train
def test_allocate_global_count_exact_with_floors() -> None:
    from prunekit.prune_train import allocate_global_count

    scores = {"a": torch.tensor([5.0, 0.1, 3.0, 0.2]), "b": torch.tensor([0.05, 0.3, 4.0]), "c": torch.tensor([9.0])}
    keep = allocate_global_count(scores, 3, floors={"a": 1, "b": 2, "c": 1})
    # globally lowest: b0 (0.05), a1 (0.1), a3 (0.2); b may lose only one channel (floor 2)
    assert {k: v.tolist() for k, v in keep.items()} == {"a": [0, 2], "b": [1, 2]}
    keep = allocate_global_count(scores, 100, floors={"a": 1, "b": 2, "c": 1})  # floors bound the removal
    assert {k: len(v) for k, v in keep.items()} == {"a": 1, "b": 2}
    assert allocate_global_count(scores, 0) == {}


def _synthetic(n: int = 64, classes: int = 4, size: int = 16, batch: int = 16) -> list:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 3, size, size, generator=g) + 0.5 * y.view(-1, 1, 1, 1).float()
    return [(x[i: i + batch], y[i: i + batch]) for i in range(0, n, batch)]


def _scored_width(model: nn.Module) -> int:
    """Channels of a CIFAR ResNet's prunable groups but the stem's: every block's inner width, plus the residual
    streams of stages 2 and 3 (stage 1's stream is the stem conv's group)."""
    blocks = [b for stage in (model.layer1, model.layer2, model.layer3) for b in stage]
    return sum(b.conv1.out_channels for b in blocks) + model.layer2[0].conv2.out_channels + \
        model.layer3[0].conv2.out_channels


def test_prune_and_train_tiny_resnet20() -> None:
    from prunekit.models import create_model
    from prunekit.prune_train import prune_and_train

    torch.manual_seed(0)
    model = create_model("resnet20", width=0.25, num_classes=4)
    n0 = _scored_width(model)
    stem_width = model.conv1.out_channels
    data = _synthetic()
    model, history = prune_and_train(model, "gf_loss", 0.5, 2, data, data[:1], final_epochs=1, imp_samples=32)
    assert history["channels"]["original"] == n0
    assert [r["channels_kept"] for r in history["rounds"]] == [round(n0 * 2 / 3), round(n0 / 2)]
    assert _scored_width(model) == round(n0 / 2)  # physically removed, residual streams included
    assert model.conv1.out_channels == stem_width and model.fc.out_features == 4  # stem and classifier kept
    assert model(data[0][0]).shape == (16, 4)
    assert len(history["final"]) == 1 and history["final"][-1]["train_loss"] < math.log(4)  # it trains
    assert history["pruned"]["params"] < history["base"]["params"]


def test_prune_and_train_thresholds_tracking_moment_init(monkeypatch: pytest.MonkeyPatch) -> None:
    import prunekit.schedule as schedule
    from prunekit.models import create_model
    from prunekit.prune_train import prune_and_train

    calls = []
    original = schedule.slice_optimizer_state_

    def spy(opt: Any, old: Any, model: nn.Module, kept: Any) -> Any:
        before = {n: opt.state[p]["momentum_buffer"].clone() for n, p in old.items() if p in opt.state}
        out = original(opt, old, model, kept)
        ok = bool(before)
        for n, p in model.named_parameters():  # momentum of the surviving channels, sliced
            expect = before[n]
            for d, idx in kept.get(n, {}).items():
                expect = expect.index_select(d, idx)
            ok = ok and torch.equal(opt.state[p]["momentum_buffer"], expect)
        calls.append(ok)
        return out

    monkeypatch.setattr(schedule, "slice_optimizer_state_", spy)
    torch.manual_seed(0)
    model = create_model("resnet20", width=0.25, num_classes=4)
    n0 = _scored_width(model)
    data = _synthetic()
    # gf_biased_loss_tracked: tracked over the last 2 minibatches, momentum preserved (its default), use_init
    model, history = prune_and_train(model, "gf_biased_loss_tracked", 0.9, 7, data, thresholds=[0.25, 0.5],
                                     track_batches=2, use_init=True)
    assert history["n_rounds"] == 2 and history["preserve_moment"] is True
    assert [r["channels_kept"] for r in history["rounds"]] == [round(n0 * 0.75), round(n0 * 0.5)]
    assert [r["tracked_batches"] for r in history["rounds"]] == [2, 2]
    assert calls == [True, True]


def test_cli_hook() -> None:
    import argparse

    from prunekit.prune_train import add_prune_train_args, prune_train_kwargs, wants_prune_train

    p = argparse.ArgumentParser()
    p.add_argument("--method")
    p.add_argument("--target")
    p.add_argument("--lr", type=float, default=0.01)  # an option the prune command already has is kept
    add_prune_train_args(p)
    args = p.parse_args(["--method", "gf_loss", "--target", "ratio=0.75", "--rounds", "25",
                         "--epochs-per-round", "1", "--thresholds", "10,50,75", "--preserve-moment"])
    assert wants_prune_train(args) and not wants_prune_train(p.parse_args([]))
    kw = prune_train_kwargs(args)
    assert kw["prune_percent"] == 0.75 and kw["n_rounds"] == 25 and kw["epochs_per_round"] == 1
    assert kw["thresholds"] == [10, 50, 75] and kw["preserve_moment"] is True and kw["lr"] == 0.01
    with pytest.raises(PruningError, match="ratio"):
        prune_train_kwargs(p.parse_args(["--target", "flops=2"]))


def test_mobilenet_depthwise_follows_pointwise_and_one_shot_prune() -> None:
    import warnings

    from prunekit.api import prune
    from prunekit.models import create_model, get_model_info
    from prunekit.surgery.graph import analyze

    torch.manual_seed(0)
    model = create_model("mobilenet_v1", num_classes=4, **get_model_info("mobilenet_v1").tiny_kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.normal_()
    graph = analyze(model, (3, 32, 32), warn=False)
    ctx = PruneContext(target=Target.parse("flops=1.5"), input_shape=(3, 32, 32), graph=graph)
    key = "layers.0.conv_pw"
    g = graph.groups[key]
    assert g.depthwise == ["layers.1.conv_dw"] and "layers.1.bn1" in g.norms  # the engine couples them
    l1 = create_method("gf_l1").score(model, ctx)
    assert "conv1" not in l1  # the stem's group is kept
    _close(l1[key], model.layers[0].conv_pw.weight.detach().abs().flatten(1).sum(1))
    _close(create_method("gf_bn").score(model, ctx)[key], model.layers[0].bn2.weight.detach().abs())
    # one-shot through prunekit.prune: the engine's global allocation, stem and classifier untouched
    data = [(torch.randn(8, 3, 32, 32), torch.arange(8) % 4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = prune(model, "gf_loss", "flops=1.5", data, imp_samples=8, verify=False)
    assert result.report["flops_speedup"] == pytest.approx(1.5, rel=0.05)
    assert result.model.conv1.out_channels == model.conv1.out_channels
