"""Coupled channel groups of a network, found with Torch-Pruning's dependency graph.

Removing output channel ``c`` of a convolution forces edits elsewhere: the BatchNorm that
follows loses entry ``c``, every layer reading the channel loses an input column (25 columns
when a 5x5 map is flattened into a linear layer), and in a residual network every layer
writing into the same residual stream must lose the same channel. :func:`analyze` traces the
model once with Torch-Pruning's ``DependencyGraph`` and turns each set of coupled channels into
a :class:`ChannelGroup`: which layers produce the channels, which read them, which norms,
depthwise convolutions and free parameters follow them, and -- for every tensor involved --
exactly which positions along which dimension belong to each channel. Methods score groups;
:mod:`prunekit.surgery.apply` removes (or masks) channels group by group.

The same member table gives a fast cost model (:class:`CostModel`): the dense multiply-adds
and parameter count of any assignment of widths, without building the pruned model.

Groups the engine cannot handle safely (grouped convolutions, layers that see only part of a
group, attention internals that a channel-to-channel mapping would break) are reported in
``ChannelGraph.skipped`` with a :class:`PruningWarning` that names the layer; they are never
pruned. The classifier (any layer whose output channels are the model's outputs) is never
pruned either.
"""

from __future__ import annotations

import copy
import math
import warnings
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from prunekit.errors import PruningError

LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
)


class PruningWarning(UserWarning):
    """A layer or channel group the engine leaves untouched; the message names it and says why."""


# --------------------------------------------------------------------------------------------- records
@dataclass
class Member:
    """One tensor dimension that follows a channel group.

    ``index[c]`` holds the positions along ``dim`` of tensor ``tensor`` (a parameter or buffer path)
    that belong to channel ``c`` of the group: one position for a producer row, ``H*W`` positions
    for a linear layer reading a flattened ``H x W`` map, ``3 * head_dim`` rows of a fused ``qkv``
    projection for an attention head.
    """

    tensor: str
    dim: int
    index: torch.Tensor  # (group size, positions per channel), int64
    role: str  # producer | consumer | norm | depthwise | param | act

    @property
    def per_channel(self) -> int:
        return int(self.index.shape[1])

    def positions(self, channels: torch.Tensor) -> torch.Tensor:
        """Sorted positions along ``dim`` of the given channels."""
        return self.index[channels].reshape(-1).sort().values


@dataclass
class ChannelGroup:
    """A set of channels that must be removed together.

    ``producers``: conv / linear layers whose output channels (weight dim 0) are these channels, in
    the group's channel order; ``consumers``: layers whose input dimension reads them
    (``expansion[path]`` input features per channel: ``H*W`` after a flatten, else 1);
    ``norms``: BatchNorm / LayerNorm / GroupNorm layers over them; ``depthwise``: depthwise
    convolutions whose input and output channels follow the group; ``params``: free parameters
    (e.g. a ViT's ``cls_token`` / ``pos_embed``) with a dimension that follows the group.
    ``kind`` is ``"channels"`` or ``"heads"`` (a channel is then a whole attention head: the
    producer's rows for head ``h`` are ``rows(model, path)[h]``). ``members`` lists every tensor
    dimension involved (see :class:`Member`).
    """

    key: str
    size: int
    producers: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    expansion: dict[str, int] = field(default_factory=dict)
    norms: list[str] = field(default_factory=list)
    depthwise: list[str] = field(default_factory=list)
    params: list[str] = field(default_factory=list)
    prunable: bool = True
    reason: str = ""
    min_keep: int = 1
    multiple_of: int = 1  # kept counts must be multiples of this (GroupNorm groups)
    kind: str = "channels"
    members: list[Member] = field(default_factory=list)

    def layers(self) -> list[str]:
        """Every conv / linear layer touched by the group."""
        return list(dict.fromkeys(self.producers + self.depthwise + self.consumers))

    def rows(self, model: nn.Module, path: str) -> torch.Tensor:
        """Weights of producer (or depthwise) layer ``path`` with one row per channel: ``(size, n)``."""
        for mb in self.members:
            if mb.tensor == f"{path}.weight" and mb.role in ("producer", "depthwise"):
                w = _get_tensor(model, mb.tensor).detach()
                w = w.movedim(mb.dim, 0)
                return w[mb.index.reshape(-1).to(w.device)].reshape(self.size, -1)
        raise PruningError(f"{path!r} is not a producer of channel group {self.key!r}")

    ln_coupled: bool = False  # a LayerNorm / GroupNorm normalises over these channels: removing them changes
    # its statistics, so masked and physical pruning differ slightly for such groups


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


