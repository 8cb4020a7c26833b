"""Low-rank factorisation of conv / linear layers: **svd**, **pca** and **lrank**.

Each method replaces a layer ``y = W x + b`` by a chain ``core`` (``r`` filters, the layer's own
kernel / stride / padding) followed by a 1x1 conv / linear ``post`` (``out x r``) carrying the bias
(:class:`~prunekit.surgery.plan.LowRankFactors`). A conv weight is read as the matrix
``(out, in * kh * kw)``. A layer is factored only when its factors have fewer weights than it.

* **svd** (data-free): truncated SVD of the weight, ``core = S_r V_r^T``, ``post = U_r``; each
  layer keeps the fewest singular values holding a fraction ``tau`` of its energy
  ``sum sigma^2``, with one ``tau`` for the whole network chosen by bisection to meet the target.
* **pca** (data-driven, no labels): the top-``r`` principal directions ``U_r`` of the layer's
  outputs (pre-activation, rows = samples x positions) on the prune set; ``core = U_r^T W``,
  ``post = U_r`` and ``bias = mu + U_r U_r^T (b - mu)`` (``mu`` = mean output), which reproduces
  ``mu + U_r U_r^T (y - mu)``. Ranks from one global explained-variance threshold (bisection).
* **lrank** (Idelbayev & Carreira-Perpinan, "Low-rank compression of neural nets: learning the
  rank of each layer", CVPR 2020): the LC algorithm. L step: a few SGD steps on the loss plus
  ``mu/2 ||W - Theta||^2``; C step: per layer the rank minimising
  ``lam * cost(r) + mu/2 sum_{i>r} sigma_i^2`` (closed form from the singular values), ``Theta``
  the rank-``r`` SVD of ``W``; ``mu`` grows geometrically. Unless ``lam`` is given it is set by
  bisection at every C step so that the chosen ranks meet the target. The result is the last
  C step's factors, with the other parameters as trained by the L steps.

**Which side** (option ``side`` of svd and pca): a ``k x k`` convolution can also be factored on its
input side, a 1x1 ``pre`` (``r x in``) then ``core`` (``out x r``, the layer's kernel): svd takes the
truncated SVD of the weight read as ``(out * kh * kw, in)``, pca the top-``r`` principal directions
``P_r`` of the layer's *input* channels (second moment over samples x positions; ``pre = P_r^T``,
``core = W P_r``, the bias unchanged). Both sides have the same multiply-adds at stride 1 with
``in = out``, but not the same speed: the runtimes' blocked kernels pad a conv's output channels to
whole SIMD blocks and read fewer input channels directly, so a rank below one block is cheap as the
core's input and costs a whole block as its output. ``side="auto"`` (the default) takes the input side
for ``k x k`` convolutions where the latency model (``aligned_ranks``) says its chain is faster, the
output side otherwise; linear layers and 1x1 convs are always factored on the output side.

Targets: ``params=X`` (default kind), ``flops=X`` (costs are multiply-adds), ``ratio=F`` (keep
``1 - F`` of the parameters, or of ``target_kind``); option ``keep_ratio`` (fraction of the
parameters to keep) overrides the target. The classifier (the layers producing the model's
outputs) is left alone unless ``BudgetOptions.ignored`` says otherwise.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from prunekit.errors import PruningError
from prunekit.methods.base import Method, PruneContext
from prunekit.methods.interpolative import cost_goal, measured_costs
from prunekit.methods.options import OptionType
from prunekit.methods.registry import register_method
from prunekit.surgery.allocate import latency_mode
from prunekit.surgery.cost import (
    LayerLatency,
    LayerShape,
    aligned_rank,
    chain_latency,
    proxy_layer_latency,
    rank_multiple,
)
from prunekit.surgery.graph import PruningWarning
from prunekit.surgery.plan import LowRankFactors, Plan


# --------------------------------------------------------------------------------------------- layers
@dataclass
class _Layer:
    """One factorisable layer and how its cost depends on the rank.

    Costs are counted the way :func:`prunekit.prune` measures them: non-zero parameters and
    multiply-adds of non-zero weights (``nonzero``: the weight's non-zero entries; the factors are
    dense). ``lrank`` trains every weight first, so it counts the layer as dense.
    """

    path: str
    out: int  # rows of the weight matrix
    cols: int  # in * kh * kw
    uses: float  # multiply-adds per weight entry per example
    has_bias: bool
    nonzero: int  # non-zero weight entries now
    zero_bias: int = 0  # zero entries of the bias now
    adds_bias: bool = False  # the factor chain gets a (non-zero) bias of its own (pca: the mean)
    spectrum: torch.Tensor | None = None  # descending energies (sigma^2 or PCA eigenvalues)
    shape: LayerShape | None = None  # channels and kernel taps, for the latency check of its chains
    latency: LayerLatency | None = None  # the shared cost model's layer latency (None: ranks as they come)
    multiple: int = 1  # ranks are multiples of this (the runtime's rank step) when ``latency`` is set
    side: str = "output"  # "output": core (in -> r, the kernel) + 1x1 post; "input": 1x1 pre + core (r -> out)
    cin: int = 0  # input channels (``cols = cin * taps``)
    stride_area: float = 1.0  # input positions per output position (the input side's 1x1 runs on the input)

    @property
    def taps(self) -> int:
        return self.cols // self.cin if self.cin else 1

    @property
    def full_rank(self) -> int:
        return min(self.out * self.taps, self.cin) if self.side == "input" else min(self.out, self.cols)

    @property
    def per_rank(self) -> int:
        """Weights of the chain per unit of rank."""
        return self.cin + self.out * self.taps if self.side == "input" else self.cols + self.out

    @property
    def per_rank_macs(self) -> float:
        """Multiply-adds of the chain per unit of rank, per example."""
        if self.side == "input":
            return (self.cin * self.stride_area + self.out * self.taps) * self.uses
        return (self.cols + self.out) * self.uses

    @property
    def dense(self) -> int:
        return self.out * self.cols

    @property
    def _new_bias(self) -> int:
        """Bias entries the chain adds (pca's mean correction on a layer without bias)."""
        return self.out if self.adds_bias and not self.has_bias else 0

    def factored(self, r: int | None) -> bool:
        """Whether the rank-``r`` chain has fewer parameters than the layer (``None``: kept dense)."""
        return r is not None and r * self.per_rank + self._new_bias < self.dense

    def aligned(self, r: int) -> int | None:
        """The rank the layer is factorised at instead of ``r``: with a latency model, ``r`` rounded up to the
        rank multiple, or None (kept dense) where that chain is not faster than the dense layer
        (:func:`~prunekit.surgery.cost.aligned_rank`); without one, ``r`` itself."""
        if self.latency is None or self.shape is None:
            return r
        ra = aligned_rank(self.shape, r, self.latency, self.multiple, self.max_useful_rank(),
                          pre=self.side == "input")
        return ra if ra is not None and self.factored(ra) else None

    def rank_options(self) -> list[int]:
        """The ranks the layer may be factorised at (ascending)."""
        useful = self.max_useful_rank()
        if self.latency is None or self.shape is None:
            return list(range(1, useful + 1))
        return sorted({r for r in (self.aligned(q) for q in range(1, useful + 1)) if r is not None})

    def max_useful_rank(self) -> int:
        """Largest rank whose chain is smaller than the layer (0: never worth it)."""
        return max(0, (self.dense - self._new_bias - 1) // self.per_rank)

    def cost(self, r: int | None, kind: str) -> float:
        """Parameters or multiply-adds of the layer at rank ``r`` (``None`` or a useless rank: as it is)."""
        if r is None or not self.factored(r):
            return float(self.nonzero * self.uses if kind == "flops" else self.nonzero)
        if kind == "flops":
            return r * self.per_rank_macs
        n = r * self.per_rank
        extra = 0
        if self.adds_bias:
            extra = self.zero_bias if self.has_bias else self.out
        return float(n + extra)

    def rank_for_energy(self, tau: float) -> int:
        """Fewest components holding a fraction ``tau`` of the energy (at least 1)."""
        assert self.spectrum is not None
        total = float(self.spectrum.sum())
        if total <= 0:
            return 1
        cum = torch.cumsum(self.spectrum, 0) / total
        r = int(torch.searchsorted(cum, torch.tensor(tau, dtype=cum.dtype) - 1e-12).item()) + 1
        return max(1, min(r, len(self.spectrum)))

    def rank_at(self, tau: float) -> int | None:
        """The rank the layer gets at energy threshold ``tau`` (None: kept dense)."""
        return self.aligned(self.rank_for_energy(tau))


def _eligible(model: nn.Module, ctx: PruneContext, method: str, dense: bool = False,
              aligned: bool = False, side: str = "output") -> tuple[list[_Layer], Any]:
    """Conv2d (groups = 1) and Linear layers that may be factored, with their per-entry costs.

    ``aligned`` (the ``aligned_ranks`` option): ranks in the runtime's channel blocks, and a layer factored
    only where the cost model says the chain is faster than the dense layer (unless ``latency_aware`` is off).
    ``side``: which side ``k x k`` convolutions are factored on (:func:`_side_of`).
    """
    if side not in ("auto", "output", "input"):
        raise PruningError(f"method {method!r}: side must be 'auto', 'output' or 'input', got {side!r}")
    from prunekit.surgery.graph import analyze

    graph = ctx.graph
    if graph is None:
        graph = analyze(model, ctx.input_shape, ignored=ctx.budget.ignored, warn=False)
        ctx.graph = graph
    ignored = set(ctx.budget.ignored) if ctx.budget.ignored is not None else set(graph.output_layers)
    uses = {t.path[: -len(".weight")]: t.macs_per_entry for t in graph.cost.tensors if t.path.endswith(".weight")}
    latency = proxy_layer_latency() if aligned and latency_mode(ctx.budget.latency_aware) != "off" else None
    layers = []
    for path, m in model.named_modules():
        if path in ignored or any(path.startswith(f"{i}.") for i in ignored):
            continue
        if isinstance(m, nn.Conv2d) and m.groups == 1 or isinstance(m, nn.Linear):
            if path not in uses or uses[path] == 0:
                continue  # not used in the forward pass
            w = m.weight.detach()
            nonzero = w.numel() if dense else int(torch.count_nonzero(w))
            zero_bias = 0 if m.bias is None or dense else int(m.bias.numel() - torch.count_nonzero(m.bias))
            taps = int(w[0, 0].numel()) if w.dim() > 2 else 1
            stride = math.prod(m.stride) if isinstance(m, nn.Conv2d) else 1
            layer = _Layer(path, int(w.shape[0]), int(w[0].numel()), float(uses[path]), m.bias is not None, nonzero,
                           zero_bias, cin=int(w.shape[1]), stride_area=float(stride))
            shape = LayerShape(int(w.shape[1]), int(w.shape[0]), taps, stride)
            if latency is not None:
                layer.shape, layer.latency, layer.multiple = shape, latency, rank_multiple()
            layer.side = _side_of(shape, side, latency)
            if layer.max_useful_rank() >= 1:
                layers.append(layer)
    if not layers:
        raise PruningError(f"method {method!r} found no conv / linear layer whose factorisation would be smaller")
    return layers, graph


def _side_of(shape: LayerShape, side: str, latency: LayerLatency | None) -> str:
    """The side a layer is factored on: ``"output"`` for linear layers and 1x1 convs; for a ``k x k`` conv
    ``side`` itself, or with ``"auto"`` the input side where the latency model says its chain is faster at the
    rank multiple (the output side without a latency model)."""
    if shape.taps == 1 or side == "output":
        return "output"
    if side == "input":
        return "input"
    if latency is None:
        return "output"
    r = rank_multiple()
    faster = chain_latency(shape, r, latency, pre=True) < chain_latency(shape, r, latency, pre=False)
    return "input" if faster else "output"


def _goal(model: nn.Module, ctx: PruneContext, graph: Any, keep_ratio: float | None, target_kind: str | None,
          method: str, dense: bool = False) -> tuple[str, float, float]:
    """``(cost kind, cost to reach, cost now)``, relative to the model's measured (non-zero) cost; with
    ``dense`` the cost now is the dense count and the goal is scaled to it."""
    measured = measured_costs(model, ctx.input_shape)
    kind, goal = _goal_of(measured, ctx, keep_ratio, target_kind, method)
    if not dense:
        return kind, goal, measured[kind]
    now = float(graph.cost.base_flops if kind == "flops" else graph.cost.base_params)
    return kind, goal * now / max(measured[kind], 1.0), now


def _goal_of(base: dict[str, float], ctx: PruneContext, keep_ratio: float | None, target_kind: str | None,
             method: str) -> tuple[str, float]:
    if keep_ratio is not None:
        if not 0 < float(keep_ratio) < 1:
            raise PruningError(f"method {method!r}: keep_ratio must be in (0, 1), got {keep_ratio}")
        kind = target_kind or "params"
        return kind, base[kind] * float(keep_ratio)
    return cost_goal(ctx.target, base, target_kind, method, default_kind="params")


def _total(layers: list[_Layer], ranks: dict[str, int | None], kind: str, base: float) -> float:
    """Model cost when every layer is at its rank (``base``: the model's full cost)."""
    return base - sum(l.cost(None, kind) - l.cost(ranks[l.path], kind) for l in layers)


def _bisect_threshold(layers: list[_Layer], kind: str, base: float, goal: float,
                      method: str) -> tuple[float, dict[str, int]]:
    """The largest global energy threshold whose ranks meet ``goal``."""

    def ranks_at(tau: float) -> dict[str, int | None]:
        return {l.path: l.rank_at(tau) for l in layers}

    lowest = _total(layers, {l.path: min(l.rank_options(), default=None) for l in layers}, kind, base)
    if lowest > goal and any(l.latency is not None for l in layers):
        warnings.warn(f"method {method!r}: the target needs chains the latency model says are not faster than the "
                      "layers they replace; ranks are chosen without it", PruningWarning, stacklevel=3)
        for l in layers:
            l.latency = None
        return _bisect_threshold(layers, kind, base, goal, method)
    if lowest > goal:
        raise PruningError(f"method {method!r} cannot reach the target: with every factorisable layer at rank 1 "
                           f"the model still has {lowest:.4g} {kind} (goal {goal:.4g}); the other layers are too "
                           "large")
    lo, hi = 0.0, 1.0
    if _total(layers, ranks_at(hi), kind, base) <= goal:
        return hi, ranks_at(hi)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _total(layers, ranks_at(mid), kind, base) <= goal:
            lo = mid
        else:
            hi = mid
    return lo, ranks_at(lo)


def _matrix(layer: nn.Module, side: str = "output") -> torch.Tensor:
    """The weight as a matrix: ``(out, in * kh * kw)``, or on the input side ``(out * kh * kw, in)``."""
    w = layer.weight.detach()
    if side == "input":
        return w.movedim(1, -1).reshape(-1, w.shape[1]).double()
    return w.reshape(w.shape[0], -1).double()


def _input_side_factors(layer: nn.Module, pre: torch.Tensor, bias: torch.Tensor | None) -> LowRankFactors:
    """Input-side factors from an orthonormal ``pre`` (``r x in``, float64): ``core = W pre^T`` (the weight with
    its input channels projected onto ``pre``'s rows)."""
    w = layer.weight.detach()
    core = torch.einsum("oi...,ri->or...", w.double(), pre.to(w.device))
    return LowRankFactors(core=core.to(w.dtype).contiguous(), pre=pre.to(w.device, w.dtype).contiguous(),
                          bias=None if bias is None else bias.detach().clone())


def _core_shape(layer: nn.Module, r: int) -> tuple[int, ...]:
    return (r, *layer.weight.shape[1:])


def _svd_factors(layer: nn.Module, r: int, bias: torch.Tensor | None, side: str = "output") -> LowRankFactors:
    """Rank-``r`` truncated SVD of a layer: ``core = S_r V_r^T`` (reshaped to a kernel), ``post = U_r``; on the
    input side ``pre = V_r^T`` and ``core = U_r S_r`` (of the ``(out * kh * kw, in)`` matrix)."""
    if side == "input":
        _, _, vh = torch.linalg.svd(_matrix(layer, "input"), full_matrices=False)
        return _input_side_factors(layer, vh[:r], bias)
    u, s, vh = torch.linalg.svd(_matrix(layer), full_matrices=False)
    dtype = layer.weight.dtype
    core = (s[:r, None] * vh[:r]).reshape(_core_shape(layer, r)).to(dtype)
    return LowRankFactors(core=core, post=u[:, :r].to(dtype).contiguous(),
                          bias=None if bias is None else bias.detach().clone())


def _plan_meta(layers: list[_Layer], ranks: dict[str, int], kind: str, base: float, goal: float,
               extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "ranks": {l.path: [ranks[l.path], l.full_rank] for l in layers if l.factored(ranks[l.path])},
        "input_side": sorted(l.path for l in layers if l.side == "input" and l.factored(ranks[l.path])),
        "rank_multiple": max((l.multiple for l in layers if l.latency is not None), default=1),
        "kept_dense": sorted(l.path for l in layers if not l.factored(ranks[l.path])),
        "predicted": {kind: _total(layers, ranks, kind, base)},
        "goal": {kind: goal},
        **extra,
    }


class _LowRankBase(Method):
    defaults: dict[str, Any] = {"keep_ratio": None, "target_kind": None, "aligned_ranks": False}
    option_help = {"aligned_ranks": "ranks in multiples of the runtime's channel block and a layer factored only "
                                    "where the chain is faster (deployed speed; ResNet-20 svd flops=2 in ONNX "
                                    "Runtime: 1.60x at 55 % top-1 with side='auto', see BENCHMARKS.md)"}


_SIDE = {"side": OptionType("str", choices=("auto", "output", "input"),
                            help="factor k x k convs on the output side (core + 1x1 post), the input side (1x1 pre "
                                 "+ core) or, auto, the input side where the latency model says it is faster")}


# --------------------------------------------------------------------------------------------- svd
@register_method("svd", granularity="lowrank", family="lowrank",
                 description="Truncated SVD of each weight at one global energy threshold (data-free).")
class SVD(_LowRankBase):
    """Plain weight SVD; the global energy threshold is bisected to meet the target."""

    defaults = {**_LowRankBase.defaults, "side": "auto"}
    option_types = dict(_SIDE)

    def plan(self, model: nn.Module, ctx: PruneContext) -> Plan:
        t0 = time.perf_counter()
        layers, graph = _eligible(model, ctx, self.name, aligned=bool(self.aligned_ranks), side=str(self.side))
        kind, goal, base = _goal(model, ctx, graph, self.keep_ratio, self.target_kind, self.name)
        for l in layers:
            l.spectrum = torch.linalg.svdvals(_matrix(model.get_submodule(l.path), l.side)) ** 2
        tau, ranks = _bisect_threshold(layers, kind, base, goal, self.name)
        lowrank = {}
        for l in layers:
            if l.factored(ranks[l.path]):
                mod = model.get_submodule(l.path)
                lowrank[l.path] = _svd_factors(mod, ranks[l.path], mod.bias, l.side)
        meta = _plan_meta(layers, ranks, kind, base, goal, {"threshold": tau,
                                                            "time_s": round(time.perf_counter() - t0, 3)})
        return Plan(method=self.name, lowrank=lowrank, meta=meta)


# --------------------------------------------------------------------------------------------- pca
def _output_moments(model: nn.Module, paths: list[str], batches: Callable[[], Any],
                    inputs: frozenset[str] = frozenset()) -> dict[str, tuple]:
    """``(count, mean, covariance)`` (float64) of every layer's output channels over the prune set; for the
    layers in ``inputs``, of its input channels instead."""
    sums: dict[str, torch.Tensor] = {}
    grams: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {p: 0 for p in paths}
    handles = []

    def make(path: str, linear: bool) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor | None = None) -> None:
            y = (args[0] if out is None else out).detach()
            y = y.reshape(-1, y.shape[-1]) if linear else y.movedim(1, -1).reshape(-1, y.shape[1])
            y = y.double()
            if path not in sums:
                sums[path] = torch.zeros(y.shape[1], dtype=torch.float64, device=y.device)
                grams[path] = torch.zeros(y.shape[1], y.shape[1], dtype=torch.float64, device=y.device)
            sums[path] += y.sum(0)
            grams[path] += y.T @ y
            counts[path] += y.shape[0]
        return hook

    for p in paths:
        mod = model.get_submodule(p)
        hook = make(p, isinstance(mod, nn.Linear))
        handles.append(mod.register_forward_pre_hook(hook) if p in inputs else mod.register_forward_hook(hook))
    training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for x, _ in batches():
                model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    out = {}
    for p in paths:
        n = counts[p]
        if n == 0:
            continue
        mean = sums[p] / n
        cov = grams[p] / n - torch.outer(mean, mean)
        out[p] = (n, mean.cpu(), cov.cpu())
    return out


@register_method("pca", granularity="lowrank", needs_data=True, needs_labels=False, family="lowrank",
                 description="Top principal directions of each layer's outputs on the prune set, one global "
                             "explained-variance threshold (no labels).")
class PCA(_LowRankBase):
    """Data-driven low rank: ``W -> U_r (U_r^T W)`` with the output mean restored by the bias; on the input
    side ``W -> (W P_r) P_r^T`` with ``P_r`` the top principal directions of the input's second moment (not
    centred: zero padding stays zero, and the bias needs no correction).

    Options: ``samples`` (prune-set size, 5000), ``keep_ratio``, ``target_kind``, ``side``.
    """

    defaults = {**_LowRankBase.defaults, "samples": 5000, "side": "auto"}
    option_types = dict(_SIDE)

    def plan(self, model: nn.Module, ctx: PruneContext) -> Plan:
        t0 = time.perf_counter()
        self.check(ctx)
        layers, graph = _eligible(model, ctx, self.name, aligned=bool(self.aligned_ranks), side=str(self.side))
        kind, goal, base = _goal(model, ctx, graph, self.keep_ratio, self.target_kind, self.name)
        inputs = frozenset(l.path for l in layers if l.side == "input")
        moments = _output_moments(model, [l.path for l in layers], lambda: ctx.batches(int(self.samples)), inputs)
        if not moments:
            raise PruningError("method 'pca' saw no examples: the prune set is empty")
        layers = [l for l in layers if l.path in moments]
        bases = {}
        for l in layers:
            n, mean, cov = moments[l.path]
            if l.side == "input":  # the second moment: directions of the input itself, not of its spread
                cov = cov + torch.outer(mean, mean)
            evals, evecs = torch.linalg.eigh(cov)
            evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
            l.spectrum = evals
            l.adds_bias = l.side == "output"  # the output-side chain restores the output mean with a bias
            bases[l.path] = evecs
        tau, ranks = _bisect_threshold(layers, kind, base, goal, self.name)
        lowrank = {}
        for l in layers:
            r = ranks[l.path]
            if not l.factored(r):
                continue
            mod = model.get_submodule(l.path)
            if l.side == "input":
                lowrank[l.path] = _input_side_factors(mod, bases[l.path][:, :r].T, mod.bias)
                continue
            u = bases[l.path][:, :r]  # (out, r) float64
            mean = moments[l.path][1]
            core = (u.T @ _matrix(mod)).reshape(_core_shape(mod, r))
            b = mod.bias.detach().double().cpu() if mod.bias is not None else torch.zeros(l.out, dtype=torch.float64)
            bias = mean + u @ (u.T @ (b - mean))
            dtype, dev = mod.weight.dtype, mod.weight.device
            lowrank[l.path] = LowRankFactors(core=core.to(dev, dtype), post=u.to(dev, dtype).contiguous(),
                                             bias=bias.to(dev, dtype))
        explained = {l.path: float(l.spectrum[: ranks[l.path]].sum() / l.spectrum.sum().clamp_min(1e-300))
                     for l in layers if l.factored(ranks[l.path])}
        meta = _plan_meta(layers, ranks, kind, base, goal, {
            "threshold": tau, "explained_variance": explained,
            "samples": int(next(iter(moments.values()))[0]), "time_s": round(time.perf_counter() - t0, 3)})
        return Plan(method=self.name, lowrank=lowrank, meta=meta)


# --------------------------------------------------------------------------------------------- lrank
def _c_step(layers: list[_Layer], sigmas: dict[str, torch.Tensor], mu: float, lam: float, kind: str) -> dict[str, int]:
    """Per layer: the rank minimising ``lam * cost(r) + mu/2 * sum_{i>r} sigma_i^2`` (full rank = dense)."""
    ranks = {}
    for l in layers:
        s2 = sigmas[l.path] ** 2
        full = len(s2)
        tail = torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0])  # tail[i] = sum_{j >= i} s2_j
        tail = torch.cat([tail, tail.new_zeros(1)])
        cand = [r for r in l.rank_options() if r <= full] + [full]
        obj = [lam * l.cost(r, kind) + 0.5 * mu * float(tail[r]) for r in cand]
        ranks[l.path] = cand[min(range(len(cand)), key=obj.__getitem__)]
    return ranks


