"""Reversible (masked) pruning with torch parametrizations.

A mask is a boolean tensor of a parameter's shape; ``apply_masks_`` registers a
parametrization that multiplies the parameter by it, so that training keeps
pruned weights at zero. ``baked_state_and_masks`` folds masks (ours or
``torch.nn.utils.prune``'s) into a plain state dict for saving.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import parametrize


class Mask(nn.Module):
    """Parametrization ``w -> w * mask``; the mask is a (non-trainable) buffer."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask.to(w.dtype)


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own.

    ``torch.nn.utils.parametrize`` injects one class per parametrized module, but a deep copy
    shares it with the original; registering or removing a parametrization on the copy would then
    add / delete properties of the original's class too. A private copy of the class avoids that.
    """
    if parametrize.is_parametrized(module):
        cls = type(module)
        module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))


def _split(name: str) -> tuple[str, str]:
    mod, _, p = name.rpartition(".")
    return mod, p


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The masks applied to ``model``: ours (parametrizations) and torch.nn.utils.prune's."""
    out: dict[str, torch.Tensor] = {}
    for mpath, m in model.named_modules():
        prefix = f"{mpath}." if mpath else ""
        if parametrize.is_parametrized(m):
            for pname, plist in m.parametrizations.items():
                masks = [p.mask for p in plist if isinstance(p, Mask)]
                if masks:
                    total = masks[0]
                    for extra in masks[1:]:
                        total = total & extra
                    out[prefix + pname] = total.clone()
        for bname, b in m.named_buffers(recurse=False):
            if bname.endswith("_mask") and hasattr(m, bname[: -len("_mask")] + "_orig"):
                out[prefix + bname[: -len("_mask")]] = b.to(torch.bool).clone()
    return out


def apply_masks_(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Mask parameters in place (``masks``: parameter path -> bool tensor). Re-masking combines masks."""
    for name, mask in masks.items():
        mpath, pname = _split(name)
        module = model.get_submodule(mpath) if mpath else model
        current = getattr(module, pname)
        if tuple(mask.shape) != tuple(current.shape):
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, parameter has {tuple(current.shape)}")
        _own_class(module)
        parametrize.register_parametrization(module, pname, Mask(mask.to(current.device)))
    return model


def remove_masks_(model: nn.Module) -> nn.Module:
    """Bake masks into the weights and drop the parametrizations (pruned weights stay zero)."""
    for m in model.modules():
        if parametrize.is_parametrized(m):
            _own_class(m)
            for pname in list(m.parametrizations.keys()):
                if any(isinstance(p, Mask) for p in m.parametrizations[pname]):
                    parametrize.remove_parametrizations(m, pname, leave_parametrized=True)
    for m in model.modules():
        for bname in [b for b, _ in m.named_buffers(recurse=False) if b.endswith("_mask")]:
            pname = bname[: -len("_mask")]
            if hasattr(m, pname + "_orig"):
                torch.nn.utils.prune.remove(m, pname)
    return model


def baked_state_and_masks(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A plain state dict with every mask folded into its weight, and the masks."""
    masks = get_masks(model)
    state: dict[str, torch.Tensor] = {}
    for mpath, m in model.named_modules():
        prefix = f"{mpath}." if mpath else ""
        for pname, p in m.named_parameters(recurse=False):
            if pname.endswith("_orig") and hasattr(m, pname[: -len("_orig")] + "_mask"):
                base = pname[: -len("_orig")]
                state[prefix + base] = getattr(m, base).detach().clone()
            else:
                state[prefix + pname] = p.detach().clone()
        if parametrize.is_parametrized(m):
            for pname in m.parametrizations.keys():
                state[prefix + pname] = getattr(m, pname).detach().clone()
        for bname, b in m.named_buffers(recurse=False):
            if bname.endswith("_mask") and hasattr(m, bname[: -len("_mask")] + "_orig"):
                continue
            if bname in getattr(m, "_non_persistent_buffers_set", set()):
                continue
            state[prefix + bname] = b.detach().clone()
    # parametrized modules expose "parametrizations.*" children; drop their internals
    plain = {k: v for k, v in state.items() if ".parametrizations." not in k and not k.startswith("parametrizations.")}
    return plain, masks
