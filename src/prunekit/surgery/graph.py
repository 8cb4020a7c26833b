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

The same member table gives a fast cost model (:class:`~prunekit.surgery.cost.CostModel`, in
:mod:`prunekit.surgery.cost`): the dense multiply-adds and parameter count of any assignment of
widths, without building the pruned model. The records themselves (:class:`ChannelGroup`,
:class:`Member`) live in :mod:`prunekit.surgery.groups`; this module traces and builds them.

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

from prunekit.errors import PruningError
from prunekit.surgery.cost import CostModel, TensorCost, build_cost_model, cpu_block  # noqa: F401  (re-exported)
from prunekit.surgery.groups import (  # noqa: F401  (re-exported: the records and predicates live in groups)
    LAYER_TYPES,
    NORM_TYPES,
    ChannelGroup,
    Member,
    PruningWarning,
    _complement,
    _get_tensor,
    _has_masks,
    _is_depthwise,
    _is_grouped,
    _matches,
    _signature,
    attention_parts,
    is_attention,
    tensor_shapes,
)
from prunekit.surgery.inputs import ExampleInputs, as_example_inputs, flatten_outputs, is_example


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


# --------------------------------------------------------------------------------------------- inputs
def example_batch(model: nn.Module, example_input: Any) -> Any:
    """A batch-1 input for tracing: ``example_input`` may be a tensor batch, a tuple of tensors or a dict of
    keyword tensors (returned as :class:`~prunekit.surgery.inputs.ExampleInputs`), or a shape ``(C, H, W)``."""
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    if isinstance(example_input, torch.Tensor):
        return example_input[:1].to(dev)
    if is_example(example_input):
        return as_example_inputs(example_input).first(1).to(dev)
    if example_input is None:
        example_input = default_input_shape(model)
    shape = tuple(int(s) for s in example_input)
    return torch.randn((1, *shape), device=dev)


