"""The one-call Python API: ``prunekit.prune(model, method, target, data)``.

>>> import prunekit
>>> model = prunekit.create_model("resnet20")
>>> result = prunekit.prune(model, "l1", "flops=2")            # doctest: +SKIP
>>> result.report["flops_speedup"], result.report["compression"]  # doctest: +SKIP

``prune`` resolves the method from the registry, builds the channel graph, lets the method plan
(scores -> budget allocation), applies the plan (physically by default) and measures the result.
With ``rounds > 1`` the target is reached gradually (see :mod:`prunekit.schedule`) with optional
fine-tuning between rounds.
"""

from __future__ import annotations

import copy as _copy
import math
import resource
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from prunekit.errors import PruningError
from prunekit.methods.base import BudgetOptions, Method, PruneContext, Target
from prunekit.methods.registry import MethodInfo, get_method_info
from prunekit.schedule import FineTuner, cumulative_fractions, target_fraction
from prunekit.surgery.allocate import latency_mode as _latency_mode
from prunekit.surgery.apply import apply_plan_
from prunekit.surgery.graph import LAYER_TYPES, ChannelGraph, PruningWarning, analyze, default_input_shape
from prunekit.surgery.inputs import accepting_examples, is_example
from prunekit.surgery.masks import remove_masks_
from prunekit.surgery.plan import Plan
from prunekit.surgery.probe import probe_groups_


@dataclass
class PruneResult:
    """What :func:`prune` returns.

    ``model``: the pruned model (a copy unless ``copy=False``); ``plan``: the last round's plan
    (``plans``: every round's); ``report``: achieved ratios and measurements (see :func:`prune`);
    ``graph``: the channel graph of the last round.
    """

    model: nn.Module
    plan: Plan
    report: dict[str, Any]
    plans: list[Plan] = field(default_factory=list)
    graph: ChannelGraph | None = None


# --------------------------------------------------------------------------------------------- helpers
def _resolve_method(method: str | Method, options: dict[str, Any]) -> tuple[Method, MethodInfo | None]:
    if isinstance(method, Method):
        if options:
            raise PruningError(
                f"options {sorted(options)} were given for an already created method; pass them to "
                "create_method(...) instead"
            )
        return method, method.info
    if not isinstance(method, str):
        raise PruningError(
            f"method must be a registered name or a Method instance, got {type(method).__name__}"
        )
    info = get_method_info(method)
    if not info.available():
        raise PruningError(
            f"method {method!r} needs the optional package {info.requires!r}: "
            f"pip install {info.requires.replace('_', '-')}"
        )
    return info.cls(**options), info


def _as_batches(data: Any, batch_size: int = 128) -> Any:
    """An iterable of ``(x, y)`` batches from a loader, an iterable of batches or a dataset."""
    if data is None:
        return None
    try:
        from prunekit.data import BatchLoader, ImageDataset

        if isinstance(data, ImageDataset):
            return BatchLoader(data, batch_size=batch_size, shuffle=False)
    except ImportError:  # pragma: no cover - the data package is part of prunekit
        pass
    if (
        isinstance(data, torch.utils.data.Dataset)
        and not isinstance(data, torch.utils.data.IterableDataset)
        and hasattr(data, "__len__")
    ):
        return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    if not hasattr(data, "__iter__"):
        raise PruningError(
            f"data must be a BatchLoader, an iterable of (x, y) batches or a dataset, got "
            f"{type(data).__name__}"
        )
    return data


def _input_shape(model: nn.Module, input_shape: Any, data: Any, example_inputs: Any = None) -> tuple[int, ...]:
    """What the engine traces and counts with: a per-example shape ``(C, H, W)``, or -- for ``example_inputs``
    and for data whose ``x`` is a tuple / dict or not a float tensor -- :class:`ExampleInputs` (one example)."""
    from prunekit.surgery.inputs import ExampleInputs, as_example_inputs

    if example_inputs is not None:
        return as_example_inputs(example_inputs).first(1)
    if input_shape is not None:
        if is_example(input_shape):  # a batch passed as the shape
            return as_example_inputs(input_shape).first(1)
        return tuple(int(s) for s in input_shape)
    if getattr(model, "prunekit_config", None):
        return default_input_shape(model)
    if data is not None:
        for x, _ in data:
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                return tuple(int(s) for s in x.shape[1:])
            return ExampleInputs((x,)).first(1) if isinstance(x, torch.Tensor) else as_example_inputs(x).first(1)
    raise PruningError("cannot tell the model's input shape: pass example_inputs=... (a batch: a tensor, a tuple of "
                       "tensors or a dict of keyword tensors) or input_shape=(C, H, W)")


