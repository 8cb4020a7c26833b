"""Provable sensitivity pruning (METHODS.md §5): SiPP (weights) and PFP (filters).

Both read empirical sensitivities (:mod:`prunekit.sensitivity`) from forward passes over a sample set S:
the first ``samples`` examples of the prune set (a held-out part of the training split); by default
``|S| = ceil(3 ln(8 eta* eta / delta))`` (torchprune's form), rounded up to a whole ``batch_size``.

Weights (granularity ``weight``):

* ``sipp``: the per-weight sensitivity is the score; the shared weight allocator keeps the global top-k.
* ``sipp_rand``: every filter's positive and negative weights are two rows; row ``r`` draws ``m_r`` weights
  with replacement, with probability ``p = s / sum(s)``, and a kept weight becomes ``w * count / (m_r p)``
  (an unbiased estimate of the row's pre-activation). The ``m_r`` solve the separable convex program
  ``min sum_r err_r(m_r) / F_l  s.t.  sum_r cost_r m_r <= B,  0 <= m_r <= nnz_r`` with torchprune's
  error bound ``err(m) = (u + sqrt(u^2 + 6u)) / 2``, ``u = alpha S_r / (3 m)``,
  ``alpha = 6 ln(8 (P + 1) K / delta)`` (``P`` patches, ``K`` kernel taps). Its KKT condition gives every
  ``m_r`` as a monotone function of the Lagrange multiplier (:func:`samples_for_multiplier`), so the
  program is solved by bisection on the multiplier (:func:`allocate_samples`); no cvxpy. The multiplier
  is chosen so that the kept weights meet the same budget as ``sipp``'s allocation (params or FLOPs).
* ``sipp_hybrid``: per row, the deterministic top-``m_r`` (error bound ``3 x`` the sensitivity left out)
  or the random sample, whichever bound is smaller.

Filters (granularity ``channel``): input channel ``c`` of a layer is output channel ``c`` of its producers,
so PFP scores each coupled channel group (:class:`~prunekit.surgery.ChannelGroup`) by the maximum, over
the group's consumer layers, of their per-input-channel sensitivities; residual streams and layers with
several readers are handled like any other group, and channels are removed physically by the surgery.
Per group ``p_c = s_c / S`` and ``m(eps) = ceil(3 (6 + 2 eps) alpha S / eps^2)`` (``alpha`` the largest over
its consumers); one ``eps`` for all groups is found by bisection so that the model meets the target, the
cost read from the channel graph's cost model.

* ``pfp``: keeps the top ``ceil(sum_c 1 - (1 - p_c)^m)`` channels (the expected number of distinct draws).
* ``pfp_rand``: draws ``m`` channels with replacement and keeps the distinct ones, consumer input columns
  scaled by ``count / (m p)`` (folded into the consumers' weights in ``Plan.weights``).
* ``pfp_top``: keeps the channels with ``p_c >= 1 / m`` as they are and draws the remaining ``m - |top|``
  samples from the others.

Every group keeps at least the budget floor (``BudgetOptions.floor``): missing channels are the
best-scored ones not drawn, kept unscaled. Widths are not rounded to the engine's channel multiples
unless ``align=True``. Random variants are seeded (``seed``) and reuse one stream of uniform numbers
while the multiplier / ``eps`` is searched, so the kept size is monotone in it.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from prunekit.errors import PruningError
from prunekit.methods.base import Method, PruneContext, WeightScorer
from prunekit.methods.options import OptionType
from prunekit.methods.registry import register_method
from prunekit.sensitivity import DEFAULT_DELTA, LayerSensitivity, collect_sensitivities, sample_size
from prunekit.surgery.inputs import input_tensors
from prunekit.surgery.plan import Plan

C_CONSTANT = 3.0  # the constant of the bounds (torchprune's c_constant)
_PAPERS = {
    "sipp": "Baykal, Liebenwein et al., SiPPing Neural Networks: Sensitivity-informed Provable Pruning, 2019",
    "pfp": "Liebenwein, Baykal et al., Provable Filter Pruning for Efficient Neural Networks, ICLR 2020",
}
_DEFAULTS: dict[str, Any] = {"samples": None, "delta": DEFAULT_DELTA, "batch_size": 32}
_HELP = {
    "samples": "size of the sample set S (None: ceil(3 ln(8 eta* eta / delta)), rounded up to a batch)",
    "delta": "failure probability of the guarantees (sample-set size and the bounds' alpha)",
    "batch_size": "examples per forward pass of the sensitivity sweep",
    "seed": "random seed of the sampling",
    "draw_cap": "at most draw_cap * nnz draws per filter (the paper: 1; more reach low compressions)",
    "align": "snap kept widths to the engine's channel multiples (BudgetOptions.round_to)",
}


# --------------------------------------------------------------------------------------------- sample set
def sensitivities(method: Method, model: nn.Module, ctx: PruneContext, paths: list[str], weights: bool,
                  channels: bool) -> dict[str, LayerSensitivity]:
    """Sensitivities of ``paths`` over the sample set (``method.samples`` / the formula)."""
    if not 0 < method.delta < 1:
        raise PruningError(f"method {method.name!r}: delta must be in (0, 1), got {method.delta}")
    n = method.samples
    if n is None:
        n = sample_size(model, ctx.input_shape, method.delta)
        n = -(-n // method.batch_size) * method.batch_size
    batches = [x for x, _ in ctx.batches(n)]
    key = _cache_key(model, paths, batches, weights, channels, method.batch_size)
    use_cache = os.environ.get("PRUNEKIT_SENSITIVITY_CACHE", "1") != "0"
    hit = _SENS_CACHE.get(key) if use_cache else None
    method.sensitivity_source = "cache" if hit is not None else "computed"
    if hit is not None:
        _SENS_CACHE.move_to_end(key)
        return {p: _rebound(t, model.get_submodule(p)) for p, t in hit.items()}
    trackers = collect_sensitivities(model, batches, paths, weights, channels, method.batch_size)
    seen = max((t.num_points for t in trackers.values()), default=0)
    if seen == 0:
        raise PruningError(f"method {method.name!r} saw no examples: the prune set is empty")
    if use_cache:
        _SENS_CACHE[key] = {p: _rebound(t, None) for p, t in trackers.items()}
    while len(_SENS_CACHE) > _SENS_CACHE_SIZE:
        _SENS_CACHE.popitem(last=False)
    return trackers


# Sensitivities are a deterministic function of the layers' weights and the sample set: a sweep prunes the
# same base model with the same prune set at several targets and with several variants (pfp / pfp_rand /
# pfp_top share the channel scores), so the last few results are kept, keyed by a digest of the weights of
# every measured layer's module tree and of the sample set. A hit returns copies bound to the caller's
# modules (the scores read their weights, identical by the key); nothing else is shared. The plans of
# sipp_rand / sipp_hybrid / pfp* say where their scores came from (meta "sensitivities": "cache" or
# "computed"); PRUNEKIT_SENSITIVITY_CACHE=0 turns the cache off, clear_sensitivity_cache() empties it.
_SENS_CACHE: OrderedDict[str, dict[str, LayerSensitivity]] = OrderedDict()
_SENS_CACHE_SIZE = 4


def clear_sensitivity_cache() -> None:
    """Forget the kept sensitivities."""
    _SENS_CACHE.clear()


def _cache_key(model: nn.Module, paths: list[str], batches: list[torch.Tensor], weights: bool, channels: bool,
               batch_size: int) -> str:
    h = hashlib.sha1(repr((paths, weights, channels, batch_size, model.training)).encode())
    # every tensor the forward pass can depend on (parameters and buffers, BatchNorm statistics included)
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        h.update(name.encode())
        _digest(h, t)
    for x in batches:
        for t in input_tensors(x):  # one tensor, or each of several / keyword inputs
            _digest(h, t)
    return h.hexdigest()


def _digest(h: Any, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(repr((str(t.dtype), tuple(t.shape))).encode())
    if t.numel():
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())


def _rebound(t: LayerSensitivity, module: nn.Module | None) -> LayerSensitivity:
    """A shallow copy of ``t`` reading its weight from ``module`` (None: detached, for the cache)."""
    c = copy.copy(t)
    c.module = module
    return c


def layer_alpha(t: LayerSensitivity, delta: float) -> float:
    """``alpha = 2 C ln(8 (P + 1) K / delta)`` of a layer (``P`` patches, ``K`` kernel taps)."""
    return 2.0 * C_CONSTANT * math.log(8.0 * ((t.num_patches or 1) + 1) * t.taps / delta)


def _module_path(param: str) -> str:
    return param.rpartition(".")[0]


# --------------------------------------------------------------------------------------------- the program
def error_rand(a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """torchprune's bound for ``m`` samples of a row with coefficient ``a = alpha S / 3``: ``(u + sqrt(u^2 +
    6u)) / 2`` with ``u = a / m`` (inf for ``m = 0`` unless ``a = 0``)."""
    u = torch.where(m > 0, a / m.clamp(min=1e-300), torch.where(a > 0, math.inf, 0.0))
    return 0.5 * (u + torch.sqrt(u * u + 6 * u))


def _phi(u: torch.Tensor) -> torch.Tensor:
    """``-d err / dm * m^2 / a`` as a function of ``u = a / m`` (increasing)."""
    return 0.5 * u * u * ((u + 3) / torch.sqrt(u * u + 6 * u) + 1)


def samples_for_multiplier(lam: float, a: torch.Tensor, lead: torch.Tensor, cost: torch.Tensor,
                           nnz: torch.Tensor) -> torch.Tensor:
    """The minimiser over ``0 <= m <= nnz`` of ``lead * err(m) + lam * cost * m`` for every row.

    Stationarity reads ``phi(a / m) = lam * cost * a / lead``; ``phi`` is increasing, so ``u = a / m`` is
    found by bisection on ``log u`` (vectorised over the rows)."""
    a, lead, cost, nnz = (torch.as_tensor(v, dtype=torch.float64) for v in (a, lead, cost, nnz))
    t = lam * cost * a / lead.clamp(min=1e-300)
    lo = torch.full_like(a, -120.0)
    hi = torch.full_like(a, 120.0)
    for _ in range(90):
        mid = 0.5 * (lo + hi)
        big = _phi(torch.exp(mid)) > t
        hi = torch.where(big, mid, hi)
        lo = torch.where(big, lo, mid)
    m = a / torch.exp(0.5 * (lo + hi))
    return torch.where(a > 0, torch.minimum(m, nnz), torch.zeros_like(a))


def allocate_samples(a: Any, lead: Any, cost: Any, nnz: Any, budget: float) -> torch.Tensor:
    """Solve ``min sum lead_r err(a_r / m_r)  s.t.  sum cost_r m_r <= budget, 0 <= m_r <= nnz_r``
    (continuous ``m``) by bisection on the Lagrange multiplier."""
    nnz_t = torch.as_tensor(nnz, dtype=torch.float64)
    cost_t = torch.as_tensor(cost, dtype=torch.float64)
    if float((cost_t * nnz_t).sum()) <= budget:
        return samples_for_multiplier(0.0, a, lead, cost, nnz)
    lo, hi = -250.0, 250.0  # log multiplier
    for _ in range(120):
        mid = 0.5 * (lo + hi)
        used = float((cost_t * samples_for_multiplier(math.exp(mid), a, lead, cost, nnz)).sum())
        lo, hi = (mid, hi) if used > budget else (lo, mid)
    return samples_for_multiplier(math.exp(hi), a, lead, cost, nnz)


# --------------------------------------------------------------------------------------------- sampling
def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Indices drawn with replacement from each row of ``probs`` (``(R, J)``) by inverting its CDF at
    ``uniforms`` (``(R, L)`` in [0, 1)); zero-probability entries are never drawn."""
    cdf = probs.cumsum(1)
    cdf = cdf / cdf[:, -1:].clamp(min=1e-300)
    return torch.searchsorted(cdf.contiguous(), uniforms.to(cdf.dtype).contiguous(), right=True).clamp(
        max=probs.shape[1] - 1)


