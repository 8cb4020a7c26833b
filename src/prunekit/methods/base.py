"""The interface every pruning method implements.

A method turns a model (+ data, gradients, trajectories as it declares) into a
:class:`~prunekit.surgery.plan.Plan`. Most methods only *score*; subclass

* :class:`ChannelScorer` and implement ``score`` -> one score per channel of each
  coupled channel group (higher = more important); the shared allocator turns
  scores into kept-channel sets meeting the budget;
* :class:`WeightScorer` and implement ``score`` -> one score per weight; the shared
  allocator turns scores into masks;
* :class:`Method` and implement ``plan`` directly for anything else (ID, EigenDamage,
  low rank).

Example -- a complete channel criterion::

    @register_method("l1", granularity="channel")
    class L1(ChannelScorer):
        def score(self, model, ctx):
            return {g.key: ctx.producer_rows(model, g).abs().sum(1) for g in ctx.groups()}
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from prunekit.budget import BudgetOptions, PruneContext, Target  # noqa: F401  (re-exported)
from prunekit.errors import PruningError
from prunekit.methods.options import validate_options
from prunekit.surgery.plan import Plan


# --------------------------------------------------------------------------------------------- methods
class Method:
    """Base class. Subclasses set ``defaults`` (option name -> default value); an option's type is
    its default's type unless ``option_types`` (name -> :class:`~prunekit.methods.options.OptionType`)
    says otherwise, and ``option_help`` (name -> one line) documents it (see :mod:`prunekit.methods.options`)."""

    name: str = "?"
    info: Any = None
    defaults: dict[str, Any] = {}
    option_types: dict[str, Any] = {}
    option_help: dict[str, str] = {}

    def __init__(self, **options: Any):
        self.options = validate_options(type(self), self.name, options)

    def __getattr__(self, key: str) -> Any:  # options read as attributes: self.k
        opts = self.__dict__.get("options", {})
        if key in opts:
            return opts[key]
        raise AttributeError(key)

    def check(self, ctx: PruneContext) -> None:
        """Validate the context before planning (data present, trajectory present...)."""
        if self.info is not None and self.info.needs_data:
            ctx.require_data(self.name)
        if self.info is not None and self.info.needs_trajectory and ctx.trajectory is None:
            raise PruningError(f"method {self.name!r} needs a parameter trajectory recorded during training "
                               "(prunekit.train.TrajectoryRecorder, or `prunekit train --record-trajectory`)")

    def plan(self, model: nn.Module, ctx: PruneContext) -> Plan:
        raise NotImplementedError


class ChannelScorer(Method):
    """Channel method defined by a per-channel importance score (higher = keep)."""

    lower_is_better = False  # set True if the natural score is "smaller = keep"

    def score(self, model: nn.Module, ctx: PruneContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def checked_scores(
        self, model: nn.Module, ctx: PruneContext, dtype: torch.dtype = torch.float32
    ) -> dict[str, torch.Tensor]:
        """``score`` on the CPU in ``dtype``, negated if lower is better; non-finite scores are an error."""
        scores = {k: v.detach().to(dtype).cpu() for k, v in self.score(model, ctx).items()}
        if self.lower_is_better:
            scores = {k: -v for k, v in scores.items()}
        for k, v in scores.items():
            if not torch.isfinite(v).all():
                raise PruningError(f"method {self.name!r} produced non-finite scores for group {k!r}")
        return scores

    def plan(self, model: nn.Module, ctx: PruneContext) -> Plan:
        from prunekit.surgery.allocate import allocate_channels

        scores = self.checked_scores(model, ctx)
        keep = allocate_channels(model, ctx, scores)
        return Plan(method=self.name, channels=keep, meta={"scores": {k: v.tolist() for k, v in scores.items()}})


class WeightScorer(Method):
    """Unstructured method defined by a per-weight importance score (higher = keep)."""

    def prunable_params(self, model: nn.Module, ctx: PruneContext) -> dict[str, nn.Parameter]:
        from prunekit.surgery.allocate import prunable_weights

        return prunable_weights(model, ctx)

    def score(self, model: nn.Module, ctx: PruneContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def plan(self, model: nn.Module, ctx: PruneContext) -> Plan:
        from prunekit.surgery.allocate import allocate_weights

        scores = {k: v.detach().float().cpu() for k, v in self.score(model, ctx).items()}
        masks = allocate_weights(model, ctx, scores)
        return Plan(method=self.name, masks=masks)


__all__ = ["Target", "BudgetOptions", "PruneContext", "Method", "ChannelScorer", "WeightScorer"]