def cpu_block() -> int:
    """Channels per SIMD block of this CPU's float32 kernels: 16 with AVX-512, 8 otherwise (AVX2, NEON)."""
    try:
        cap = str(torch.backends.cpu.get_cpu_capability()).upper()
    except Exception:  # pragma: no cover - very old torch
        return 8
    return 16 if "AVX512" in cap else 8


LATENCY_BLOCK = cpu_block()


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
        block = LATENCY_BLOCK if block is None else int(block)
        sizes = t.sizes(w)
        out = sizes[0]
        cin = sizes[1] if len(sizes) > 1 else 0
        # input channels are blocked too, except for depthwise / grouped kernels with one input per group
        cin_aligned = _align(cin, block, partial=True) if cin > 1 else cin
        rest = math.prod(sizes[2:]) if len(sizes) > 2 else 1
        return t.macs_per_entry * (_align(out, block, partial=False) * cin_aligned * rest + per_element * (out + cin))

    def latency(
        self, widths: dict[str, int] | None = None, block: int | None = None, per_element: float = LATENCY_PER_ELEMENT
    ) -> float:
        """A CPU latency proxy (per example, in multiply-add equivalents) of a width assignment.

        Per conv / linear layer: its multiply-adds with the output channels rounded up to a multiple of
        ``block`` (default :func:`cpu_block`: 16 floats per SIMD register with AVX-512, 8 with AVX2; a
        partial block costs a full one) and the input channels rounded up likewise (to half a block when
        there are fewer than ``block``), plus ``per_element`` for every element of its input and output
        activations (memory-bound work that does not shrink with multiply-adds: normalisation,
        activation functions, residual additions, layout reorders). Only relative values matter.
        """
        w = self._full(widths)
        return sum(self.layer_latency(t, w, block, per_element) for t in self._mac_tensors)

    def latency_tensors(self) -> list[TensorCost]:
        """The conv / linear weights the latency proxy sums over."""
        return list(self._mac_tensors)


