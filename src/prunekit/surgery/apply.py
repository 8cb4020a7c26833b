"""Applying a :class:`~prunekit.surgery.plan.Plan` to a model, masked or physically.

``mode="physical"`` really shrinks the model: for each coupled channel group of the plan the
complement of the kept channels is removed with Torch-Pruning (``get_pruning_group(...).prune()``;
attention heads by prunekit itself), then weight replacements are copied in, low-rank layers are
replaced by factor chains and unstructured masks are baked into the weights.

``mode="masked"`` keeps every shape and zeroes instead, with :class:`~prunekit.surgery.masks.Mask`
parametrizations (training keeps the zeros): for a channel group, producer rows and biases,
norm weights and biases, depthwise filters, free parameters and consumer input columns. Without
weight replacements both modes compute the same function (LayerNorm / GroupNorm-coupled groups
excepted: removing channels changes the norm's statistics, zeroing them does not).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from prunekit.errors import PruningError
from prunekit.surgery.graph import (
    ChannelGraph,
    ChannelGroup,
    _complement,
    _has_masks,
    analyze,
    attention_parts,
    tensor_shapes,
)
from prunekit.surgery.lowrank import factors_to_module
from prunekit.surgery.masks import apply_masks_, get_masks, remove_masks_
from prunekit.surgery.plan import Plan

MODES = ("physical", "masked")


def apply_plan(model: nn.Module, plan: Plan, *args: Any, **kwargs: Any) -> nn.Module:
    """Apply ``plan`` to a deep copy of ``model`` and return the copy; the other arguments
    (``graph``, ``mode``, ``example_input``) are those of :func:`apply_plan_`."""
    return apply_plan_(copy.deepcopy(model), plan, *args, **kwargs)


def apply_plan_(
    model: nn.Module,
    plan: Plan,
    graph: ChannelGraph | None = None,
    mode: str = "physical",
    example_input: torch.Tensor | Sequence[int] | None = None,
) -> nn.Module:
    """Apply ``plan`` to ``model`` in place and return it.

    Args:
        model: the model the plan was made for (same shapes).
        plan: channels to keep per group, weight replacements, low-rank factors, masks.
        graph: the :class:`ChannelGraph` of ``model`` (built here when missing or stale).
        mode: ``"physical"`` (remove channels, replace layers) or ``"masked"`` (zero them, reversible).
        example_input: an input batch or shape ``(C, H, W)`` for tracing (default: the zoo model's).

    Raises:
        PruningError: unknown group / layer / parameter, a group that cannot be pruned, a plan that
            keeps no channel of a group, or replacement shapes that do not match.
    """
    if mode not in MODES:
        raise PruningError(f"mode must be 'physical' or 'masked', got {mode!r}")
    if not isinstance(plan, Plan):
        raise PruningError(f"expected a prunekit Plan, got {type(plan).__name__}")
    channels = {k: _as_index(v, k) for k, v in plan.channels.items()}
    if channels:
        if example_input is None and graph is not None:
            example_input = graph.input_shape
        if (
            graph is None
            or any(k not in graph.groups for k in channels)
            or graph.layer_shapes != tensor_shapes(model)
        ):
            graph = analyze(model, example_input, heads=True, warn=False, costs=False)
        _check_channels(graph, channels)
    if mode == "physical":
        _physical(model, plan, channels, graph, example_input)
    else:
        _masked(model, plan, channels, graph)
    history = list(getattr(model, "prunekit_history", []))
    history.append({"mode": mode, **plan.describe()})
    model.prunekit_history = history
    return model


# --------------------------------------------------------------------------------------------- checks
def _as_index(v: Any, key: str) -> torch.Tensor:
    t = torch.as_tensor(v)
    if t.dtype == torch.bool:
        t = t.nonzero().flatten()
    if t.dim() != 1 or t.is_floating_point():
        raise PruningError(f"plan.channels[{key!r}] must be a 1-D tensor of channel indices to keep")
    return t.long().cpu().sort().values


def _check_channels(graph: ChannelGraph, channels: dict[str, torch.Tensor]) -> None:
    for key, keep in channels.items():
        g = graph.groups.get(key)
        if g is None:
            raise PruningError(
                f"the plan refers to channel group {key!r}, which this model does not have; its groups "
                f"are: {', '.join(sorted(graph.groups))}"
            )
        if not g.prunable:
            raise PruningError(f"channel group {key!r} cannot be pruned: {g.reason}")
        if keep.numel() == 0:
            raise PruningError(
                f"the plan keeps no channel of group {key!r} ({g.size} channels; layers "
                f"{', '.join(g.layers())}): every layer must keep at least one channel"
            )
        if int(keep.min()) < 0 or int(keep.max()) >= g.size:
            raise PruningError(f"plan.channels[{key!r}] has indices outside [0, {g.size})")
        if keep.unique().numel() != keep.numel():
            raise PruningError(f"plan.channels[{key!r}] lists a channel twice")
        if keep.numel() % g.multiple_of and keep.numel() != g.size:
            raise PruningError(
                f"group {key!r} is normalised by a GroupNorm with {g.multiple_of} groups: keep a "
                f"multiple of {g.multiple_of} channels, not {keep.numel()}"
            )


# --------------------------------------------------------------------------------------------- tensors
def _split(path: str) -> tuple[str, str]:
    mod, _, name = path.rpartition(".")
    return mod, name


def _owner(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    mod_path, name = _split(path)
    try:
        mod = model.get_submodule(mod_path) if mod_path else model
    except AttributeError:
        raise PruningError(f"the model has no module {mod_path!r} (for {path!r})") from None
    return mod, name


def _raw(model: nn.Module, path: str) -> torch.Tensor:
    """The stored tensor behind ``path`` (the original of a parametrized parameter)."""
    mod, name = _owner(model, path)
    if parametrize.is_parametrized(mod, name):
        return mod.parametrizations[name].original
    t = mod._parameters.get(name)
    if t is None:
        t = mod._buffers.get(name)
    if t is None:
        raise PruningError(f"the model has no parameter or buffer {path!r}")
    return t


def _full_index(shape: Sequence[int], dims: dict[int, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Broadcastable advanced index selecting the kept positions of every dimension."""
    out = []
    for d, s in enumerate(shape):
        idx = dims.get(d, torch.arange(s))
        view = [1] * len(shape)
        view[d] = -1
        out.append(idx.view(view))
    return tuple(out)


def _keep_mask(shape: Sequence[int], dims: dict[int, torch.Tensor]) -> torch.Tensor:
    m = torch.ones(tuple(shape), dtype=torch.bool)
    for d, idx in dims.items():
        v = torch.zeros(shape[d], dtype=torch.bool)
        v[idx] = True
        view = [1] * len(shape)
        view[d] = -1
        m &= v.view(view)
    return m


def _pruned_shape(shape: Sequence[int], dims: dict[int, torch.Tensor]) -> tuple[int, ...]:
    return tuple(len(dims[d]) if d in dims else s for d, s in enumerate(shape))


# --------------------------------------------------------------------------------------------- physical
def _physical(
    model: nn.Module,
    plan: Plan,
    channels: dict[str, torch.Tensor],
    graph: ChannelGraph | None,
    example_input: Any,
) -> None:
    pre_masks: dict[str, torch.Tensor] = {}
    kept: dict[str, dict[int, torch.Tensor]] = {}
    if channels:
        assert graph is not None
        kept = graph.kept_dims(channels)
        if _has_masks(model):  # bake the masks, prune, then re-apply the surviving part of each mask
            pre_masks = get_masks(model)
            remove_masks_(model)
        if not graph.bound_to(model):
            graph = analyze(
                model,
                example_input if example_input is not None else graph.input_shape,
                heads=True,
                warn=False,
                costs=False,
            )
        expected = {t: _pruned_shape(graph.layer_shapes[t], dims) for t, dims in kept.items()}
        dg = graph._dg
        for key, keep in channels.items():
            g = graph.groups[key]
            remove = _complement(keep, g.size)
            if remove.numel() == 0:
                continue
            if g.kind == "heads" and g.unit_index is None:
                _prune_heads(model, g, keep)
            elif g.unit_index is not None:  # whole heads of an attention module: their channels, by Torch-Pruning
                root = model.get_submodule(g.key)
                pruner = dg.get_pruner_of_module(root)
                idx = g.unit_index[remove].reshape(-1).tolist()
                mhas = [model.get_submodule(p) for p in g.mha]
                for m in mhas:  # Torch-Pruning keeps the head count and shrinks head_dim; prunekit removes heads
                    m.num_heads = 1
                dg.get_pruning_group(root, pruner.prune_out_channels, idx).prune()
                for m, (_, d, _) in zip(mhas, g.mha_heads):
                    m.num_heads, m.head_dim = int(m.embed_dim) // d, d
                _update_head_count(model, g, int(keep.numel()))
            else:
                root = model.get_submodule(g.key)
                pruner = dg.get_pruner_of_module(root)
                dg.get_pruning_group(root, pruner.prune_out_channels, remove.tolist()).prune()
        graph._signature = None  # the Torch-Pruning graph no longer matches the plan's indices
        shapes = tensor_shapes(model)
        for t, shape in expected.items():
            if shapes.get(t) != shape:
                raise PruningError(
                    f"internal error: after pruning, {t!r} has shape {shapes.get(t)}, expected {shape}; "
                    "please report this model"
                )
    for path, w in plan.weights.items():
        target = _raw(model, path)
        if tuple(w.shape) != tuple(target.shape):
            raise PruningError(
                f"plan.weights[{path!r}] has shape {tuple(w.shape)} but the layer has "
                f"{tuple(target.shape)} after channel removal"
            )
        with torch.no_grad():
            target.copy_(w.to(target.device, target.dtype))
    for path, f in plan.lowrank.items():
        layer = _layer(model, path)
        new = factors_to_module(layer, f)
        parent, name = _owner(model, path)
        setattr(parent, name, new)
    masks: dict[str, torch.Tensor] = {}
    for path, m in pre_masks.items():  # slice masks of the masked model to the pruned shapes
        dims = kept.get(path, {})
        masks[path] = m[_full_index(m.shape, dims)] if dims else m
    for path, m in plan.masks.items():
        cur = _raw(model, path)
        m = torch.as_tensor(m, dtype=torch.bool).cpu()
        if tuple(m.shape) != tuple(cur.shape):
            dims = kept.get(path, {})
            full_ok = dims and tuple(m.shape) == tuple(graph.layer_shapes.get(path, ())) if graph else False
            if not full_ok:
                raise PruningError(
                    f"plan.masks[{path!r}] has shape {tuple(m.shape)}, the parameter has {tuple(cur.shape)}"
                )
            m = m[_full_index(m.shape, dims)]
        with torch.no_grad():
            cur.mul_(m.to(cur.device, cur.dtype))
    if masks:
        apply_masks_(model, {k: v for k, v in masks.items() if not bool(v.all())})


def _layer(model: nn.Module, path: str) -> nn.Module:
    try:
        layer = model.get_submodule(path)
    except AttributeError:
        raise PruningError(f"plan.lowrank refers to {path!r}, which the model does not have") from None
    if not isinstance(layer, (nn.Conv2d, nn.Linear)):
        raise PruningError(
            f"plan.lowrank[{path!r}] must replace a Conv2d or Linear layer, not {type(layer).__name__}"
        )
    return layer


def _update_head_count(model: nn.Module, g: ChannelGroup, heads: int) -> None:
    """The attention module's head count and widths after keeping ``heads`` of its heads."""
    attn = model.get_submodule(g.attention) if g.attention else None
    if attn is None:
        return
    d = int(g.unit_index.shape[1])
    for name in ("num_heads", "num_attention_heads"):
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, heads)
    for name in ("all_head_size", "inner_dim"):
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, heads * d)
    if isinstance(getattr(attn, "split_size", None), int):
        attn.split_size = heads * d


