"""What a method is asked for and given: the target, how it is spread over layers, and the context.

The bottom of the pruning stack: :mod:`prunekit.surgery` (the allocators) and :mod:`prunekit.methods`
both use these types, so they live below both.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from prunekit.errors import PruningError

# --------------------------------------------------------------------------------------------- targets
_TARGET_RE = re.compile(r"^\s*(flops|params|ratio|sparsity|latency)(?:@([a-z_]+))?\s*=\s*([0-9.eE+-]+)\s*$")
LATENCY_RUNTIMES = ("eager", "torchscript", "onnxruntime")  # where a latency= target is measured (deploy.RUNTIMES)


@dataclass(frozen=True)
class Target:
    """A pruning budget.

    ``flops=2``: 2x fewer multiply-adds; ``params=4``: 4x fewer (non-zero) parameters;
    ``ratio=0.5``: remove that fraction of every prunable layer's units / weights
    (per-layer overrides in ``per_layer``: layer or group key -> fraction removed);
    ``sparsity=0.9``: same as ratio, for weight methods;
    ``latency=1.5``: 1.5x faster, *measured* at batch 64 in ``runtime`` (``latency@eager=1.5``,
    ``latency@onnxruntime=1.5``; default: ONNX Runtime where installed, else eager PyTorch).
    """

    kind: str
    value: float
    per_layer: dict[str, float] = field(default_factory=dict)
    runtime: str | None = None  # latency targets: the runtime the speedup is measured in

    @staticmethod
    def parse(spec: str | Target | dict[str, Any]) -> Target:
        if isinstance(spec, Target):
            return spec
        if isinstance(spec, dict):
            per = dict(spec.get("per_layer", {}))
            kind = spec.get("kind", "ratio")
            return Target._checked(kind, float(spec.get("value", 0.0)), per, spec.get("runtime"))
        m = _TARGET_RE.match(str(spec))
        if not m:
            raise PruningError(f"cannot parse target {spec!r}: use flops=X, params=X or latency=X (X > 1, X-fold "
                               "reduction; latency@RUNTIME=X names the runtime), or ratio=F / sparsity=F (fraction "
                               "removed, 0 < F < 1)")
        if m.group(2) and m.group(1) != "latency":
            raise PruningError(f"target {spec!r}: only latency targets name a runtime (latency@onnxruntime=2)")
        return Target._checked(m.group(1), float(m.group(3)), {}, m.group(2))

    @staticmethod
    def _checked(kind: str, value: float, per_layer: dict[str, float], runtime: str | None = None) -> Target:
        if kind == "sparsity":
            kind = "ratio"
        if kind not in ("flops", "params", "ratio", "latency"):
            raise PruningError(f"unknown target kind {kind!r}; use flops, params, latency, ratio or sparsity")
        if runtime is not None and runtime not in LATENCY_RUNTIMES:
            raise PruningError(f"unknown runtime {runtime!r} in a latency target; choose from "
                               f"{', '.join(LATENCY_RUNTIMES)}")
        if value != value or value in (float("inf"), float("-inf")):
            raise PruningError(f"target {kind}={value} is not a finite number")
        if kind in ("flops", "params", "latency") and not value > 1:
            what = "faster" if kind == "latency" else "fewer"
            raise PruningError(f"target {kind}={value} must be > 1 (it is the reduction factor: {kind}=2 means 2x "
                               f"{what})")
        if kind == "ratio" and not 0 <= value < 1:
            raise PruningError(f"target ratio={value} must be in [0, 1) (the fraction removed)")
        for k, v in per_layer.items():
            if not 0 <= v < 1:
                raise PruningError(f"per-layer ratio for {k!r} is {v}; it must be in [0, 1)")
        return Target(kind, value, dict(per_layer), runtime if kind == "latency" else None)

    def __str__(self) -> str:
        return f"{self.kind}@{self.runtime}={self.value:g}" if self.runtime else f"{self.kind}={self.value:g}"


@dataclass
class BudgetOptions:
    """How a target is distributed over layers."""

    scope: str = "global"  # "global": one ranking across layers; "layerwise": same fraction per layer
    floor: float = 0.05  # every layer keeps at least floor(floor * width) + 1 units (never zero)
    cap: float = 1.0  # at most this fraction of a layer's units is removed
    round_to: int | str | None = None  # channel multiple (None: engine default, 8/16/32 by width; "runtime")
    ignored: tuple[str, ...] | None = None  # layer paths never pruned (None: the classifier)
    normalize: str | None = None  # per-layer score normalisation before a global ranking: None, "l2", "max", "mean"
    tolerance: float = 0.05  # achieved/target may be off by this fraction
    nm: str | None = None  # weight methods: "N:M" structured sparsity (keep N of every M weights along a row)
    # global channel ranking: score / CPU latency saved per channel, estimated by the analytic proxy
    # (True / "proxy"), by timing the model's layers on this machine in eager PyTorch ("measured") or in ONNX
    # Runtime ("onnxruntime"), or not at all (False / "off")
    latency_aware: bool | str = True
    latency_batch: int = 64  # "measured": batch size the layers are timed at
    latency_threads: int | None = None  # "measured": threads while timing (None: torch's current setting)


# --------------------------------------------------------------------------------------------- context
@dataclass
class PruneContext:
    """Everything a method may use besides the model itself."""

    target: Target
    input_shape: tuple[int, ...]  # one example's shape, or prunekit.surgery.inputs.ExampleInputs (a tuple too)
    budget: BudgetOptions = field(default_factory=BudgetOptions)
    data: Any = None  # iterable of (x, y) batches: the prune set (training split or a held-out part of it)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    trajectory: Any = None  # prunekit.train.callbacks.Trajectory for the Koopman methods
    num_classes: int | None = None
    graph: Any = None  # prunekit.surgery.ChannelGraph, built lazily by the engine
    # -- set by the pipeline for the allocators (read by methods, never written by them) ------------
    verify: bool = True  # check the achieved cost on a physically pruned copy
    original_sizes: dict[str, int] = field(default_factory=dict)  # group key -> width before any round
    removed_channels: dict[str, Any] | None = None  # channels removed by earlier (masked) rounds
    initial_state: dict[str, torch.Tensor] | None = None  # the weights at initialisation (gf use_init)
    # -- written by the allocator: what it decided ------------------------------------------------
    allocation: dict[str, Any] | None = None  # widths, predicted and measured cost of the chosen plan
    latency_table: dict[str, Any] | None = None  # the measured per-layer table used, if any
    output_layers: list[str] | None = None  # layers left unpruned as network outputs

    # -- data --------------------------------------------------------------------------------------
    def require_data(self, method: str) -> None:
        if self.data is None:
            raise PruningError(f"method {method!r} needs data (a prune set): pass data=... to prunekit.prune or "
                               "--dataset to `prunekit prune`")

    def batches(self, max_samples: int | None = None,
                shard: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of the prune set moved to the device, at most ``max_samples`` examples.

        ``shard=True`` (under ``torchrun``): this rank's contiguous slice of every batch, so that the ranks
        together see exactly the examples one process sees; the method then sums its statistics over the
        ranks with :meth:`reduce_sums`. Without torchrun both are no-ops.

        ``x`` is a tensor, or for a model with several inputs a tuple (positional) / dict (keyword) of
        tensors, yielded as :class:`prunekit.surgery.inputs.ExampleInputs` (batch-like: ``len(x)`` is the
        batch size, ``x[:n]`` the first examples; ``model(x)`` unpacks it while a method plans).
        """
        if self.data is None:
            raise PruningError("this method needs data but none was given")
        from prunekit import distributed

        rank, world = (distributed.rank(), distributed.world_size()) if shard else (0, 1)
        seen = 0
        for x, y in self.data:
            if not isinstance(x, torch.Tensor):  # several inputs: a tuple (positional) or a dict (keyword)
                from prunekit.surgery.inputs import as_example_inputs

                x = as_example_inputs(x)
            n = x.batch_size if not isinstance(x, torch.Tensor) else len(x)
            if max_samples is not None and seen >= max_samples:
                break
            if max_samples is not None and seen + n > max_samples:
                x, y = x[: max_samples - seen], y[: max_samples - seen]
                n = max_samples - seen
            seen += n
            if world > 1:
                step = -(-n // world)
                x, y = x[rank * step: (rank + 1) * step], y[rank * step: (rank + 1) * step]
                if not len(x):
                    continue
            yield x.to(self.device), y.to(self.device)

    @staticmethod
    def reduce_sums(sums: dict[str, torch.Tensor], count: int) -> tuple[dict[str, torch.Tensor], int]:
        """``sums`` (tensors, summed in place) and ``count`` summed over the ranks (no-op in one process)."""
        from prunekit import distributed

        if not distributed.active():
            return sums, count
        import torch.distributed as dist

        for v in sums.values():
            dist.all_reduce(v)
        return sums, int(round(distributed.all_reduce_sum([float(count)])[0]))

    def loss(self, logits: Any, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the model's output; for a model with several outputs (tuple, dict, dataclass,
        Hugging Face ``ModelOutput``), of its ``logits`` or else its first output tensor
        (:func:`prunekit.surgery.inputs.primary_output`; subclass or replace ``loss`` for anything else)."""
        if not isinstance(logits, torch.Tensor):
            from prunekit.surgery.inputs import primary_output

            logits = primary_output(logits)
        return F.cross_entropy(logits, y)

    @staticmethod
    def logits(model: nn.Module, x: Any) -> torch.Tensor:
        """``model`` run on a batch ``x`` of the prune set -- a tensor, or several / keyword inputs
        (:class:`prunekit.surgery.inputs.ExampleInputs`, a tuple, a dict) -- and the one output tensor a
        method's loss or logit statistics are taken of (:func:`prunekit.surgery.inputs.primary_output`)."""
        from prunekit.surgery.inputs import as_example_inputs, primary_output, run_model

        if not isinstance(x, torch.Tensor):
            x = as_example_inputs(x)
        return primary_output(run_model(model, x))

    # -- channel groups ------------------------------------------------------------------------------
    def groups(self) -> list[Any]:
        """The prunable coupled channel groups (see :class:`prunekit.surgery.ChannelGroup`)."""
        if self.graph is None:
            raise PruningError("no channel graph was built for this context")
        return [g for g in self.graph.groups.values() if g.prunable]

    def producer_rows(self, model: nn.Module, group: Any, reduce: str = "concat") -> torch.Tensor:
        """Weights of the group's producers with one row per channel: ``(size, n)``.

        Rows of all producer layers (conv / linear output channels) of a coupled group are
        concatenated along the second axis, so that a group-wide norm is a row norm.
        """
        return torch.cat([_rows(model, group, path, "producer") for path in group.producers], 1)

    def consumer_columns(self, model: nn.Module, group: Any) -> torch.Tensor:
        """Weights of the group's consumers that read each channel: ``(size, n)``, all consumers
        concatenated along the second axis (input features of a conv / linear layer, output
        channels of a transposed conv's weight: the axis the channel graph recorded)."""
        cols = [_rows(model, group, path, "consumer") for path in group.consumers]
        if not cols:
            return torch.zeros(group.size, 0)
        return torch.cat(cols, 1)


def _rows(model: nn.Module, group: Any, path: str, role: str) -> torch.Tensor:
    """One layer's weights with one row per channel of ``group``: from the group's member table (the
    channel axis the graph recorded: transposed convs, heads, flattened maps), else along weight dim 0
    (producers) / dim 1 (consumers) for hand-made groups without one."""
    if getattr(group, "members", None):
        return group.rows(model, path) if role == "producer" else group.columns(model, path)
    w = model.get_submodule(path).weight.detach()
    if role != "producer":
        w = w.movedim(1, 0)
    return w.reshape(group.size, -1)


__all__ = ["BudgetOptions", "PruneContext", "Target"]