# --------------------------------------------------------------------------------------------- the graph
@dataclass
class ChannelGraph:
    """The coupled channel groups of a model (see :func:`analyze`)."""

    groups: dict[str, ChannelGroup]
    skipped: dict[str, str]
    input_shape: tuple[int, ...]
    cost: CostModel | None
    output_layers: list[str]
    layer_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    _dg: Any = None
    _model_ref: Any = None
    _signature: Any = None

    # -- queries -----------------------------------------------------------------------------------
    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups.values() if g.prunable]

    def group_of(self, layer: str) -> ChannelGroup | None:
        """The group holding the output channels of ``layer`` (None if it has none)."""
        for g in self.groups.values():
            if layer in g.producers or layer in g.depthwise:
                return g
        return None

    def widths(self, channels: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
        """``{group key: width}`` at full size, or after keeping ``channels``."""
        w = {k: g.size for k, g in self.groups.items()}
        for k, keep in (channels or {}).items():
            w[k] = int(len(keep))
        return w

    def predict(self, channels: dict[str, torch.Tensor] | dict[str, int] | None = None) -> dict[str, float]:
        """Predicted ``{"flops", "params"}`` after keeping ``channels`` (index tensors or counts)."""
        widths = {k: (int(v) if isinstance(v, int) else int(len(v))) for k, v in (channels or {}).items()}
        return {"flops": self.cost.flops(widths), "params": self.cost.params(widths)}

    def kept_dims(self, channels: dict[str, torch.Tensor]) -> dict[str, dict[int, torch.Tensor]]:
        """For every tensor a plan changes: ``{dim: sorted kept positions}``."""
        out: dict[str, dict[int, torch.Tensor]] = {}
        for key, keep in channels.items():
            g = self.groups[key]
            keep = torch.as_tensor(keep, dtype=torch.long)
            for mb in g.members:
                shape = self.layer_shapes.get(mb.tensor)
                if shape is None:
                    continue
                dims = out.setdefault(mb.tensor, {})
                removed = mb.positions(_complement(keep, g.size))
                current = dims.get(mb.dim)
                if current is None:
                    current = torch.arange(shape[mb.dim])
                dims[mb.dim] = current[~torch.isin(current, removed)]
        return out

    def bound_to(self, model: nn.Module) -> bool:
        """Whether the graph (and its Torch-Pruning graph) describes this very model in its current shape."""
        return (
            self._dg is not None
            and self._model_ref is not None
            and self._model_ref() is model
            and self._signature == _signature(model)
        )

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly description of the groups and skipped layers."""
        return {
            "groups": {
                k: {
                    "size": g.size,
                    "kind": g.kind,
                    "prunable": g.prunable,
                    "reason": g.reason,
                    "producers": g.producers,
                    "consumers": g.consumers,
                    "norms": g.norms,
                    "depthwise": g.depthwise,
                    "params": g.params,
                }
                for k, g in self.groups.items()
            },
            "skipped": dict(self.skipped),
        }


# --------------------------------------------------------------------------------------------- helpers
def _complement(keep: torch.Tensor, size: int) -> torch.Tensor:
    mask = torch.ones(size, dtype=torch.bool)
    mask[keep] = False
    return mask.nonzero().flatten()


def _get_tensor(model: nn.Module, path: str) -> torch.Tensor:
    mod_path, _, name = path.rpartition(".")
    mod = model.get_submodule(mod_path) if mod_path else model
    return getattr(mod, name)


def _signature(model: nn.Module) -> tuple:
    return tuple((n, tuple(p.shape), id(p)) for n, p in model.named_parameters())


def tensor_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of every parameter and buffer, parametrized tensors under their plain names."""
    out: dict[str, tuple[int, ...]] = {}
    for mpath, m in model.named_modules():
        if ".parametrizations." in f".{mpath}.":
            continue
        prefix = f"{mpath}." if mpath else ""
        for name, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is not None:
                out[prefix + name] = tuple(t.shape)
        if parametrize.is_parametrized(m):
            for name, plist in m.parametrizations.items():
                out[prefix + name] = tuple(plist.original.shape)
    return out


def _is_depthwise(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.modules.conv._ConvNd)
        and m.groups > 1
        and m.groups == m.in_channels
        and m.out_channels == m.groups
    )


