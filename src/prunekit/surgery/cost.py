"""The cost model of a channel graph: dense multiply-adds, parameters and a CPU latency proxy of any
assignment of group widths, without building the pruned model (:class:`CostModel`), and how it is built
from the graph's member table and one counted forward pass (:func:`build_cost_model`)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from prunekit.surgery.groups import ChannelGroup


@dataclass
class TensorCost:
    """How the size of one parameter (and the multiply-adds of its layer) depends on group widths."""

    path: str
    shape: tuple[int, ...]
    dims: dict[int, tuple[int, list[tuple[str, int]]]]  # dim -> (fixed part, [(group key, per channel)])
    macs_per_entry: float = 0.0  # multiply-adds per weight entry per example (conv / linear weights)
    is_param: bool = True

    def sizes(self, widths: dict[str, int]) -> list[float]:
        """The tensor's shape under ``widths``."""
        out = []
        for d, s in enumerate(self.shape):
            if d in self.dims:
                fixed, terms = self.dims[d]
                s = fixed + sum(e * widths[k] for k, e in terms)
            out.append(s)
        return out

    def numel(self, widths: dict[str, int]) -> float:
        return float(math.prod(self.sizes(widths)))


# latency proxy (CostModel.latency): CPU convolution kernels (oneDNN) compute output channels in SIMD
# blocks and read input channels in blocks of the same size (half a block when a layer has fewer input
# channels than one block), so a partial block costs a whole one; every activation element read or
# written by a conv / linear layer costs about LATENCY_PER_ELEMENT multiply-adds of memory-bound work
# (batch norm, ReLU, residual add, layout reorders). Measured on a 2-core AVX-512 machine (batch 64,
# 2 threads): a 3x3 conv costs the same for 9..16 output channels and for 17..32 input channels, 8 input
# channels cost half of 16; batch norm + ReLU (+ add) cost 25-85 multiply-add times per element.
LATENCY_PER_ELEMENT = 32.0


@functools.cache
def cpu_block() -> int:
    """Channels per SIMD block of this CPU's float32 kernels: 16 with AVX-512, 8 otherwise (AVX2, NEON)."""
    try:
        cap = str(torch.backends.cpu.get_cpu_capability()).upper()
    except Exception:  # pragma: no cover - very old torch
        return 8
    return 16 if "AVX512" in cap else 8