def _prune_heads(model: nn.Module, g: ChannelGroup, keep: torch.Tensor) -> None:
    attn = model.get_submodule(g.key)
    for mb in g.members:
        mod, name = _owner(model, mb.tensor)
        t = getattr(mod, name)
        idx = mb.positions(keep).to(t.device)
        new = nn.Parameter(t.detach().index_select(mb.dim, idx).clone(), requires_grad=t.requires_grad)
        setattr(mod, name, new)
    q, o = attention_parts(attn) or ("qkv", "proj")
    getattr(attn, q).out_features = int(getattr(attn, q).weight.shape[0])
    getattr(attn, o).in_features = int(getattr(attn, o).weight.shape[1])
    attn.num_heads = int(keep.numel())
    if isinstance(getattr(attn, "split_size", None), int):  # GPT-2 splits its fused projection at split_size
        attn.split_size = int(keep.numel()) * int(attn.head_dim)


# --------------------------------------------------------------------------------------------- masked
def _masked(
    model: nn.Module, plan: Plan, channels: dict[str, torch.Tensor], graph: ChannelGraph | None
) -> None:
    kept = graph.kept_dims(channels) if channels and graph is not None else {}
    params = {n for n, _ in _named_effective_params(model)}
    masks: dict[str, torch.Tensor] = {}
    for path, dims in kept.items():
        if path in params:
            masks[path] = _keep_mask(_raw(model, path).shape, dims)
    for path, w in plan.weights.items():
        target = _raw(model, path)
        dims = kept.get(path, {})
        w = w.detach().to(target.device, target.dtype)
        with torch.no_grad():
            if tuple(w.shape) == tuple(target.shape):
                target.copy_(w)
            elif tuple(w.shape) == _pruned_shape(target.shape, dims):
                target[_full_index(target.shape, dims)] = w
            else:
                raise PruningError(
                    f"plan.weights[{path!r}] has shape {tuple(w.shape)}; expected "
                    f"{_pruned_shape(target.shape, dims)} (after channel removal)"
                )
    for path, f in plan.lowrank.items():
        layer = _layer(model, path)
        dense = f.dense_weight()
        target = _raw(model, f"{path}.weight")
        if tuple(dense.shape) != tuple(target.shape):
            raise PruningError(
                f"plan.lowrank[{path!r}] rebuilds a weight of shape {tuple(dense.shape)}, the layer "
                f"has {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(dense.to(target.dtype))
            if f.bias is not None:
                if layer.bias is None:
                    raise PruningError(f"plan.lowrank[{path!r}] has a bias but the layer has none")
                _raw(model, f"{path}.bias").copy_(f.bias.to(target.dtype))
    for path, m in plan.masks.items():
        target = _raw(model, path)
        m = torch.as_tensor(m, dtype=torch.bool).cpu()
        dims = kept.get(path, {})
        if tuple(m.shape) == tuple(target.shape):
            full = m
        elif dims and tuple(m.shape) == _pruned_shape(target.shape, dims):
            full = torch.zeros(tuple(target.shape), dtype=torch.bool)
            full[_full_index(target.shape, dims)] = m
        else:
            raise PruningError(
                f"plan.masks[{path!r}] has shape {tuple(m.shape)}, the parameter has {tuple(target.shape)}"
            )
        masks[path] = masks[path] & full if path in masks else full
    if masks:
        apply_masks_(model, {k: v for k, v in masks.items() if not bool(v.all())})


def _named_effective_params(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    out = []
    for mpath, m in model.named_modules():
        prefix = f"{mpath}." if mpath else ""
        for name, p in m._parameters.items():
            if p is not None:
                out.append((prefix + name, p))
        if parametrize.is_parametrized(m):
            for name in m.parametrizations.keys():
                out.append((prefix + name, getattr(m, name)))
    return [(n, p) for n, p in out if ".parametrizations." not in n and not n.startswith("parametrizations.")]


__all__ = ["MODES", "apply_plan", "apply_plan_"]
