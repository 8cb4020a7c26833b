"""What a pruning method decides, independent of how it is applied.

A :class:`Plan` is produced by a method and applied by :func:`prunekit.surgery.apply_plan`,
either *masked* (reversible: parametrizations zero the removed weights / channels)
or *physically* (modules really shrink). A method never edits modules itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class LowRankFactors:
    """Replace a conv / linear layer by a chain of smaller layers.

    For a layer computing ``y = W x + b`` the chain computes
    ``y = post(core(pre(x))) + b``:

    * ``pre``: optional ``(r_in, in)`` matrix, a 1x1 conv / linear projecting the input
      onto ``r_in`` directions (``None``: no input projection);
    * ``core``: the middle weight, ``(r_out, r_in, kh, kw)`` for conv (keeps the layer's
      stride/padding/dilation) or ``(r_out, r_in)`` for linear;
    * ``post``: optional ``(out, r_out)`` matrix, a 1x1 conv / linear back to ``out`` channels.

    ``bias`` (shape ``(out,)``) goes on the last layer of the chain. The layer's
    input/output channel counts are unchanged, so neighbours need no edit.
    """

    core: torch.Tensor
    pre: torch.Tensor | None = None
    post: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def dense_weight(self) -> torch.Tensor:
        """The equivalent full weight (for masked application and tests)."""
        w = self.core
        if self.pre is not None:
            w = torch.einsum("oi...,ij->oj...", w, self.pre)
        if self.post is not None:
            w = torch.einsum("po,oj...->pj...", self.post, w)
        return w

    def num_params(self) -> int:
        n = self.core.numel()
        n += self.pre.numel() if self.pre is not None else 0
        n += self.post.numel() if self.post is not None else 0
        return n + (self.bias.numel() if self.bias is not None else 0)


@dataclass
class Plan:
    """A pruning decision.

    masks
        parameter path -> bool tensor of the parameter's shape, True = keep
        (unstructured or N:M weight pruning).
    channels
        channel-group key (see :class:`prunekit.surgery.ChannelGroup`) -> sorted
        LongTensor of the channel indices to KEEP in that coupled group.
    weights
        parameter path -> replacement tensor, in the layer's shape *after* the
        plan's channel removal (interpolative decomposition folds its
        interpolation matrix into consumers; OBS applies its weight update).
    lowrank
        module path -> :class:`LowRankFactors` replacing that conv / linear.
    meta
        free-form information (scores, chosen ranks, ...) reported to the user.
    """

    method: str = ""
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    channels: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    lowrank: dict[str, LowRankFactors] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary (sizes, not tensors)."""
        return {
            "method": self.method,
            "masks": {k: {"kept": int(v.sum()), "total": v.numel()} for k, v in self.masks.items()},
            "channels": {k: int(v.numel()) for k, v in self.channels.items()},
            "weights": sorted(self.weights),
            "lowrank": {k: {"core": list(f.core.shape), "params": f.num_params()} for k, f in self.lowrank.items()},
        }
