"""Groups the channel graph offers but the model's own code cannot shrink.

The graph couples layers by tracing them; a width the model's ``forward`` fixes in code -- a linear layer's
output viewed as ``x.view(n, self.c, 4, 4)`` with a constant ``self.c`` -- leaves no trace in the autograd
graph, so the group looks prunable and the physically pruned model no longer runs. :func:`probe_groups_`
prunes every prunable group by its smallest step on a copy and runs it once; when that fails it finds the
groups that break the forward pass (one at a time) and marks them unprunable with the error as the reason.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from prunekit.surgery.apply import apply_plan
from prunekit.surgery.graph import ChannelGraph, _has_masks
from prunekit.surgery.groups import PruningWarning
from prunekit.surgery.inputs import example_for, run_model
from prunekit.surgery.plan import Plan


def _breaks(model: nn.Module, graph: ChannelGraph, keys: list[str]) -> str:
    """Why the model pruned by one step in each of ``keys`` does not run ("" if it runs)."""
    channels = {k: torch.arange(graph.groups[k].size - graph.groups[k].multiple_of) for k in keys}
    try:
        pruned = apply_plan(model, Plan(channels=channels), graph, "physical", graph.input_shape)
        pruned.eval()
        with torch.no_grad():
            run_model(pruned, example_for(pruned, graph.input_shape, 1))
    except Exception as e:  # noqa: BLE001  (any failure of the user's forward is the reason)
        first = (str(e).strip().splitlines() or [""])[0]
        return f"{type(e).__name__}: {first[:200]}"
    return ""


def probe_groups_(model: nn.Module, graph: ChannelGraph, warn: bool = True) -> dict[str, str]:
    """Mark unprunable (in place) the prunable groups of ``graph`` whose pruning breaks ``model``'s forward pass;
    returns group key -> reason. One pruned copy and one forward pass when every group prunes cleanly."""
    if _has_masks(model):
        return {}
    keys = [k for k, g in graph.groups.items()
            if g.prunable and g.size - g.multiple_of >= max(1, g.min_keep)]
    if not keys or not _breaks(model, graph, keys):
        return {}
    found: dict[str, str] = {}
    for k in keys:
        err = _breaks(model, graph, [k])
        if not err:
            continue
        g = graph.groups[k]
        reason = (f"pruning it breaks the model's forward pass ({err}): the model's code fixes this width "
                  "(a constant in a view / reshape or a hard-coded size)")
        g.prunable, g.reason = False, reason
        for p in g.producers + g.depthwise:
            graph.skipped.setdefault(p, reason)
        found[k] = reason
        if warn:
            warnings.warn(f"prunekit: output channels of {k!r} are not pruned: {reason}", PruningWarning,
                          stacklevel=2)
    return found


__all__ = ["probe_groups_"]
