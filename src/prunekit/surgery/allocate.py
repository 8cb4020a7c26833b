"""Budgets: turning importance scores into kept channels or weight masks that meet a target.

Channels (:func:`allocate_channels`): every prunable coupled group has one score per channel.
``scope="global"`` ranks all channels of all groups together (optionally after per-group
normalisation) and removes the lowest-ranked until the target is met; ``scope="layerwise"``
removes the same fraction of every group, the fraction found by bisection. Costs come from the
graph's :class:`~prunekit.surgery.graph.CostModel` (exact for conv / linear layers), so a target
such as ``flops=2`` is searched in milliseconds; the result is then measured on a pruned deep
copy and the search corrected if the measurement disagrees.

Per-group limits: at least ``floor(floor * width) + 1`` channels survive (and at most ``cap`` of
them are removed); kept counts are multiples of ``round_to``. The default rounding
(:func:`default_round_to`) keeps channel counts at multiples of 32 for groups of 64 channels or
more, 16 for 32-63 and 8 for 16-31, and leaves tiny groups unrounded: CPU kernels process channels
in blocks of 8 / 16 / 32, so unaligned widths cost as much as the next aligned one.

Latency-aware ranking (``BudgetOptions.latency_aware``, on by default): with ``scope="global"`` a
channel's score (after the optional ``normalize``) is divided by its group's weight, the latency the
removal of one of its channels saves relative to the other groups. ``"proxy"`` (``True``, the library
default) takes it from the graph's analytic CPU latency proxy
(:meth:`~prunekit.surgery.graph.CostModel.latency`: multiply-adds plus memory-bound work per
activation element); ``"measured"`` (``prunekit prune --latency-model measured``) times the layers touching
each group on this machine at full width and one rounding step narrower
(:mod:`prunekit.surgery.latency`), which also sees what the proxy cannot (small convolutions on large
maps running at half the arithmetic rate, memory-bound strided 1x1 shortcuts); ``"off"`` ranks by
score alone. The target itself (``flops=`` / ``params=``) is unchanged; the ranking only decides where
it is taken, preferring the channels that cost time (e.g. the residual stream of early,
high-resolution stages, whose batch norm / ReLU / additions do not shrink when only inner
convolutions are pruned). If the weighted ranking cannot land on the target, the plain one is used.

Weights (:func:`allocate_weights`): one score per weight; ``flops=`` / ``params=`` targets count
non-zero (effective) multiply-adds / parameters; global or layer-wise; N:M masks with ``nm="2:4"``.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from prunekit.errors import PruningError
from prunekit.surgery.graph import LAYER_TYPES, ChannelGraph, PruningWarning, _matches, analyze
from prunekit.surgery.inputs import ExampleInputs, flatten_outputs, run_model

if TYPE_CHECKING:
    from prunekit.budget import PruneContext

EPS = 1e-12


# --------------------------------------------------------------------------------------------- rounding
def default_round_to(size: int) -> int:
    """The engine's default channel multiple for a group of ``size`` channels.

    32 for groups of at least 64 channels, 16 for 32-63, 8 for 16-31, none below 16. CPU
    convolution kernels (oneDNN) compute output channels in blocks (8 floats with AVX2, 16 with
    AVX-512, 32 for the wider channels-last kernels), so a width just above a block boundary costs
    as much as the next full block, and with the default (contiguous) layout an unaligned width adds a
    slow reorder of the output; measured on ResNet-20 (CIFAR-10) at 2x fewer FLOPs, these multiples
    also lost less accuracy than finer ones. When rounding keeps a target out of reach, the allocator
    gives up alignment for single groups rather than miss the target.
    """
    if size >= 64:
        return 32
    if size >= 32:
        return 16
    if size >= 16:
        return 8
    return 1


def runtime_step(block: int | None = None) -> int:
    """The channel multiple of latency-aware width searches (id_iter): a quarter of a SIMD block
    (:func:`~prunekit.surgery.cost.cpu_block`; 4 with AVX-512, 2 with AVX2).

    ONNX Runtime's blocked (NCHWc) convolutions take any width that is a multiple of 4 (padding output
    channels to whole blocks internally) and read fewer input channels than one block directly; other
    widths leave the blocked layout (a reorder around the layer, or a slower unblocked kernel). Measured on
    ResNet-20 (2-core AVX-512, batch 64, 2 threads): unaligned 15 / 22 / 28 / 60-channel widths put a reorder
    after 16 of the 21 convolutions and ran 2x fewer FLOPs no faster than the base.
    """
    from prunekit.surgery.cost import cpu_block

    b = cpu_block() if block is None else int(block)
    return max(1, b // 4)


def runtime_multiple(size: int, block: int | None = None) -> int:
    """The channel multiple of a latency-aware width search for a group of ``size`` channels written by
    convolutions: 1 below one SIMD block, :func:`runtime_step` up to four blocks, a whole block from four
    blocks up (16 channels with AVX-512 from 64 channels).

    ONNX Runtime's blocked kernels pad output channels to whole blocks, and a partial block costs as much as
    a whole one or more: measured on this machine (2-core AVX-512, batch 64, 8x8 maps), a 52-channel conv
    ran in 1.8 ms against 1.28 ms at 48 channels. On ResNet-20 at flops=2 (ONNX Runtime, batch 64, 7
    rounds), id_iter with this rule kept more accuracy (68.8 % against 67.7 %) and ran faster (1.54x
    against 1.44x) than with the quarter-block step everywhere.
    """
    from prunekit.surgery.cost import cpu_block

    b = cpu_block() if block is None else int(block)
    if size < b:
        return 1
    return b if size >= 4 * b else runtime_step(b)


def runtime_breakpoint(n: int, block: int | None = None) -> int:
    """The next narrower width below ``n`` at which the block-aligned kernels save time: the multiple of
    the block below ``n``, or half a block below one block (input channels below one block run in half
    blocks), or one :func:`runtime_step` less below that (0: none)."""
    from prunekit.surgery.cost import cpu_block

    b = cpu_block() if block is None else int(block)
    if n > b:
        return ((n - 1) // b) * b
    if n > b // 2:
        return b // 2
    return max(0, n - runtime_step(b))


def resolve_round_to(size: int, round_to: int | str | None) -> int:
    """The channel multiple used for a group: ``None`` / ``"auto"`` -> :func:`default_round_to`;
    ``"runtime"`` -> :func:`runtime_multiple` (the latency-aware width search's multiples: exact below one SIMD
    block, quarter blocks up to four blocks, whole blocks above); an int applies to every group (1 or 0: no
    rounding); a callable maps the group's width to its multiple."""
    if round_to is None or round_to == "auto":
        return default_round_to(size)
    if round_to == "runtime":
        return runtime_multiple(size)
    if callable(round_to):
        return max(1, int(round_to(size)))
    try:
        r = int(round_to)
    except (TypeError, ValueError):
        raise PruningError(f"round_to must be a positive int, 'auto' or 'runtime', got {round_to!r}") from None
    if r < 0:
        raise PruningError(f"round_to must be a positive int, 'auto' or 'runtime', got {round_to!r}")
    return max(1, r)


