"""EigenDamage and Improved EigenDamage: structured low-rank pruning in the K-FAC eigenbasis (METHODS.md §3).

**eigendamage** (Wang et al., "EigenDamage: Structured Pruning in the Kronecker-Factored
Eigenbasis", ICML 2019). For every conv (groups = 1) / linear layer, with the channel-mode K-FAC
factors of :mod:`prunekit.curvature` (true Fisher by default):

1. ``A = Q_A diag(lambda_A) Q_A^T`` and ``G = Q_G diag(lambda_G) Q_G^T`` (eigenvalues < 1e-10 -> 0);
2. per kernel tap ``t``, ``W*_t = Q_G^T [W_t, b] Q_A``; in this basis the Fisher is about diagonal,
   ``S_ij = lambda_G_i lambda_A_j``, and the saliency of entry ``(i, j)`` is ``sum_t W*_ijt^2 S_ij``;
3. the score of output direction ``i`` is its row sum, of input direction ``j`` its column sum. All
   in- and out-direction scores of all layers form one ascending ranking (ties, e.g. zeros, broken
   by order); the fewest lowest-ranked directions whose removal meets the ``params`` / ``flops``
   target are removed (a bisection: the global threshold). At most ``ratio_limit`` (the seed's
   ``prune_ratio_limit``; 0.95 one-shot, 0.5 per iterative round) of either side of a layer is
   removed, at least one direction is always kept; the classifier is excluded;
4. the layer becomes the chain ``1x1 (Q_A[:, kept]^T) -> kxk (W*[kept_out, kept_in]) -> 1x1
   (Q_G[:, kept_out])`` (three linears for a Linear), a
   :class:`~prunekit.surgery.plan.LowRankFactors`, only where the chain is smaller than the layer
   (in parameters, and in FLOPs for a FLOPs target). The layer's widths do not change. The
   original bias stays on the last layer of the chain (the chain's 1x1 input projection has no
   bias, so the bias row of ``Q_A`` is dropped: with nothing pruned the chain is exactly ``W``).

With ``iterative = R > 1``, round ``k`` meets ``base * (goal / base)^(k / R)``; the
curvature of every replaced layer is recomputed on its middle layer (the reduced space) and the
rotations are composed: ``pre <- Q_A'^T pre``, ``post <- post Q_G'``.

**eigendamage_improved** (M. Hariat's "Improved EigenDamage", mhariat/DeepPruning): pi-corrected
damping ``lambda = 1e-3``, factors an EMA (0.9) over batches, EKFAC eigenvalues ``S_ijt = mean_n
(Q_G^T grad_W_t l_n Q_A)_ij^2`` from per-example gradients (``ekfac_batches`` batches), a Tucker
re-projection of ``W*`` at the chosen ranks by a deterministic 2-mode HOOI (:func:`hooi`), steps
removing ``step_ratio`` = 0.2 of the remaining cost each (per-layer cap 0.5 per step), and
"bring-back" regrowth: after every step but the last, ``back_ratio`` = 0.25 of the directions
that step removed are given back, one at a time to a layer side drawn (seeded) with probability
proportional to an EMA (``pool_momentum`` 0.5) of the share of saliency that side lost; it
gets back its best removed direction. ``finetune_batches`` SGD minibatches on the prune set (BN
frozen) run between steps (default 0: no fine-tuning; the seed trained for 200 epochs per step);
their weight changes go into :attr:`Plan.weights` / the factors.

**Latency-aware ranks** (option ``aligned_ranks``, both methods, off by default): each side's kept count is
rounded up to the runtime's rank multiple (:func:`~prunekit.surgery.cost.rank_multiple`), the chain variant
(with / without its 1x1 sides) is the one the shared latency model says is fastest, and a layer is replaced
only where that chain is also faster than the layer (:func:`~prunekit.surgery.cost.dense_latency`); when the
target needs more, the ranks are chosen without the latency model, with a warning.

Costs are counted as :func:`prunekit.prune` measures them (non-zero weights, multiply-adds). The
method never edits the model: rounds work on copies built with
:func:`prunekit.surgery.apply_plan`.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from prunekit import curvature
from prunekit.errors import PruningError
from prunekit.methods.base import Method, PruneContext
from prunekit.methods.lowrank import _eligible, _goal, _Layer
from prunekit.methods.options import OptionType
from prunekit.methods.registry import register_method
from prunekit.surgery.cost import chain_latency, dense_latency, two_sided_chain_latency
from prunekit.surgery.graph import PruningWarning
from prunekit.surgery.plan import LowRankFactors, Plan

_PAPER = "Wang, Grosse, Fidler & Zhang, EigenDamage: Structured Pruning in the Kronecker-Factored Eigenbasis, ICML 2019"


# --------------------------------------------------------------------------------------------- HOOI
def _top_left(m: torch.Tensor, r: int) -> torch.Tensor:
    """The ``r`` leading left singular vectors of ``m``, each signed so its largest entry is positive."""
    u, _, _ = torch.linalg.svd(m, full_matrices=r > min(m.shape))
    u = u[:, :r]
    sign = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))
    return u * torch.where(sign == 0, torch.ones_like(sign), sign)


def hooi(w: torch.Tensor, r_out: int, r_in: int, iters: int = 20,
         tol: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partial Tucker decomposition of ``w`` (``(out, in, taps)``) on its first two modes.

    Higher-order orthogonal iteration initialised by the truncated SVDs of the two unfoldings
    (HOSVD; no random start, so the result is deterministic), then alternating: ``U_out`` = leading
    left singular vectors of ``w x_in U_in`` unfolded along ``out``, and vice versa. Returns
    ``(U_out (out, r_out), U_in (in, r_in), core (r_out, r_in, taps))`` with ``w ~ core x U_out x U_in``;
    the error ``||w||^2 - ||core||^2`` never exceeds that of the initialisation.
    """
    o, i, _ = w.shape
    u_out = _top_left(w.reshape(o, -1), r_out)
    u_in = _top_left(w.transpose(0, 1).reshape(i, -1), r_in)
    core = torch.einsum("oit,ok,ij->kjt", w, u_out, u_in)
    last = float(core.norm())
    for _ in range(iters):
        u_out = _top_left(torch.einsum("oit,ij->ojt", w, u_in).reshape(o, -1), r_out)
        u_in = _top_left(torch.einsum("oit,ok->ikt", w, u_out).reshape(i, -1), r_in)
        core = torch.einsum("oit,ok,ij->kjt", w, u_out, u_in)
        now = float(core.norm())
        if now - last <= tol * max(now, 1e-300):
            break
        last = now
    return u_out, u_in, core


