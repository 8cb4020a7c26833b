"""Low-rank replacements of conv / linear layers (chains of plain layers).

:class:`LowRankConv2d` and :class:`LowRankLinear` are ``nn.Sequential`` chains
``pre -> core -> post`` built from :class:`~prunekit.surgery.plan.LowRankFactors`. Their input and
output sizes equal those of the layer they replace, so neighbours need no edit. Both are
registered with :func:`prunekit.specs.register_module_spec`, so checkpoints of factorised models
load without pickled classes.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn

from prunekit.errors import PruningError
from prunekit.specs import conv_geometry, register_module_spec
from prunekit.surgery.plan import LowRankFactors


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class LowRankConv2d(nn.Sequential):
    """``Conv2d`` factorised as 1x1 ``pre`` (optional) -> ``core`` (the layer's kernel, stride, padding)
    -> 1x1 ``post`` (optional); the bias sits on the last conv.

    ``r_in`` / ``r_out`` are the ranks of the input / output projections (``None``: no projection).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        r_in: int | None = None,
        r_out: int | None = None,
        bias: bool = True,
        padding_mode: str = "zeros",
    ):
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        cin = in_channels
        if r_in is not None:
            layers["pre"] = nn.Conv2d(in_channels, r_in, 1, bias=False)
            cin = r_in
        cout = r_out if r_out is not None else out_channels
        layers["core"] = nn.Conv2d(
            cin,
            cout,
            kernel_size,
            stride,
            padding,
            dilation,
            bias=bias and r_out is None,
            padding_mode=padding_mode,
        )
        if r_out is not None:
            layers["post"] = nn.Conv2d(r_out, out_channels, 1, bias=bias)
        super().__init__(layers)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation, self.padding_mode = _pair(dilation), padding_mode
        self.r_in, self.r_out, self.has_bias = r_in, r_out, bool(bias)

    @classmethod
    def from_factors(cls, layer: nn.Conv2d, f: LowRankFactors) -> LowRankConv2d:
        """Build the chain replacing ``layer`` from its factors (shapes checked)."""
        if layer.groups != 1:
            raise PruningError(
                f"low-rank replacement of a grouped convolution (groups={layer.groups}) is not supported"
            )
        r_in = None if f.pre is None else int(f.pre.shape[0])
        r_out = None if f.post is None else int(f.post.shape[1])
        m = cls(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            r_in,
            r_out,
            bias=f.bias is not None,
            padding_mode=layer.padding_mode,
        )
        _load(m, f, conv=True)
        return m.to(layer.weight.device, layer.weight.dtype)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent ``(out, in, kh, kw)`` weight."""
        return _dense(self, conv=True)


class LowRankLinear(nn.Sequential):
    """``Linear`` factorised as ``pre`` (optional, ``in -> r_in``) -> ``core`` -> ``post`` (optional)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r_in: int | None = None,
        r_out: int | None = None,
        bias: bool = True,
    ):
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        cin = in_features
        if r_in is not None:
            layers["pre"] = nn.Linear(in_features, r_in, bias=False)
            cin = r_in
        cout = r_out if r_out is not None else out_features
        layers["core"] = nn.Linear(cin, cout, bias=bias and r_out is None)
        if r_out is not None:
            layers["post"] = nn.Linear(r_out, out_features, bias=bias)
        super().__init__(layers)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.r_in, self.r_out, self.has_bias = r_in, r_out, bool(bias)

    @classmethod
    def from_factors(cls, layer: nn.Linear, f: LowRankFactors) -> LowRankLinear:
        r_in = None if f.pre is None else int(f.pre.shape[0])
        r_out = None if f.post is None else int(f.post.shape[1])
        m = cls(layer.in_features, layer.out_features, r_in, r_out, bias=f.bias is not None)
        _load(m, f, conv=False)
        return m.to(layer.weight.device, layer.weight.dtype)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent ``(out, in)`` weight."""
        return _dense(self, conv=False)


def _load(m: nn.Sequential, f: LowRankFactors, conv: bool) -> None:
    def put(layer: nn.Module, w: torch.Tensor, name: str) -> None:
        target = layer.weight
        w = w.detach().to(target.dtype)
        if conv and w.dim() == 2:
            w = w[:, :, None, None]
        if tuple(w.shape) != tuple(target.shape):
            raise PruningError(
                f"low-rank factor {name!r} has shape {tuple(w.shape)}, the layer needs {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(w)

    with torch.no_grad():
        if f.pre is not None:
            put(m.pre, f.pre, "pre")
        put(m.core, f.core, "core")
        if f.post is not None:
            put(m.post, f.post, "post")
        if f.bias is not None:
            last = m.post if f.post is not None else m.core
            if tuple(f.bias.shape) != tuple(last.bias.shape):
                raise PruningError(
                    f"low-rank bias has shape {tuple(f.bias.shape)}, the layer needs {tuple(last.bias.shape)}"
                )
            last.bias.copy_(f.bias.detach().to(last.bias.dtype))


def _dense(m: nn.Sequential, conv: bool) -> torch.Tensor:
    w = m.core.weight
    if "pre" in m._modules:
        pre = m.pre.weight.flatten(1)
        w = torch.einsum("oi...,ij->oj...", w, pre)
    if "post" in m._modules:
        post = m.post.weight.flatten(1)
        w = torch.einsum("po,oj...->pj...", post, w)
    return w


def factors_to_module(layer: nn.Module, f: LowRankFactors) -> nn.Module:
    """The chain replacing ``layer`` (a ``Conv2d`` or ``Linear``)."""
    if isinstance(layer, nn.Conv2d):
        return LowRankConv2d.from_factors(layer, f)
    if isinstance(layer, nn.Linear):
        return LowRankLinear.from_factors(layer, f)
    raise PruningError(f"low-rank replacement needs a Conv2d or Linear layer, got {type(layer).__name__}")


register_module_spec(
    LowRankConv2d,
    lambda m: {**conv_geometry(m), "r_in": m.r_in, "r_out": m.r_out, "bias": m.has_bias},
)
register_module_spec(
    LowRankLinear,
    lambda m: {
        "in_features": m.in_features,
        "out_features": m.out_features,
        "r_in": m.r_in,
        "r_out": m.r_out,
        "bias": m.has_bias,
    },
)

__all__ = ["LowRankConv2d", "LowRankLinear", "factors_to_module"]
