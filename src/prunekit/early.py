"""Pruning early in training: a trainer callback that prunes at the end of epoch ``k``, then training goes on.

:class:`PruneAtEpoch` calls the shared pipeline (:func:`prunekit.prune`) on the model being trained, in
place and *masked*: the parameters stay the same objects, so the optimizer, its momentum, the learning
rate schedule and DistributedDataParallel carry on untouched, and pruned weights stay zero for the rest of
training. A channel plan is made physical when training ends (the network really shrinks). Methods that
need a trajectory (the Koopman family) get the one a :class:`~prunekit.train.TrajectoryRecorder` recorded
over epoch ``k`` (:func:`early_pruning_callbacks` sets both up)::

    rec, pr = early_pruning_callbacks("kmp", "params=4", epoch=2, trajectory_dir="runs/x/trajectory")
    Trainer(model, cfg, loader, callbacks=[rec, pr]).fit()
    pr.result.report                       # what was pruned at epoch 2

``prunekit train --prune-at-epoch K --prune-method M --prune-target T`` is the command-line form.
"""

from __future__ import annotations

import os
from typing import Any

import torch.nn as nn

from prunekit.errors import PruningError

__all__ = ["PruneAtEpoch", "early_pruning_callbacks"]


class PruneAtEpoch:
    """Trainer callback: prune with ``method`` to ``target`` when epoch ``epoch`` (1-based) ends.

    ``data``: the prune set (methods that need data); ``recorder``: the trajectory recorder whose window ends
    with that epoch (methods that need a trajectory); ``prune_kwargs``: passed on to :func:`prunekit.prune`
    (method options, budget options). After pruning ``result`` holds the :class:`~prunekit.PruneResult`.
    """

    def __init__(self, method: str, target: str, epoch: int, data: Any = None, recorder: Any = None,
                 **prune_kwargs: Any):
        if epoch < 1:
            raise PruningError(f"prune-at epoch must be >= 1, got {epoch}")
        self.method, self.target, self.epoch = method, target, int(epoch)
        self.data, self.recorder, self.kwargs = data, recorder, prune_kwargs
        self.result: Any = None

    def on_train_begin(self, trainer: Any) -> None:
        import math

        if self.epoch > math.ceil(trainer.cfg.epochs):
            raise PruningError(f"cannot prune at epoch {self.epoch}: training runs {trainer.cfg.epochs:g} epoch(s)")

    def on_epoch_end(self, trainer: Any, record: dict[str, Any]) -> None:
        if trainer.epoch != self.epoch or self.result is not None:
            return
        from prunekit.api import prune

        traj = getattr(self.recorder, "trajectory", None) if self.recorder is not None else None
        model: nn.Module = trainer.model
        flags = [(m, m.training) for m in model.modules()]
        try:
            self.result = prune(model, self.method, self.target, self.data, mode="masked", copy=False,
                                trajectory=traj, device=trainer.device, **self.kwargs)
        finally:
            for m, f in flags:
                m.training = f
        rep = self.result.report
        record["pruned"] = {"method": self.method, "target": self.target,
                            "compression": rep.get("compression"), "flops_speedup": rep.get("flops_speedup")}
        if trainer.log_epochs:
            print(f"pruned at epoch {self.epoch}: {self.method} {self.target} -> compression "
                  f"{rep.get('compression', float('nan')):.3g}x, FLOPs {rep.get('flops_speedup', float('nan')):.3g}x",
                  flush=True)

    def on_train_end(self, trainer: Any) -> None:
        """Make a channel plan physical (the masked channels are removed from the trained network)."""
        if self.result is None or not self.result.plan.channels:
            return
        from prunekit.surgery.apply import apply_plan_
        from prunekit.surgery.masks import remove_masks_
        from prunekit.surgery.plan import Plan

        model = trainer.model
        shape = self.result.report.get("input_shape") or getattr(self.result.graph, "input_shape", None)
        remove_masks_(model)
        apply_plan_(model, Plan(method=self.method, channels=self.result.plan.channels), mode="physical",
                    example_input=shape)


def early_pruning_callbacks(method: str, target: str, epoch: int, data: Any = None,
                            trajectory_dir: str | os.PathLike | None = None, trajectory_window: int | None = None,
                            **prune_kwargs: Any) -> list[Any]:
    """The callbacks for pruning at the end of ``epoch``: a trajectory recorder over that epoch when the method
    needs one (written to ``trajectory_dir``), then :class:`PruneAtEpoch`."""
    from prunekit.methods import get_method_info
    from prunekit.train.trajectory import TrajectoryRecorder

    info = get_method_info(method)
    out: list[Any] = []
    rec = None
    if info.needs_trajectory:
        if trajectory_dir is None:
            raise PruningError(f"method {method!r} records a trajectory during epoch {epoch}: give trajectory_dir")
        rec = TrajectoryRecorder(trajectory_dir, window=trajectory_window, epoch=epoch)
        out.append(rec)
    if info.needs_data and data is None:
        raise PruningError(f"method {method!r} needs a prune set: pass data=...")
    out.append(PruneAtEpoch(method, target, epoch, data=data, recorder=rec, **prune_kwargs))
    return out