def sample_counts(idx: torch.Tensor, m: torch.Tensor, width: int) -> torch.Tensor:
    """How often each entry was drawn among the first ``m[r]`` draws of row ``r``: ``(R, width)``."""
    use = (torch.arange(idx.shape[1]).unsqueeze(0) < m.unsqueeze(1)).to(torch.float64)
    return torch.zeros(idx.shape[0], width, dtype=torch.float64).scatter_add_(1, idx, use)


def reweight(counts: torch.Tensor, probs: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``count / (m p)`` where drawn, else 0: the factor that makes the sampled sum unbiased."""
    den = m.unsqueeze(1).to(torch.float64) * probs
    return torch.where(counts > 0, counts / den.clamp(min=1e-300), torch.zeros_like(counts))


# --------------------------------------------------------------------------------------------- SiPP
class _SiPPBase(WeightScorer):
    sensitivity_source = "computed"  # "cache" when the last call reused kept sensitivities
    defaults = dict(_DEFAULTS)
    option_help = _HELP

    def layer_sensitivities(self, model: nn.Module, ctx: PruneContext) -> dict[str, LayerSensitivity]:
        params = self.prunable_params(model, ctx)
        if not params:
            raise PruningError(f"method {self.name!r}: the model has no prunable conv / linear weight")
        paths = [_module_path(p) for p in params]
        return sensitivities(self, model, ctx, paths, weights=True, channels=False)

    def score(self, model: nn.Module, ctx: PruneContext) -> dict[str, torch.Tensor]:
        trackers = self.layer_sensitivities(model, ctx)
        return {f"{p}.weight": t.weight_scores() for p, t in trackers.items()}


@register_method("sipp", granularity="weight", needs_data=True, family="provable", paper=_PAPERS["sipp"],
                 description="SiPP: empirical sensitivity (max over S of the mean relative contribution); "
                             "global top-k.")
class SiPP(_SiPPBase):
    """Deterministic SiPP: keep the weights of largest sensitivity."""


@dataclass
class _Rows:
    """One layer's rows for the sampling program: its filters' positive, then negative, weights."""

    param: str
    weight: torch.Tensor  # (F, J) float64
    sens: torch.Tensor  # (2F, J): sensitivities of the row's side, 0 elsewhere
    probs: torch.Tensor  # (2F, J)
    a: torch.Tensor  # (2F,): alpha * S / 3
    nnz: torch.Tensor  # (2F,)
    lead: float  # 1 / F: the row's weight in the objective
    unit: float  # cost of one kept weight (1, or its multiply-adds)
    idx: torch.Tensor  # (2F, J): the row's draws, in order
    first: torch.Tensor  # (2F, J): the first draw of each entry (J: never)
    rank: torch.Tensor  # (2F, J): rank of each entry by sensitivity within its row
    top_sum: torch.Tensor  # (2F, J): sum of the k+1 largest sensitivities of the row
    draw_cap: float = 1.0  # at most draw_cap * nnz draws per row

    @staticmethod
    def build(param: str, w: torch.Tensor, s: torch.Tensor, alpha: float, unit: float,
              gen: torch.Generator, draw_cap: int = 1) -> _Rows:
        f = w.shape[0]
        w = w.detach().double().reshape(f, -1).cpu()
        s = s.double().reshape(f, -1).cpu()
        sens = torch.cat((s * (w > 0), s * (w < 0)))
        total = sens.sum(1)
        ok = total > 1e-12
        probs = torch.where(ok.unsqueeze(1), sens / total.clamp(min=1e-300).unsqueeze(1), torch.zeros_like(sens))
        j = sens.shape[1]
        idx = draw(probs, torch.rand((sens.shape[0], j * draw_cap), generator=gen, dtype=torch.float64))
        pos = torch.arange(idx.shape[1]).expand_as(idx).contiguous()
        first = torch.full_like(sens, idx.shape[1], dtype=torch.long).scatter_reduce_(1, idx, pos, "amin")
        order = torch.argsort(sens, dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(j).expand_as(order).contiguous())
        top_sum = sens.gather(1, order).cumsum(1)
        nnz = (probs > 0).sum(1).to(torch.float64)
        a = torch.where(ok, alpha * total / C_CONSTANT, torch.zeros_like(total))
        return _Rows(param, w, sens, probs, a, nnz, 1.0 / f, unit, idx, first, rank, top_sum, float(draw_cap))

    def integer_samples(self, m: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.ceil(m - 1e-9).clamp(min=0), self.nnz * self.draw_cap)

    def use_rand(self, m: torch.Tensor, hybrid: bool) -> torch.Tensor:
        if not hybrid:
            return torch.ones_like(m, dtype=torch.bool)
        k = (m.long().clamp(min=1) - 1).clamp(max=self.top_sum.shape[1] - 1)
        left = self.top_sum[:, -1] - torch.where(m > 0, self.top_sum.gather(1, k.unsqueeze(1)).squeeze(1), 0.0)
        return C_CONSTANT * left > error_rand(self.a, m)

    def kept(self, m: torch.Tensor, hybrid: bool) -> float:
        rand = self.use_rand(m, hybrid)
        n_rand = (self.first < m.unsqueeze(1)).sum(1).to(torch.float64)
        return float(torch.where(rand, n_rand, torch.minimum(m, self.nnz)).sum())

    def factors(self, m: torch.Tensor, hybrid: bool) -> torch.Tensor:
        """``(F, J)`` factor of each weight: 0 dropped, 1 kept as is, ``count / (m p)`` sampled."""
        rand = self.use_rand(m, hybrid).unsqueeze(1)
        sampled = reweight(sample_counts(self.idx, m, self.probs.shape[1]), self.probs, m)
        top = (self.rank < m.unsqueeze(1)).to(torch.float64)
        fac = torch.where(rand, sampled, top)
        f = self.weight.shape[0]
        return fac[:f] + fac[f:]


def _fit_multiplier(rows: list[_Rows], target: float, hybrid: bool) -> tuple[float, list[torch.Tensor]]:
    """The Lagrange multiplier whose (integer) allocation keeps the cost closest to ``target``."""
    a = torch.cat([r.a for r in rows])
    lead = torch.cat([torch.full_like(r.a, r.lead) for r in rows])
    cost = torch.cat([torch.full_like(r.a, r.unit) for r in rows])
    nnz = torch.cat([r.nnz * r.draw_cap for r in rows])
    sizes = [len(r.a) for r in rows]

    def evaluate(log_lam: float) -> tuple[float, list[torch.Tensor]]:
        m = samples_for_multiplier(math.exp(log_lam), a, lead, cost, nnz)
        ms = [r.integer_samples(x) for r, x in zip(rows, m.split(sizes))]
        return sum(r.unit * r.kept(x, hybrid) for r, x in zip(rows, ms)), ms

    lo, hi = -250.0, 250.0
    best: tuple[float, float, list[torch.Tensor]] | None = None

    def consider(x: float) -> float:
        nonlocal best
        c, ms = evaluate(x)
        if best is None or abs(c - target) < abs(best[1] - target):
            best = (x, c, ms)
        return c

    for _ in range(70):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if consider(mid) > target else (lo, mid)
    if hybrid:  # rows switching between the variants make the kept size non-monotone: scan around too
        for x in torch.linspace(lo - 8.0, lo + 8.0, 161).tolist():
            consider(x)
    assert best is not None
    return math.exp(best[0]), best[2]


def _top_up(rows: list[_Rows], facs: list[torch.Tensor], target: float, scores: dict[str, torch.Tensor]
            ) -> list[torch.Tensor]:
    """Weights of zero sensitivity are never drawn; when the draws keep less than the budget, keep the
    best unsampled weights (by sensitivity, then magnitude) as they are until it is used."""
    deficit = target - sum(r.unit * float((f > 0).sum()) for r, f in zip(rows, facs))
    if deficit <= 0.5 * min(r.unit for r in rows):
        return facs
    keys, owner, units = [], [], []
    for i, (r, f) in enumerate(zip(rows, facs)):
        free = (f == 0).flatten()
        mag = r.weight.abs().flatten()
        key = scores[r.param].double().cpu().flatten() * (1 + float(mag.max()) + 1) + mag
        keys.append(key.masked_fill(~free, -math.inf))
        owner.append(torch.full_like(mag, i, dtype=torch.long))
        units.append(torch.full_like(mag, r.unit))
    key, own, unit = torch.cat(keys), torch.cat(owner), torch.cat(units)
    order = torch.argsort(key, descending=True, stable=True)
    order = order[torch.isfinite(key[order])]
    take = int(torch.searchsorted(unit[order].cumsum(0), torch.tensor([deficit], dtype=torch.float64)))
    facs = [f.clone() for f in facs]
    offsets = [0] + torch.tensor([f.numel() for f in facs]).cumsum(0).tolist()
    for pos in order[:take + 1].tolist():
        i = int(own[pos])
        facs[i].view(-1)[pos - offsets[i]] = 1.0
    return facs


class _SiPPSampled(_SiPPBase):
    defaults = {**_DEFAULTS, "seed": 0, "draw_cap": 4}
    option_types = {"draw_cap": OptionType("int", low=1)}
    hybrid = False

    def plan(self, model: nn.Module, ctx: PruneContext) -> Plan:
        from prunekit.surgery.allocate import _weight_uses, allocate_weights

        trackers = self.layer_sensitivities(model, ctx)
        params = self.prunable_params(model, ctx)
        scores = {f"{p}.weight": t.weight_scores() for p, t in trackers.items()}
        # the budget: what the deterministic allocation keeps, in the target's units (params or FLOPs)
        masks = allocate_weights(model, ctx, {k: v.detach().float().cpu() for k, v in scores.items()})
        units = _weight_uses(model, ctx, list(scores)) if ctx.target.kind == "flops" else dict.fromkeys(scores, 1.0)
        gen = torch.Generator().manual_seed(int(self.seed))
        rows = [_Rows.build(k, params[k], scores[k], layer_alpha(trackers[_module_path(k)], self.delta),
                            float(units[k]), gen, self.draw_cap) for k in scores]
        if ctx.target.kind == "ratio" or ctx.budget.scope == "layerwise":
            fits = [_fit_multiplier([r], r.unit * float(masks[r.param].sum()), self.hybrid) for r in rows]
            ms = [f[1][0] for f in fits]
            lam: Any = [f[0] for f in fits]
        else:
            target = sum(r.unit * float(masks[r.param].sum()) for r in rows)
            lam, ms = _fit_multiplier(rows, target, self.hybrid)
        out = Plan(method=self.name, meta={"multiplier": lam, "sensitivities": self.sensitivity_source,
                                           "samples": {r.param: int(m.sum()) for r, m in zip(rows, ms)}})
        facs = [r.factors(m, self.hybrid) for r, m in zip(rows, ms)]
        if ctx.target.kind == "ratio" or ctx.budget.scope == "layerwise":
            facs = [_top_up([r], [f], r.unit * float(masks[r.param].sum()), scores)[0] for r, f in zip(rows, facs)]
        else:
            facs = _top_up(rows, facs, target, scores)
        for r, fac in zip(rows, facs):
            w = params[r.param]
            out.masks[r.param] = (fac > 0).reshape(w.shape).cpu()
            out.weights[r.param] = (r.weight * fac).reshape(w.shape).to(w.dtype).cpu()
        return out


@register_method("sipp_rand", granularity="weight", needs_data=True, family="provable", paper=_PAPERS["sipp"],
                 description="SiPP randomised: per-filter importance sampling of weights, sample sizes from the "
                             "convex program (Lagrangian bisection), kept weights reweighted.")
class SiPPRand(_SiPPSampled):
    """Randomised SiPP: sample weights in proportion to sensitivity and reweight them."""


@register_method("sipp_hybrid", granularity="weight", needs_data=True, family="provable",
                 paper=_PAPERS["sipp"],
                 description="SiPP hybrid: per filter the deterministic or the sampled variant, whichever "
                             "bound is smaller.")
class SiPPHybrid(_SiPPSampled):
    """Hybrid SiPP: per row, the deterministic top-m or the random sample of m."""

    hybrid = True


# --------------------------------------------------------------------------------------------- PFP
def group_sensitivities(model: nn.Module, ctx: PruneContext, method: Method) -> dict[str, tuple[torch.Tensor,
                                                                                                  float]]:
    """Per prunable group: ``(s, alpha)``, ``s_c`` the largest input-channel sensitivity of channel ``c`` over
    the group's consumer layers, ``alpha`` the largest of their bound constants."""
    reads: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for g in ctx.groups():
        for mb in g.members:
            if mb.role == "consumer" and mb.dim == 1 and mb.tensor.endswith(".weight"):
                reads.setdefault(g.key, []).append((_module_path(mb.tensor), mb.index))
    paths = sorted({p for v in reads.values() for p, _ in v})
    if not paths:
        raise PruningError(f"method {method.name!r}: no prunable channel group has a consumer layer to measure")
    trackers = sensitivities(method, model, ctx, paths, weights=False, channels=True)
    out = {}
    for key, items in reads.items():
        s = torch.stack([trackers[p].channel_scores().double().cpu()[idx].amax(1) for p, idx in items]).amax(0)
        out[key] = (s, max(layer_alpha(trackers[p], method.delta) for p, _ in items))
    return out


@dataclass
class _Group:
    key: str
    scores: torch.Tensor  # (size,) float64, 0 for removed channels
    coeff: float  # alpha * S
    lo: int
    hi: int
    mult: int
    uniforms: torch.Tensor  # (L,): the group's stream of uniform numbers
    alive: torch.Tensor  # (size,) bool: not removed by an earlier round

    @property
    def probs(self) -> torch.Tensor:
        total = float(self.scores.sum())
        return self.scores / total if total > 0 else torch.zeros_like(self.scores)

    def samples(self, eps: float) -> int:
        """``m(eps) = ceil(3 (6 + 2 eps) alpha S / eps^2)``, at least 1."""
        m = 3.0 * (6.0 + 2.0 * eps) * self.coeff / (eps * eps)
        return int(max(1.0, min(1e15, math.ceil(m))))

    def width(self, k: int) -> int:
        k = max(k, self.lo)
        return self.hi if k >= self.hi else min(self.hi, -(-k // self.mult) * self.mult)

    def choose(self, eps: float, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept channels (sorted) and the scale of every channel (1 unless sampled)."""
        p, m = self.probs, self.samples(eps)
        scale = torch.ones_like(p)
        chosen = torch.zeros(len(p), dtype=torch.bool)
        if variant == "pfp":
            k = int(math.ceil(float((1 - (1 - p) ** m).sum()) - 1e-9))
        else:
            top = p >= 1.0 / m if variant == "pfp_top" else torch.zeros_like(chosen)
            rest = torch.where(top, torch.zeros_like(p), p)
            draws = min(m - int(top.sum()), len(self.uniforms))
            chosen |= top
            if draws > 0 and float(rest.sum()) > 0:
                q = rest / rest.sum()
                idx = draw(q.unsqueeze(0), self.uniforms[:draws].unsqueeze(0))
                counts = sample_counts(idx, torch.tensor([draws]), len(p))[0]
                drawn = counts > 0
                scale = torch.where(drawn, counts / (draws * q).clamp(min=1e-300), scale)
                chosen |= drawn
            k = int(chosen.sum())
        k = self.width(k)
        rank = self.scores + 2.0 * chosen.double() * (1 + float(self.scores.max()))
        order = torch.argsort(rank.masked_fill(~self.alive, -math.inf), descending=True, stable=True)
        keep = order[:k].sort().values
        return keep, scale

    def grown(self, keep: torch.Tensor, scale: torch.Tensor) -> Any:
        """``mult`` more channels: the best-scored ones not kept, unscaled (None: none left)."""
        k = self.width(len(keep) + self.mult) if len(keep) + self.mult <= self.hi else self.hi
        if k <= len(keep):
            return None
        free = torch.ones(len(self.scores), dtype=torch.bool)
        free[keep] = False
        free &= self.alive
        add = torch.argsort(self.scores.masked_fill(~free, -math.inf), descending=True, stable=True)[:k - len(keep)]
        return torch.cat((keep, add)).sort().values, scale

    def shrunk(self, keep: torch.Tensor, scale: torch.Tensor) -> Any:
        """``mult`` fewer channels: the worst-scored kept ones go (None: at the floor)."""
        k = len(keep) - self.mult
        if k < self.lo or k < 1:
            return None
        order = torch.argsort(self.scores[keep], descending=True, stable=True)
        return keep[order[:k]].sort().values, scale


def _fit_eps(groups: list[_Group], variant: str, cost: Any, budget: float) -> tuple[float, list[Any]]:
    """The eps (one for all ``groups``) whose choice costs closest to ``budget`` (bisection on log eps)."""
    def evaluate(log_eps: float) -> tuple[float, list[Any]]:
        picks = [g.choose(math.exp(log_eps), variant) for g in groups]
        return cost({g.key: len(k) for g, (k, _) in zip(groups, picks)}), picks

    lo, hi = -30.0, 60.0
    best: tuple[float, float, list[Any]] | None = None
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        c, picks = evaluate(mid)
        if best is None or abs(math.log(max(c, 1e-12) / budget)) < abs(math.log(max(best[1], 1e-12) / budget)):
            best = (mid, c, picks)
        lo, hi = (mid, hi) if c > budget else (lo, mid)
    assert best is not None
    return math.exp(best[0]), best[2]


def _refine(groups: list[_Group], picks: list[Any], cost: Any, budget: float, tol: float) -> list[Any]:
    """One eps moves every group at once, so on small models the cost jumps past the budget: then add
    (best-scored, unscaled) or drop (worst-scored) ``mult`` channels of single groups, greedily, while that
    brings the cost closer to the budget."""
    picks = list(picks)

    def err(ps: list[Any]) -> float:
        return abs(math.log(max(cost({g.key: len(k) for g, (k, _) in zip(groups, ps)}), 1e-12) / budget))

    cur = err(picks)
    for _ in range(4 * len(groups)):
        if cur <= math.log1p(tol / 4):
            break
        best: tuple[float, int, Any] | None = None
        for i, (g, (keep, scale)) in enumerate(zip(groups, picks)):
            for move in (g.grown(keep, scale), g.shrunk(keep, scale)):
                if move is not None:
                    e = err(picks[:i] + [move] + picks[i + 1:])
                    if e < cur - 1e-12 and (best is None or e < best[0]):
                        best = (e, i, move)
        if best is None:
            break
        cur, picks[best[1]] = best[0], best[2]
    return picks


def _fold_scales(model: nn.Module, ctx: PruneContext, picks: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 channels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Consumer weights with the sampled channels' input columns scaled, in the post-removal shape."""
    graph = ctx.graph
    scales: dict[str, torch.Tensor] = {}
    for key, (keep, scale) in picks.items():
        if bool((scale[keep] == 1).all()):
            continue
        for mb in graph.groups[key].members:
            if mb.role != "consumer" or mb.dim != 1 or not mb.tensor.endswith(".weight"):
                continue
            w = model.get_submodule(_module_path(mb.tensor)).weight
            vec = scales.setdefault(mb.tensor, torch.ones(w.shape[1], dtype=torch.float64))
            vec[mb.index.reshape(-1)] *= scale.repeat_interleave(mb.index.shape[1])
    kept = graph.kept_dims(channels) if channels else {}
    out = {}
    for tensor, vec in scales.items():
        w = model.get_submodule(_module_path(tensor)).weight.detach()
        view = [1] * w.dim()
        view[1] = -1
        new = (w.double() * vec.to(w.device).view(view)).to(w.dtype)
        for d, idx in kept.get(tensor, {}).items():
            new = new.index_select(d, idx.to(new.device))
        out[tensor] = new.cpu()
    return out


class _PFPBase(Method):
    sensitivity_source = "computed"  # "cache" when the last call reused kept sensitivities
    defaults = {**_DEFAULTS, "seed": 0, "align": False}
    option_help = _HELP
    variant = "pfp"

    def problem(self, model: nn.Module, ctx: PruneContext) -> tuple[list[_Group], Any, dict[str, Any]]:
        from prunekit.surgery.allocate import _ChannelProblem, masked_channels

        graph = ctx.graph
        sens = group_sensitivities(model, ctx, self)
        removed = dict(ctx.removed_channels or masked_channels(model, graph))
        prob = _ChannelProblem(graph, ctx, {k: s for k, (s, _) in sens.items()}, removed)
        gen = torch.Generator().manual_seed(int(self.seed))
        groups = []
        for key, alive, lo, hi, mult in zip(prob.keys, prob.alive, prob.lo, prob.hi, prob.mult):
            s = torch.where(alive, sens[key][0], torch.zeros_like(sens[key][0]))
            if not self.align:
                mult = max(1, graph.groups[key].multiple_of)
            u = torch.rand(32 * len(s) + 64, generator=gen, dtype=torch.float64)
            groups.append(_Group(key, s, sens[key][1] * float(s.sum()), lo, hi, mult, u, alive))
        return groups, prob, removed

    def plan(self, model: nn.Module, ctx: PruneContext) -> Plan:
        from prunekit.surgery.allocate import _measure

        graph = ctx.graph
        if graph is None:
            raise PruningError(f"method {self.name!r} needs the channel graph (run it through prunekit.prune)")
        groups, prob, removed = self.problem(model, ctx)
        t = ctx.target
        current = {k: g.size for k, g in graph.groups.items()}
        for k, r in removed.items():
            current[k] = graph.groups[k].size - len(r)
        if t.kind == "ratio":
            fits = []
            for g in groups:
                f = t.per_layer.get(g.key, t.value)
                fits.append(_fit_eps([g], self.variant, lambda w, k=g.key: float(w[k]), g.hi - round(f * g.hi)))
            eps: Any = [e for e, _ in fits]
            picks = [p[0] for _, p in fits]
            info: dict[str, Any] = {}
        else:
            cost_fn = graph.cost.flops if t.kind == "flops" else graph.cost.params
            base = cost_fn(current)
            cost = lambda w: cost_fn({**current, **w})  # noqa: E731
            floor = cost({g.key: g.width(g.lo) for g in groups})
            if floor > base / t.value * (1 + ctx.budget.tolerance):
                raise PruningError(f"target {t} cannot be reached: the largest reachable reduction is "
                                   f"{base / floor:.3g}x with floor={ctx.budget.floor}; lower the target or the floor")
            eps, picks = _fit_eps(groups, self.variant, cost, base / t.value)
            picks = _refine(groups, picks, cost, base / t.value, ctx.budget.tolerance)
            predicted = cost({g.key: len(k) for g, (k, _) in zip(groups, picks)})
            info = {"epsilon": eps, "target": t.value, "predicted": base / predicted}
        chosen = {g.key: pk for g, pk in zip(groups, picks)}
        channels = {k: keep for k, (keep, _) in chosen.items() if len(keep) < graph.groups[k].size}
        if t.kind != "ratio" and ctx.verify and not removed and channels:
            measured = _measure(model, graph, channels, t.kind)
            if measured is not None:
                info["measured"] = base / measured
                if abs(info["measured"] / t.value - 1) > ctx.budget.tolerance:
                    warnings.warn(f"prunekit: {self.name} reached {t} as {info['measured']:.3g}x", stacklevel=2)
        info["widths"] = {k: len(keep) for k, (keep, _) in chosen.items()}
        ctx.allocation = info
        weights = _fold_scales(model, ctx, chosen, channels)
        return Plan(method=self.name, channels=channels, weights=weights,
                    meta={"epsilon": eps, "sensitivities": self.sensitivity_source})


_PFP_KW: dict[str, Any] = {"granularity": "channel", "needs_data": True, "family": "provable",
                           "paper": _PAPERS["pfp"]}


@register_method("pfp", description="PFP: input-channel sensitivity over the consumers; top-m channels per "
                                    "group, one epsilon for all layers.", **_PFP_KW)
class PFP(_PFPBase):
    """Deterministic PFP: keep each group's most sensitive channels."""


@register_method("pfp_rand", description="PFP randomised: channels sampled in proportion to sensitivity, "
                                         "consumers reweighted.", **_PFP_KW)
class PFPRand(_PFPBase):
    """Randomised PFP: sample channels and reweight the consumers' input columns."""

    variant = "pfp_rand"


@register_method("pfp_top", description="PFP top: channels with p >= 1/m kept, the rest sampled and "
                                        "reweighted.", **_PFP_KW)
class PFPTop(_PFPBase):
    """PFP with the certain channels kept deterministically and the rest sampled."""

    variant = "pfp_top"