def _lambda_for(layers: list[_Layer], sigmas: dict[str, torch.Tensor], mu: float, kind: str, base: float,
                goal: float) -> tuple[float, dict[str, int]]:
    """Smallest ``lam`` (log-bisection) whose C-step ranks meet ``goal``."""
    lo, hi = 1e-16, 1.0
    while _total(layers, _c_step(layers, sigmas, mu, hi, kind), kind, base) > goal:
        hi *= 10
        if hi > 1e16:
            ranks = {l.path: 1 for l in layers}
            return hi, ranks
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        if _total(layers, _c_step(layers, sigmas, mu, mid, kind), kind, base) <= goal:
            hi = mid
        else:
            lo = mid
    return hi, _c_step(layers, sigmas, mu, hi, kind)


@register_method("lrank", granularity="lowrank", needs_data=True, needs_grad=True, family="lowrank",
                 paper="Idelbayev & Carreira-Perpinan, Low-rank compression of neural nets: learning the rank of "
                       "each layer, CVPR 2020",
                 description="LC algorithm: alternate penalised training (L step) and per-layer rank selection "
                             "with the SVD (C step), learning each layer's rank.")
class LRank(_LowRankBase):
    """Learning the rank of each layer with the LC algorithm.

    Options: ``steps`` (LC iterations, 5), ``mu0`` (1e-3), ``mu_growth`` (4: ``mu_j = mu0 * growth^j``),
    ``lam`` (None: bisected at every C step to meet the target), ``l_steps`` (SGD minibatches per
    L step, 20), ``lr`` (1e-3, ``momentum`` 0.9, gradient norm clipped at ``clip`` = 5; minibatches
    with a non-finite loss are skipped; a trained ResNet-20 with frozen BatchNorm already drifts at
    lr 3e-3), ``keep_ratio``, ``target_kind``. BatchNorm statistics are frozen during the L steps
    (eval mode); every other parameter trains.
    """

    defaults = {**_LowRankBase.defaults, "steps": 5, "mu0": 1e-3, "mu_growth": 4.0, "lam": None, "l_steps": 20,
                "lr": 1e-3, "momentum": 0.9, "clip": 5.0}

    def plan(self, model: nn.Module, ctx: PruneContext) -> Plan:
        t0 = time.perf_counter()
        self.check(ctx)
        # dense: training makes every weight non-zero
        layers, graph = _eligible(model, ctx, self.name, dense=True, aligned=bool(self.aligned_ranks))
        kind, goal, base = _goal(model, ctx, graph, self.keep_ratio, self.target_kind, self.name, dense=True)
        work = copy.deepcopy(model)
        work.eval()
        mods = {l.path: work.get_submodule(l.path) for l in layers}
        params = [p for p in work.parameters() if p.is_floating_point()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.SGD(params, lr=float(self.lr), momentum=float(self.momentum))
        data = _cycle(ctx)
        history = []
        skipped = 0
        thetas: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        lam = self.lam
        for j in range(int(self.steps)):
            mu = float(self.mu0) * float(self.mu_growth) ** j
            if j > 0:  # L step (the first C step projects the trained model directly)
                loss_sum = 0.0
                for _ in range(int(self.l_steps)):
                    x, y = next(data)
                    opt.zero_grad(set_to_none=True)
                    loss = ctx.loss(work(x), y)
                    pen = sum(((mods[p].weight - thetas[p]) ** 2).sum() for p in thetas)
                    total = loss + 0.5 * mu * pen
                    if not torch.isfinite(total):
                        skipped += 1  # a diverging minibatch (e.g. an untrained deep net): no update
                        continue
                    total.backward()
                    torch.nn.utils.clip_grad_norm_(params, float(self.clip))
                    opt.step()
                    loss_sum += float(loss)
                history.append({"step": j, "mu": mu, "loss": loss_sum / max(1, int(self.l_steps))})
            # C step
            if not all(torch.isfinite(m.weight).all() for m in mods.values()):
                raise PruningError("method 'lrank': the L step diverged (non-finite weights); lower lr or mu0")
            sigmas = {p: torch.linalg.svdvals(_matrix(m)) for p, m in mods.items()}
            if self.lam is None:
                lam, ranks = _lambda_for(layers, sigmas, mu, kind, base, goal)
            else:
                ranks = _c_step(layers, sigmas, mu, float(self.lam), kind)
            thetas = {}
            for l in layers:
                m = mods[l.path]
                f = _svd_factors(m, ranks[l.path], None) if l.factored(ranks[l.path]) else None
                thetas[l.path] = (f.dense_weight().reshape(m.weight.shape) if f is not None
                                  else m.weight.detach().clone())
            if history:
                history[-1].update(lam=lam, ranks=dict(ranks))
        for p in params:
            p.requires_grad_(False)
        achieved = _total(layers, ranks, kind, base)
        if achieved > goal * (1 + 1e-9):
            raise PruningError(f"method 'lrank' with lam={self.lam} ends at {achieved:.4g} {kind}, above the goal "
                               f"{goal:.4g}; leave lam unset to tune it to the target")
        lowrank = {}
        factored = set()
        for l in layers:
            if l.factored(ranks[l.path]):
                m = mods[l.path]
                lowrank[l.path] = _svd_factors(m, ranks[l.path], m.bias)
                factored.update({f"{l.path}.weight", f"{l.path}.bias"})
        weights = {n: p.detach().clone() for n, p in work.named_parameters() if n not in factored}
        meta = _plan_meta(layers, ranks, kind, base, goal, {"lam": lam, "history": history, "skipped_steps": skipped,
                                                            "time_s": round(time.perf_counter() - t0, 3)})
        return Plan(method=self.name, lowrank=lowrank, weights=weights, meta=meta)


def _cycle(ctx: PruneContext) -> Any:
    """Endless minibatches of the prune set."""
    while True:
        seen = False
        for x, y in ctx.batches():
            seen = True
            yield x, y
        if not seen:
            raise PruningError("method 'lrank' needs a labelled prune set; the data is empty")


__all__ = ["LRank", "PCA", "SVD"]
