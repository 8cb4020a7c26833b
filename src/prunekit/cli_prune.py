"""``prunekit methods`` and ``prunekit prune``: the pruning sub-commands of the CLI.

``prunekit prune --checkpoint C --method l1 --target flops=2 --dataset cifar10 --out DIR`` loads a
trained checkpoint, draws the prune set from the training split, prunes (optionally over several
rounds with fine-tuning), and writes ``DIR/model.pt`` (a prunekit checkpoint whose metadata holds
the plan and the report) and ``DIR/metrics.json`` (accuracy, agreement with the unpruned model,
sizes, FLOPs, latency and the speed-ups over the base model).

Prune-and-train (the gradient-flow paper's framework, :mod:`prunekit.prune_train`):
``prunekit prune --model resnet20 --dataset cifar10 --method gf_loss --target ratio=0.75 --rounds 25
--epochs-per-round 1 --final-epochs 160 --out DIR`` starts from a random init (or from ``--checkpoint``),
trains ``--epochs-per-round`` epochs before each of ``--rounds`` pruning rounds that remove, by one global
ranking, a growing share of the filters until the fraction ``P`` of all scored filters is gone, then trains
``--final-epochs``; it writes the same two files (``metrics.json`` has ``"mode": "prune_train"``, the model's
metadata the whole history). ``--option prune_percent=P`` without ``--epochs-per-round`` prunes a checkpoint
one-shot to the same global filter fraction (gradient-flow measures; ``--target`` may then be left out).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from prunekit import cli_types as T
from prunekit.cli_types import parse_options
from prunekit.errors import PrunekitError


# --------------------------------------------------------------------------------------------- helpers
def _round_to(text: str | None) -> int | str | None:
    if text is None or text == "auto":
        return None
    if text == "runtime":
        return text
    try:
        value = int(text)
    except ValueError:
        raise PrunekitError(f"--round-to must be an integer >= 1, 'auto' or 'runtime', got {text!r}") from None
    if value < 1:
        raise PrunekitError(f"--round-to must be an integer >= 1 (1: no rounding), 'auto' or 'runtime', got "
                            f"{value}")
    return value


def _latency_model(args: argparse.Namespace) -> str:
    """``--latency-model`` (default ``proxy``, the engine's default)."""
    return str(getattr(args, "latency_model", None) or "proxy")


def _latency_metrics(base: Any, pruned: Any, shape: tuple[int, ...], args: argparse.Namespace) -> dict[str, Any]:
    """Latency of both models in every runtime of ``--runtimes``, measured alternately (``--latency-repeats``
    rounds, the fastest kept) to cancel machine drift. ``latency_speedup`` (batch 64) / ``_b1`` compare the
    pruned model in its fastest runtime with the base model in its fastest; per-runtime ratios beside it."""
    from prunekit.deploy import measure_runtimes, speedups

    lat = measure_runtimes({"base": base, "pruned": pruned}, shape, runtimes=tuple(args.runtimes),
                           threads=args.threads, rounds=max(1, args.latency_repeats))
    sp = speedups(lat)
    out: dict[str, Any] = {"latency": lat, "latency_repeats": max(1, args.latency_repeats)}
    eager = lat["runtimes"].get("eager")
    if eager:
        extra = {"threads": lat["threads"], "device": "cpu"}
        out["base_latency_ms"], out["latency_ms"] = eager["base"] | extra, eager["pruned"] | extra
    for rt, per in sp["per_runtime"].items():
        if "64" in per:
            out[f"latency_speedup_{rt}"] = per["64"]
    for k in ("latency_speedup", "latency_speedup_b1"):
        if k in sp:
            out[k], out[k + "_runtimes"] = sp[k], sp[k + "_runtimes"]
    if lat["skipped"]:
        out["latency_skipped"] = lat["skipped"]
    return out


# --------------------------------------------------------------------------------------------- commands
def _method_row(name: str) -> dict[str, Any]:
    from prunekit.methods import get_method_info
    from prunekit.methods.options import option_specs

    info = get_method_info(name)
    return info.as_dict() | {"available": info.available(),
                             "options": [o.as_dict() for o in option_specs(info.cls)]}


def _print_method(r: dict[str, Any]) -> None:
    needs = [k[len("needs_"):] for k in ("needs_data", "needs_labels", "needs_grad", "needs_second_order",
                                         "needs_trajectory") if r.get(k)]
    print(f"{r['name']}: {r['description']}")
    print(f"  family {r['family']}, granularity {r['granularity']}, needs {', '.join(needs) or 'nothing'}"
          + ("" if r["available"] else f" [needs the package {r['requires']}]"))
    if r.get("paper"):
        print(f"  paper: {r['paper']}")
    if not r["options"]:
        print("  options: none")
        return
    print("  options (--option NAME=VALUE):")
    width = max(len(o["name"]) for o in r["options"])
    for o in r["options"]:
        print(f"    {o['name']:<{width}}  {o['type']:<26} default {o['default']!r:<8}  {o['help']}")


def cmd_methods(args: argparse.Namespace) -> int:
    from prunekit.methods import list_methods

    if getattr(args, "name", None):
        rows = [_method_row(args.name)]  # an unknown name raises UnknownNameError (exit 2)
    else:
        filters = {"granularity": args.granularity} if args.granularity else {}
        rows = [_method_row(n) for n in list_methods(**filters)]
    if args.json:
        print(json.dumps(rows if not getattr(args, "name", None) else rows[0], indent=2, default=str))
        return 0
    if getattr(args, "name", None):
        _print_method(rows[0])
        return 0
    for r in rows:
        needs = [
            k[len("needs_") :]
            for k in ("needs_data", "needs_labels", "needs_grad", "needs_second_order", "needs_trajectory")
            if r.get(k)
        ]
        flag = "" if r["available"] else f" [needs {r['requires']}]"
        print(
            f"{r['name']:<24} {r['granularity']:<8} {r['family']:<14} {','.join(needs) or '-':<28} "
            f"{r['description']}{flag}"
        )
    print("\n`prunekit methods NAME` shows a method's options with their types and defaults.")
    return 0


def _trajectory_arg(args: argparse.Namespace, info: Any) -> Any:
    """``--trajectory PATH``, else the trajectory recorded beside the checkpoint (methods that need one)."""
    from prunekit.train.trajectory import Trajectory, TrajectoryError, find_trajectory

    path = getattr(args, "trajectory", None)
    if path is None and info.needs_trajectory:
        path = find_trajectory(args.checkpoint)
        if path is None:
            raise PrunekitError(
                f"method {info.name!r} needs the parameter trajectory recorded while training {args.checkpoint}; "
                "none was found beside it (trajectory/ or <name>.trajectory/). Record one with `prunekit train ... "
                "--record-trajectory` (or --init-from this checkpoint for a short run), or pass --trajectory PATH")
    if path is None:
        return None
    try:
        return Trajectory.load(path)
    except TrajectoryError as e:
        raise PrunekitError(str(e)) from None


def _checked_method(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The method's info and typed options, and ``--target``, checked before any work (exit 2 on a bad one)."""
    from prunekit.cli import prepare_out
    from prunekit.methods import get_method_info

    info = get_method_info(args.method)  # fail fast on an unknown method
    options = parse_options(args.option)
    info.cls(**options)  # typed options checked before any work: an unknown or mistyped one exits 2
    prepare_out(args.out)
    if args.target is None and options.get("prune_percent") is not None:
        p = float(options["prune_percent"])
        args.target = f"ratio={p / 100 if p > 1 else p:g}"
    if args.target is None:
        raise PrunekitError("--target is required (flops=X, params=X or ratio=F; gradient-flow methods also take "
                            "--option prune_percent=P, the fraction of all filters removed)")
    return info, options


def _base_and_data(args: argparse.Namespace, device: str) -> tuple[Any, Any, Any, Any, int]:
    """The checkpoint, its train / test splits and the prune loader (``--prune-samples`` held out)."""
    from prunekit.cli import check_fits, load_checked, load_data
    from prunekit.data import BatchLoader, train_holdout_split

    base = load_checked(args.checkpoint).eval()
    meta = getattr(base, "prunekit_meta", {}) or {}
    args.dataset = args.dataset or meta.get("dataset")
    if not args.dataset:
        raise PrunekitError("the checkpoint does not record its dataset: pass --dataset")
    train_ds, test_ds = load_data(args)
    check_fits(base, train_ds.info, f"--checkpoint {args.checkpoint}")
    n_prune = min(int(args.prune_samples), len(train_ds) - 1)
    if n_prune < 1:
        raise PrunekitError(f"--prune-samples must be >= 1, got {args.prune_samples}")
    _, prune_ds = train_holdout_split(train_ds, n_prune, seed=args.seed)
    prune_loader = BatchLoader(prune_ds, batch_size=args.batch_size, shuffle=False, augment=False, seed=args.seed,
                               device=device)
    return base.to(device), train_ds, test_ds, prune_loader, n_prune


def _cli_finetuner(args: argparse.Namespace, train_ds: Any, device: str) -> Any:
    """``--finetune-epochs`` > 0: the fine-tuner every round (and the final fine-tune) uses."""
    from prunekit.data import BatchLoader
    from prunekit.schedule import FineTuner

    if args.finetune_epochs <= 0:
        return None
    train_loader = BatchLoader(train_ds, batch_size=args.batch_size, shuffle=True, augment=True, seed=args.seed,
                               drop_last=True, device=device)
    return FineTuner(train_loader, epochs=args.finetune_epochs, lr=args.finetune_lr, device=device,
                     progress=not args.quiet, momentum=args.momentum, weight_decay=args.weight_decay, seed=args.seed)


def cmd_prune(args: argparse.Namespace) -> int:
    import torch

    from prunekit.api import prune
    from prunekit.cli import _device, _setup_runtime, summarize
    from prunekit.prune_train import wants_prune_train

    _setup_runtime(args)
    device = _device(args.device)
    info, options = _checked_method(args)
    if wants_prune_train(args):
        return cmd_prune_train(args, options, device)
    if args.checkpoint is None:
        raise PrunekitError("one-shot pruning needs --checkpoint (from `prunekit train`); to prune while training "
                            "from a random init give --model and --epochs-per-round")
    if args.weight_decay is None:
        args.weight_decay = 5e-4
    base, train_ds, test_ds, prune_loader, n_prune = _base_and_data(args, device)
    shape = (test_ds.info.in_channels, test_ds.info.image_size, test_ds.info.image_size)
    no_latency = args.no_latency
    args.no_latency = True  # latency is measured below, base and pruned alternately
    base_metrics = summarize(base, test_ds, args, device)
    tuner = _cli_finetuner(args, train_ds, device)
    trajectory = _trajectory_arg(args, info)
    torch.manual_seed(args.seed)
    result = prune(base, args.method, args.target, prune_loader, trajectory=trajectory, mode=args.mode,
                   scope=args.scope, round_to=_round_to(args.round_to), floor=args.floor,
                   latency_aware=_latency_model(args), rounds=args.rounds, schedule=args.schedule, heads=args.heads,
                   finetune=tuner, finetune_last=False, input_shape=shape, device=device, **options)
    metrics = _one_shot_metrics(args, info, result, base, base_metrics, tuner, test_ds, device, n_prune)
    model = result.model
    if not no_latency:
        model.to("cpu")
        base.to("cpu")
        metrics.update(_latency_metrics(base, model, shape, args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rep = result.report
    report = {k: v for k, v in rep.items() if k != "layers"}
    return _write_outputs(model, out, args, metrics, {
        "dataset": args.dataset,
        "plan": result.plan.describe(),
        "report": json.loads(json.dumps(report, default=str)),
        "layers": json.loads(json.dumps(rep["layers"])),
        "base_checkpoint": str(args.checkpoint),
    }, base=base, input_shape=shape)


def _one_shot_metrics(args: argparse.Namespace, info: Any, result: Any, base: Any, base_metrics: dict[str, Any],
                      tuner: Any, test_ds: Any, device: str, n_prune: int) -> dict[str, Any]:
    """Plans checked across ranks, the final fine-tune, and every result metric of the pruned model."""
    from prunekit import distributed
    from prunekit.cli import _test_loader, summarize
    from prunekit.metrics import evaluate

    model = result.model.eval()
    # under torchrun every rank plans from the same prune set and seed: the plans must agree
    distributed.check_same(json.loads(json.dumps(result.plan.describe(), default=str)), "the pruning plan")
    metrics: dict[str, Any] = {"world_size": distributed.world_size()}
    if tuner is not None:
        after = evaluate(model, _test_loader(test_ds, args, device), reference=base, device=device)
        metrics["top1_after_prune"] = after["top1"]
        metrics["agreement_after_prune"] = after.get("agreement")
        t0 = time.perf_counter()
        tuner(model, args.finetune_epochs)
        model.to(device).eval()
        result.report["finetune_seconds"] += time.perf_counter() - t0
        metrics["finetune_epochs_total"] = args.finetune_epochs * args.rounds
        metrics["finetune_lr"] = args.finetune_lr
    metrics.update(summarize(model, test_ds, args, device, reference=base))
    rep = result.report
    base_flops = rep["base_flops"]
    metrics.update({
        "method": args.method, "granularity": info.granularity, "target": str(args.target),
        "dataset": args.dataset, "checkpoint": str(args.checkpoint), "mode": args.mode, "rounds": args.rounds,
        "seed": args.seed, "base_top1": base_metrics.get("top1"), "base_top5": base_metrics.get("top5"),
        "base_params": rep["base_params"], "base_flops": base_flops,
        # relative to the checkpoint as given (its zeros / masked channels count as removed), as the targets are
        "flops_speedup": rep["base_effective_flops"] / max(1, metrics["effective_flops"]),
        "dense_flops_speedup": base_flops / max(1, metrics["flops"]),
        "compression": rep["base_nonzero_params"] / max(1, metrics["nonzero_params"]),
        "dense_compression": rep["base_params"] / max(1, metrics["params"]),
        "prune_seconds": rep["prune_seconds"], "finetune_seconds": rep["finetune_seconds"],
        "peak_memory_mb": rep.get("peak_memory_mb"), "prune_samples": n_prune,
        "round_achieved": rep.get("round_achieved"),  # --rounds N --finetune-epochs E: the cascade, per round
    })
    return metrics


def _write_outputs(model: Any, out: Path, args: argparse.Namespace, metrics: dict[str, Any],
                   meta: dict[str, Any], base: Any = None, input_shape: tuple[int, ...] | None = None) -> int:
    """Write ``OUT/model.pt`` (with ``meta`` and the metrics), ``OUT/metrics.json`` and, where matplotlib is
    installed, ``OUT/layers.png`` (widths and multiply-adds per layer, before and after); print the metrics
    (rank 0 only under torchrun)."""
    from prunekit import distributed
    from prunekit.cli import print_metrics
    from prunekit.io import save_with_metrics

    if not distributed.is_main():
        return 0
    # checkpoint + metrics as a checked pair (temp files, then renamed; metrics record the checkpoint's hash)
    save_with_metrics(model.to("cpu"), out, metrics, meta=meta)
    meta = {**meta, "metrics": json.loads(json.dumps(metrics, default=str))}
    chart = _layer_chart(model, base, input_shape, out / "layers.png", meta) if input_shape else None
    print_metrics(metrics, args.json)
    if not args.json:
        files = [out / "model.pt", out / "metrics.json", *([chart] if chart else [])]
        print(f"wrote {', '.join(map(str, files[:-1]))} and {files[-1]}")
    return 0


def _layer_chart(model: Any, base: Any, input_shape: tuple[int, ...], path: Path, meta: dict[str, Any]
                 ) -> Path | None:
    """``OUT/layers.png`` (:func:`prunekit.inspection.plot_layers`, no latency panel); None without matplotlib.
    The pruned model is already saved: a chart that cannot be drawn is a note, not a failure."""
    import importlib.util
    import sys

    if importlib.util.find_spec("matplotlib") is None:
        return None
    from prunekit.inspection import inspect_model, plot_layers

    try:
        insp = inspect_model(model.to("cpu").eval(), input_shape, base=None if base is None else base.to("cpu"),
                             original_widths=None if base is not None else meta.get("layers"), latency=False)
        rep = meta.get("report") or {}
        arch = (getattr(model, "prunekit_config", {}) or {}).get("name")
        method = rep.get("method") or (meta.get("metrics") or {}).get("method")
        target = rep.get("target") or (meta.get("metrics") or {}).get("target")
        return plot_layers(insp, path, title=" ".join(str(v) for v in (arch, method, target) if v) or None)
    except (PrunekitError, RuntimeError, ValueError, OSError) as e:
        print(f"prunekit: note: {path.name} not written: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def cmd_prune_train(args: argparse.Namespace, options: dict[str, Any], device: str) -> int:
    """``prunekit prune ... --epochs-per-round E``: prune-and-train from ``--checkpoint`` or a random init."""
    import copy

    import torch

    from prunekit.cli import _test_loader, check_fits, load_checked, load_data, summarize
    from prunekit.data import BatchLoader
    from prunekit.metrics import count_flops, count_params
    from prunekit.models import create_model_for_dataset, get_model_info
    from prunekit.prune_train import run_prune_train

    if args.finetune_epochs:
        raise PrunekitError("prune-and-train trains after its last round with --final-epochs; --finetune-epochs "
                            "is for one-shot pruning")
    if args.weight_decay is None:
        args.weight_decay = 1e-4  # the gradient-flow seed's setting
    base = None
    if args.checkpoint:
        base = load_checked(args.checkpoint).eval()
        name = (getattr(base, "prunekit_config", {}) or {}).get("name")
        if args.model and name and args.model != name:
            raise PrunekitError(f"--checkpoint {args.checkpoint} holds a {name!r} model, not --model {args.model!r}")
        dataset = args.dataset or (getattr(base, "prunekit_meta", {}) or {}).get("dataset")
        if not dataset:
            raise PrunekitError("the checkpoint does not record its dataset: pass --dataset")
        args.dataset = dataset
    elif not args.model:
        raise PrunekitError("prune-and-train needs --checkpoint or --model (a random init of that zoo model)")
    else:
        get_model_info(args.model)  # fail fast on an unknown model
        if not args.dataset:
            raise PrunekitError("--model needs --dataset")
    train_ds, test_ds = load_data(args)
    shape = (test_ds.info.in_channels, test_ds.info.image_size, test_ds.info.image_size)
    if base is not None:
        check_fits(base, train_ds.info, f"--checkpoint {args.checkpoint}")
    torch.manual_seed(args.seed)
    if base is not None:
        model = copy.deepcopy(base)
    else:
        kw = dict(args.model_kwargs or {})
        model = create_model_for_dataset(args.model, train_ds.info, **kw)
    dense = {**count_params(model), "flops": count_flops(model, shape)}
    train_loader = BatchLoader(train_ds, batch_size=args.batch_size, shuffle=True, augment=True, seed=args.seed,
                               drop_last=len(train_ds) > args.batch_size, device=device)
    test_loader = _test_loader(test_ds, args, device) if args.eval_rounds else None
    no_latency = args.no_latency
    args.no_latency = True  # latency is measured below, base and pruned alternately
    base_metrics = summarize(base, test_ds, args, device) if base is not None else {}
    t0 = time.perf_counter()
    model, history = run_prune_train(args, model, train_loader, test_loader, method_options=options, device=device)
    seconds = time.perf_counter() - t0
    model.to(device).eval()
    metrics: dict[str, Any] = summarize(model, test_ds, args, device, reference=base)
    rounds = history.get("rounds") or []
    score_s = sum(float(r.get("score_seconds") or 0.0) for r in rounds)
    mem = [r["plan_meta"]["score_memory"] for r in rounds
           if isinstance((r.get("plan_meta") or {}).get("score_memory"), dict)]
    ch = history.get("channels") or {}
    metrics.update({
        "mode": "prune_train", "method": args.method, "target": str(args.target), "dataset": args.dataset,
        "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "model": args.model or (getattr(model, "prunekit_config", {}) or {}).get("name"),
        "start": "checkpoint" if base is not None else "random_init", "seed": args.seed,
        "rounds": len(rounds), "schedule": history.get("schedule"), "epochs_per_round": args.epochs_per_round,
        "final_epochs": args.final_epochs, "warmup_epochs": args.warmup_epochs, "lr": args.lr,
        "weight_decay": args.weight_decay, "preserve_moment": history.get("preserve_moment"),
        "filters_original": ch.get("original"), "filters_kept": ch.get("final"),
        "top1_after_rounds": [r.get("top1_after_pruning") for r in rounds] if test_loader is not None else None,
        "base_top1": base_metrics.get("top1"), "base_top5": base_metrics.get("top5"),
        "base_params": dense["params"], "base_flops": dense["flops"],
        "flops_speedup": dense["flops"] / max(1, metrics["effective_flops"]),
        "dense_flops_speedup": dense["flops"] / max(1, metrics["flops"]),
        "compression": dense["params"] / max(1, metrics["nonzero_params"]),
        "prune_seconds": seconds, "score_seconds": score_s, "train_seconds": seconds - score_s,
        "peak_memory_mb": max(m["increase_bytes"] for m in mem) / 2**20 if mem else None,
        "peak_memory_source": (mem[0].get("source") + " (scoring pass, max over rounds)") if mem else None,
    })
    if base is None:
        metrics["note"] = "random init: no base accuracy or agreement; base_params / base_flops are the dense init's"
    if not no_latency:
        ref = base if base is not None else create_model_for_dataset(
            args.model, train_ds.info, **dict(args.model_kwargs or {}))
        model.to("cpu")
        ref.to("cpu").eval()
        metrics.update(_latency_metrics(ref, model, shape, args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return _write_outputs(model, out, args, metrics, {
        "dataset": args.dataset, "prune_train": json.loads(json.dumps(history, default=str)),
        "base_checkpoint": str(args.checkpoint) if args.checkpoint else None}, base=base, input_shape=shape)


# --------------------------------------------------------------------------------------------- parser
def add_commands(sub: Any) -> None:
    """Add ``methods`` and ``prune`` to the CLI's sub-parsers."""
    from prunekit.cli import _add_data_args, _add_runtime_args

    s = sub.add_parser("methods", help="list the pruning methods, or show one method's options")
    s.add_argument("name", nargs="?", default=None, help="a method: show its metadata and typed options")
    s.add_argument("--json", action="store_true", help="metadata as JSON")
    s.add_argument("--granularity", choices=["weight", "channel", "lowrank"], default=None)
    s.set_defaults(fn=cmd_methods)

    s = sub.add_parser("prune",
                       help="prune a checkpoint (or prune-and-train); writes OUT/model.pt and OUT/metrics.json")
    s.add_argument("--checkpoint", default=None,
                   help="a prunekit checkpoint (from `prunekit train`); required unless prune-and-train from --model")
    s.add_argument("--model", default=None, help="prune-and-train from a random init of this zoo model")
    s.add_argument("--model-kwargs", type=T.json_object, default=None,
                   help="JSON keyword arguments of --model, e.g. '{\"width\": 0.5}'")
    s.add_argument("--method", required=True, help="a method name (see `prunekit methods`)")
    s.add_argument("--trajectory", default=None, metavar="DIR",
                   help="Koopman methods: the recorded parameter trajectory (default: the one beside --checkpoint)")
    s.add_argument("--target", default=None,
                   help="flops=X, params=X (X-fold reduction) or ratio=F; prune-and-train: ratio=P, the fraction "
                        "of all filters removed")
    _add_data_args(s, required=False)
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--mode", default="physical", choices=["physical", "masked"])
    s.add_argument("--scope", default=None, choices=["global", "layerwise"])
    s.add_argument(
        "--round-to", default=None,
        help="channel multiple (integer, 1 = none), 'auto' (default: 8/16/32 by width) or 'runtime' (exact "
             "below one SIMD block, quarter blocks up to four, whole blocks above; also rounds the gradient-flow "
             "global count, prune_percent)"
    )
    s.add_argument("--floor", type=T.FRACTION, default=None, help="every layer keeps floor(floor*width)+1 units")
    s.add_argument("--rounds", type=T.POSITIVE_INT, default=1,
                   help="iterative pruning rounds (with --epochs-per-round: prune-and-train rounds)")
    s.add_argument("--schedule", default="geometric", choices=["geometric", "linear", "gradflow"])
    s.add_argument("--heads", action="store_true", help="also prune whole attention heads (ViT)")
    s.add_argument(
        "--latency-model",
        default=None,
        choices=["measured", "onnxruntime", "proxy", "off"],
        help="how the global channel ranking weighs the time a channel costs: 'proxy' (default: an analytic "
        "CPU cost model), 'measured' (time the model's layers on this CPU in eager PyTorch, a few seconds, "
        "cached per machine), 'onnxruntime' (the same in ONNX Runtime; needs prunekit[deploy]), 'off' "
        "(scores alone)",
    )
    s.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option (repeatable), e.g. --option samples=512",
    )
    s.add_argument(
        "--prune-samples",
        type=T.POSITIVE_INT,
        default=5000,
        help="size of the prune set, drawn from the training split (default 5000)",
    )
    s.add_argument(
        "--finetune-epochs", type=T.NON_NEGATIVE, default=0.0, help="fine-tuning epochs per round (0: none)"
    )
    s.add_argument("--finetune-lr", type=T.POSITIVE, default=0.01)
    s.add_argument("--momentum", type=T.FRACTION, default=0.9)
    s.add_argument("--weight-decay", type=T.NON_NEGATIVE, default=None,
                   help="SGD weight decay (default 5e-4 for fine-tuning, 1e-4 for prune-and-train)")
    s.add_argument("--seed", type=T.SEED, default=0)
    s.add_argument(
        "--latency-repeats",
        type=T.POSITIVE_INT,
        default=3,
        help="base and pruned latency are measured alternately this many times (fastest kept)",
    )
    s.add_argument("--json", action="store_true", help="print the metrics as JSON")
    s.add_argument("--eval-rounds", action="store_true",
                   help="prune-and-train: evaluate on the test set after every epoch and pruning round")
    _add_runtime_args(s)
    from prunekit.prune_train import add_prune_train_args

    add_prune_train_args(s)  # --epochs-per-round E switches to prune-and-train (--rounds is shared)
    s.set_defaults(fn=cmd_prune)


__all__ = ["add_commands", "cmd_methods", "cmd_prune", "cmd_prune_train", "parse_options"]  # parse_options: re-exported