def _snap(k: float, lo: int, hi: int, m: int) -> int:
    """Round a kept count to a multiple of ``m`` within ``[lo, hi]`` (``hi``: keep everything)."""
    if k >= hi:
        return hi
    if m <= 1:
        return int(min(hi, max(lo, round(k))))
    lo_m = -(-lo // m) * m
    hi_m = (hi // m) * m
    if lo_m > hi_m or lo_m >= hi:
        return hi if lo_m >= hi else lo_m
    r = int(round(k / m)) * m
    return int(min(hi_m, max(lo_m, r)))


# --------------------------------------------------------------------------------------------- channels
class _ChannelProblem:
    """The search state: per group its scores, limits and multiple."""

    def __init__(
        self,
        graph: ChannelGraph,
        ctx: PruneContext,
        scores: dict[str, torch.Tensor],
        removed: dict[str, torch.Tensor],
    ):
        b = ctx.budget
        if not 0 <= b.floor < 1:
            raise PruningError(f"floor must be in [0, 1), got {b.floor}")
        if not 0 < b.cap <= 1:
            raise PruningError(f"cap must be in (0, 1], got {b.cap}")
        originals = ctx.original_sizes
        ignored = list(b.ignored or ())
        self.graph = graph
        self.keys: list[str] = []
        self.scores: list[torch.Tensor] = []
        self.alive: list[torch.Tensor] = []
        self.lo: list[int] = []
        self.hi: list[int] = []
        self.mult: list[int] = []
        unknown = sorted(set(scores) - set(graph.groups))
        if unknown:
            raise PruningError(f"scores refer to channel group(s) {unknown} that the model does not have")
        for key, g in graph.groups.items():
            if not g.prunable or key not in scores:
                continue
            if ignored and any(_matches(p, ignored) for p in g.producers + g.depthwise + g.norms):
                continue
            s = torch.as_tensor(scores[key], dtype=torch.float64).flatten()
            if s.numel() != g.size:
                raise PruningError(
                    f"scores for channel group {key!r} have {s.numel()} entries; the group has "
                    f"{g.size} channels"
                )
            alive = torch.ones(g.size, dtype=torch.bool)
            if key in removed:
                alive[removed[key]] = False
            hi = int(alive.sum())
            orig = int(originals.get(key, g.size))
            lo = max(g.min_keep, math.floor(b.floor * orig) + 1, math.ceil((1 - b.cap) * orig - 1e-9))
            lo = min(lo, hi)
            m = 1 if g.kind == "heads" else resolve_round_to(orig, b.round_to)
            m = math.lcm(m, g.multiple_of) if g.multiple_of > 1 else m
            self.keys.append(key)
            self.scores.append(s)
            self.alive.append(alive)
            self.lo.append(lo)
            self.hi.append(hi)
            self.mult.append(m)
        if not self.keys:
            raise PruningError(
                "no prunable channel group has scores: nothing can be pruned "
                f"(skipped layers: {graph.skipped or 'none'})"
            )
        self.normalized = [_normalize(s, b.normalize) for s in self.scores]
        self.latency_weights: list[float] | None = None  # set by allocate_channels (latency-aware ranking)

    def widths(self, counts: list[int]) -> dict[str, int]:
        return dict(zip(self.keys, counts))

    def snapped(self, raw: list[float]) -> list[int]:
        return [_snap(k, lo, hi, m) for k, lo, hi, m in zip(raw, self.lo, self.hi, self.mult)]

    def keep(self, counts: list[int]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        size = {k: self.graph.groups[k].size for k in self.keys}
        for key, s, alive, k in zip(self.keys, self.scores, self.alive, counts):
            if k >= size[key]:
                continue
            masked = s.clone()
            masked[~alive] = -math.inf
            idx = torch.argsort(masked, descending=True, stable=True)[:k]
            out[key] = idx.sort().values
        return out


def _normalize(s: torch.Tensor, how: str | None) -> torch.Tensor:
    if how in (None, "", "none"):
        return s
    a = s.abs()
    if how == "l2":
        d = a.norm()
    elif how == "max":
        d = a.max()
    elif how == "mean":
        d = a.mean()
    elif how == "sum":
        d = a.sum()
    else:
        raise PruningError(f"unknown score normalisation {how!r}; use none, l2, max, mean or sum")
    return s / max(float(d), EPS)


def _cost_fn(graph: ChannelGraph, kind: str) -> Any:
    return graph.cost.flops if kind == "flops" else graph.cost.params


def masked_channels(model: nn.Module, graph: ChannelGraph) -> dict[str, torch.Tensor]:
    """Channels of each group that masks already zero out (every producer row masked)."""
    from prunekit.surgery.masks import get_masks

    masks = get_masks(model)
    out: dict[str, torch.Tensor] = {}
    for key, g in graph.groups.items():
        dead: torch.Tensor | None = None
        for mb in g.members:
            if mb.role != "producer" or mb.tensor not in masks:
                continue
            m = masks[mb.tensor].movedim(mb.dim, 0)
            rows = m[mb.index.reshape(-1)].reshape(g.size, -1)
            d = ~rows.any(1)
            dead = d if dead is None else dead & d
        if dead is not None and bool(dead.any()):
            out[key] = dead.nonzero().flatten()
    return out


def allocate_channels(
    model: nn.Module, ctx: PruneContext, scores: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Kept channel indices per coupled group, meeting ``ctx.target`` under ``ctx.budget``.

    ``scores``: group key -> one score per channel (higher = keep). Groups without scores are not
    pruned. Returns ``{group key: sorted LongTensor of kept channels}`` for groups that lose channels.

    Raises:
        PruningError: unreachable target (the message gives the largest reachable ratio), bad scores.
    """
    graph = ctx.graph
    if graph is None:
        graph = ctx.graph = analyze(model, ctx.input_shape, ignored=ctx.budget.ignored)
    removed = dict(ctx.removed_channels or masked_channels(model, graph))
    prob = _ChannelProblem(graph, ctx, scores, removed)
    target = ctx.target
    if target.kind == "ratio":
        counts = _ratio_counts(prob, target)
        keep = prob.keep(counts)
        ctx.allocation = {"widths": prob.widths(counts)}
        return keep
    kind = target.kind
    cost = _cost_fn(graph, kind)
    full = {k: graph.groups[k].size for k in graph.groups}
    current = dict(full)
    for k, r in removed.items():
        current[k] = full[k] - int(len(r))
    base = cost(current)
    budget = base / target.value
    if ctx.budget.scope == "global" and latency_mode(ctx.budget.latency_aware) != "off":
        prob.latency_weights = _latency_weights(prob, model, ctx)
    counts = _search(prob, ctx, cost, budget)
    keep = prob.keep(counts)
    predicted = cost({**current, **prob.widths(counts)})
    info: dict[str, Any] = {"predicted": base / max(predicted, EPS), "target": target.value}
    if ctx.verify and not removed:
        measured = _measure(model, graph, keep, kind)
        if measured is not None and abs(measured / max(predicted, EPS) - 1) > 0.002:
            counts, keep, measured = _correct(model, prob, ctx, cost, budget, measured, predicted, kind)
        if measured is not None:
            info["measured"] = base / max(measured, EPS)
            achieved = info["measured"]
            if abs(achieved / target.value - 1) > ctx.budget.tolerance:
                warnings.warn(
                    f"prunekit: {target} reached as {achieved:.3g}x (the cost model predicted "
                    f"{info['predicted']:.3g}x); layers left unpruned: {unpruned_reasons(graph)}",
                    PruningWarning,
                    stacklevel=2,
                )
    if "measured" not in info and abs(info["predicted"] / target.value - 1) > ctx.budget.tolerance:
        warnings.warn(f"prunekit: {target} reached as {info['predicted']:.3g}x (cost model; the per-layer floors "
                      "and channel multiples leave no more to remove)", PruningWarning, stacklevel=2)
    info["widths"] = prob.widths(counts)
    ctx.allocation = info
    return keep


def _ratio_counts(prob: _ChannelProblem, target: Any) -> list[int]:
    raw = []
    for key, hi in zip(prob.keys, prob.hi):
        g = prob.graph.groups[key]
        f = target.per_layer.get(key)
        if f is None:
            f = next(
                (target.per_layer[p] for p in g.producers + g.depthwise if p in target.per_layer),
                target.value,
            )
        raw.append(hi - int(round(f * hi)))
    return prob.snapped(raw)


def unpruned_reasons(graph: ChannelGraph, limit: int = 12) -> str:
    """``'layer': why`` for every layer whose output channels the graph leaves unpruned ("none" if none)."""
    items = sorted(graph.skipped.items())
    if not items:
        return "none"
    text = "; ".join(f"{p!r}: {why}" for p, why in items[:limit])
    return text + (f"; and {len(items) - limit} more" if len(items) > limit else "")


def _search(prob: _ChannelProblem, ctx: PruneContext, cost: Any, budget: float) -> list[int]:
    """Counts per group whose predicted cost is closest to ``budget`` (in log ratio)."""
    base_widths = {k: g.size for k, g in prob.graph.groups.items()}
    for k, hi in zip(prob.keys, prob.hi):
        base_widths[k] = hi

    def c(counts: list[int]) -> float:
        return cost({**base_widths, **prob.widths(counts)})

    lo_counts = prob.snapped([float(lo) for lo in prob.lo])
    min_cost = c(lo_counts)
    base = c(list(prob.hi))
    tol = ctx.budget.tolerance
    if min_cost > budget * (1 + tol):
        # the aligned floors cannot reach the budget; the search may still give up alignment for single
        # groups (below), so the target is unreachable only if the unaligned floors cannot reach it either
        unaligned = [max(1, g) for g in (prob.graph.groups[k].multiple_of for k in prob.keys)]
        min_cost = c([_snap(lo, lo, hi, m) for lo, hi, m in zip(prob.lo, prob.hi, unaligned)])
    if min_cost > budget * (1 + tol):
        t = ctx.target
        best = base / max(min_cost, EPS)
        raise PruningError(
            f"target {t} cannot be reached: the largest reachable reduction is {best:.3g}x with floor="
            f"{ctx.budget.floor}, cap={ctx.budget.cap} and the layers that are not pruned "
            f"({unpruned_reasons(prob.graph)}); lower the target, the floor or round_to"
        )
    if ctx.budget.scope == "layerwise":
        seqs = [_layerwise_configs(prob)]
    elif ctx.budget.scope == "global":
        seqs = []
        if prob.latency_weights is not None:
            seqs.append(_global_configs(prob, prob.latency_weights))
        # without latency weights the plain ranking; with them, the fallback if that ranking cannot land
        seqs.append(_global_configs(prob))
    else:
        raise PruningError(f"scope must be 'global' or 'layerwise', got {ctx.budget.scope!r}")

    def err(counts: list[int]) -> float:
        return abs(math.log(max(c(counts), EPS) / budget))

    best: list[int] | None = None
    for seq in seqs:
        cand = _bisect(seq, c, budget)
        if err(cand) > math.log1p(tol / 2):
            cand = _refine(prob, cand, c, budget, prob.mult)  # rounding steps are coarse: adjust single groups
        finest = [max(1, g) for g in (prob.graph.groups[k].multiple_of for k in prob.keys)]
        mult = list(prob.mult)
        while err(cand) > math.log1p(tol) and mult != finest:
            # still outside the tolerance: fall back to finer multiples (half the rounding, down to one
            # channel or the group's GroupNorm multiple) for the groups that need it before reporting a miss
            mult = [max(f, m // 2) if (m // 2) % f == 0 else f for m, f in zip(mult, finest)]
            cand = _refine(prob, cand, c, budget, mult)
        if best is None or err(cand) < err(best):
            best = cand
        if err(best) <= math.log1p(tol):
            break
    assert best is not None
    return best


def _bisect(seq: Any, c: Any, budget: float) -> list[int]:
    """``seq(t)`` for t in [0, 1] gives configurations of (mostly) decreasing cost; pick the one closest
    to ``budget``."""
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if c(seq(mid)) > budget:
            lo = mid
        else:
            hi = mid
    cands = [seq(lo), seq(hi)]
    # neighbouring distinct configurations (rounding makes the cost a step function)
    for t in (max(0.0, lo - 0.01), min(1.0, hi + 0.01)):
        cands.append(seq(t))
    return min(cands, key=lambda cfg: abs(math.log(max(c(cfg), EPS) / budget)))


def _ranked(s: torch.Tensor, alive: torch.Tensor, descending: bool) -> torch.Tensor:
    """Positions of the live entries of ``s`` in rank order (dead entries last)."""
    masked = s.clone()
    masked[~alive] = -math.inf if descending else math.inf
    return torch.argsort(masked, descending=descending, stable=True)


def _merge(parts: list[torch.Tensor], descending: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank the values of all ``parts`` together: ``(part index of each value, order)`` in rank order,
    ``order`` indexing the concatenation of the parts."""
    order = torch.argsort(torch.cat(parts), descending=descending, stable=True)
    ids = torch.cat([torch.full((len(p),), i, dtype=torch.long) for i, p in enumerate(parts)])
    return ids[order], order


LATENCY_MODES = ("proxy", "measured", "onnxruntime", "off")


def latency_mode(value: Any) -> str:
    """``BudgetOptions.latency_aware`` as one of :data:`LATENCY_MODES` (True: ``"proxy"``, False: ``"off"``;
    ``"measured@eager"`` / ``"measured@onnxruntime"`` spell the two measured runtimes like latency targets)."""
    if value is True or value is None:
        return "proxy"
    if value is False:
        return "off"
    v = str(value).strip().lower()
    if v in ("proxy", "true", "on", "yes", "1"):
        return "proxy"
    if v in ("off", "false", "no", "0", "none"):
        return "off"
    if v in ("measured", "measured@eager", "eager"):
        return "measured"
    if v in ("onnxruntime", "measured@onnxruntime", "ort"):
        return "onnxruntime"
    raise PruningError(f"latency_aware must be one of {', '.join(LATENCY_MODES)} (or True / False), got {value!r}")


def _latency_weights(
    prob: _ChannelProblem, model: nn.Module | None = None, ctx: PruneContext | None = None
) -> list[float]:
    """Latency saved by removing a channel of each group, relative to the average over groups (1 for every
    group when nothing can be estimated).

    ``"proxy"`` (default): the graph's analytic CPU latency proxy (:meth:`CostModel.latency`) for one
    channel less at full width. ``"measured"`` (``ctx.budget.latency_aware``): the layers touching each
    group are timed on this machine at full width and with one rounding step (the group's multiple) less
    (:func:`prunekit.surgery.latency.measured_channel_savings`) in eager PyTorch; ``"onnxruntime"``: the same
    in ONNX Runtime; groups whose layers could not be timed keep their proxy weight."""
    cost = prob.graph.cost
    if cost is None:
        return [1.0] * len(prob.keys)
    full = dict(zip(prob.keys, prob.hi))
    ref = cost.latency(full, block=1)
    per = []
    for k, hi in zip(prob.keys, prob.hi):
        per.append(max(ref - cost.latency({**full, k: max(0, hi - 1)}, block=1), 0.0))
    per = _relative(per)
    mode = latency_mode(ctx.budget.latency_aware) if ctx is not None else "proxy"
    if mode in ("measured", "onnxruntime") and model is not None:
        from prunekit.surgery.latency import LatencyTable, measured_channel_savings

        b = ctx.budget
        table = LatencyTable(batch_size=b.latency_batch, threads=b.latency_threads,
                             runtime="eager" if mode == "measured" else "onnxruntime")
        widths = {k: g.size for k, g in prob.graph.groups.items()}
        widths.update(full)
        saved = measured_channel_savings(model, prob.graph, prob.keys, prob.mult, widths, table)
        ctx.latency_table = {"layers_timed": table.measured, "cache": str(table.cache_file or ""),
                             "runtime": table.runtime}
        if any(v > 0 for v in saved):
            measured = _relative(saved)
            per = [m if v > 0 else p for m, v, p in zip(measured, saved, per)]
    return per


def _relative(values: list[float]) -> list[float]:
    mean = sum(values) / max(1, len(values))
    return [v / mean if mean > 0 and v > 0 else 1.0 for v in values]


def _global_configs(prob: _ChannelProblem, weights: list[float] | None = None) -> Any:
    """Configurations removing the globally lowest-ranked channels (fraction t of the removable ones).

    ``weights`` (latency-aware ranking): a channel's rank is its (group-normalised) score divided by its
    group's weight, the relative latency its removal saves, so that, for the same importance, channels
    of groups that cost more time go first."""
    weights = weights or [1.0] * len(prob.keys)
    vals = []
    for s, alive, lo, hi, w in zip(prob.normalized, prob.alive, prob.lo, prob.hi, weights):
        s = s / w
        vals.append(s[_ranked(s, alive, descending=False)[: max(0, hi - lo)]])
    if not any(len(v) for v in vals):
        return lambda t: list(prob.hi)
    gid, _ = _merge(vals, descending=False)
    total = len(gid)
    n_groups = len(prob.keys)
    cum = torch.zeros(total + 1, n_groups, dtype=torch.long) if total * n_groups <= 4_000_000 else None

    if cum is not None:
        cum[1:] = torch.nn.functional.one_hot(gid, n_groups).cumsum(0)

    def seq(t: float) -> list[int]:
        n = int(round(t * total))
        removed = cum[n] if cum is not None else torch.bincount(gid[:n], minlength=n_groups)
        raw = [hi - int(r) for hi, r in zip(prob.hi, removed.tolist())]
        return prob.snapped([float(x) for x in raw])

    return seq


def _layerwise_configs(prob: _ChannelProblem) -> Any:
    def seq(t: float) -> list[int]:
        return prob.snapped([max(lo, hi * (1 - t)) for lo, hi in zip(prob.lo, prob.hi)])

    return seq


def _refine(prob: _ChannelProblem, counts: list[int], c: Any, budget: float, mult: list[int]) -> list[int]:
    """Greedy single-group steps of ``mult[i]`` channels (or 2, 4, 8, ... times that) towards the budget."""
    counts = list(counts)
    err = abs(math.log(max(c(counts), EPS) / budget))
    for _ in range(4 * len(counts) + 16):
        best_move, best_err = None, err
        for i, (k, lo, hi, m) in enumerate(zip(counts, prob.lo, prob.hi, mult)):
            steps, step = [], m
            while step < hi:
                steps += [_snap(k - step, lo, hi, m), _snap(k + step, lo, hi, m) if k + step <= hi else hi]
                step *= 2
            for nk in dict.fromkeys(steps):
                if nk == k:
                    continue
                trial = counts[:i] + [nk] + counts[i + 1 :]
                e = abs(math.log(max(c(trial), EPS) / budget))
                if e < best_err - 1e-12:
                    best_move, best_err = (i, nk), e
        if best_move is None:
            break
        counts[best_move[0]] = best_move[1]
        err = best_err
    return counts


def _measure(model: nn.Module, graph: ChannelGraph, keep: dict[str, torch.Tensor], kind: str) -> float | None:
    """Real dense FLOPs / params of the model pruned by ``keep`` (on a deep copy)."""
    from prunekit.metrics import count_flops, count_params
    from prunekit.surgery.apply import apply_plan
    from prunekit.surgery.plan import Plan

    if not keep:
        return None
    pruned = apply_plan(model, Plan(channels=keep), None, "physical", graph.input_shape)
    if kind == "flops":
        return float(count_flops(pruned, graph.input_shape))
    return float(count_params(pruned)["params"])


def _correct(
    model: nn.Module,
    prob: _ChannelProblem,
    ctx: PruneContext,
    cost: Any,
    budget: float,
    measured: float,
    predicted: float,
    kind: str,
) -> tuple[list[int], dict[str, torch.Tensor], float]:
    """The cost model disagrees with the measurement: search again with the budget rescaled by the
    observed ratio (a few times, secant-like), keeping the result whose measurement is closest."""
    warnings.warn(
        f"prunekit: the cost model is off by {100 * (measured / predicted - 1):+.1f}% on this model; "
        "correcting with measured values",
        PruningWarning,
        stacklevel=3,
    )
    best: tuple[list[int], dict[str, torch.Tensor], float] | None = None
    scale = predicted / measured
    for _ in range(4):
        counts = _search(prob, ctx, cost, budget * scale)
        keep = prob.keep(counts)
        m = _measure(model, prob.graph, keep, kind)
        if m is None:
            break
        if best is None or abs(math.log(m / budget)) < abs(math.log(best[2] / budget)):
            best = (counts, keep, m)
        if abs(math.log(m / budget)) < math.log1p(ctx.budget.tolerance / 4):
            break
        scale *= budget / m
    assert best is not None
    return best


# --------------------------------------------------------------------------------------------- weights
def _zeros_example(spec: Any, dev: torch.device) -> Any:
    """A batch-1 example: the first of the given example inputs, or zeros of a per-example shape."""
    if isinstance(spec, ExampleInputs):
        return spec.first(1).to(dev)
    return torch.zeros((1, *spec), device=dev)


def _output_layers(model: nn.Module, input_shape: Any) -> list[str]:
    """Conv / linear layers whose output is the model's output (the classifier)."""
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [
        m.register_forward_hook(lambda mod, a, out, p=p: calls.append((p, out)))
        for p, m in model.named_modules()
        if isinstance(m, LAYER_TYPES)
    ]
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            y = run_model(model, _zeros_example(input_shape, dev))
    finally:
        for h in handles:
            h.remove()
        for m, f in flags:
            m.training = f
    outs = flatten_outputs(y)
    direct = [p for p, o in calls if any(o is t for t in outs)]
    return direct or ([calls[-1][0]] if calls else [])


def prunable_weights(model: nn.Module, ctx: PruneContext) -> dict[str, torch.Tensor]:
    """Conv / linear weights an unstructured method may prune: ``{parameter path: weight}``.

    Layers in ``ctx.budget.ignored`` are excluded; by default (``ignored=None``) the classifier.
    For masked layers the effective (masked) weight is returned.
    """
    ignored = ctx.budget.ignored
    if ignored is None:
        if ctx.graph is not None:
            ignored = tuple(ctx.graph.output_layers)
        else:
            ignored = tuple(_output_layers(model, ctx.input_shape))
            ctx.output_layers = ctx.output_layers or list(ignored)
    out: dict[str, torch.Tensor] = {}
    for path, m in model.named_modules():
        if isinstance(m, LAYER_TYPES) and not _matches(path, ignored):
            w = m.weight
            if isinstance(w, torch.Tensor) and w.dim() >= 2:
                out[f"{path}.weight"] = w
    return out


def _weight_uses(model: nn.Module, ctx: PruneContext, paths: list[str]) -> dict[str, float]:
    """Multiply-adds per entry (per example) of each weight."""
    if ctx.graph is not None:
        per = {t.path: t.macs_per_entry for t in ctx.graph.cost.tensors}
        if all(p in per for p in paths):
            return {p: per[p] for p in paths}
    from prunekit.surgery.graph import _UseRecorder

    rec = _UseRecorder(model)
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            run_model(model, _zeros_example(ctx.input_shape, dev))
    finally:
        rec.remove()
        for m, f in flags:
            m.training = f
    return {p: rec.uses.get(p.rpartition(".")[0], 0.0) for p in paths}


def _parse_nm(nm: Any) -> tuple[int, int]:
    try:
        n, m = (int(v) for v in str(nm).split(":"))
    except ValueError:
        raise PruningError(f"nm must look like '2:4' (keep N of every M weights), got {nm!r}") from None
    if not 0 < n < m:
        raise PruningError(f"nm={nm!r}: need 0 < N < M")
    return n, m


def allocate_weights(
    model: nn.Module, ctx: PruneContext, scores: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Boolean keep-masks per weight meeting ``ctx.target`` (``params=``/``flops=``: non-zero counts).

    ``scores``: parameter path -> scores of the parameter's shape (higher = keep); parameters
    without scores are not pruned. Weights already masked stay pruned. With ``ctx.budget.nm``
    (``"N:M"``) every group of M consecutive weights along a row keeps its N best and the target
    is not used.
    """
    from prunekit.metrics import count_params, effective_flops
    from prunekit.surgery.masks import get_masks

    params = prunable_weights(model, ctx)
    unknown = sorted(set(scores) - set(params))
    if unknown:
        raise PruningError(
            f"scores for {unknown}, which are not prunable weights (prunable: {sorted(params)})"
        )
    paths = [p for p in params if p in scores]
    if not paths:
        raise PruningError("no prunable weight has scores: nothing can be pruned")
    existing = get_masks(model)
    sc: dict[str, torch.Tensor] = {}
    alive: dict[str, torch.Tensor] = {}
    for p in paths:
        s = torch.as_tensor(scores[p], dtype=torch.float64).cpu()
        if tuple(s.shape) != tuple(params[p].shape):
            raise PruningError(
                f"scores for {p!r} have shape {tuple(s.shape)}, the weight has {tuple(params[p].shape)}"
            )
        if not torch.isfinite(s).all():
            raise PruningError(f"scores for {p!r} are not all finite")
        a = existing[p].cpu().bool() if p in existing else torch.ones(s.shape, dtype=torch.bool)
        # weights that are exactly zero (a sparse model saved with its zeros baked in) count as removed, so a
        # target is relative to the model as given and pruning a pruned model prunes further
        a = a & (params[p].detach().cpu() != 0)
        sc[p], alive[p] = s, a
    nm = ctx.budget.nm
    if nm:
        return _nm_masks(sc, alive, *_parse_nm(nm))
    b = ctx.budget
    floors = {
        p: min(
            int(alive[p].sum()),
            max(math.floor(b.floor * sc[p].numel()) + 1, math.ceil((1 - b.cap) * sc[p].numel() - 1e-9)),
        )
        for p in paths
    }
    t = ctx.target
    if t.kind == "ratio":
        counts = {}
        for p in paths:
            f = t.per_layer.get(p, t.per_layer.get(p.rpartition(".")[0], t.value))
            n = sc[p].numel()
            counts[p] = max(floors[p], min(int(alive[p].sum()), n - int(round(f * n))))
        return _top_masks(sc, alive, counts)
    if t.kind == "params":
        unit = {p: 1.0 for p in paths}
        base = float(count_params(model)["nonzero_params"])
    else:
        unit = _weight_uses(model, ctx, paths)
        base = float(effective_flops(model, ctx.input_shape if isinstance(ctx.input_shape, ExampleInputs)
                                     else tuple(ctx.input_shape)))
    alive_cost = sum(unit[p] * float(alive[p].sum()) for p in paths)
    const = base - alive_cost
    budget = base / t.value - const
    floor_cost = sum(unit[p] * floors[p] for p in paths)
    if floor_cost > budget + 1e-9 * base:
        best = base / (const + floor_cost)
        raise PruningError(
            f"target {t} cannot be reached: the largest reachable reduction is {best:.3g}x "
            f"(floor={b.floor}, classifier and other unprunable weights kept); lower the target"
        )
    if b.scope == "global":
        counts = _global_weight_counts(sc, alive, floors, unit, budget, b.normalize)
    elif b.scope == "layerwise":
        counts = _layerwise_weight_counts(sc, alive, floors, unit, budget)
    else:
        raise PruningError(f"scope must be 'global' or 'layerwise', got {b.scope!r}")
    return _top_masks(sc, alive, counts)


def _top_masks(
    sc: dict[str, torch.Tensor], alive: dict[str, torch.Tensor], counts: dict[str, int]
) -> dict[str, Any]:
    out = {}
    for p, k in counts.items():
        s = sc[p].flatten().clone()
        s[~alive[p].flatten()] = -math.inf
        idx = torch.topk(s, int(k), sorted=False).indices if k > 0 else torch.zeros(0, dtype=torch.long)
        m = torch.zeros(s.numel(), dtype=torch.bool)
        m[idx] = True
        out[p] = m.view(sc[p].shape)
    return out


def _global_weight_counts(
    sc: dict[str, torch.Tensor],
    alive: dict[str, torch.Tensor],
    floors: dict[str, int],
    unit: dict[str, float],
    budget: float,
    normalize: str | None,
) -> dict[str, int]:
    """Keep the globally best weights beyond each layer's floor until the budget is used up."""
    vals = []
    paths = list(sc)
    floor_cost = 0.0
    for p in paths:
        s = _normalize(sc[p].flatten(), normalize)
        a = alive[p].flatten()
        vals.append(s[_ranked(s, a, descending=True)[floors[p] : int(a.sum())]])
        floor_cost += unit[p] * floors[p]
    gid, _ = _merge(vals, descending=True)
    cum = torch.tensor([unit[p] for p in paths], dtype=torch.float64)[gid].cumsum(0)
    room = budget - floor_cost
    k = int(torch.searchsorted(cum, torch.tensor([room], dtype=torch.float64), right=True)[0])
    # one more weight may land closer to the budget
    if k < len(cum):
        below = room - (float(cum[k - 1]) if k > 0 else 0.0)
        above = float(cum[k]) - room
        if above < below:
            k += 1
    extra = torch.bincount(gid[:k], minlength=len(paths))
    return {p: floors[p] + int(extra[i]) for i, p in enumerate(paths)}


def _layerwise_weight_counts(
    sc: dict[str, torch.Tensor],
    alive: dict[str, torch.Tensor],
    floors: dict[str, int],
    unit: dict[str, float],
    budget: float,
) -> dict[str, int]:
    paths = list(sc)
    n_alive = {p: int(alive[p].sum()) for p in paths}

    def counts(f: float) -> dict[str, int]:
        return {p: max(floors[p], int(round(n_alive[p] * (1 - f)))) for p in paths}

    def cost(f: float) -> float:
        return sum(unit[p] * k for p, k in counts(f).items())

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if cost(mid) > budget:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda f: abs(cost(f) - budget))
    return counts(best)


def _nm_masks(
    sc: dict[str, torch.Tensor], alive: dict[str, torch.Tensor], n: int, m: int
) -> dict[str, torch.Tensor]:
    out = {}
    for p, s in sc.items():
        rows = s.reshape(s.shape[0], -1).clone()
        if rows.shape[1] % m:
            warnings.warn(
                f"prunekit: {p!r} has {rows.shape[1]} inputs per row, not a multiple of {m}: left dense "
                f"by the {n}:{m} pattern",
                PruningWarning,
                stacklevel=3,
            )
            continue
        rows[~alive[p].reshape(rows.shape)] = -math.inf
        blocks = rows.view(rows.shape[0], -1, m)
        idx = blocks.topk(n, dim=2).indices
        keep = torch.zeros_like(blocks, dtype=torch.bool).scatter_(2, idx, True)
        out[p] = keep.view(s.shape) & alive[p]
    return out


__all__ = [
    "allocate_channels",
    "allocate_filter_count",
    "allocate_global_count",
    "allocate_weights",
    "default_round_to",
    "masked_channels",
    "prunable_weights",
    "resolve_round_to",
    "runtime_breakpoint",
    "runtime_multiple",
    "runtime_step",
]


# --------------------------------------------------------------------------------------------- global count
def allocate_global_count(scores: dict[str, torch.Tensor], n_remove: int,
                          floors: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Remove exactly ``n_remove`` channels: the globally lowest raw scores, every group keeping ``floors[key]``.

    Ties are broken by group order, then channel index (deterministic). Returns ``{group key: sorted kept
    indices}`` for the groups that lose channels. If the floors leave fewer than ``n_remove`` removable
    channels, all removable ones go.
    """
    floors = floors or {}
    vals, keys, idxs = [], [], []
    for gi, (key, s) in enumerate(scores.items()):
        s = torch.as_tensor(s, dtype=torch.float64).flatten().cpu()
        lo = min(len(s), max(1, int(floors.get(key, 1))))
        order = torch.argsort(s, stable=True)[: len(s) - lo]
        vals.append(s[order])
        keys.append(torch.full((len(order),), gi, dtype=torch.long))
        idxs.append(order)
    if not vals or n_remove <= 0:
        return {}
    v, gid, idx = torch.cat(vals), torch.cat(keys), torch.cat(idxs)
    take = torch.argsort(v, stable=True)[: int(n_remove)]
    names = list(scores)
    out: dict[str, torch.Tensor] = {}
    for gi in gid[take].unique().tolist():
        key = names[gi]
        removed = idx[take][gid[take] == gi]
        keep = torch.ones(len(scores[key]), dtype=torch.bool)
        keep[removed] = False
        out[key] = keep.nonzero().flatten()
    return out


def allocate_filter_count(scores: dict[str, torch.Tensor], original_sizes: dict[str, int], target_keep: int,
                          floor: float, multiples: dict[str, int] | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Keep ``target_keep`` channels over all scored groups (the gradient-flow "global count" allocator).

    The globally lowest scores go first (:func:`allocate_global_count`); every group keeps
    ``floor(floor * original width) + 1`` channels. With ``multiples`` (``{group: channel multiple}``, e.g.
    from :func:`resolve_round_to`), each group's count is then rounded to its nearest multiple (at least its
    floor's, at most its width), keeping its best-scored channels: the total moves by at most half a multiple
    per group. Returns ``(kept indices per group that loses channels, channels kept in all)``; the count is
    above ``target_keep`` when the floors forbid more removal.
    """
    floors = {k: math.floor(floor * int(original_sizes.get(k, len(s)))) + 1 for k, s in scores.items()}
    alive = sum(len(s) for s in scores.values())
    keep = allocate_global_count(scores, max(0, alive - int(target_keep)), floors)
    if multiples:
        keep = _snap_counts(scores, keep, floors, multiples)
    kept = alive - sum(len(scores[k]) - len(idx) for k, idx in keep.items())
    return keep, kept


def _snap_counts(scores: dict[str, torch.Tensor], keep: dict[str, torch.Tensor], floors: dict[str, int],
                 multiples: dict[str, int]) -> dict[str, torch.Tensor]:
    """Each group's kept count rounded to its multiple, the best-scored channels kept (sorted indices)."""
    out: dict[str, torch.Tensor] = {}
    for key, s in scores.items():
        n = len(s)
        count = len(keep[key]) if key in keep else n
        target = _snap(count, min(n, max(1, floors.get(key, 1))), n, max(1, int(multiples.get(key, 1))))
        if target >= n:
            continue
        if target == count:
            out[key] = keep[key]
            continue
        order = torch.argsort(torch.as_tensor(s, dtype=torch.float64).flatten().cpu(), descending=True, stable=True)
        out[key] = order[:target].sort().values
    return out