def _layer_widths(model: nn.Module) -> dict[str, list[int]]:
    from prunekit.surgery.lowrank import LowRankConv2d, LowRankLinear

    out: dict[str, list[int]] = {}
    chains: list[str] = []
    for path, m in model.named_modules():
        if any(path.startswith(c + ".") for c in chains):
            continue
        if isinstance(m, LowRankConv2d):
            out[path], chains = [m.out_channels, m.in_channels], chains + [path]
        elif isinstance(m, LowRankLinear):
            out[path], chains = [m.out_features, m.in_features], chains + [path]
        elif isinstance(m, nn.modules.conv._ConvNd):
            out[path] = [int(m.out_channels), int(m.in_channels)]
        elif isinstance(m, nn.Linear):
            out[path] = [int(m.out_features), int(m.in_features)]
    return out


def _sparsity(model: nn.Module) -> dict[str, float]:
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, LAYER_TYPES):
            w = m.weight
            out[path] = 1.0 - float(torch.count_nonzero(w)) / max(1, w.numel())
    return out


def _measure(
    model: nn.Module, input_shape: tuple[int, ...], graph: ChannelGraph | None = None
) -> dict[str, int]:
    """Dense and effective multiply-adds and parameters, as :mod:`prunekit.metrics` counts them (one
    counted forward pass; none when ``graph`` was just built on this very model)."""
    from prunekit.metrics import count_params

    p = count_params(model)
    out = {"params": int(p["params"]), "nonzero_params": int(p["nonzero_params"])}
    if graph is not None and graph.bound_to(model):
        dense = graph.cost.base_flops
        zero = 0.0
        for t in graph.cost.tensors:
            if t.macs_per_entry:
                mod_path, _, pname = t.path.rpartition(".")
                w = getattr(model.get_submodule(mod_path), pname)  # weight, or MultiheadAttention's in_proj_weight
                zero += t.macs_per_entry * (w.numel() - int(torch.count_nonzero(w)))
        return {**out, "flops": int(dense), "effective_flops": int(max(0, dense - round(zero)))}
    try:
        from prunekit.metrics.flops import _run_counted

        total, batch, layers = _run_counted(model, input_shape, track_layers=True)
        dense = total // 2 // batch
        eff = max(0, total // 2 - sum(lm.zero_skipped for lm in layers)) // batch
    except (ImportError, TypeError, ValueError):  # pragma: no cover - metrics internals changed
        from prunekit.metrics import count_flops, effective_flops

        dense, eff = count_flops(model, input_shape), effective_flops(model, input_shape)
    return {**out, "flops": int(dense), "effective_flops": int(eff)}


class _PeakMemory:
    """Peak memory of a code block: resident set high-water mark (Linux, reset through
    ``/proc/self/clear_refs``), else ``ru_maxrss``; CUDA peak allocation on a GPU device."""

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def _status(field_name: str) -> float | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field_name + ":"):
                        return float(line.split()[1]) / 1024.0
        except OSError:
            return None
        return None

    def __enter__(self) -> _PeakMemory:
        self.reset = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset = True
        except OSError:
            pass
        self.rss0 = self._status("VmRSS")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        peak = self._status("VmHWM") if self.reset else None
        if peak is not None:
            self.method = "rss high-water mark"
        else:
            scale = 1 / 1024.0 if sys.platform != "darwin" else 1 / 1024.0**2
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
            self.method = "ru_maxrss (process lifetime peak)"
        self.peak_mb = peak
        self.delta_mb = None if self.rss0 is None or peak is None else max(0.0, peak - self.rss0)
        self.cuda_mb = (
            (torch.cuda.max_memory_allocated(self.device) / 2**20) if self.device.type == "cuda" else None
        )


def _budget(budget: BudgetOptions | None, **overrides: Any) -> BudgetOptions:
    b = _copy.copy(budget) if budget is not None else BudgetOptions()
    for k, v in overrides.items():
        if v is None:
            continue
        if k == "ignored":
            v = (v,) if isinstance(v, str) else tuple(v)
        setattr(b, k, v)
    return b


