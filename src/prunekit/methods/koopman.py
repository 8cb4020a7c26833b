"""Koopman pruning (METHODS.md §6; Redman et al., ICLR 2022): prune from where training is going.

All three methods read a parameter trajectory recorded during training
(:class:`prunekit.train.TrajectoryRecorder`, ``prunekit train --record-trajectory``) and solve its exact
DMD once in bounded memory (:mod:`prunekit.koopman`; cached on the trajectory per ``rtol``):

* ``kmp`` (Koopman magnitude pruning): score ``|phi|``, ``phi`` the Koopman mode of the eigenvalue nearest 1
  -- the point the parameters converge to; one global ranking (the shared weight allocator);
* ``kgp`` (Koopman gradient pruning, offered but never shipped by the seed): score the size of the predicted
  next change, ``|sum_i phi_i (lambda_i - 1) b_i|`` over all modes, ``b`` the amplitudes of the last snapshot;
* ``kmp_channel``: the filter norm of ``phi`` per channel of each coupled group (summed over the group's
  producers, like ``l2``), so the shared channel allocator can shrink the network physically.

The DMD runs on every recorded parameter (weights *and* biases of conv / linear layers, as the seed);
the masks cover the same weights every prunekit weight method prunes (conv / linear weights, the
classifier excluded by default): the shared allocator masks weights, not biases -- the seed also ranked
the biases, which are ~0.1 % of ResNet-20's parameters.

The trajectory must have been recorded on the model being pruned (same layer names and shapes; masked
models are fine). When the model is not the last recorded state (e.g. after weight averaging), a warning
says how far it is.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from prunekit import koopman
from prunekit.errors import PruningError
from prunekit.methods.base import ChannelScorer, PruneContext, WeightScorer
from prunekit.methods.registry import register_method
from prunekit.train.trajectory import Trajectory, TrajectoryError

_HELP = {"rtol": "DMD: keep singular values of the snapshot matrix above rtol * the largest "
                 "(the Gram route resolves down to 1e-6)"}
_PAPER = "Redman et al., An Operator Theoretic View on Pruning Deep Neural Networks, ICLR 2022"


def trajectory_for(model: nn.Module, ctx: PruneContext, method: str) -> Trajectory:
    """``ctx.trajectory`` as a loaded :class:`Trajectory` checked against ``model``."""
    traj = ctx.trajectory
    if traj is None:
        raise PruningError(
            f"method {method!r} needs a parameter trajectory recorded during training: record one with "
            "`prunekit train ... --record-trajectory` (it is saved beside model.pt) or "
            "prunekit.train.TrajectoryRecorder, then pass --trajectory PATH / trajectory=PATH")
    try:
        if isinstance(traj, (str, os.PathLike)):
            traj = Trajectory.load(traj)
            ctx.trajectory = traj
        if not isinstance(traj, Trajectory):
            raise PruningError(f"trajectory must be a prunekit Trajectory or its folder, got {type(traj).__name__}")
        traj.check_model(model)
    except TrajectoryError as e:
        raise PruningError(str(e)) from None
    gap = traj.last_snapshot_gap(model)
    if gap > 1e-3:
        warnings.warn(f"{method}: the model differs from the trajectory's last snapshot (largest difference "
                      f"{gap:.2g} of the largest weight); the Koopman scores describe the recorded run",
                      stacklevel=3)
    return traj


def _per_parameter(traj: Trajectory, values: np.ndarray) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in traj.split(values).items()}


class _KoopmanWeights(WeightScorer):
    defaults: dict[str, Any] = {"rtol": koopman.DEFAULT_RTOL}
    option_help = _HELP

    def vector(self, traj: Trajectory) -> np.ndarray:
        raise NotImplementedError

    def score(self, model: nn.Module, ctx: PruneContext) -> dict[str, torch.Tensor]:
        traj = trajectory_for(model, ctx, self.name)
        scores = _per_parameter(traj, np.abs(self.vector(traj)))
        return {k: scores[k] for k in self.prunable_params(model, ctx)}


@register_method("kmp", granularity="weight", needs_trajectory=True, family="koopman", paper=_PAPER,
                 description="Koopman magnitude: |mode of the DMD eigenvalue nearest 1|; global ranking.")
class KoopmanMagnitude(_KoopmanWeights):
    """Koopman magnitude pruning: the magnitude of the trajectory's limit point."""

    def vector(self, traj: Trajectory) -> np.ndarray:
        return koopman.kmp_mode(traj, self.rtol)[0]


@register_method("kgp", granularity="weight", needs_trajectory=True, family="koopman", paper=_PAPER,
                 description="Koopman gradient: |predicted next change| summed over all DMD modes; global.")
class KoopmanGradient(_KoopmanWeights):
    """Koopman gradient pruning: the size of the Koopman-predicted change of each weight."""

    def vector(self, traj: Trajectory) -> np.ndarray:
        return koopman.kgp_change(traj, self.rtol)


@register_method("kmp_channel", granularity="channel", needs_trajectory=True, family="koopman", paper=_PAPER,
                 description="Koopman magnitude per channel: L2 norm of the mode's filter rows.")
class KoopmanChannel(ChannelScorer):
    """Channel variant of ``kmp``: each channel scores the L2 norm of its producers' rows of ``|phi|``."""

    defaults: dict[str, Any] = {"rtol": koopman.DEFAULT_RTOL}
    option_help = _HELP

    def score(self, model: nn.Module, ctx: PruneContext) -> dict[str, torch.Tensor]:
        traj = trajectory_for(model, ctx, self.name)
        phi = _per_parameter(traj, np.abs(koopman.kmp_mode(traj, self.rtol)[0]).astype(np.float32))
        twin = _with_weights(model, phi)
        return {g.key: ctx.producer_rows(twin, g).double().norm(dim=1) for g in ctx.groups()}


def _with_weights(model: nn.Module, values: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` whose conv / linear weights are ``values`` (masks still applied)."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for path, v in values.items():
            mod_path, _, name = path.rpartition(".")
            mod = twin.get_submodule(mod_path) if mod_path else twin
            if parametrize.is_parametrized(mod, name):
                getattr(mod.parametrizations, name).original.copy_(v)
            else:
                getattr(mod, name).copy_(v)
    return twin
