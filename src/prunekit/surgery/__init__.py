"""Plans and surgery: masks, coupled-channel removal, low-rank replacement, budget allocation.

* :func:`analyze` finds the coupled channel groups of a model (:class:`ChannelGraph`);
* :func:`apply_plan` / :func:`apply_plan_` apply a :class:`Plan` masked or physically;
* :func:`allocate_channels` / :func:`allocate_weights` turn scores into a plan meeting a target;
* :class:`LowRankConv2d` / :class:`LowRankLinear` are the factor chains of low-rank plans.
"""

from prunekit.surgery.allocate import (
    allocate_channels,
    allocate_weights,
    default_round_to,
    masked_channels,
    prunable_weights,
    resolve_round_to,
)
from prunekit.surgery.apply import apply_plan, apply_plan_
from prunekit.surgery.graph import (
    ChannelGraph,
    ChannelGroup,
    CostModel,
    Member,
    PruningWarning,
    analyze,
    is_attention,
)
from prunekit.surgery.lowrank import LowRankConv2d, LowRankLinear
from prunekit.surgery.masks import Mask, apply_masks_, get_masks, remove_masks_
from prunekit.surgery.plan import LowRankFactors, Plan

__all__ = [
    "ChannelGraph",
    "ChannelGroup",
    "CostModel",
    "LowRankConv2d",
    "LowRankFactors",
    "LowRankLinear",
    "Mask",
    "Member",
    "Plan",
    "PruningWarning",
    "allocate_channels",
    "allocate_weights",
    "analyze",
    "apply_masks_",
    "apply_plan",
    "apply_plan_",
    "default_round_to",
    "get_masks",
    "is_attention",
    "masked_channels",
    "prunable_weights",
    "remove_masks_",
    "resolve_round_to",
]