def _round_target(
    tgt: Target,
    kind_granularity: str,
    k: int,
    cum: list[float],
    graph: ChannelGraph | None,
    originals: dict[str, int],
    removed: dict[str, int],
    current_cost: float,
    base_cost: float,
    rounds: int,
    schedule: str,
    thresholds: Any,
) -> Target | None:
    """The target of round ``k`` relative to the current model (None: nothing left to do this round)."""
    c = cum[k]
    if tgt.kind == "ratio":
        if kind_granularity != "channel" or graph is None:
            return Target(
                "ratio",
                c,
                {p: cumulative_fractions(v, rounds, schedule)[k] for p, v in tgt.per_layer.items()},
            )
        per: dict[str, float] = {}
        for key, g in graph.groups.items():
            if not g.prunable:
                continue
            frac = tgt.per_layer.get(key)
            if frac is None:
                frac = next((tgt.per_layer[p] for p in g.producers + g.depthwise if p in tgt.per_layer), None)
            ck = c if frac is None else cumulative_fractions(frac, rounds, schedule, None)[k]
            orig = originals.get(key, g.size)
            hi = g.size - removed.get(key, 0)
            want = int(round(orig * (1 - ck)))
            per[key] = 0.0 if want >= hi else max(0.0, 1.0 - want / hi)
        return Target("ratio", 0.0, per)
    if base_cost <= 0:
        raise PruningError(f"target {tgt} cannot apply: the model has no non-zero "
                           f"{'multiply-adds' if tgt.kind == 'flops' else 'parameters'} left to remove")
    goal = base_cost * (1 - c)
    rel = current_cost / goal
    if rel <= 1.0 + 1e-6:
        return None
    return Target(tgt.kind, rel)