def _is_grouped(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and not _is_depthwise(m)


def is_attention(m: nn.Module) -> bool:
    """A multi-head attention module prunekit can prune by heads: int ``num_heads`` / ``head_dim``,
    a fused ``qkv`` linear with ``3 * num_heads * head_dim`` outputs and a ``proj`` linear."""
    h, d = getattr(m, "num_heads", None), getattr(m, "head_dim", None)
    qkv, proj = getattr(m, "qkv", None), getattr(m, "proj", None)
    return (
        isinstance(h, int)
        and isinstance(d, int)
        and isinstance(qkv, nn.Linear)
        and isinstance(proj, nn.Linear)
        and qkv.out_features == 3 * h * d
        and proj.in_features == h * d
    )


def _has_masks(model: nn.Module) -> bool:
    return any(parametrize.is_parametrized(m) for m in model.modules()) or any(
        b.endswith("_mask") for b, _ in model.named_buffers()
    )


def _matches(path: str, patterns: Iterable[str]) -> str | None:
    for p in patterns:
        if path == p or path.startswith(p + "."):
            return p
    return None


def example_batch(model: nn.Module, example_input: Any) -> torch.Tensor:
    """A batch-1 input for tracing: ``example_input`` may be a tensor batch or a shape ``(C, H, W)``."""
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    if isinstance(example_input, torch.Tensor):
        return example_input[:1].to(dev)
    if example_input is None:
        example_input = default_input_shape(model)
    shape = tuple(int(s) for s in example_input)
    return torch.randn((1, *shape), device=dev)


def default_input_shape(model: nn.Module) -> tuple[int, ...]:
    """The input shape of a zoo model (from ``model.prunekit_config``); raises if unknown."""
    cfg = getattr(model, "prunekit_config", None)
    if not cfg:
        raise PruningError(
            "cannot tell the model's input shape: pass input_shape=(C, H, W) (or example_input)"
        )
    from prunekit.models import get_model_info

    info = get_model_info(cfg["name"])
    size = cfg.get("kwargs", {}).get("image_size")
    hw = (int(size), int(size)) if size else tuple(info.input_size[1:])
    return (int(cfg.get("in_channels", info.input_size[0])), *hw)


# --------------------------------------------------------------------------------------------- analysis
_DUMMY_TYPES: tuple | None = None


def _dummy_types() -> tuple:
    global _DUMMY_TYPES
    if _DUMMY_TYPES is None:
        from torch_pruning import ops

        _DUMMY_TYPES = (
            ops.OPTYPE.ELEMENTWISE,
            ops.OPTYPE.RESHAPE,
            ops.OPTYPE.CONCAT,
            ops.OPTYPE.SPLIT,
            ops.OPTYPE.SLICE,
            ops.OPTYPE.EXPAND,
            ops.OPTYPE.UNBIND,
            ops.OPTYPE.OUTPUT,
            ops.OPTYPE.CUSTOMIZED,
        )
    return _DUMMY_TYPES


def _index_table(idxs: Sequence[int], roots: Sequence[int], size: int) -> torch.Tensor | None:
    """``(size, e)`` table of positions per root channel, or None if channels map unevenly."""
    if len(idxs) == 0 or roots is None or len(roots) != len(idxs) or any(r is None for r in roots):
        return None
    idx = torch.as_tensor(list(idxs), dtype=torch.long)
    root = torch.as_tensor(list(roots), dtype=torch.long)
    if int(root.min()) < 0 or int(root.max()) >= size:
        return None
    counts = torch.bincount(root, minlength=size)
    if int(counts.min()) == 0 or int(counts.min()) != int(counts.max()):
        return None
    order = torch.argsort(root * (int(idx.max()) + 1) + idx)
    return idx[order].reshape(size, -1)


def _output_modules(dg: Any) -> set[Any]:
    """Modules whose channels reach the model output without passing another layer."""
    dummy = _dummy_types()
    terminals = [n for n in dg.module2node.values() if not n.outputs]
    seen: set[Any] = set()
    found: set[Any] = set()
    stack = list(terminals)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.type in dummy:
            stack.extend(n.inputs)
        else:
            found.add(n.module)
    return found


def _trace(model: nn.Module, x: torch.Tensor) -> tuple[Any, list[str], _UseRecorder]:
    import torch_pruning as tp

    dg = tp.DependencyGraph()
    rec = _UseRecorder(model)
    flags = [(m, m.training) for m in model.modules()]
    notes: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught, torch.enable_grad():
            warnings.simplefilter("always")
            dg.build_dependency(model, (x,), verbose=True)
        for w in caught:
            msg = str(w.message)
            if "Unwrapped parameters" not in msg:
                notes.append(msg.strip())
    except Exception as e:  # noqa: BLE001 - tracing arbitrary models can fail in many ways
        raise PruningError(
            f"could not trace the model to find coupled channels ({type(e).__name__}: {e}); "
            "the model must run on a single tensor input of the given shape"
        ) from e
    finally:
        rec.remove()
        for m, f in flags:
            m.training = f
    return dg, notes, rec


def analyze(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[int] | None = None,
    ignored: Iterable[str | nn.Module] | None = None,
    *,
    heads: bool = False,
    warn: bool = True,
    costs: bool = True,
) -> ChannelGraph:
    """Find the coupled channel groups of ``model``.

    Args:
        model: the network (zoo or any ``nn.Module`` taking one tensor).
        example_input: an example batch or an input shape ``(C, H, W)``; default: the zoo model's size.
        ignored: layers (paths or modules) whose output channels must not be pruned; a group
            containing one of them (as producer, depthwise conv or norm) is not prunable. The
            classifier never is, whatever this says.
        heads: also offer attention heads of :func:`is_attention` modules as groups
            (``kind="heads"``); otherwise their inner ``qkv``/``proj`` channels are left alone.
        warn: emit a :class:`PruningWarning` for every group the engine must skip.
        costs: build the cost model (one counted forward pass); without it ``graph.cost`` is None.

    Returns:
        a :class:`ChannelGraph`; ``graph.groups`` is keyed by the path of the group's first producer.
    """
    if not isinstance(model, nn.Module):
        raise PruningError(f"expected a torch.nn.Module, got {type(model).__name__}")
    x = example_batch(model, example_input)
    work = model
    if _has_masks(model):  # trace a copy with masks baked in: parametrizations confuse the tracer
        from prunekit.surgery.masks import remove_masks_

        work = remove_masks_(copy.deepcopy(model))
    dg, notes, rec = _trace(work, x)
    names = {m: n for n, m in work.named_modules()}
    model_names = {m: n for n, m in model.named_modules()}
    ignored_paths = [model_names.get(i, "?") if isinstance(i, nn.Module) else str(i) for i in (ignored or ())]
    attn = {p: m for p, m in work.named_modules() if is_attention(m)}
    attn_qkv = {f"{p}.qkv": p for p in attn}
    outputs = _output_modules(dg)
    shapes = tensor_shapes(work)

    groups, skipped, problems = _build_groups(work, dg, names, shapes, attn_qkv, outputs, ignored_paths)
    if heads:
        for p, m in attn.items():
            groups[p] = _head_group(p, m)
    for path, reason in problems:
        if warn:
            warnings.warn(
                f"prunekit: output channels of {path!r} are not pruned: {reason}",
                PruningWarning,
                stacklevel=2,
            )
    if warn:
        for note in notes:
            warnings.warn(f"prunekit: while tracing the model: {note}", PruningWarning, stacklevel=2)

    _sort_members(work, groups)
    cost = _cost_model(work, x, groups, rec) if costs else None
    graph = ChannelGraph(
        groups=groups,
        skipped=skipped,
        input_shape=tuple(x.shape[1:]),
        cost=cost,
        output_layers=sorted(names[m] for m in outputs if m in names),
        layer_shapes=shapes,
    )
    if work is model:
        graph._dg = dg
        graph._model_ref = weakref.ref(model)
        graph._signature = _signature(model)
    return graph


def _build_groups(work: nn.Module, dg: Any, names: dict[nn.Module, str], shapes: Any, attn_qkv: dict[str, str],
                  outputs: set[nn.Module], ignored_paths: list[str]
                  ) -> tuple[dict[str, ChannelGroup], dict[str, str], list[tuple[str, str]]]:
    """One group per first producer (Torch-Pruning's pruning group of its output channels), marked unprunable
    with the reason where it holds the classifier, an ignored layer or something the engine cannot shrink."""
    groups: dict[str, ChannelGroup] = {}
    skipped: dict[str, str] = {}
    visited: set[nn.Module] = set()
    problems: list[tuple[str, str]] = []

    for path, m in work.named_modules():
        if not isinstance(m, LAYER_TYPES) or m in visited or _is_depthwise(m):
            continue
        if m not in dg.module2node:
            skipped[path] = "not used in the forward pass"
            continue
        pruner = dg.get_pruner_of_module(m)
        n = pruner.get_out_channels(m)
        tp_group = dg.get_pruning_group(m, pruner.prune_out_channels, list(range(n)))
        g, out_mods, bad = _convert(path, n, tp_group, dg, names, shapes)
        visited.update(out_mods)
        if path in attn_qkv:
            for p in g.producers:
                skipped[p] = (
                    f"attention projection of {attn_qkv[path]!r}: its output channels are heads; "
                    "they are pruned only as whole heads (heads=True)"
                )
            continue
        if bad:
            g.prunable, g.reason = False, bad
            problems.append((path, bad))
        elif any(mod in outputs for mod in out_mods | {work.get_submodule(p) for p in g.norms}):
            g.prunable, g.reason = False, "its channels are the model's outputs (classifier)"
        else:
            hits = [h for p in g.producers + g.depthwise + g.norms if (h := _matches(p, ignored_paths))]
            if hits:
                g.prunable, g.reason = False, f"contains ignored layer {hits[0]!r}"
        if not g.prunable:
            for p in g.producers + g.depthwise:
                skipped.setdefault(p, g.reason)
        groups[path] = g
    return groups, skipped, problems


def _sort_members(work: nn.Module, groups: dict[str, ChannelGroup]) -> None:
    """Members of every group in module order; ``ln_coupled`` where a LayerNorm / GroupNorm normalises them."""
    stat_norms = {n for n, m in work.named_modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))}
    order = {n: i for i, (n, _) in enumerate(work.named_modules())}
    for g in groups.values():
        for lst in (g.producers, g.consumers, g.norms, g.depthwise):
            lst.sort(key=lambda p: order.get(p, 0))
        g.ln_coupled = any(n in stat_norms for n in g.norms)