def _align(n: float, block: int, partial: bool) -> float:
    """``n`` channels rounded up to whole blocks; with ``partial``, fewer than one block round up to half
    a block (kernels for few input channels use half-width blocks)."""
    if block <= 1 or n <= 0:
        return n
    if partial and n < block:
        half = block // 2
        return -(-n // half) * half
    return -(-n // block) * block


class CostModel:
    """Predicts dense multiply-adds (per example) and parameter counts of any width assignment.

    ``flops(widths)`` / ``params(widths)`` take ``{group key: kept channels}`` (missing groups keep
    their full size). Costs not attributable to a prunable group are a constant measured on the
    unpruned model, so predictions at full width equal the measured counts.
    """

    def __init__(
        self,
        tensors: list[TensorCost],
        sizes: dict[str, int],
        flops: int,
        params: int,
        extra: list[tuple[str, float]],
    ):
        self.tensors = tensors
        self.sizes = dict(sizes)
        self.extra = (
            extra  # (group key, multiply-adds per kept channel) not tied to a weight (attention matmuls)
        )
        full = self.sizes
        self.base_flops = int(flops)
        self.base_params = int(params)
        self._const_flops = (
            flops
            - sum(t.macs_per_entry * t.numel(full) for t in tensors)
            - sum(c * full[k] for k, c in extra)
        )
        self._const_params = params - sum(t.numel(full) for t in tensors if t.is_param)
        self._flop_tensors = [t for t in tensors if t.macs_per_entry and t.dims]
        self._flop_fixed = sum(
            t.macs_per_entry * t.numel(full) for t in tensors if t.macs_per_entry and not t.dims
        )
        self._param_tensors = [t for t in tensors if t.is_param and t.dims]
        self._mac_tensors = [t for t in tensors if t.macs_per_entry and len(t.shape) >= 2]
        self._param_fixed = sum(t.numel(full) for t in tensors if t.is_param and not t.dims)

    def _full(self, widths: dict[str, int] | None) -> dict[str, int]:
        return {**self.sizes, **(widths or {})}

    def flops(self, widths: dict[str, int] | None = None) -> float:
        w = self._full(widths)
        return (
            self._const_flops
            + self._flop_fixed
            + sum(t.macs_per_entry * t.numel(w) for t in self._flop_tensors)
            + sum(c * w[k] for k, c in self.extra)
        )

    def params(self, widths: dict[str, int] | None = None) -> float:
        w = self._full(widths)
        return self._const_params + self._param_fixed + sum(t.numel(w) for t in self._param_tensors)

    def layer_latency(
        self, t: TensorCost, w: dict[str, int], block: int | None = None, per_element: float = LATENCY_PER_ELEMENT
    ) -> float:
        """The latency proxy of one conv / linear weight ``t`` (see :meth:`latency`) under full widths ``w``."""
        block = cpu_block() if block is None else int(block)
        sizes = t.sizes(w)
        out = sizes[0]
        cin = sizes[1] if len(sizes) > 1 else 0
        # input channels are blocked too, except for depthwise / grouped kernels with one input per group
        cin_aligned = _align(cin, block, partial=True) if cin > 1 else cin
        rest = math.prod(sizes[2:]) if len(sizes) > 2 else 1
        out_aligned = _align(out, block, partial=False)
        # blocked layouts store (and normalise, add, reorder) whole blocks: the memory-bound work is aligned too
        return t.macs_per_entry * (out_aligned * cin_aligned * rest + per_element * (out_aligned + cin_aligned))

    def latency(
        self, widths: dict[str, int] | None = None, block: int | None = None, per_element: float = LATENCY_PER_ELEMENT
    ) -> float:
        """A CPU latency proxy (per example, in multiply-add equivalents) of a width assignment.

        Per conv / linear layer: its multiply-adds with the output channels rounded up to a multiple of
        ``block`` (default :func:`cpu_block`: 16 floats per SIMD register with AVX-512, 8 with AVX2; a
        partial block costs a full one) and the input channels rounded up likewise (to half a block when
        there are fewer than ``block``), plus ``per_element`` for every element of its input and output
        activations, counted in whole blocks too (blocked layouts store whole blocks): memory-bound work that
        does not shrink with multiply-adds (normalisation, activation functions, residual additions, layout
        reorders). Only relative values matter.
        """
        w = self._full(widths)
        return sum(self.layer_latency(t, w, block, per_element) for t in self._mac_tensors)

    def latency_tensors(self) -> list[TensorCost]:
        """The conv / linear weights the latency proxy sums over."""
        return list(self._mac_tensors)


# --------------------------------------------------------------------------------------------- low-rank chains
@dataclass(frozen=True)
class LayerShape:
    """One conv / linear layer as the latency proxy sees it: channels, kernel taps and the stride of its
    input relative to its output (a 1x1 projection in front of a strided conv runs at the input's
    resolution: ``stride_area`` times as many positions as the conv's output)."""

    cin: int
    cout: int
    taps: int = 1  # kernel elements (kh * kw); 1 for a linear layer
    stride_area: int = 1  # input positions per output position


# a layer latency function: (cin, cout, taps, positions per output position) -> cost in any fixed unit
LayerLatency = Callable[[int, int, int, float], float]


def proxy_layer_latency(block: int | None = None, per_element: float = LATENCY_PER_ELEMENT) -> LayerLatency:
    """The analytic proxy of :meth:`CostModel.layer_latency` as a function of one layer's shape, per output
    position: block-aligned multiply-adds plus ``per_element`` per activation element read or written."""
    b = cpu_block() if block is None else int(block)

    def cost(cin: int, cout: int, taps: int, positions: float) -> float:
        cin_a = _align(cin, b, partial=True) if cin > 1 else cin
        cout_a = _align(cout, b, partial=False)
        return positions * (cout_a * cin_a * taps + per_element * (cin_a + cout_a))

    return cost


def rank_multiple(block: int | None = None) -> int:
    """Ranks of low-rank chains are multiples of this: half a SIMD block (8 with AVX-512, 4 with AVX2), the
    finest step the block-aligned kernels still run at the speed of its multiply-adds (a partial output
    block costs a whole one; input channels below one block run in half blocks)."""
    b = cpu_block() if block is None else int(block)
    return max(1, b // 2)


def dense_latency(shape: LayerShape, latency: LayerLatency) -> float:
    return latency(shape.cin, shape.cout, shape.taps, 1.0)


def chain_latency(shape: LayerShape, r: int, latency: LayerLatency, pre: bool = False) -> float:
    """Latency of the chain replacing ``shape`` at rank ``r``: ``core`` (``cin -> r``, the layer's kernel)
    then a 1x1 ``post`` (``r -> cout``); with ``pre``, a 1x1 ``pre`` (``cin -> r``, at the input's
    resolution) then ``core`` (``r -> cout``)."""
    if pre:
        return latency(shape.cin, r, 1, float(shape.stride_area)) + latency(r, shape.cout, shape.taps, 1.0)
    return latency(shape.cin, r, shape.taps, 1.0) + latency(r, shape.cout, 1, 1.0)


def two_sided_chain_latency(shape: LayerShape, r_in: int, r_out: int, latency: LayerLatency) -> float:
    """Latency of the chain 1x1 ``pre`` (``cin -> r_in``, at the input's resolution), ``core`` (``r_in -> r_out``,
    the layer's kernel), 1x1 ``post`` (``r_out -> cout``): EigenDamage's / a Tucker factorisation's chain."""
    return (latency(shape.cin, r_in, 1, float(shape.stride_area)) + latency(r_in, r_out, shape.taps, 1.0)
            + latency(r_out, shape.cout, 1, 1.0))


def aligned_rank(shape: LayerShape, r: int, latency: LayerLatency, multiple: int, max_rank: int,
                 pre: bool = False) -> int | None:
    """The rank a low-rank method should use for ``shape`` instead of ``r``: ``r`` rounded up to
    ``multiple`` (at most the largest multiple within ``max_rank``); None when that chain is not faster than
    the dense layer (keep it dense)."""
    m = max(1, int(multiple))
    ra = min(-(-int(r) // m) * m, (int(max_rank) // m) * m)
    if ra < 1:
        return None
    return ra if chain_latency(shape, ra, latency, pre) < dense_latency(shape, latency) else None


# --------------------------------------------------------------------------------------------- building
def _totals(model: nn.Module, x: Any) -> tuple[int, int]:
    """Dense multiply-adds per example and parameter count, as :mod:`prunekit.metrics` counts them."""
    from prunekit.metrics import count_flops, count_params
    from prunekit.surgery.inputs import ExampleInputs

    spec = x if isinstance(x, ExampleInputs) else tuple(x.shape[1:])
    return int(count_flops(model, spec)), int(count_params(model)["params"])


def build_cost_model(
    model: nn.Module, x: Any, groups: dict[str, ChannelGroup], rec: Any
) -> CostModel:
    flops, params = _totals(model, x)
    uses = rec.uses
    attn_cost = {p: float(n * n * 2 * model.get_submodule(p).head_dim) for p, n in rec.tokens.items()}
    dims: dict[str, dict[int, list[tuple[str, int]]]] = {}
    for g in groups.values():
        if not g.prunable:
            continue
        for mb in g.members:
            dims.setdefault(mb.tensor, {}).setdefault(mb.dim, []).append((g.key, mb.per_channel))
    sizes = {k: g.size for k, g in groups.items()}
    tensors: list[TensorCost] = []
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):  # a tied weight counts once as a parameter,
        shape = tuple(p.shape)  # but its multiply-adds count in every layer that uses it
        td = {
            d: (shape[d] - sum(sizes[k] * e for k, e in terms), terms)
            for d, terms in dims.get(name, {}).items()
        }
        mod_path, _, pname = name.rpartition(".")
        per = uses.get(mod_path, 0.0) if pname in ("weight", "in_proj_weight") else 0.0
        tensors.append(TensorCost(name, shape, td, per, id(p) not in seen))
        seen.add(id(p))
    extra = []
    for g in groups.values():  # nn.MultiheadAttention products q k^T and a v: 2 L S multiply-adds per channel
        if g.prunable and g.mha:
            d = g.mha_heads[0][1]
            extra += [(g.key, 2.0 * d * nq * nk) for p in g.mha if (nq_nk := getattr(rec, "mha_tokens", {}).get(p))
                      for nq, nk in [nq_nk]]
    for p, c in attn_cost.items():
        g = groups.get(p)
        if g is not None and g.kind == "heads" and g.prunable:
            extra.append((p, c))
    return CostModel(tensors, sizes, flops, params, extra)


__all__ = [
    "LATENCY_PER_ELEMENT", "CostModel", "LayerLatency", "LayerShape", "TensorCost", "aligned_rank", "build_cost_model",
    "chain_latency", "cpu_block", "dense_latency", "proxy_layer_latency", "rank_multiple",
]