# --------------------------------------------------------------------------------------------- prune
def prune(
    model: nn.Module,
    method: str | Method,
    target: str | Target | dict[str, Any],
    data: Any = None,
    *,
    mode: str = "physical",
    scope: str | None = None,
    round_to: int | str | None = None,
    ignored: Any = None,
    floor: float | None = None,
    cap: float | None = None,
    normalize: str | None = None,
    nm: str | None = None,
    latency_aware: bool | str | None = None,
    heads: bool = False,
    budget: BudgetOptions | None = None,
    rounds: int = 1,
    schedule: str = "geometric",
    thresholds: Any = None,
    finetune: Any = None,
    finetune_last: bool = True,
    input_shape: Any = None,
    example_inputs: Any = None,
    device: str | torch.device = "cpu",
    copy: bool = True,
    trajectory: Any = None,
    num_classes: int | None = None,
    verify: bool = True,
    **method_options: Any,
) -> PruneResult:
    """Prune ``model`` with ``method`` to ``target``.

    Args:
        model: a zoo model (``prunekit.create_model``) or any ``nn.Module`` (see ``example_inputs``).
        method: a registered method name (``prunekit.list_methods()``) or a :class:`Method` instance.
        target: ``"flops=2"`` (2x fewer multiply-adds), ``"params=4"``, ``"ratio=0.5"`` (fraction removed
            per layer), or a :class:`Target`.
        data: the prune set: a :class:`prunekit.data.BatchLoader`, any iterable of ``(x, y)`` batches, a
            dataset, or an ``(x, y)`` pair of tensors. Required by methods that need data.
        mode: ``"physical"`` (remove channels; bake weight masks) or ``"masked"`` (reversible zeros).
        scope: ``"global"`` (one ranking across layers, default) or ``"layerwise"``.
        round_to: channel multiple (default ``"auto"``: 32 from 64 channels, 16 for 32-63, 8 for 16-31,
            none below; ``1``: no rounding; ``"runtime"``: exact below one SIMD block, quarter blocks up to
            four blocks, whole blocks above; or a callable ``width -> multiple``). An explicit ``round_to``
            also rounds the gradient-flow global count (``prune_percent``). With the default
            ``latency_aware`` the global ranking also weighs each channel by the CPU time its
            removal saves (see :class:`BudgetOptions`).
        latency_aware: ``True`` / ``"proxy"`` (default): the time a channel saves comes from an analytic
            CPU cost model; ``"measured"``: from timing the model's layers on this machine in eager PyTorch;
            ``"onnxruntime"``: the same in ONNX Runtime (each layer exported alone, BN folded)
            (:mod:`prunekit.surgery.latency`; a few seconds, cached per machine); ``False`` / ``"off"``:
            channels are ranked by score alone.
        ignored: layer paths whose output channels (channel methods) / weights (weight methods) are not
            pruned; the classifier never is.
        floor / cap / normalize / nm: see :class:`BudgetOptions`; ``budget`` passes them all at once.
        heads: also prune whole attention heads of fused-qkv attention modules (the zoo's ViT, timm, GPT-2's
            ``c_attn``). Attention modules with separate q / k / v projections that reshape them into heads
            (Hugging Face BERT / ViT) are always pruned by whole heads; ``nn.MultiheadAttention`` keeps its width.
        rounds / schedule / thresholds: iterative pruning (:mod:`prunekit.schedule`); with ``finetune`` the
            prune -> retrain cascade (:func:`prunekit.schedule.cascade` gives the keyword arguments).
        finetune: ``None``; a number of epochs per round (trains on ``data``); a :class:`FineTuner`;
            or any callable ``fn(model, epochs)``. Runs between rounds and, if ``finetune_last``,
            after the last.
        input_shape: ``(C, H, W)``; default: the zoo model's input size, else the data's.
        example_inputs: an example batch instead of a shape, as Torch-Pruning takes it: a tensor, a tuple
            of positional tensors (``model(*inputs)``) or a dict of keyword tensors (``model(**inputs)``);
            needed for models with several inputs, keyword inputs or integer tokens. Outputs may be a
            tensor, a tuple, a dict or a dataclass (Hugging Face ``ModelOutput``). Data for data-driven
            methods stays ``(x, y)`` batches; for such models ``x`` is the tuple / dict of inputs.
        device: where pruning runs. copy: prune a deep copy (default) or ``model`` itself.
        trajectory: a recorded parameter trajectory (Koopman methods). verify: measure the pruned
            FLOPs / parameters during channel allocation and correct the search if needed.
        **method_options: options of the method (see ``prunekit methods``).

    Returns:
        :class:`PruneResult`. ``report`` holds ``flops_speedup`` (base dense multiply-adds / pruned
        effective multiply-adds, i.e. zeros skipped), ``dense_flops_speedup``, ``compression`` (base
        parameters / pruned non-zero parameters), ``dense_compression``, base and pruned counts,
        ``layers`` (per conv / linear layer: ``[out, in]`` before and after and weight sparsity),
        ``prune_seconds`` (excluding fine-tuning), ``finetune_seconds``, ``peak_memory_mb`` of the
        pruning step, ``warnings`` and ``skipped`` layers; for ``params`` / ``flops`` targets
        ``round_achieved``, the reduction reached after each round (the last entry is ``achieved``).

    Raises:
        PruningError: unknown method option, missing data, unreachable target, ...
    """
    if Target.parse(target).kind == "latency":
        kw = {k: v for k, v in locals().items() if k not in ("model", "method", "target", "data", "method_options")}
        return _prune_to_latency(model, method, Target.parse(target), data, kw, method_options)
    t_start = time.perf_counter()
    run = _prepare(model, method, target, data, method_options, mode=mode, rounds=rounds, schedule=schedule,
                   thresholds=thresholds, finetune=finetune, finetune_last=finetune_last, input_shape=input_shape,
                   example_inputs=example_inputs, device=device, copy=copy, trajectory=trajectory,
                   num_classes=num_classes, verify=verify,
                   heads=heads, budget=_budget(budget, scope=scope, round_to=round_to, ignored=ignored, floor=floor,
                                               cap=cap, normalize=normalize, nm=nm, latency_aware=latency_aware))
    return _execute(run, mode, schedule, t_start)