def _convert(
    root: str,
    size: int,
    tp_group: Any,
    dg: Any,
    names: dict[nn.Module, str],
    shapes: dict[str, tuple[int, ...]],
) -> tuple[ChannelGroup, set[nn.Module], str]:
    """Translate a Torch-Pruning group into a :class:`ChannelGroup` (+ modules whose outputs it holds,
    + the reason it cannot be pruned, or "")."""
    g = ChannelGroup(key=root, size=size)
    out_mods: set[nn.Module] = set()
    bad = ""

    def add(tensor: str, dim: int, table: torch.Tensor, role: str) -> str:
        shape = shapes.get(tensor)
        if shape is None:
            return ""
        d = dim % len(shape)
        if int(table.max()) >= shape[d]:
            return (
                f"{tensor.rpartition('.')[0]!r} has {shape[d]} entries along dim {d} but the group has "
                f"{size} channels x {table.shape[1]} (an operation between the layers mixes channels)"
            )
        owner = tensor.rpartition(".")[0]
        if role != "consumer" and table.shape[1] != 1:
            return f"{owner!r} maps one channel to {table.shape[1]} entries: unsupported"
        if role == "producer" and shape[d] != size:
            return f"{owner!r} produces {shape[d]} channels, the group has {size}: unsupported"
        for mb in g.members:
            if mb.tensor == tensor and mb.dim == d:
                if not torch.equal(mb.index, table):
                    return f"{tensor!r} is reached twice with different channel orders"
                return ""
        g.members.append(Member(tensor, d, table, role))
        return ""

    for item in tp_group:
        dep = item.dep
        node = dep.target
        mod = node.module
        if node.type in _dummy_types():
            bad = bad or _mixing(node)
            continue
        table = _index_table(item.idxs, item.root_idxs, size)
        if isinstance(mod, nn.Parameter):
            name = dg._param_to_name.get(mod, "?")
            if table is None:
                bad = bad or f"parameter {name!r} maps the channels unevenly"
                continue
            bad = bad or add(name, node.pruning_dim, table, "param")
            if name not in g.params:
                g.params.append(name)
            continue
        path = names.get(mod)
        if path is None:
            continue
        if table is None:
            bad = bad or f"{path!r} sees the channels unevenly (index mapping not supported)"
            continue
        is_out = dg.is_out_channel_pruning_fn(dep.handler)
        if isinstance(mod, LAYER_TYPES):
            if _is_grouped(mod):
                bad = bad or f"grouped convolution {path!r} (groups={mod.groups}) is not supported"
                continue
            transposed = isinstance(mod, nn.modules.conv._ConvNd) and mod.transposed
            if _is_depthwise(mod) or is_out:
                # the layer's output channels belong to the group: weight rows (+ bias)
                role = "depthwise" if _is_depthwise(mod) else "producer"
                out_mods.add(mod)
                bad = bad or add(f"{path}.weight", 1 if transposed else 0, table, role)
                if mod.bias is not None:
                    bad = bad or add(f"{path}.bias", 0, table, role)
                paths = g.depthwise if role == "depthwise" else g.producers
                if path not in paths:
                    paths.append(path)
            else:
                bad = bad or add(f"{path}.weight", 0 if transposed else 1, table, "consumer")
                if path not in g.consumers:
                    g.consumers.append(path)
                    g.expansion[path] = int(table.shape[1])
        elif isinstance(mod, NORM_TYPES):
            bad = bad or _add_norm(g, mod, path, table, add)
        elif isinstance(mod, nn.PReLU):
            if mod.num_parameters > 1:
                bad = bad or add(f"{path}.weight", 0, table, "act")
        else:
            bad = bad or f"layer {path!r} ({type(mod).__name__}) is not supported by the pruning engine"
    g.min_keep = max(1, g.multiple_of)
    if not g.producers and not bad:
        bad = "no conv / linear layer produces these channels"
    return g, out_mods, bad


