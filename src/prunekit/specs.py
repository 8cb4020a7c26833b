"""Module specs: the JSON-able constructor arguments of a layer, so a checkpoint can rebuild it.

The bottom of the package (it imports only torch): :mod:`prunekit.io` writes and replays these
specs, and layers prunekit creates (low-rank chains, ...) register theirs with
:func:`register_module_spec` where they are defined.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn

# Integer attributes of custom modules that pruning may change (e.g. attention heads).
_SHAPE_ATTRS = ("num_heads", "head_dim", "embed_dim", "dim", "hidden_dim", "in_features", "out_features")


def conv_geometry(m: Any) -> dict[str, Any]:
    """The JSON-able constructor geometry shared by convolutions and conv-like replacements."""
    return {
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "kernel_size": list(m.kernel_size),
        "stride": list(m.stride),
        "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
        "dilation": list(m.dilation),
        "padding_mode": m.padding_mode,
    }


def _conv_spec(m: nn.modules.conv._ConvNd) -> dict[str, Any]:
    return {**conv_geometry(m), "groups": m.groups, "bias": m.bias is not None}


def _bn_spec(m: nn.modules.batchnorm._BatchNorm) -> dict[str, Any]:
    return {
        "num_features": m.num_features,
        "eps": m.eps,
        "momentum": m.momentum,
        "affine": m.affine,
        "track_running_stats": m.track_running_stats,
    }


# type name -> (class, spec function). Extended by `register_module_spec`.
_SPECS: dict[str, tuple[type[nn.Module], Callable[[nn.Module], dict[str, Any]]]] = {
    "Conv1d": (nn.Conv1d, _conv_spec),
    "Conv2d": (nn.Conv2d, _conv_spec),
    "Linear": (nn.Linear, lambda m: {"in_features": m.in_features, "out_features": m.out_features,
                                     "bias": m.bias is not None}),
    "BatchNorm1d": (nn.BatchNorm1d, _bn_spec),
    "BatchNorm2d": (nn.BatchNorm2d, _bn_spec),
    "LayerNorm": (nn.LayerNorm, lambda m: {"normalized_shape": list(m.normalized_shape), "eps": m.eps,
                                           "elementwise_affine": m.elementwise_affine,
                                           "bias": getattr(m, "bias", None) is not None}),
    "GroupNorm": (nn.GroupNorm, lambda m: {"num_groups": m.num_groups, "num_channels": m.num_channels,
                                           "eps": m.eps, "affine": m.affine}),
    "Identity": (nn.Identity, lambda m: {}),
    "Sequential": (nn.Sequential, lambda m: {}),
}


def register_module_spec(cls: type[nn.Module], spec_fn: Callable[[nn.Module], dict[str, Any]]) -> None:
    """Let checkpoints rebuild instances of ``cls`` (``cls(**spec_fn(module))`` must recreate it)."""
    _SPECS[cls.__name__] = (cls, spec_fn)


def module_spec(m: nn.Module) -> dict[str, Any] | None:
    """The spec of one module (type, constructor args, shape attributes), or None for an unknown type."""
    name = type(m).__name__
    entry = _SPECS.get(name)
    spec: dict[str, Any] = {"type": name}
    if entry is not None and type(m) is entry[0]:
        spec["args"] = entry[1](m)
    attrs = {a: getattr(m, a) for a in _SHAPE_ATTRS if isinstance(getattr(m, a, None), int)
             and not isinstance(getattr(m, a), bool)}
    if entry is None and not attrs:
        return None
    if attrs and entry is None:
        spec["attrs"] = attrs
    return spec


__all__ = ["conv_geometry", "module_spec", "register_module_spec"]