def _execute(run: _Run, mode: str, schedule: str, t_start: float) -> PruneResult:
    """Run the prepared rounds, measure the result, and report (refusals carry the analysis warnings)."""
    model = run.model
    try:
        with warnings.catch_warnings(record=True) as caught, _PeakMemory(run.ctx.device) as mem:
            warnings.simplefilter("always")
            widths_before = _layer_widths(model)
            _run_rounds(run)
            if mode == "physical":
                remove_masks_(model)  # weight masks are baked into the weights
            pruned = _measure(model, run.ctx.input_shape)
    except PruningError as e:  # a refusal says why too: the analysis warnings go with it
        _reemit(caught)
        notes = [str(w.message) for w in caught if "not pruned" in str(w.message) or "tracing" in str(w.message)]
        missing = [n for n in dict.fromkeys(notes) if n.split(": ", 1)[-1] not in str(e)]
        if missing:
            raise PruningError(f"{e}\n" + "\n".join(f"  {n}" for n in missing[:12])) from e
        raise
    _reemit(caught)  # show them to the caller too
    prune_s = time.perf_counter() - t_start - run.finetune_s
    report = _report(run.method, run.target, mode, run.ctx.budget, run.rounds, schedule, run.base, pruned,
                     widths_before, model, run.graph, run.ctx, run.plans, prune_s, run.finetune_s, mem, caught)
    if run.round_costs:  # params / flops targets: the reduction reached after each round (the last: the result)
        key = "effective_flops" if run.target.kind == "flops" else "nonzero_params"
        costs = run.round_costs[1:] + [pruned[key]]
        report["round_achieved"] = [run.base[key] / max(1, c) for c in costs]
    _check_removed(report, run)
    model.prunekit_report = report
    return PruneResult(model=model, plan=run.plans[-1] if run.plans else Plan(method=run.method.name),
                       report=report, plans=run.plans, graph=run.graph)


def _reemit(caught: list[Any]) -> None:
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


LATENCY_BATCH = 64  # the batch size latency targets are measured at
LATENCY_TRIALS = 6  # pruning trials the latency search may take


def _measured_speedup(base: nn.Module, pruned: nn.Module, shape: tuple[int, ...], runtime: str) -> float:
    from prunekit import deploy

    lat = deploy.measure_runtimes({"base": base, "pruned": pruned}, shape, runtimes=[runtime],
                                  batch_sizes=[LATENCY_BATCH])
    if runtime in lat["skipped"]:
        raise PruningError(f"cannot measure latency in {runtime}: {lat['skipped'][runtime]} (name another runtime: "
                           "latency@eager=X)")
    res = lat["runtimes"][runtime]
    return res["base"][str(LATENCY_BATCH)] / res["pruned"][str(LATENCY_BATCH)]


def _next_flops(trials: list[dict[str, float]], goal: float) -> float:
    """The next FLOPs target of the latency search (measured speedup assumed to grow with the FLOPs target).

    Bracketed: between the highest FLOPs target still too slow and the lowest one fast enough, interpolate
    in log space (kept inside the inner 80 % of the bracket); without a bracket yet, step by the missing
    factor, at most 2x up or down per trial (timings are noisy, steps stay bounded)."""
    slow = [t for t in trials if t["latency_speedup"] < goal]
    fast = [t for t in trials if t["latency_speedup"] >= goal]
    lo = max(slow, key=lambda t: t["flops_target"]) if slow else None
    hi = min(fast, key=lambda t: t["flops_target"]) if fast else None
    if lo is not None and hi is not None:
        a, b = math.log(lo["flops_target"]), math.log(hi["flops_target"])
        if a < b:
            span = math.log(hi["latency_speedup"]) - math.log(lo["latency_speedup"])
            w = (math.log(goal) - math.log(lo["latency_speedup"])) / span if span > 0 else 0.5
            return math.exp(a + min(0.9, max(0.1, w)) * (b - a))
        return math.exp((a + b) / 2)  # noise inverted the order: try between them
    t = lo if lo is not None else hi
    step = min(2.0, max(0.5, goal / t["latency_speedup"]))
    return min(64.0, max(1.01, t["flops_target"] * step))