# --------------------------------------------------------------------------------------------- state
@dataclass
class _Directions:
    """One layer in one step: its current chain and its rotated weight and direction scores."""

    layer: _Layer
    c_in: int
    out: int
    kernel: tuple[int, ...]  # (kh, kw) for conv, () for linear
    in_pos: int = 1
    out_pos: int = 1
    fold: bool = True
    pre: torch.Tensor | None = None  # (r_in0, c_in): composed input projection so far
    post: torch.Tensor | None = None  # (out, r_out0)
    bias: torch.Tensor | None = None
    dtype: torch.dtype = torch.float32
    q_a: torch.Tensor | None = None  # (rows of the core's input without the bias row, d_A)
    q_g: torch.Tensor | None = None
    w_star: torch.Tensor | None = None  # (out', d_A, taps)
    out_scores: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    in_scores: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    out_rank: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # global positions
    in_rank: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    @property
    def taps(self) -> int:
        return math.prod(self.kernel) if self.kernel else 1

    @property
    def full(self) -> int:
        return self.out * self.c_in * self.taps

    def variants(self, r_out: int, r_in: int, kind: str) -> dict[tuple[bool, bool], float]:
        """Cost of the chain with / without its input and output 1x1 layers (a side left out is
        multiplied into the middle layer: the same function)."""
        t, c, o = self.taps, self.c_in, self.out
        pin, pout = (self.in_pos, self.out_pos) if kind == "flops" else (1, 1)
        out: dict[tuple[bool, bool], float] = {
            (True, True): float(r_in * c * pin + (r_out * r_in * t + o * r_out) * pout)}
        if self.fold:
            out[(True, False)] = float(r_in * c * pin + o * r_in * t * pout)
            out[(False, True)] = float((r_out * c * t + o * r_out) * pout)
        return out

    @property
    def timed(self) -> bool:
        """Whether the shared latency model chooses this layer's ranks and chain (option ``aligned_ranks``)."""
        return self.layer.latency is not None and self.layer.shape is not None

    def latency(self, variant: tuple[bool, bool], r_out: int, r_in: int) -> float:
        """The latency model's time of the chain ``variant`` (``(pre?, post?)``) at these ranks."""
        lat, s = self.layer.latency, self.layer.shape
        assert lat is not None and s is not None
        if variant == (True, True):
            return two_sided_chain_latency(s, r_in, r_out, lat)
        return chain_latency(s, r_in, lat, pre=True) if variant[0] else chain_latency(s, r_out, lat)

    def faster(self, variant: tuple[bool, bool], r_out: int, r_in: int) -> bool:
        """Whether the latency model says the chain is faster than the layer it replaces."""
        assert self.layer.shape is not None and self.layer.latency is not None
        return self.latency(variant, r_out, r_in) < dense_latency(self.layer.shape, self.layer.latency)

    def aligned(self, r_out: int, r_in: int) -> tuple[int, int]:
        """Kept counts rounded up to the runtime's rank multiple (at most every direction of the side)."""
        if not self.timed:
            return r_out, r_in
        m = max(1, int(self.layer.multiple))
        return (min(len(self.out_rank), -(-r_out // m) * m), min(len(self.in_rank), -(-r_in // m) * m))

    def best(self, r_out: int, r_in: int, kind: str) -> tuple[tuple[bool, bool], float, float]:
        """``((pre?, post?), cost in kind, params)`` of the cheapest chain at these ranks (with a latency model:
        the fastest)."""
        costs = self.variants(r_out, r_in, kind)
        params = self.variants(r_out, r_in, "params")
        if self.timed:
            key = min(costs, key=lambda k: (self.latency(k, r_out, r_in), costs[k], params[k]))
        else:
            key = min(costs, key=lambda k: (costs[k], params[k]))
        return key, costs[key], params[key]

    def cost(self, r_out: int, r_in: int, kind: str) -> tuple[float, bool]:
        """``(cost, factored)`` at ranks ``(r_out, r_in)``: the chain where it is smaller (and, with a latency
        model, faster), else the layer."""
        dense = self.layer.cost(None, kind)
        variant, chain, params = self.best(r_out, r_in, kind)
        if params < self.full and chain < dense and (not self.timed or self.faster(variant, r_out, r_in)):
            return chain, True
        return dense, False


def _kept(order: torch.Tensor, k: int, cap: float) -> int:
    """Directions of one side kept when the ``k`` lowest-scoring directions of the network go:
    those ranked ``>= k``, at most ``cap`` of the side removed, at least one kept."""
    n = len(order)
    lo = max(1, n - math.floor(cap * n))
    return min(n, max(lo, int((order >= k).sum())))


def _total(dirs: list[_Directions], ranks: dict[str, tuple[int, int]], kind: str, base: float) -> float:
    return base - sum(d.layer.cost(None, kind) - d.cost(*ranks[d.layer.path], kind)[0] for d in dirs)


def _ranks_at(dirs: list[_Directions], k: int, cap: float) -> dict[str, tuple[int, int]]:
    return {d.layer.path: d.aligned(_kept(d.out_rank, k, cap), _kept(d.in_rank, k, cap)) for d in dirs}


def _rank_globally(dirs: list[_Directions]) -> int:
    """Position of every direction in one ascending ranking of all scores (ties broken by order of
    appearance, so that equal scores, e.g. zeros, go one at a time); returns the count."""
    scores = torch.cat([torch.cat([d.out_scores, d.in_scores]) for d in dirs]).double()
    pos = torch.empty(len(scores), dtype=torch.long)
    pos[torch.sort(scores, stable=True).indices] = torch.arange(len(scores))
    start = 0
    for d in dirs:
        no, ni = len(d.out_scores), len(d.in_scores)
        d.out_rank, d.in_rank = pos[start:start + no], pos[start + no:start + no + ni]
        start += no + ni
    return len(scores)


def _threshold(dirs: list[_Directions], kind: str, base: float, goal: float,
               cap: float) -> tuple[int, dict[str, tuple[int, int]], bool]:
    """The fewest lowest-ranked directions to remove so that the ranks meet ``goal``: ``(k, ranks, reached)``.

    The cost falls monotonically with ``k``, so a bisection finds it; when even removing every
    direction (every layer at its cap) misses the goal, that is returned with ``reached=False``.
    """
    total = _rank_globally(dirs)
    if _total(dirs, _ranks_at(dirs, total, cap), kind, base) > goal:
        if any(d.timed for d in dirs):
            warnings.warn("eigendamage: the target needs chains the latency model says are not faster than the "
                          "layers they replace (aligned_ranks); ranks are chosen without it", PruningWarning,
                          stacklevel=3)
            for d in dirs:
                d.layer.latency = None
            return _threshold(dirs, kind, base, goal, cap)
        return total, _ranks_at(dirs, total, cap), False
    if _total(dirs, _ranks_at(dirs, 0, cap), kind, base) <= goal:
        return 0, _ranks_at(dirs, 0, cap), True
    lo, hi = 0, total  # invariant: hi meets the goal, lo does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _total(dirs, _ranks_at(dirs, mid, cap), kind, base) <= goal:
            hi = mid
        else:
            lo = mid
    return hi, _ranks_at(dirs, hi, cap), True


# --------------------------------------------------------------------------------------------- method
class _EigenBase(Method):
    """Shared machinery of eigendamage and eigendamage_improved (see the module docstring)."""

    defaults: dict[str, Any] = {"samples": 1024, "fisher": "true", "seed": 0, "target_kind": None,
                                "ratio_limit": None, "damping": 0.0, "average": "sum", "decay": 0.9, "ekfac": False,
                                "ekfac_batches": 1, "tucker": False, "back_ratio": 0.0, "pool_momentum": 0.5,
                                "finetune_batches": 0, "finetune_lr": 1e-3, "fold": True, "aligned_ranks": False}
    option_types = {
        "target_kind": OptionType("str", choices=("params", "flops"), optional=True,
                                  help="cost a ratio= target is measured in (default params)"),
        "ratio_limit": OptionType("float", optional=True, low=0, high=0.99,
                          help="most of either side of a layer removed per round (None: 0.95 one-shot, 0.5 "
                               "iterative)"),
        "average": OptionType("str", choices=("sum", "ema"), help="K-FAC factors: sum over batches or EMA"),
        "decay": OptionType("float", low=0, high=0.999, help="EMA weight of the past (average='ema')"),
    }
    option_help = {
        "samples": "prune-set examples of each K-FAC pass",
        "damping": "pi-corrected damping lambda added to the factors (0: none)",
        "ekfac": "EKFAC: eigenvalues re-estimated from per-example gradients",
        "ekfac_batches": "batches of per-example gradients for the EKFAC eigenvalues",
        "tucker": "re-project the rotated weight by a 2-mode Tucker (HOOI) at the chosen ranks",
        "back_ratio": "fraction of each step's removed directions brought back (not after the last step)",
        "pool_momentum": "EMA weight of the past in each layer side's removed-saliency pool",
        "finetune_batches": "SGD minibatches on the prune set between rounds (BN frozen; 0: none)",
        "finetune_lr": "learning rate of the fine-tuning between rounds (momentum 0.9)",
        "fold": "multiply a 1x1 side of the chain into the middle layer where that is cheaper (same function)",
        "aligned_ranks": "ranks in multiples of the runtime's channel block, the fastest chain variant, and a layer "
                         "replaced only where the latency model says that chain is faster (deployed speed)",
    }

    # -- schedule (overridden) -----------------------------------------------------------------
    def step_goal(self, step: int, now: float, goal: float, base: float) -> float:
        raise NotImplementedError

    def default_cap(self) -> float:
        raise NotImplementedError

    max_steps = 1

    # -- plan ---------------------------------------------------------------------------------------
    def plan(self, model: nn.Module, ctx: PruneContext) -> Plan:
        t0 = time.perf_counter()
        self.check(ctx)
        layers, graph = _eligible(model, ctx, self.name, aligned=bool(self.aligned_ranks))
        kind, goal, base = _goal(model, ctx, graph, None, self.target_kind, self.name)
        cap = float(self.ratio_limit) if self.ratio_limit is not None else self.default_cap()
        dirs = [_new_directions(model, layer, bool(self.fold)) for layer in layers]
        factors: dict[str, LowRankFactors] = {}
        pool: dict[tuple[str, str], float] = {}
        gen = torch.Generator().manual_seed(int(self.seed))
        history, weights, now, pruned = [], {}, base, base
        for step in range(self.max_steps):
            target = self.step_goal(step, pruned, goal, base)  # the schedule ignores what was brought back
            last = target <= goal * (1 + 1e-12)
            tune = step > 0 and int(self.finetune_batches) > 0
            work = _working_copy(model, factors, copy=tune)
            if tune:
                weights = _finetune(work, ctx, int(self.finetune_batches), float(self.finetune_lr))
            self._measure(work, ctx, dirs, factors, step)
            tau, ranks, reached = _threshold(dirs, kind, base, target, cap)
            keep = {d.layer.path: _top_sets(d, *ranks[d.layer.path]) for d in dirs}
            pruned = _total(dirs, ranks, kind, base)
            brought = 0 if last else self._bring_back(dirs, keep, pool, gen, kind)
            factors = {}
            for d in dirs:
                f = self._factors(d, *keep[d.layer.path], kind)
                if f is not None:
                    factors[d.layer.path] = f
            now = _total(dirs, {d.layer.path: (len(keep[d.layer.path][0]), len(keep[d.layer.path][1]))
                                for d in dirs}, kind, base)
            history.append({"step": step, "goal": target, "removed_lowest": tau, kind: now, "brought_back": brought})
            if now <= goal * (1 + 1e-9):
                break
        if now > goal * (1 + 1e-9):
            raise PruningError(f"method {self.name!r} cannot reach the target: with every layer at its cap "
                               f"({cap:g} of either side removed) the model still has {now:.4g} {kind} (goal "
                               f"{goal:.4g}; steps: {[round(h[kind]) for h in history]})")
        weights = {k: v for k, v in weights.items() if not any(k.startswith(f"{p}.") for p in factors)}
        meta = {"ranks": {p: [int(f.core.shape[0]), int(f.core.shape[1])] for p, f in factors.items()},
                "rank_multiple": max((d.layer.multiple for d in dirs if d.timed), default=1),
                "kept_dense": sorted(d.layer.path for d in dirs if d.layer.path not in factors),
                "predicted": {kind: now}, "goal": {kind: goal}, "history": history,
                "time_s": round(time.perf_counter() - t0, 3)}
        return Plan(method=self.name, lowrank=factors, weights=weights, meta=meta)

    # -- one step -----------------------------------------------------------------------------------
    def _measure(self, work: nn.Module, ctx: PruneContext, dirs: list[_Directions],
                 factors: dict[str, LowRankFactors], step: int) -> None:
        """Curvature, rotation and direction scores of every layer's current middle layer."""
        paths = {d.layer.path: _core_path(d.layer.path, d.layer.path in factors) for d in dirs}
        for d in dirs:
            _read_chain(work, d, d.layer.path in factors)
        batches = ctx.batches(int(self.samples))
        kf = curvature.kfac_factors(work, batches, list(paths.values()), loss=ctx.loss, mode="channel",
                                    fisher=self.fisher, seed=int(self.seed) + step, average=self.average,
                                    decay=float(self.decay))
        bases, eig = {}, {}
        for d in dirs:
            f = curvature.damp(kf[paths[d.layer.path]], float(self.damping))
            lam_a, q_a = curvature.eigh(f.A[0])
            lam_g, q_g = curvature.eigh(f.G)
            core = work.get_submodule(paths[d.layer.path])
            wt = curvature.weight_taps(core, core.weight.detach().double(),
                                       None if core.bias is None else core.bias.detach().double())
            d.w_star = curvature.rotate(wt, q_g, q_a)
            d.in_pos, d.out_pos = f.in_positions, f.out_positions
            d.q_a, d.q_g = q_a[: core.weight.shape[1]], q_g
            d.dtype = core.weight.dtype
            eig[d.layer.path] = (lam_g, lam_a)
            bases[paths[d.layer.path]] = (q_a, q_g)
        ek = None
        if self.ekfac:
            ek = curvature.ekfac_eigenvalues(work, ctx.batches(int(self.samples)), bases, loss=ctx.loss,
                                             fisher=self.fisher, seed=int(self.seed) + step,
                                             num_batches=int(self.ekfac_batches))
        for d in dirs:
            lam_g, lam_a = eig[d.layer.path]
            s = ek[paths[d.layer.path]] if ek is not None else (lam_g[:, None] * lam_a[None, :])[..., None]
            sal = (d.w_star.pow(2) * s).sum(-1)
            d.out_scores, d.in_scores = sal.sum(1).cpu(), sal.sum(0).cpu()

    def _factors(self, d: _Directions, kept_out: torch.Tensor, kept_in: torch.Tensor,
                 kind: str) -> LowRankFactors | None:
        """The chain of ``d`` keeping those directions (Tucker re-projected if asked); None where not smaller."""
        r_out, r_in = len(kept_out), len(kept_in)
        if not d.cost(r_out, r_in, kind)[1]:
            return None
        assert d.w_star is not None and d.q_a is not None and d.q_g is not None
        if self.tucker:
            u_out, u_in, core = hooi(d.w_star, r_out, r_in)
            qg, qa = d.q_g @ u_out, d.q_a @ u_in
        else:
            qg, qa = d.q_g[:, kept_out], d.q_a[:, kept_in]
            core = d.w_star[kept_out][:, kept_in]
        (use_pre, use_post), _, _ = d.best(r_out, r_in, kind)
        return eigen_factors(d, qa, qg, core, use_pre, use_post)

    def _bring_back(self, dirs: list[_Directions], keep: dict[str, tuple[torch.Tensor, torch.Tensor]],
                    pool: dict[tuple[str, str], float], gen: torch.Generator, kind: str) -> int:
        """Give back ``back_ratio`` of the removed directions (see the module docstring); returns how many."""
        ratio, mom = float(self.back_ratio), float(self.pool_momentum)
        if ratio <= 0:
            return 0
        total = float(sum(d.out_scores.sum() + d.in_scores.sum() for d in dirs)) or 1.0
        removed: dict[tuple[str, str], list[int]] = {}
        for d in dirs:
            for side, scores, kept in (("out", d.out_scores, keep[d.layer.path][0]),
                                       ("in", d.in_scores, keep[d.layer.path][1])):
                mask = torch.ones(len(scores), dtype=torch.bool)
                mask[kept] = False
                idx = mask.nonzero().flatten()
                share = float(scores[idx].sum()) / total
                key = (d.layer.path, side)
                pool[key] = mom * pool.get(key, share) + (1 - mom) * share
                rank = d.out_rank if side == "out" else d.in_rank
                removed[key] = idx[rank[idx].argsort(descending=True)].tolist()  # best first
        n_back = round(ratio * sum(len(v) for v in removed.values()))
        keys = sorted(removed)
        by_path = {d.layer.path: d for d in dirs}
        given = 0
        for _ in range(n_back):
            w = torch.tensor([pool[k] if removed[k] else 0.0 for k in keys], dtype=torch.float64)
            if not float(w.sum()) > 0:
                break
            k = keys[int(torch.multinomial(w, 1, generator=gen))]
            out_k, in_k = keep[k[0]]
            j = torch.tensor([removed[k].pop(0)])
            grown = (torch.cat([out_k, j]), in_k) if k[1] == "out" else (out_k, torch.cat([in_k, j]))
            d = by_path[k[0]]
            if d.cost(len(out_k), len(in_k), kind)[1] and not d.cost(len(grown[0]), len(grown[1]), kind)[1]:
                removed[k] = []  # a replaced layer must stay smaller than the original
                continue
            keep[k[0]] = grown
            given += 1
        return given


def _new_directions(model: nn.Module, layer: _Layer, fold: bool) -> _Directions:
    m = model.get_submodule(layer.path)
    if isinstance(m, nn.Conv2d):
        return _Directions(layer, m.in_channels, m.out_channels, tuple(m.kernel_size), fold=fold)
    return _Directions(layer, m.in_features, m.out_features, (), fold=fold)


def _core_path(path: str, replaced: bool) -> str:
    return f"{path}.core" if replaced else path


def _read_chain(work: nn.Module, d: _Directions, replaced: bool) -> None:
    """The current ``pre`` / ``post`` / bias of ``d`` as the working model has them (after any fine-tuning)."""
    m = work.get_submodule(d.layer.path)
    mods = m._modules if replaced else {}
    d.pre = mods["pre"].weight.detach().flatten(1).double() if "pre" in mods else None
    d.post = mods["post"].weight.detach().flatten(1).double() if "post" in mods else None
    last = mods.get("post") or mods.get("core") or m
    d.bias = None if last.bias is None else last.bias.detach().clone()


def _top_sets(d: _Directions, r_out: int, r_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the ``r_out`` / ``r_in`` best-ranked directions of each side (best first)."""
    return d.out_rank.argsort(descending=True)[:r_out], d.in_rank.argsort(descending=True)[:r_in]


def eigen_factors(d: _Directions, qa: torch.Tensor, qg: torch.Tensor, core: torch.Tensor, use_pre: bool = True,
                  use_post: bool = True) -> LowRankFactors:
    """Compose the kept rotations with the chain so far: ``pre = qa^T pre``, ``post = post qg``.

    ``core`` is ``(r_out, r_in, taps)``; a side with ``use_pre`` / ``use_post`` off is multiplied
    into the middle layer instead of becoming a 1x1 layer.
    """
    pre = qa.T if d.pre is None else qa.T @ d.pre
    post = qg if d.post is None else d.post @ qg
    core = core.double()
    if not use_pre:
        core, pre = torch.einsum("oit,ic->oct", core, pre), None
    if not use_post:
        core, post = torch.einsum("po,oit->pit", post, core), None
    shape = (core.shape[0], core.shape[1], *d.kernel) if d.kernel else (core.shape[0], core.shape[1])
    return LowRankFactors(core=core.reshape(shape).to(d.dtype).contiguous(),
                          pre=None if pre is None else pre.to(d.dtype).contiguous(),
                          post=None if post is None else post.to(d.dtype).contiguous(),
                          bias=None if d.bias is None else d.bias.clone())


def _working_copy(model: nn.Module, factors: dict[str, LowRankFactors], copy: bool = False) -> nn.Module:
    """``model`` itself (read only) when there is no chain yet and ``copy`` is off, else a copy with
    the chains so far."""
    from prunekit.surgery.apply import apply_plan

    if not factors and not copy:
        return model

    return apply_plan(model, Plan(method="eigendamage-round", lowrank=factors), mode="physical")


def _finetune(work: nn.Module, ctx: PruneContext, n: int, lr: float) -> dict[str, torch.Tensor]:
    """``n`` SGD minibatches (momentum 0.9, BN frozen) of the working copy; its parameters after."""
    params = [p for p in work.parameters() if p.is_floating_point()]
    flags = [p.requires_grad for p in params]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    work.eval()
    done = 0
    try:
        for p in params:
            p.requires_grad_(True)
        while done < n:
            seen = False
            for x, y in ctx.batches():
                seen = True
                opt.zero_grad(set_to_none=True)
                loss = ctx.loss(work(x), y)
                if torch.isfinite(loss):
                    loss.backward()
                    opt.step()
                done += 1
                if done >= n:
                    break
            if not seen:
                raise PruningError("fine-tuning between rounds needs a labelled prune set; the data is empty")
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None
    return {k: v.detach().clone() for k, v in work.named_parameters()}


@register_method("eigendamage", granularity="lowrank", needs_grad=True, needs_second_order=True, needs_labels=False,
                 family="eigendamage", paper=_PAPER,
                 description="Low-rank pruning in the K-FAC eigenbasis: in/out eigen-directions of all layers in "
                             "one global ranking, each layer a 1x1 -> kxk -> 1x1 chain where smaller.")
class EigenDamage(_EigenBase):
    """EigenDamage, one-shot (``iterative=1``) or iterative (``iterative > 1`` rounds, curvature recomputed in the
    reduced space each round, rotations composed; ``finetune_batches`` between rounds)."""

    defaults = {**_EigenBase.defaults, "iterative": 1}
    option_help = {**_EigenBase.option_help,
                   "iterative": "pruning rounds inside the method (1: one-shot; >1: iterative, ratio_limit 0.5)"}

    @property
    def max_steps(self) -> int:  # type: ignore[override]
        if int(self.iterative) < 1:
            raise PruningError(f"eigendamage: iterative={self.iterative} must be >= 1 (rounds)")
        return int(self.iterative)

    def default_cap(self) -> float:
        return 0.95 if int(self.iterative) == 1 else 0.5

    def step_goal(self, step: int, now: float, goal: float, base: float) -> float:
        return base * (goal / base) ** ((step + 1) / int(self.iterative))


@register_method("eigendamage_improved", granularity="lowrank", needs_grad=True, needs_second_order=True,
                 needs_labels=False, family="eigendamage", paper=_PAPER + "; M. Hariat, Improved EigenDamage "
                 "(github.com/mhariat/DeepPruning)",
                 description="EigenDamage with pi-damping, EMA factors, EKFAC eigenvalues, Tucker (HOOI) "
                             "re-projection, bring-back regrowth and a 0.2-per-step schedule.")
class ImprovedEigenDamage(_EigenBase):
    """Improved EigenDamage: steps of ``step_ratio`` of the remaining cost (cap 0.5 per step) until the
    target, at most ``steps`` steps; see the module docstring for the other changes."""

    defaults = {**_EigenBase.defaults, "damping": 1e-3, "average": "ema", "decay": 0.9, "ekfac": True,
                "tucker": True, "back_ratio": 0.25, "step_ratio": 0.2, "steps": 20}
    option_types = {**_EigenBase.option_types,
                    "step_ratio": OptionType("float", low=0.01, high=0.99,
                                             help="fraction of the remaining cost removed per step")}
    option_help = {**_EigenBase.option_help, "steps": "most pruning steps"}

    @property
    def max_steps(self) -> int:  # type: ignore[override]
        if int(self.steps) < 1:
            raise PruningError(f"eigendamage_improved: steps={self.steps} must be >= 1")
        return int(self.steps)

    def default_cap(self) -> float:
        return 0.5

    def step_goal(self, step: int, now: float, goal: float, base: float) -> float:
        target = max(goal, now * (1.0 - float(self.step_ratio)))
        return goal if step == self.max_steps - 1 else target


__all__ = ["EigenDamage", "ImprovedEigenDamage", "eigen_factors", "hooi"]