def _add_norm(g: ChannelGroup, mod: nn.Module, path: str, table: torch.Tensor, add: Any) -> str:
    """A norm layer's parameters and statistics as members of ``g`` (a GroupNorm's groups bound the multiple)."""
    dim = len(mod.normalized_shape) - 1 if isinstance(mod, nn.LayerNorm) else 0
    bad = ""
    for pname, _ in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
        if pname != "num_batches_tracked":
            bad = bad or add(f"{path}.{pname}", dim, table, "norm")
    if isinstance(mod, nn.GroupNorm):
        g.multiple_of = max(g.multiple_of, int(mod.num_groups))
    if path not in g.norms:
        g.norms.append(path)
    return bad


# autograd ops that combine channels; Torch-Pruning treats unknown ops as element-wise
_MIXING_OPS = (
    "MmBackward",
    "BmmBackward",
    "MatmulBackward",
    "AddmmBackward",
    "BaddbmmBackward",
    "AddbmmBackward",
    "MvBackward",
    "AddmvBackward",
    "DotBackward",
    "ConvolutionBackward",
    "SoftmaxBackward",
    "LogSoftmaxBackward",
    "CdistBackward",
    "NormBackward",
    "LinalgVectorNormBackward",
    "EinsumBackward",
)


def _mixing(node: Any) -> str:
    """Why an operation on the channel path mixes channels (""=it does not).

    A matrix product fed by a parameter-only branch (a transposed weight) is the inside of a
    linear layer applied to a 3-D input, not a channel mix.
    """
    fn = getattr(node, "grad_fn", None)
    name = fn.name() if fn is not None and hasattr(fn, "name") else ""
    if not name.startswith(_MIXING_OPS):
        return ""
    if any(not n.inputs for n in node.inputs):
        return ""
    return f"operation {name} between the layers mixes channels (matrix product, softmax or norm over them)"