def _prune_to_latency(model: nn.Module, method: str | Method, tgt: Target, data: Any, kw: dict[str, Any],
                      method_options: dict[str, Any]) -> PruneResult:
    """Meet ``latency=X``: prune to FLOPs targets found by a secant search until the pruned model, timed
    against the base in the target's runtime (batch 64, alternately, medians), is X times faster (within
    the budget's tolerance, default 5 %); the closest trial is kept, then fine-tuned once if asked."""
    from prunekit import deploy

    if kw["rounds"] != 1:
        raise PruningError("latency targets are met by a one-shot search over FLOPs targets: use rounds=1")
    info = method.info if isinstance(method, Method) else get_method_info(method)
    if info is not None and info.granularity == "weight":
        raise PruningError(f"method {info.name!r} prunes single weights: dense runtimes do not run it faster, so a "
                           "latency target cannot be met; use a channel or low-rank method")
    runtime = tgt.runtime or ("onnxruntime" if deploy._available("onnxruntime") is None else "eager")
    finetune = kw.pop("finetune")
    if not kw.pop("copy"):
        raise PruningError("a latency target prunes a copy per trial and returns the closest: pass copy=True")
    tol = (kw["budget"] or BudgetOptions()).tolerance
    t0 = time.perf_counter()
    base = _copy.deepcopy(model).cpu().eval()
    shape = _input_shape(model, kw["input_shape"], _as_batches(data), kw.get("example_inputs"))
    trials: list[dict[str, float]] = []
    best: tuple[float, PruneResult] | None = None
    r = tgt.value
    for _ in range(LATENCY_TRIALS):
        res = prune(model, method, Target("flops", r), data, copy=True, finetune=None, **kw, **method_options)
        s = _measured_speedup(base, res.model, shape, runtime)
        trials.append({"flops_target": r, "flops_speedup": res.report["flops_speedup"], "latency_speedup": s})
        if best is None or abs(math.log(s / tgt.value)) < abs(math.log(best[0] / tgt.value)):
            best = (s, res)
        if abs(s / tgt.value - 1) <= tol:
            break
        r = _next_flops(trials, tgt.value)
    assert best is not None
    s, res = best
    tuner = _finetuner(finetune, _as_batches(data), torch.device(kw["device"]))
    ft_s = 0.0
    if tuner is not None:
        t_ft = time.perf_counter()
        tuner(res.model, getattr(tuner, "epochs", 1.0))
        ft_s = time.perf_counter() - t_ft
    res.report.update({"target": str(tgt), "achieved": s, "target_error": s / tgt.value - 1, "finetune_seconds": ft_s,
                       "prune_seconds": time.perf_counter() - t0 - ft_s,
                       "latency_search": {"runtime": runtime, "batch": LATENCY_BATCH, "trials": trials}})
    if abs(s / tgt.value - 1) > tol:
        warnings.warn(f"prunekit: latency={tgt.value:g} in {runtime}: the closest of {len(trials)} trials is "
                      f"{s:.2f}x (FLOPs targets tried: {', '.join(format(t['flops_target'], '.2f') for t in trials)})",
                      stacklevel=3)
    return res


def _check_removed(report: dict[str, Any], run: Any) -> None:
    if report["achieved"] is not None and report["achieved"] < 1.0 + 1e-9:
        raise PruningError(f"{run.method.name} at {run.target} removed nothing from this model (its parameters and "
                           "multiply-adds are unchanged): nothing prunable is left under the budget's floors, or "
                           "the method's plan was empty")


@dataclass
class _Run:
    """What one call of :func:`prune` works with (checked inputs) and collects (plans, costs, time)."""

    model: nn.Module
    method: Method
    granularity: str
    target: Target
    mode: str
    ctx: PruneContext
    tuner: Any
    cum: list[float]
    schedule: str
    thresholds: Any
    finetune_last: bool
    heads: bool
    plans: list[Plan] = field(default_factory=list)
    graph: ChannelGraph | None = None
    base: dict[str, int] = field(default_factory=dict)
    originals: dict[str, int] = field(default_factory=dict)
    finetune_s: float = 0.0
    round_costs: list[float] = field(default_factory=list)  # the target's cost before each round

    @property
    def rounds(self) -> int:
        return len(self.cum)