def default_input_shape(model: nn.Module) -> tuple[int, ...]:
    """The input shape of a zoo model (from ``model.prunekit_config``); raises if unknown."""
    cfg = getattr(model, "prunekit_config", None)
    if not cfg:
        raise PruningError(
            "cannot tell the model's input shape: pass example_inputs=... (a batch: a tensor, a tuple of "
            "tensors or a dict of keyword tensors) or input_shape=(C, H, W)"
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


_KNOWN = (*LAYER_TYPES, *NORM_TYPES, nn.Embedding, nn.PReLU, nn.MultiheadAttention)


def unknown_layers(model: nn.Module) -> list[tuple[str, str]]:
    """``(path, type)`` of modules holding weights of their own whose type the engine does not know
    (e.g. Hugging Face's ``Conv1D``, a linear layer with a transposed weight): Torch-Pruning cannot tell
    which of their dimensions are channels."""
    out = []
    for path, m in model.named_modules():
        if isinstance(m, _KNOWN) or not any(p.dim() > 1 for p in m.parameters(recurse=False)):
            continue
        if any(path.startswith(k + ".") for k, _ in out):
            continue
        out.append((path, type(m).__name__))
    return out


def _trace(model: nn.Module, x: Any) -> tuple[Any, list[str], _UseRecorder]:
    import torch_pruning as tp

    dg = tp.DependencyGraph()
    rec = _UseRecorder(model)
    flags = [(m, m.training) for m in model.modules()]
    notes: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught, torch.enable_grad():
            warnings.simplefilter("always")
            if isinstance(x, ExampleInputs):
                dg.build_dependency(model, x.args, forward_fn=lambda m, _: x(m), output_transform=flatten_outputs,
                                    verbose=True)
            else:
                dg.build_dependency(model, (x,), output_transform=flatten_outputs, verbose=True)
        for w in caught:
            msg = str(w.message)
            if "Unwrapped parameters" not in msg:
                notes.append(msg.strip())
    except Exception as e:  # noqa: BLE001 - tracing arbitrary models can fail in many ways
        odd = unknown_layers(model)
        hint = (
            f"; layers of types the pruning engine does not know, the likely cause: "
            f"{', '.join(f'{p!r} ({t})' for p, t in odd[:6])}{' ...' if len(odd) > 6 else ''}"
            if odd
            else "; the model must run on the example inputs (pass example_inputs=... for models taking several "
            "inputs, keyword inputs or integer tokens)"
        )
        if getattr(getattr(model, "config", None), "use_cache", False):
            hint += "; for a Hugging Face model set model.config.use_cache = False (its key/value cache concatenates)"
        raise PruningError(
            f"could not trace the model to find coupled channels ({type(e).__name__}: {e}){hint}"
        ) from e
    finally:
        rec.remove()
        for m, f in flags:
            m.training = f
    return dg, notes, rec


def analyze(
    model: nn.Module,
    example_input: Any = None,
    ignored: Iterable[str | nn.Module] | None = None,
    *,
    heads: bool = False,
    warn: bool = True,
    costs: bool = True,
) -> ChannelGraph:
    """Find the coupled channel groups of ``model``.

    Args:
        model: the network (zoo or any ``nn.Module``).
        example_input: an example batch (a tensor, a tuple of positional tensors or a dict of keyword
            tensors, batch first; see :class:`~prunekit.surgery.inputs.ExampleInputs`) or an input shape
            ``(C, H, W)``; default: the zoo model's size. Outputs may be tensors, tuples, dicts or
            dataclasses (every tensor in them is an output).
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
    attn_qkv = {f"{p}.{attention_parts(m)[0]}": p for p, m in attn.items()}
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
    cost = build_cost_model(work, x, groups, rec) if costs else None
    graph = ChannelGraph(
        groups=groups,
        skipped=skipped,
        input_shape=x if isinstance(x, ExampleInputs) else tuple(x.shape[1:]),
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
            parent = work.get_submodule(path.rpartition(".")[0]) if "." in path else work
            if isinstance(parent, nn.MultiheadAttention):
                skipped[path] = (
                    f"output projection of nn.MultiheadAttention {path.rpartition('.')[0]!r} (read as a weight "
                    "inside it): pruned with the module's embedding, by whole heads"
                )
            else:
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
        if not bad:
            bad = _block_heads(work, g)
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
    _block_grouped_query(work, groups, skipped, problems)
    return groups, skipped, problems


def _kv_heads(m: nn.Module) -> tuple[int, int] | None:
    """``(query heads, key/value heads)`` of a grouped-query attention module (fewer K/V heads than query heads:
    ``num_key_value_heads`` / ``num_kv_heads`` / ``n_kv_heads`` beside ``num_heads`` / ``num_attention_heads``,
    on the module or its ``config``), else None."""
    def attr(names: tuple[str, ...]) -> int | None:
        for src in (m, getattr(m, "config", None)):
            for a in names:
                if isinstance(v := getattr(src, a, None), int) and v > 0:
                    return v
        return None

    kv = attr(("num_key_value_heads", "num_kv_heads", "n_kv_heads"))
    h = attr(("num_heads", "num_attention_heads", "n_heads"))
    return (h, kv) if h and kv and kv < h else None


def _block_grouped_query(work: nn.Module, groups: dict[str, ChannelGroup], skipped: dict[str, str],
                         problems: list[tuple[str, str]]) -> None:
    """Grouped-query attention: several query heads share one key/value head, so a query head, its K/V group
    and the repeat that maps one onto the other must shrink together; single channels of the q / k / v
    projections (which the trace sees as independent groups) would break that mapping. Their groups are
    left unpruned -- the residual stream that feeds them and the output projection stay prunable."""
    for parent, m in work.named_modules():
        hk = _kv_heads(m)
        if hk is None:
            continue
        inside = f"{parent}." if parent else ""
        reason = (f"grouped-query attention {parent!r} ({hk[0]} query heads share {hk[1]} key/value heads): its "
                  "query / key / value projections keep every channel so that each query head keeps its "
                  "key/value group")
        for key, g in groups.items():
            if g.prunable and g.producers and all(p.startswith(inside) for p in g.producers):
                g.prunable, g.reason = False, reason
                for p in g.producers:
                    skipped[p] = reason
                problems.append((key, reason))


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
    grouped: list[tuple[str, torch.Tensor, int, int, str]] = []  # grouped convs: (path, unit, block, groups, weight)

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
        if role not in ("consumer", "attn") and table.shape[1] != 1:
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
        if isinstance(mod, LAYER_TYPES):
            bad = _add_layer(g, mod, path, table, dg.is_out_channel_pruning_fn(dep.handler), add, out_mods, grouped,
                             bad)
        elif isinstance(mod, nn.Embedding):
            # an embedding's output channels are its weight's columns (dim 1); a tied output layer reading
            # the same matrix is a consumer along the same dimension
            out_mods.add(mod)
            bad = bad or add(f"{path}.weight", 1, table, "producer")
            if path not in g.producers:
                g.producers.append(path)
        elif isinstance(mod, NORM_TYPES):
            bad = bad or _add_norm(g, mod, path, table, add)
        elif isinstance(mod, nn.PReLU):
            if mod.num_parameters > 1:
                bad = bad or add(f"{path}.weight", 0, table, "act")
        elif isinstance(mod, nn.MultiheadAttention):
            bad = bad or _add_mha(g, mod, path, table, add)
        else:
            bad = bad or f"layer {path!r} ({type(mod).__name__}) is not supported by the pruning engine"
    g.min_keep = max(1, g.multiple_of)
    if not g.producers and not bad:
        bad = "no conv / linear layer produces these channels"
    if grouped and not bad:
        bad = _block_grouped(g, grouped)
    if g.mha and not bad:
        bad = _block_mha(g, work_modules=names)
    return g, out_mods, bad


def _add_layer(g: ChannelGroup, mod: nn.Module, path: str, table: torch.Tensor, is_out: bool, add: Any,
               out_mods: set[nn.Module], grouped: list[tuple[str, torch.Tensor, int, int, str]], bad: str) -> str:
    """A conv / linear layer's members of group ``g`` (producer rows, consumer columns, grouped blocks);
    returns ``bad`` (the first reason the group cannot be pruned so far) or the reason found here, or ""."""
    if _is_grouped(mod):
        if mod.transposed or table.shape[1] != 1:
            return bad or f"grouped convolution {path!r} (groups={mod.groups}) is not supported here"
        # channels of a grouped conv come in `groups` blocks; every block must lose the same positions
        if is_out:
            block = mod.out_channels // mod.groups
            out_mods.add(mod)
            bad = bad or add(f"{path}.weight", 0, table, "producer")
            if mod.bias is not None:
                bad = bad or add(f"{path}.bias", 0, table, "producer")
            if path not in g.producers:
                g.producers.append(path)
            grouped.append((path, table[:, 0] % block, block, mod.groups, ""))
        else:
            block = mod.in_channels // mod.groups
            bad = bad or add(f"{path}.weight", 1, table % block, "consumer")
            grouped.append((path, table[:, 0] % block, block, mod.groups, f"{path}.weight"))
        return bad
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
    return bad


def _add_mha(g: ChannelGroup, mod: nn.MultiheadAttention, path: str, table: torch.Tensor, add: Any) -> str:
    """An ``nn.MultiheadAttention`` whose embedding channels are the group's: its packed q / k / v rows
    (``c``, ``E + c``, ``2E + c``), its input columns and its output projection's rows and columns."""
    e, h = int(mod.embed_dim), int(mod.num_heads)
    if not mod._qkv_same_embed_dim or mod.bias_k is not None or table.shape[1] != 1:
        return (f"nn.MultiheadAttention {path!r} with separate key / value widths or bias_k / bias_v: its embedding "
                "channels are kept")
    rows = torch.cat([table, table + e, table + 2 * e], 1)
    bad = add(f"{path}.in_proj_weight", 0, rows, "attn") or add(f"{path}.in_proj_weight", 1, table, "attn")
    if mod.in_proj_bias is not None:
        bad = bad or add(f"{path}.in_proj_bias", 0, rows, "attn")
    bad = bad or add(f"{path}.out_proj.weight", 0, table, "attn") or add(f"{path}.out_proj.weight", 1, table, "attn")
    if mod.out_proj.bias is not None:
        bad = bad or add(f"{path}.out_proj.bias", 0, table, "attn")
    if path not in g.mha:
        g.mha.append(path)
        g.mha_heads.append((h, e // h, table[:, 0]))
    return bad


def _block_mha(g: ChannelGroup, work_modules: Any) -> str:
    """Units of whole heads for a group that is the embedding of ``nn.MultiheadAttention`` modules: removing
    head ``j`` removes embedding channels ``[j*d, (j+1)*d)`` (their q / k / v rows, input columns and output
    projection), so ``head_dim`` and the attention scale stay and masked == physical. Every module must split
    the channels into the same heads."""
    h, d, pos = g.mha_heads[0]
    for (_h2, d2, pos2), p in zip(g.mha_heads[1:], g.mha[1:]):
        if d2 != d or not torch.equal(pos2 // d2, pos // d):
            return f"nn.MultiheadAttention {g.mha[0]!r} and {p!r} split the embedding into different heads: unsupported"
    if g.size != h * d:
        return f"nn.MultiheadAttention {g.mha[0]!r} sees only part of these channels: unsupported"
    unit_of = pos // d
    members = torch.stack([(unit_of == j).nonzero().flatten() for j in range(h)])
    for mb in g.members:
        mb.index = mb.index[members].reshape(h, -1)
    g.expansion = {c: e * d for c, e in g.expansion.items()}
    g.unit_index = members
    g.size = h
    return ""


def _block_grouped(g: ChannelGroup, grouped: list[tuple[str, torch.Tensor, int, int, str]]) -> str:
    """Make the group's units the positions inside one block of a grouped convolution it touches: unit ``j``
    is channel ``j`` of every one of the conv's ``groups`` blocks, so each block loses the same positions
    (what a dense grouped weight can express). Returns why this is impossible ("" if done)."""
    path, unit_of, block, n_groups, own = grouped[0]
    for other, u, b, _, _ in grouped[1:]:
        if b != block or not torch.equal(u, unit_of):
            return (f"grouped convolutions {path!r} and {other!r} split the channels into different blocks: "
                    "unsupported")
    members = torch.stack([(unit_of == j).nonzero().flatten() for j in range(block)]) \
        if all(int((unit_of == j).sum()) == n_groups for j in range(block)) else None
    if members is None or g.size != block * n_groups:
        return f"grouped convolution {path!r} (groups={n_groups}) sees only part of these channels: unsupported"
    for mb in g.members:
        if any(mb.tensor == t for *_, t in grouped if t):
            mb.index = torch.arange(block).view(block, 1)  # the grouped weight's per-block input position
        else:
            mb.index = mb.index[members].reshape(block, -1)
    for *_, t in grouped:
        if t:  # its input columns follow the units, but its input tensor is not read per unit
            c = t.rpartition(".")[0]
            if c in g.consumers:
                g.consumers.remove(c)
                g.expansion.pop(c, None)
    g.unit_index = members
    g.size = block
    return ""


def _head_attrs(m: nn.Module) -> tuple[int, int] | None:
    """``(heads, head_dim)`` of an attention module that splits its projections into heads (Hugging Face
    ``num_attention_heads`` / ``attention_head_size`` / ``head_dim``, timm ``num_heads`` / ``head_dim``)."""
    d = next((v for a in ("head_dim", "attention_head_size") if isinstance(v := getattr(m, a, None), int)), None)
    h = next((v for a in ("num_heads", "num_attention_heads") if isinstance(v := getattr(m, a, None), int)), None)
    if d is None or d < 1:
        return None
    return (h or 0), d


def _block_heads(work: nn.Module, g: ChannelGroup) -> str:
    """Turn a group of attention projection channels (the q / k / v outputs of one module that reshapes them
    into heads of ``head_dim``) into a group of whole heads: removing single channels would break the
    reshape, removing whole heads keeps it valid. Returns why the group cannot be pruned ("" if it can)."""
    parents = {p.rpartition(".")[0] for p in g.producers}
    if len(parents) != 1:
        return ""
    parent = parents.pop()
    attn = work.get_submodule(parent) if parent else work
    hd = _head_attrs(attn)
    if hd is None:
        return ""
    heads, d = hd
    if d == 1 or g.size % d or (heads and g.size not in (heads * d,)):
        return ""
    if g.norms or g.depthwise or g.params:
        return f"attention projections of {parent!r} feed other layers per channel: their heads cannot be pruned"
    n = g.size // d
    for mb in g.members:
        mb.index = mb.index.reshape(n, d * mb.per_channel)
    g.unit_index = torch.arange(g.size).reshape(n, d)
    g.size, g.kind = n, "heads"
    g.expansion = {c: e * d for c, e in g.expansion.items()}
    g.attention = parent
    return ""


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
    q, o = attention_parts(m)
    h, d = int(m.num_heads), int(m.head_dim)
    inner = h * d
    heads = torch.arange(h).unsqueeze(1) * d + torch.arange(d).unsqueeze(0)  # (h, d)
    qkv_rows = torch.cat([heads, heads + inner, heads + 2 * inner], 1)  # (h, 3d)
    g = ChannelGroup(
        key=path,
        size=h,
        producers=[f"{path}.{q}"],
        consumers=[f"{path}.{o}"],
        expansion={f"{path}.{o}": d},
        kind="heads",
    )
    g.members.append(Member(f"{path}.{q}.weight", 0, qkv_rows, "producer"))
    if getattr(m, q).bias is not None:
        g.members.append(Member(f"{path}.{q}.bias", 0, qkv_rows, "producer"))
    g.members.append(Member(f"{path}.{o}.weight", 1, heads, "consumer"))
    return g


class _UseRecorder:
    """Forward hooks recording, during the tracing pass, how many multiply-adds each weight entry of a
    conv / linear layer takes part in (per example) and the token count seen by attention modules."""

    def __init__(self, model: nn.Module):
        self.uses: dict[str, float] = {}
        self.tokens: dict[str, int] = {}
        self.mha_tokens: dict[str, tuple[float, float]] = {}
        self.handles = []
        for path, m in model.named_modules():
            if isinstance(m, LAYER_TYPES):
                self.handles.append(m.register_forward_hook(self._layer_hook(path)))
            elif is_attention(m):
                self.handles.append(m.register_forward_pre_hook(self._attn_hook(path)))
            elif isinstance(m, nn.MultiheadAttention):
                self.handles.append(m.register_forward_pre_hook(self._mha_hook(path), with_kwargs=True))

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

    def _mha_hook(self, path: str) -> Any:
        """Per example: the query / key token counts of an nn.MultiheadAttention (its projections and the
        attention products are read inside the module, not through hooked layers)."""

        def hook(m: nn.Module, args: tuple, kwargs: dict) -> None:
            q = args[0] if args else kwargs.get("query")
            k = args[1] if len(args) > 1 else kwargs.get("key", q)
            if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
                return
            batch = (q.shape[0] if m.batch_first else q.shape[1]) if q.dim() == 3 else 1
            nq, nk = q.numel() / m.embed_dim / batch, k.numel() / m.kdim / batch
            self.uses[path] = self.uses.get(path, 0.0) + nq  # in_proj rows meet every query token (q, k, v
            self.uses[f"{path}.out_proj"] = self.uses.get(f"{path}.out_proj", 0.0) + nq  # of self-attention)
            self.mha_tokens[path] = (nq, nk)

        return hook

    def _attn_hook(self, path: str) -> Any:
        def hook(m: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor):
                self.tokens[path] = int(args[0].shape[-2])

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


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