def _head_group(path: str, m: nn.Module) -> ChannelGroup:
    h, d = int(m.num_heads), int(m.head_dim)
    inner = h * d
    heads = torch.arange(h).unsqueeze(1) * d + torch.arange(d).unsqueeze(0)  # (h, d)
    qkv_rows = torch.cat([heads, heads + inner, heads + 2 * inner], 1)  # (h, 3d)
    g = ChannelGroup(
        key=path,
        size=h,
        producers=[f"{path}.qkv"],
        consumers=[f"{path}.proj"],
        expansion={f"{path}.proj": d},
        kind="heads",
    )
    g.members.append(Member(f"{path}.qkv.weight", 0, qkv_rows, "producer"))
    if m.qkv.bias is not None:
        g.members.append(Member(f"{path}.qkv.bias", 0, qkv_rows, "producer"))
    g.members.append(Member(f"{path}.proj.weight", 1, heads, "consumer"))
    return g


class _UseRecorder:
    """Forward hooks recording, during the tracing pass, how many multiply-adds each weight entry of a
    conv / linear layer takes part in (per example) and the token count seen by attention modules."""

    def __init__(self, model: nn.Module):
        self.uses: dict[str, float] = {}
        self.tokens: dict[str, int] = {}
        self.handles = []
        for path, m in model.named_modules():
            if isinstance(m, LAYER_TYPES):
                self.handles.append(m.register_forward_hook(self._layer_hook(path)))
            elif is_attention(m):
                self.handles.append(m.register_forward_pre_hook(self._attn_hook(path)))

    def _layer_hook(self, path: str) -> Any:
        def hook(m: nn.Module, args: tuple, out: Any) -> None:
            if not isinstance(out, torch.Tensor) or not args or not isinstance(args[0], torch.Tensor):
                return
            batch = args[0].shape[0] if args[0].dim() > 1 else 1
            if isinstance(m, nn.Linear):
                per = out.numel() / max(1, out.shape[-1])
            else:
                spatial = len(m.kernel_size)
                ref = args[0] if m.transposed else out
                per = math.prod(ref.shape[-spatial:]) * (
                    ref.numel() / max(1, math.prod(ref.shape[-spatial - 1 :]))
                )
            self.uses[path] = self.uses.get(path, 0.0) + per / max(1, batch)

        return hook

    def _attn_hook(self, path: str) -> Any:
        def hook(m: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor):
                self.tokens[path] = int(args[0].shape[-2])

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _totals(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Dense multiply-adds per example and parameter count, as :mod:`prunekit.metrics` counts them."""
    from prunekit.metrics import count_flops, count_params

    return int(count_flops(model, tuple(x.shape[1:]))), int(count_params(model)["params"])


def _cost_model(
    model: nn.Module, x: torch.Tensor, groups: dict[str, ChannelGroup], rec: _UseRecorder
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
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        td = {
            d: (shape[d] - sum(sizes[k] * e for k, e in terms), terms)
            for d, terms in dims.get(name, {}).items()
        }
        mod_path, _, pname = name.rpartition(".")
        per = uses.get(mod_path, 0.0) if pname == "weight" else 0.0
        tensors.append(TensorCost(name, shape, td, per, True))
    extra = []
    for p, c in attn_cost.items():
        g = groups.get(p)
        if g is not None and g.kind == "heads" and g.prunable:
            extra.append((p, c))
    return CostModel(tensors, sizes, flops, params, extra)


__all__ = [
    "ChannelGraph",
    "ChannelGroup",
    "CostModel",
    "Member",
    "PruningWarning",
    "TensorCost",
    "analyze",
    "default_input_shape",
    "example_batch",
    "is_attention",
    "tensor_shapes",
]