def _prepare(model: nn.Module, method: str | Method, target: Any, data: Any, method_options: dict[str, Any], *,
             mode: str, rounds: int, schedule: str, thresholds: Any, finetune: Any, finetune_last: bool,
             input_shape: Any, device: Any, copy: bool, trajectory: Any, num_classes: int | None, verify: bool,
             heads: bool, budget: BudgetOptions, example_inputs: Any = None) -> _Run:
    """Check every input (before any work), copy and move the model, build the context."""
    meth, info = _resolve_method(method, method_options)
    tgt = Target.parse(target)
    if mode not in ("physical", "masked"):
        raise PruningError(f"mode must be 'physical' or 'masked', got {mode!r}")
    if not isinstance(model, nn.Module):
        raise PruningError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if rounds < 1:
        raise PruningError(f"rounds must be >= 1, got {rounds}")
    dev = torch.device(device)
    loader = _as_batches(data)
    if loader is not None:  # (x, y) pairs with labels of the model's classes; the shape once it is known
        from prunekit.data.checks import CheckedBatches

        loader = CheckedBatches(loader, None, num_classes or (getattr(model, "prunekit_config", None) or {}).get(
            "num_classes"))
    _latency_mode(budget.latency_aware)  # a clear error for a bad value, before any work
    if copy:
        model = _copy.deepcopy(model)
    model.to(dev)
    from prunekit.surgery.convert import linearize_

    if linearize_(model):  # Hugging Face Conv1D (GPT-2) -> the equal nn.Linear, so the graph can be traced
        warnings.warn("prunekit: Hugging Face Conv1D layers were replaced by the equal nn.Linear layers",
                      PruningWarning, stacklevel=3)
    shape = _input_shape(model, input_shape, loader, example_inputs)
    if hasattr(shape, "kwargs"):  # ExampleInputs: on the model's device
        shape = shape.to(dev)
    if loader is not None:  # every batch checked as it is read: pairs of the model's input shape and classes
        loader.input_shape = shape
    ctx = PruneContext(target=tgt, input_shape=shape, budget=budget, data=loader, device=dev,
                       trajectory=trajectory, num_classes=num_classes)
    ctx.verify = verify
    meth.check(ctx)
    tuner = _finetuner(finetune, loader, dev)
    cum = cumulative_fractions(target_fraction(tgt), rounds, schedule, thresholds)
    return _Run(model=model, method=meth, granularity=info.granularity if info is not None else "channel",
                target=tgt, mode=mode, ctx=ctx, tuner=tuner, cum=cum, schedule=schedule, thresholds=thresholds,
                finetune_last=finetune_last, heads=heads)


def _run_rounds(run: _Run) -> None:
    """The rounds: analyse, set the round's target, plan, apply, fine-tune (between rounds / after the last)."""
    model, ctx, tgt = run.model, run.ctx, run.target
    shape = ctx.input_shape
    cost_key = "effective_flops" if tgt.kind == "flops" else "nonzero_params"
    for k in range(run.rounds):
        graph = analyze(model, shape, ignored=ctx.budget.ignored, heads=run.heads)
        probe_groups_(model, graph)  # widths the model's code fixes (view(n, 32, 4, 4)) are not offered
        run.graph = graph
        if not run.originals:
            run.originals = {key: g.size for key, g in graph.groups.items()}
            run.base = _measure(model, shape, graph)
        ctx.graph = graph
        ctx.original_sizes = run.originals
        ctx.removed_channels = None
        removed = {}
        if run.mode == "masked" and run.granularity == "channel":
            from prunekit.surgery.allocate import masked_channels

            rem = masked_channels(model, graph)
            ctx.removed_channels = rem
            removed = {key: int(len(v)) for key, v in rem.items()}
        if k == 0 and run.granularity == "channel":
            _count_masked_channels_removed(run, model, graph, ctx.removed_channels)
        current = 0.0
        if tgt.kind != "ratio":
            current = run.base[cost_key] if k == 0 else _measure(model, shape, graph)[cost_key]
            run.round_costs.append(current)
        # targets are relative to the model as given, its zeros counted as removed (a sparse or masked model
        # pruned again is pruned further)
        rt = _round_target(tgt, run.granularity, k, run.cum, graph, run.originals, removed, current,
                           run.base[cost_key], run.rounds, run.schedule, run.thresholds)
        if rt is None:
            continue
        ctx.target = rt
        if hasattr(ctx.input_shape, "kwargs"):  # several / keyword inputs: model(x) unpacks ExampleInputs
            with accepting_examples(model):
                plan = run.method.plan(model, ctx)
        else:
            plan = run.method.plan(model, ctx)
        run.plans.append(plan)
        _apply_and_finetune(run, plan, graph, last=k == run.rounds - 1)


def _count_masked_channels_removed(run: _Run, model: nn.Module, graph: ChannelGraph,
                                   rem: dict[str, Any] | None = None) -> None:
    """A model given with masked channels costs what its physically pruned equivalent costs (the consumers'
    columns reading a masked channel are not zero, so zero-skipping counts overstate it): the base of the
    targets and of the report is that cost, so pruning such a model again halves *that* at flops=2."""
    from prunekit.surgery.allocate import masked_channels

    rem = masked_channels(model, graph) if rem is None else rem  # masked mode found them already
    if not any(len(v) for v in rem.values()):
        return
    widths = {key: g.size - int(len(rem.get(key, ()))) for key, g in graph.groups.items()}
    run.base["effective_flops"] = int(min(run.base["effective_flops"], round(graph.cost.flops(widths))))
    run.base["nonzero_params"] = int(min(run.base["nonzero_params"], round(graph.cost.params(widths))))


