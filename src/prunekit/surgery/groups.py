"""The records of the channel engine: a :class:`ChannelGroup` of coupled channels and its :class:`Member`
tensor dimensions (which positions of which parameter belong to each channel), and small predicates on
modules and paths that the graph, the allocator and the surgery share."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

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

    ``producers``: conv / linear layers whose output channels (weight dim 0; dim 1 for a transposed
    conv -- the member table records the axis, read it with :meth:`rows`) are these channels, in
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
    # a heads group found by the graph (q / k / v projections of an attention module that reshapes them):
    # ``unit_index[h]`` are the root producer's output channels of head ``h``; None for prunekit's own
    # fused-qkv head groups and for channel groups
    unit_index: torch.Tensor | None = None
    attention: str = ""  # the attention module whose heads these are
    mha: list[str] = field(default_factory=list)  # nn.MultiheadAttention modules whose embedding these are
    mha_heads: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)  # (heads, head_dim, positions)

    def layers(self) -> list[str]:
        """Every conv / linear layer touched by the group."""
        return list(dict.fromkeys(self.producers + self.depthwise + self.consumers))

    def member(self, path: str, roles: Iterable[str] = ("producer", "depthwise"), param: str = "weight") -> Member:
        """The member entry of ``path.param`` in one of ``roles``: its channel axis (``dim``: weight dim 0
        for a conv / linear producer, dim 1 for a transposed conv's output channels, the reverse for
        consumers) and the positions of each channel along it."""
        roles = tuple(roles)
        for mb in self.members:
            if mb.tensor == f"{path}.{param}" and mb.role in roles:
                return mb
        raise PruningError(
            f"layer {path!r} is not a {' / '.join(roles)} of channel group {self.key!r} "
            f"(its layers: {', '.join(self.layers()) or 'none'})"
        )

    def channel_axis(self, path: str, role: str = "producer") -> int:
        """The weight dimension of layer ``path`` that holds this group's channels (for ``role``)."""
        roles = ("producer", "depthwise") if role == "producer" else (role,)
        return self.member(path, roles).dim

    def _gather(self, model: nn.Module, mb: Member) -> torch.Tensor:
        w = _get_tensor(model, mb.tensor).detach().movedim(mb.dim, 0)
        return w[mb.index.reshape(-1).to(w.device)].reshape(self.size, -1)

    def rows(self, model: nn.Module, path: str) -> torch.Tensor:
        """Weights of producer (or depthwise) layer ``path`` with one row per channel: ``(size, n)``.

        Row ``c`` holds every weight that writes channel ``c`` (for an attention head: its q, k and v
        rows), read along the axis the graph recorded for the layer -- weight dim 0 for a conv or a
        linear layer, dim 1 for a transposed convolution -- so every scorer sees the same channels."""
        return self._gather(model, self.member(path, ("producer", "depthwise")))

    def columns(self, model: nn.Module, path: str) -> torch.Tensor:
        """Weights of consumer layer ``path`` that read each channel: ``(size, n)`` (input dim 1 of a conv
        or linear weight, dim 0 of a transposed conv; ``H*W`` columns per channel after a flatten)."""
        return self._gather(model, self.member(path, ("consumer",)))

    ln_coupled: bool = False  # a LayerNorm / GroupNorm normalises over these channels: removing them changes
    # its statistics, so masked and physical pruning differ slightly for such groups


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


# (fused q/k/v linear, output projection) attribute names of attention modules: timm, GPT-2 (c_attn / c_proj
# once its Conv1D layers are linear, see prunekit.surgery.convert)
ATTENTION_PARTS = (("qkv", "proj"), ("c_attn", "c_proj"))


def attention_parts(m: nn.Module) -> tuple[str, str] | None:
    """The names of the fused ``qkv`` linear (``3 * num_heads * head_dim`` outputs) and the output
    projection of a multi-head attention module with int ``num_heads`` / ``head_dim``; None otherwise."""
    h, d = getattr(m, "num_heads", None), getattr(m, "head_dim", None)
    if not isinstance(h, int) or not isinstance(d, int):
        return None
    for q, o in ATTENTION_PARTS:
        qkv, proj = getattr(m, q, None), getattr(m, o, None)
        if (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and qkv.out_features == 3 * h * d
                and proj.in_features == h * d):
            return q, o
    return None


def is_attention(m: nn.Module) -> bool:
    """A multi-head attention module prunekit can prune by heads: int ``num_heads`` / ``head_dim``,
    a fused ``qkv`` (or ``c_attn``) linear with ``3 * num_heads * head_dim`` outputs and a ``proj``
    (or ``c_proj``) linear."""
    return attention_parts(m) is not None


def _has_masks(model: nn.Module) -> bool:
    return any(parametrize.is_parametrized(m) for m in model.modules()) or any(
        b.endswith("_mask") for b, _ in model.named_buffers()
    )


def _matches(path: str, patterns: Iterable[str]) -> str | None:
    for p in patterns:
        if path == p or path.startswith(p + "."):
            return p
    return None


__all__ = ["LAYER_TYPES", "NORM_TYPES", "ChannelGroup", "Member", "PruningWarning", "is_attention", "tensor_shapes"]
