"""Peer libraries as prunekit methods, measured side by side with ours (BENCHMARK.md "Peers").

Torch-Pruning (family ``peer``, optional package ``torch_pruning``), each running Torch-Pruning's
own ``MetaPruner`` with its own importance criterion:

* ``tp_l1`` / ``tp_l2``: group magnitude (``GroupMagnitudeImportance(p=1 / 2)``);
* ``tp_taylor``: group first-order Taylor (``GroupTaylorImportance``), gradients of the loss
  averaged over the prune set;
* ``tp_hessian``: group OBD (``GroupHessianImportance``), the diagonal Hessian approximated by the
  mean of squared per-example gradients;
* ``tp_lamp``: LAMP (``LAMPImportance``).

The pruner runs on a deep copy of the model; its ``pruning_ratio`` is found by bisection so that
the FLOPs (or parameter) reduction meets the target within the budget tolerance (5 % by
default), measured with prunekit's cost model. Torch-Pruning's choices are read in interactive
mode (the channels it would remove from every layer) and translated into a prunekit
:class:`~prunekit.surgery.plan.Plan` keyed by our channel groups; the engine applies it, so the
pruned model, its fine-tuning and its measurement are exactly those of every other method.

``torch_prune_l1`` (granularity ``weight``): ``torch.nn.utils.prune.global_unstructured`` with
``L1Unstructured`` over the prunable weights of a copy; its masks become ``Plan.masks``.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from prunekit.errors import PruningError
from prunekit.methods.base import Method, PruneContext
from prunekit.methods.registry import register_method
from prunekit.surgery.plan import Plan

_MAX_BISECTION_STEPS = 24


# --------------------------------------------------------------------------------------------- shared
def _graph(model: nn.Module, ctx: PruneContext) -> Any:
    """The engine's channel graph, or one built here when the context has none."""
    if ctx.graph is None:
        from prunekit.surgery.graph import analyze

        ctx.graph = analyze(model, ctx.input_shape, ignored=ctx.budget.ignored or None, warn=False)
    return ctx.graph


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _search(achieved: Callable[[float], tuple[float, Any]], target: float, hi: float, tol: float,
            what: str, step: float = 0.05) -> tuple[float, float, Any, int]:
    """Find ``r`` in ``(0, hi]`` whose ``achieved(r)`` reduction is within ``tol`` of ``target``.

    The reduction need not be monotone over the whole range (Torch-Pruning skips groups it would
    empty at high ratios), so ratios are scanned upwards in ``step`` increments until the target is
    reached, then the last interval is bisected. Returns ``(r, reduction, payload, evaluations)`` of
    the best point within ``tol``: one meeting the target if any (the closest), else the closest.
    """
    best: tuple[float, float, Any] | None = None
    evals = 0

    def rank(red: float) -> tuple[int, float]:  # within tolerance: meeting the target first, then closeness
        return (0 if target <= red <= target * (1 + tol) else 1, abs(red / target - 1))

    def consider(r: float) -> float:
        nonlocal best, evals
        red, payload = achieved(r)
        evals += 1
        if red >= target * (1 - tol) and (best is None or rank(red) < rank(best[1])):
            best = (r, red, payload)
        return red

    lo, r, reached = 0.0, 0.0, False
    top = 0.0
    while r < hi - 1e-9:
        r = min(hi, r + step)
        red = consider(r)
        top = max(top, red)
        if red >= target:
            reached = True
            break
        lo = r
    if reached:
        a, b = lo, r
        for _ in range(_MAX_BISECTION_STEPS):
            if best is not None and target <= best[1] <= target * (1 + tol / 5):
                break
            mid = 0.5 * (a + b)
            if b - a < 1e-4:
                break
            if consider(mid) < target:
                a = mid
            else:
                b = mid
    if best is None:
        raise PruningError(f"{what}: no pruning ratio up to {hi:g} reaches the target {target:g}x "
                           f"(best {top:.3f}x)")
    if abs(best[1] / target - 1) > tol:
        warnings.warn(f"{what}: the reduction jumps over the target; closest reachable is {best[1]:.3f}x "
                      f"(target {target:g}x, tolerance {tol:.0%})", UserWarning, stacklevel=3)
    return best[0], best[1], best[2], evals