def _apply_and_finetune(run: _Run, plan: Plan, graph: ChannelGraph, last: bool) -> None:
    model, tuner = run.model, run.tuner
    old_params = dict(model.named_parameters())
    weight_only = bool(plan.masks) and not plan.channels and not plan.lowrank and not plan.weights
    apply_plan_(model, plan, graph, "masked" if weight_only else run.mode, run.ctx.input_shape)
    if tuner is not None and run.mode == "physical" and plan.channels and hasattr(tuner, "pruned"):
        tuner.pruned(old_params, model, graph.kept_dims(plan.channels))
    if tuner is not None and (not last or run.finetune_last):
        t_ft = time.perf_counter()
        tuner(model, getattr(tuner, "epochs", 1.0))
        model.to(run.ctx.device)
        run.finetune_s += time.perf_counter() - t_ft


def _finetuner(finetune: Any, loader: Any, dev: torch.device) -> Any:
    if finetune is None or finetune is False:
        return None
    if isinstance(finetune, (int, float)) and not isinstance(finetune, bool):
        if loader is None:
            raise PruningError("fine-tuning needs training data: pass data=...")
        return FineTuner(loader, epochs=float(finetune), device=dev)
    if callable(finetune):
        return finetune
    raise PruningError(
        f"finetune must be None, a number of epochs, a FineTuner or a callable, got {finetune!r}"
    )


def _report(
    meth: Method,
    tgt: Target,
    mode: str,
    b: BudgetOptions,
    rounds: int,
    schedule: str,
    base: dict[str, int],
    pruned: dict[str, int],
    widths_before: dict[str, list[int]],
    model: nn.Module,
    graph: ChannelGraph | None,
    ctx: PruneContext,
    plans: list[Plan],
    prune_s: float,
    finetune_s: float,
    mem: _PeakMemory,
    caught: list[Any],
) -> dict[str, Any]:
    after = _layer_widths(model)
    sparsity = _sparsity(model)
    layers = {
        p: {"before": w, "after": after.get(p, w), "sparsity": round(sparsity.get(p, 0.0), 6)}
        for p, w in widths_before.items()
    }
    # relative to the model as given (its zero weights / masked channels already count as removed)
    flops_speedup = base["effective_flops"] / max(1, pruned["effective_flops"])
    compression = base["nonzero_params"] / max(1, pruned["nonzero_params"])
    achieved = flops_speedup if tgt.kind == "flops" else compression if tgt.kind == "params" else None
    report: dict[str, Any] = {
        "method": meth.name,
        "options": {
            k: v for k, v in meth.options.items() if isinstance(v, (int, float, str, bool, type(None)))
        },
        "target": str(tgt),
        "mode": mode,
        "scope": b.scope,
        "round_to": "auto"
        if b.round_to in (None, "auto")
        else b.round_to
        if isinstance(b.round_to, int)
        else repr(b.round_to),
        "rounds": rounds,
        "schedule": schedule,
        "latency_aware": _latency_mode(b.latency_aware),
        "base_flops": base["flops"],
        "base_effective_flops": base["effective_flops"],
        "base_params": base["params"],
        "base_nonzero_params": base["nonzero_params"],
        **pruned,
        "flops_speedup": flops_speedup,
        "dense_flops_speedup": base["flops"] / max(1, pruned["flops"]),
        "compression": compression,
        "dense_compression": base["params"] / max(1, pruned["params"]),
        "achieved": achieved,
        "target_error": None if achieved is None else achieved / tgt.value - 1,
        "layers": layers,
        "prune_seconds": prune_s,
        "finetune_seconds": finetune_s,
        "peak_memory_mb": getattr(mem, "peak_mb", None),
        "peak_memory_delta_mb": getattr(mem, "delta_mb", None),
        "peak_memory_method": getattr(mem, "method", None),
        "warnings": [str(w.message) for w in caught],
        "skipped": dict(graph.skipped) if graph is not None else {},
        "plans": [p.describe() for p in plans],
    }
    if getattr(mem, "cuda_mb", None) is not None:
        report["peak_cuda_memory_mb"] = mem.cuda_mb
    alloc = ctx.allocation
    if alloc:
        report["allocation"] = {k: v for k, v in alloc.items() if k != "widths"}
    if ctx.latency_table:
        report["latency_table"] = dict(ctx.latency_table)
    return report


__all__ = ["PruneResult", "prune"]