# --------------------------------------------------------------------------------------------- Torch-Pruning
class _TorchPruningPeer(Method):
    """Run Torch-Pruning's MetaPruner with one importance criterion; translate its choice into a Plan."""

    defaults: dict[str, Any] = {"max_pruning_ratio": 0.95, "global_pruning": None}
    grad_mode: str | None = None  # None | "mean" (Taylor) | "sq" (per-example squared gradients, OBD)

    def importance(self) -> Any:
        raise NotImplementedError

    # -- gradients ----------------------------------------------------------------------------------
    def _fill_gradients(self, work: nn.Module, ctx: PruneContext) -> int:
        """Leave the criterion's gradient statistic in ``p.grad`` of the copy; returns the examples used."""
        params = [p for p in work.parameters()]
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        work.eval()
        acc = {p: torch.zeros_like(p) for p in params}
        n = 0
        for x, y in ctx.batches(self.samples):
            if self.grad_mode == "mean":
                work.zero_grad(set_to_none=True)
                loss = ctx.loss(work(x), y) * len(x)
                loss.backward()
                for p in params:
                    if p.grad is not None:
                        acc[p] += p.grad
            else:
                for i in range(len(x)):
                    work.zero_grad(set_to_none=True)
                    ctx.loss(work(x[i: i + 1]), y[i: i + 1]).backward()
                    for p in params:
                        if p.grad is not None:
                            acc[p] += p.grad.pow(2)
            n += len(x)
        if n == 0:
            raise PruningError(f"method {self.name!r}: the prune set yielded no examples")
        for p in params:
            p.grad = acc[p] / n
        return n

    # -- the pruner ---------------------------------------------------------------------------------
    def _ignored(self, work: nn.Module, graph: Any, ctx: PruneContext) -> list[nn.Module]:
        """Layers Torch-Pruning must leave alone: the classifier, ignored layers, groups we cannot prune."""
        paths = set(graph.output_layers)
        paths.update(ctx.budget.ignored or ())
        for g in graph.groups.values():
            if not g.prunable:
                paths.update(g.producers)
        paths.update(graph.skipped)
        mods = []
        for p in sorted(paths):
            try:
                mods.append(work.get_submodule(p))
            except AttributeError:
                continue
        return mods

    def _tp_pruner(self, work: nn.Module, ctx: PruneContext, ratio: float, global_pruning: bool,
                   ignored: list[nn.Module]) -> Any:
        import torch_pruning as tp

        from prunekit.surgery.inputs import ExampleInputs, example_for, flatten_outputs

        example = example_for(work, ctx.input_shape)  # a shape, or the model's own inputs (several / keyword)
        extra: dict[str, Any] = {"output_transform": flatten_outputs}
        if isinstance(example, ExampleInputs):
            extra["forward_fn"] = lambda m, _x, ex=example: ex(m)
            example = example.kwargs or example.args
        # Torch-Pruning's own default is no rounding; an explicit integer multiple is passed on
        rt = ctx.budget.round_to
        round_to = int(rt) if isinstance(rt, int) and not isinstance(rt, bool) and rt > 1 else None
        return tp.pruner.MetaPruner(
            work, example, importance=self.importance(), global_pruning=global_pruning, pruning_ratio=ratio,
            max_pruning_ratio=self.max_pruning_ratio, ignored_layers=ignored, round_to=round_to, **extra,
        )

    @staticmethod
    def _retarget(pruner: Any, ratio: float) -> bool:
        """Point an unused pruner at another ratio (the model is never edited, so its graph stays valid)."""
        needed = ("per_step_pruning_ratio", "iterative_pruning_ratio_scheduler", "iterative_steps",
                  "_scope_initial_channels", "reset")
        if not all(hasattr(pruner, a) for a in needed):
            return False
        pruner.pruning_ratio = ratio
        pruner.per_step_pruning_ratio = pruner.iterative_pruning_ratio_scheduler(ratio, pruner.iterative_steps)
        pruner._scope_initial_channels = {}
        pruner.reset()
        return True

    @staticmethod
    def _tp_choice(pruner: Any, work: nn.Module) -> dict[str, list[int]]:
        """The output channels Torch-Pruning removes from each layer (layer path -> indices), read in
        interactive mode without applying them."""
        names = {m: n for n, m in work.named_modules()}
        removed: dict[str, list[int]] = {}
        for group in pruner.step(interactive=True):  # read the choice; the copy is never edited
            for dep, idxs in group:
                layer = dep.target.module
                if isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)) and pruner.DG.is_out_channel_pruning_fn(
                        dep.handler) and layer in names:
                    removed.setdefault(names[layer], [])
                    removed[names[layer]].extend(int(i) for i in idxs)
        return removed

    @staticmethod
    def _to_plan_channels(removed: dict[str, list[int]], graph: Any) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Translate per-layer removed output channels into kept channels per prunekit group."""
        channels: dict[str, torch.Tensor] = {}
        used: set[str] = set()
        for g in graph.groups.values():
            if not g.prunable:
                continue
            drop: set[int] | None = None
            for p in g.producers:
                if p not in removed:
                    continue
                used.add(p)
                gone = set(removed[p])
                index = None
                for mb in g.members:
                    if mb.tensor == f"{p}.weight" and mb.role == "producer" and mb.dim == 0:
                        index = mb.index[:, 0]
                        break
                rows = index.tolist() if index is not None else list(range(g.size))
                here = {c for c, r in enumerate(rows) if r in gone}
                drop = here if drop is None else drop | here  # a coupled group loses what any producer lost
            if drop:
                keep = [c for c in range(g.size) if c not in drop]
                if len(keep) < max(1, g.min_keep):
                    keep = list(range(g.size))[: max(1, g.min_keep)]
                channels[g.key] = torch.tensor(keep, dtype=torch.long)
        unmapped = sorted(set(removed) - used)
        return channels, unmapped

    def plan(self, model: nn.Module, ctx: PruneContext) -> Plan:
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            raise PruningError(f"method {self.name!r} needs Torch-Pruning: pip install torch-pruning") from None
        graph = _graph(model, ctx)
        work = copy.deepcopy(model)  # the user's model is never touched
        n_grad = self._fill_gradients(work, ctx) if self.grad_mode else 0
        if self.grad_mode and all(p.grad is None or not p.grad.any() for p in work.parameters()):
            outs = ", ".join(repr(p) for p in graph.output_layers) or "none"
            raise PruningError(f"method {self.name!r}: the loss has a zero gradient for every parameter on the prune "
                               f"set (model outputs from {outs}; a cross-entropy over one output channel is "
                               f"constant), so {type(self.importance()).__name__} has nothing to rank")
        ignored = self._ignored(work, graph, ctx)
        t = ctx.target
        global_pruning = (ctx.budget.scope != "layerwise") if self.global_pruning is None else self.global_pruning

        pruner: Any = None

        def choice(ratio: float) -> tuple[dict[str, torch.Tensor], list[str]]:
            nonlocal pruner
            if pruner is None or not self._retarget(pruner, ratio):
                pruner = self._tp_pruner(work, ctx, ratio, global_pruning, ignored)
            return self._to_plan_channels(self._tp_choice(pruner, work), graph)

        meta: dict[str, Any] = {"peer": "torch_pruning", "importance": type(self.importance()).__name__,
                                "global_pruning": global_pruning, "gradient_examples": n_grad}
        if t.kind == "ratio":
            channels, unmapped = choice(t.value)
            meta["tp_pruning_ratio"] = t.value
        else:
            base = graph.cost.base_flops if t.kind == "flops" else graph.cost.base_params

            def achieved(ratio: float) -> tuple[float, Any]:
                ch, un = choice(ratio)
                pred = graph.predict(ch)
                return base / max(pred[t.kind], 1e-12), (ch, un)

            ratio, red, (channels, unmapped), steps = _search(
                achieved, t.value, self.max_pruning_ratio, ctx.budget.tolerance, f"{self.name} ({t})")
            meta.update({"tp_pruning_ratio": ratio, f"predicted_{t.kind}_reduction": red, "bisection_steps": steps})
        if unmapped:
            meta["unmapped_layers"] = unmapped  # Torch-Pruning pruned layers outside our prunable groups
        for p in work.parameters():
            p.grad = None
        return Plan(method=self.name, channels=channels, meta=meta)


def _magnitude_defaults(p: int) -> dict[str, Any]:
    return {**_TorchPruningPeer.defaults, "p": p, "group_reduction": "mean", "normalizer": "mean"}


@register_method("tp_l1", granularity="channel", family="peer",
                 description="Torch-Pruning's MetaPruner with group L1 magnitude importance.",
                 paper="Fang et al. 2023, DepGraph")
class TPGroupL1(_TorchPruningPeer):
    """Torch-Pruning, group L1-norm importance."""

    defaults = _magnitude_defaults(1)

    def importance(self) -> Any:
        import torch_pruning as tp

        return tp.importance.GroupMagnitudeImportance(p=self.p, group_reduction=self.group_reduction,
                                                      normalizer=self.normalizer)


@register_method("tp_l2", granularity="channel", family="peer",
                 description="Torch-Pruning's MetaPruner with group L2 magnitude importance.",
                 paper="Fang et al. 2023, DepGraph")
class TPGroupL2(TPGroupL1):
    """Torch-Pruning, group L2-norm importance."""

    defaults = _magnitude_defaults(2)


@register_method("tp_taylor", granularity="channel", needs_grad=True, family="peer",
                 description="Torch-Pruning's MetaPruner with group first-order Taylor importance.",
                 paper="Molchanov et al. 2019")
class TPTaylor(_TorchPruningPeer):
    """Torch-Pruning, group Taylor importance (gradients averaged over ``samples`` prune-set examples)."""

    defaults = {**_TorchPruningPeer.defaults, "samples": 512, "group_reduction": "mean", "normalizer": "mean"}
    grad_mode = "mean"

    def importance(self) -> Any:
        import torch_pruning as tp

        return tp.importance.GroupTaylorImportance(group_reduction=self.group_reduction, normalizer=self.normalizer)


@register_method("tp_hessian", granularity="channel", needs_grad=True, needs_second_order=True, family="peer",
                 description="Torch-Pruning's MetaPruner with group OBD (diagonal Hessian) importance.",
                 paper="LeCun et al. 1989 (OBD), Torch-Pruning's GroupHessianImportance")
class TPHessian(_TorchPruningPeer):
    """Torch-Pruning, group Hessian (OBD) importance; the Hessian diagonal is the mean squared
    per-example gradient over ``samples`` prune-set examples (accumulated here, exactly what
    ``GroupHessianImportance.accumulate_grad`` is meant to collect)."""

    defaults = {**_TorchPruningPeer.defaults, "samples": 128, "group_reduction": "mean", "normalizer": "mean"}
    grad_mode = "sq"

    def importance(self) -> Any:
        import torch_pruning as tp

        return tp.importance.GroupHessianImportance(group_reduction=self.group_reduction, normalizer=self.normalizer)


@register_method("tp_lamp", granularity="channel", family="peer",
                 description="Torch-Pruning's MetaPruner with LAMP importance.", paper="Lee et al. 2021, LAMP")
class TPLamp(_TorchPruningPeer):
    """Torch-Pruning, layer-adaptive magnitude (LAMP) importance."""

    defaults = {**_TorchPruningPeer.defaults, "p": 2, "group_reduction": "mean"}

    def importance(self) -> Any:
        import torch_pruning as tp

        return tp.importance.LAMPImportance(p=self.p, group_reduction=self.group_reduction)


# --------------------------------------------------------------------------------------------- torch.nn.utils.prune
def _prunable_weights(model: nn.Module, ctx: PruneContext) -> dict[str, nn.Parameter]:
    """The weights prunekit's own weight methods prune (the shared allocator's definition when present)."""
    try:
        from prunekit.surgery.allocate import prunable_weights
    except ImportError:
        prunable_weights = None
    if prunable_weights is not None:
        return dict(prunable_weights(model, ctx))
    ignored = set(ctx.budget.ignored or ())
    if ctx.budget.ignored is None:  # default: the classifier (last linear / conv layer)
        layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
        ignored = {layers[-1]} if layers else set()
    return {f"{n}.weight": m.weight for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and n not in ignored}


@register_method("torch_prune_l1", granularity="weight", family="peer",
                 description="torch.nn.utils.prune.global_unstructured with L1Unstructured (the mask baseline).")
class TorchPruneGlobalL1(Method):
    """PyTorch's own global L1 unstructured pruning over the prunable weights, read back as masks."""

    defaults: dict[str, Any] = {}

    def _masks(self, model: nn.Module, ctx: PruneContext, amount: int) -> dict[str, torch.Tensor]:
        from torch.nn.utils import prune

        from prunekit.surgery.masks import remove_masks_

        # a model pruned before (an earlier round, or a masked checkpoint) carries masks as parametrizations or
        # torch's own weight_orig / weight_mask: baked into plain weights first, its zeros are the smallest
        # magnitudes, so this round's masks contain the earlier ones
        work = remove_masks_(copy.deepcopy(model))
        names = list(_prunable_weights(work, ctx))
        if not names:
            raise PruningError("torch_prune_l1: the model has no prunable weights")
        pairs = [(work.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]) for n in names]
        prune.global_unstructured(pairs, pruning_method=prune.L1Unstructured, amount=int(amount))
        return {n: getattr(m, f"{pname}_mask").detach().to(torch.bool).cpu().clone()
                for n, (m, pname) in zip(names, pairs)}

    def plan(self, model: nn.Module, ctx: PruneContext) -> Plan:
        from prunekit.metrics import count_params, effective_flops

        weights = _prunable_weights(model, ctx)
        total = sum(w.numel() for w in weights.values())
        zeros = sum(int((w == 0).sum()) for w in weights.values())
        t = ctx.target
        meta: dict[str, Any] = {"peer": "torch.nn.utils.prune", "pruning_method": "L1Unstructured"}
        if t.kind == "ratio":
            amount = int(round(t.value * total))
        elif t.kind == "params":
            # relative to the model as given, its zeros counted as removed (as the engine's targets are; a later
            # round of an iterative schedule gets its target relative to what the earlier rounds left)
            nonzero = count_params(model)["nonzero_params"]
            remove = nonzero - math.ceil(nonzero / t.value)
            amount = zeros + max(0, remove)
            if amount > total:
                raise PruningError(f"torch_prune_l1: params={t.value:g} needs {remove:,} of the "
                                   f"{total - zeros:,} non-zero prunable weights removed")
        else:  # flops: bisection on the pruned fraction, zero-skipping multiply-adds
            from prunekit.surgery.masks import apply_masks_

            base = effective_flops(model, ctx.input_shape)

            def achieved(frac: float) -> tuple[float, Any]:
                masks = self._masks(model, ctx, int(round(frac * total)))
                probe = apply_masks_(copy.deepcopy(model), {k: v.to(_device(model)) for k, v in masks.items()})
                return base / max(1, effective_flops(probe, ctx.input_shape)), masks

            frac, red, masks, steps = _search(achieved, t.value, 1.0, ctx.budget.tolerance, f"torch_prune_l1 ({t})")
            meta.update({"amount": frac, "predicted_flops_reduction": red, "bisection_steps": steps})
            return Plan(method=self.name, masks=masks, meta=meta)
        meta["amount"] = amount
        return Plan(method=self.name, masks=self._masks(model, ctx, min(amount, total)), meta=meta)


__all__ = ["TPGroupL1", "TPGroupL2", "TPHessian", "TPLamp", "TPTaylor", "TorchPruneGlobalL1"]
