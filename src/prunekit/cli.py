"""The ``prunekit`` command line: train, eval, export, inspect, prune, methods, models, datasets, bench.

Errors caused by the user (unknown names, missing data, bad checkpoints,
impossible targets) print one clear message and exit with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prunekit import cli_types as T
from prunekit.errors import PrunekitError

# OpenMP's wait policy is left to the user: the default (threads spin briefly between parallel regions)
# is what latency figures should be measured with. On a small CPU shared with other jobs, export
# OMP_WAIT_POLICY=PASSIVE: spinning threads then slow every process down several-fold (README).

EXIT_USAGE = 2


# --------------------------------------------------------------------------------------------- console
@contextlib.contextmanager
def console_warnings(verbose: bool = False) -> Iterator[None]:
    """How the command line shows Python warnings while a command runs.

    Default: each distinct warning once (same category and text: once, wherever it comes from), on one line,
    ``prunekit: warning: TEXT [Category, from PACKAGE]``; categories Python hides by default (deprecations in
    library code, ...) stay hidden. ``verbose``: every warning each time, in Python's own format with its source
    line. Warnings that code records itself (``warnings.catch_warnings(record=True)``, as the benchmark runner
    does per cell) are not affected."""
    with warnings.catch_warnings():
        if verbose:
            warnings.simplefilter("always")
            yield
            return
        seen: set[tuple[type, str]] = set()

        def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: Any = None, line: str | None = None) -> None:
            text = str(message).strip()
            if (category, text) in seen:
                return
            seen.add((category, text))
            out = file if file is not None else sys.stderr
            first, *rest = text.splitlines() or [""]
            more = f" (+{len(rest)} line{'s' * (len(rest) > 1)}; --verbose shows all)" if rest else ""
            try:
                out.write(f"prunekit: warning: {first}{more} [{category.__name__}, from {_origin(text, filename)}]\n")
            except (OSError, ValueError):  # stderr closed: nowhere to show it
                pass

        warnings.showwarning = show
        yield


def _origin(text: str, filename: str) -> str:
    """The package a warning comes from: its file's top-level package (torch's C++ warnings name torch)."""
    if "Triggered internally at" in text:
        return "torch"
    path = Path(filename)
    here = Path(__file__).resolve().parent
    try:
        path.resolve().relative_to(here)
        return "prunekit"
    except (OSError, ValueError):
        pass
    parts = path.parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts and parts.index(marker) + 1 < len(parts):
            return parts[parts.index(marker) + 1].removesuffix(".py")
    return path.name or "?"


# --------------------------------------------------------------------------------------------- helpers
def _add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--dataset", required=required, help="dataset name (see `prunekit datasets`)")
    p.add_argument("--data-dir", default=None, help="where the dataset lives (else $PRUNEKIT_DATA, cache, ...)")
    p.add_argument("--no-download", action="store_true", help="never try to download the dataset")


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto (default)")
    p.add_argument("--threads", type=T.THREADS, default=None, help="torch CPU threads")
    p.add_argument("--batch-size", type=T.POSITIVE_INT, default=128,
                   help="examples per batch (per rank under torchrun)")
    p.add_argument("--eval-batch-size", type=T.POSITIVE_INT, default=512)
    p.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    p.add_argument("--runtimes", type=T.RUNTIMES, default=("eager", "onnxruntime"),
                   help="runtimes to time: comma list of eager, onnxruntime, torchscript (default eager,onnxruntime; "
                        "onnxruntime is skipped with a note when not installed: pip install 'prunekit[deploy]')")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise PrunekitError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PrunekitError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}, "
                            f"built {'with' if torch.backends.cuda.is_built() else 'without'} CUDA); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise PrunekitError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise PrunekitError(f"--device {name!r}: prunekit runs on cpu, cuda or mps")
    return name


def _setup_runtime(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


def load_data(args: argparse.Namespace, name: str | None = None) -> tuple[Any, Any]:
    from prunekit.data import get_dataset

    name = name or args.dataset
    kw = {"data_dir": args.data_dir, "download": not getattr(args, "no_download", False)}
    return get_dataset(name, "train", **kw), get_dataset(name, "test", **kw)


def _test_loader(test_ds: Any, args: argparse.Namespace, device: str) -> Any:
    from prunekit.data import BatchLoader

    return BatchLoader(test_ds, batch_size=args.eval_batch_size, device=device)


def summarize(model: Any, test_ds: Any, args: argparse.Namespace, device: str, reference: Any = None) -> dict:
    from prunekit.metrics import model_summary

    info = test_ds.info
    return model_summary(model, (info.in_channels, info.image_size, info.image_size),
                         loader=_test_loader(test_ds, args, device), reference=reference,
                         latency=not args.no_latency)


def load_checked(path: str) -> Any:
    """A checkpoint for a command: loaded with ``weights_only=True``; non-finite weights are an error (they
    would evaluate to chance level without a word)."""
    from prunekit.io import load

    return load(path, require_finite=True)


def check_fits(model: Any, info: Any, what: str, shape: tuple[int, ...] | None = None) -> None:
    """``model`` (from ``what``) takes this dataset's images and predicts its classes, else exit 2 naming
    both -- checked with one forward pass of two blank images before any work, instead of a shape error
    from the first batch (or a wrong accuracy when only the class count differs). ``shape``: an input
    shape the user gave instead (``--input-shape``; ``info`` may then be None)."""
    import torch

    given = shape is not None
    shape = tuple(shape) if given else (info.in_channels, info.image_size, info.image_size)
    if math.prod(shape) > 2**26:
        raise PrunekitError(f"input shape {','.join(map(str, shape))} is too large for one example")
    was_training = model.training
    param = next(iter(model.parameters()), None)
    x = torch.zeros(2, *shape, device=param.device if param is not None else "cpu")
    meta = getattr(model, "prunekit_meta", None)
    recorded = meta.get("dataset") if isinstance(meta, dict) else None
    hint = (f" (it records dataset {recorded!r})" if info is not None and isinstance(recorded, str)
            and recorded != info.name else "")
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        inputs = (f"inputs of shape {','.join(map(str, shape))}" if given else
                  f"the images of dataset {info.name!r} ({' x '.join(map(str, shape))})")
        raise PrunekitError(f"{what} does not take {inputs}{hint}: {first}") from None
    finally:
        model.train(was_training)
    n = out.shape[-1] if isinstance(out, torch.Tensor) and out.ndim == 2 else None
    if info is not None and n is not None and n != info.num_classes:
        raise PrunekitError(f"{what} predicts {n} classes but dataset {info.name!r} has {info.num_classes}{hint}; "
                            "use the dataset the model was trained on")


def prepare_out(out: str) -> Path:
    """``--out``: checked and created before any work (not an existing file, writable), else exit 2."""
    from prunekit.io import writable_dir

    return writable_dir(out)


def write_json(path: Path, obj: Any) -> None:
    from prunekit.io import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def print_metrics(m: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(m, indent=2, sort_keys=True, default=str))
        return
    for k in ("top1", "top5", "base_top1", "agreement", "params", "nonzero_params", "flops", "effective_flops",
              "compression", "flops_speedup", "latency_speedup", "prune_seconds"):
        if k in m and m[k] is not None:
            v = m[k]
            print(f"{k:>16}: {v:.4f}" if isinstance(v, float) else f"{k:>16}: {v:,}" if isinstance(v, int) else
                  f"{k:>16}: {v}")
    if "latency_ms" in m and isinstance(m["latency_ms"], dict):
        lat = ", ".join(f"batch {k}: {v:.2f} ms" for k, v in m["latency_ms"].items()
                        if k not in ("threads", "device") and isinstance(v, (int, float)))
        print(f"{'latency':>16}: {lat} ({m['latency_ms'].get('threads')} threads)")
    runs = (m.get("latency") or {}).get("runtimes") or {rt: {"model": v} for rt, v in
                                                           (m.get("latency_by_runtime") or {}).items()}
    for rt, res in runs.items():
        if rt == "eager" and "latency_ms" in m:
            continue
        parts = [f"{who} b{bs} {ms:.2f} ms" for who, per in res.items() for bs, ms in per.items()]
        print(f"{rt:>16}: {', '.join(parts)}")
    sp = m.get("latency_speedup_runtimes")
    if sp:
        print(f"{'':>16}  (latency_speedup: pruned in {sp['pruned']} vs base in {sp['base']}, batch {sp['batch']})")


# -------------------------------------------------------------------------------------------- commands
def cmd_models(args: argparse.Namespace) -> int:
    from prunekit.models import get_model_info, list_models

    rows = [{"name": n, "family": get_model_info(n).family, "description": get_model_info(n).description}
            for n in list_models()]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['name']:<16} {r['family']:<10} {r['description']}")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from prunekit.data import list_datasets

    for n in list_datasets():
        print(n)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from prunekit import distributed
    from prunekit.data import BatchLoader
    from prunekit.models import create_model_for_dataset, get_model_info
    from prunekit.train import TrainConfig, Trainer, config_dict

    _setup_runtime(args)
    device = _device(args.device)
    get_model_info(args.model)  # fail fast on an unknown model, before loading data
    prepare_out(args.out)
    train_ds, test_ds = load_data(args)
    model_kw = dict(args.model_kwargs or {})
    torch.manual_seed(args.seed)
    model = create_model_for_dataset(args.model, train_ds.info, **model_kw)
    if args.init_from:
        init = load_checked(args.init_from)
        if getattr(init, "prunekit_config", {}).get("name") != args.model:
            raise PrunekitError(f"--init-from {args.init_from} holds a {init.prunekit_config.get('name')!r} model, "
                                f"not {args.model!r}")
        check_fits(init, train_ds.info, f"--init-from {args.init_from}")
        model = init
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, optimizer=args.optimizer, momentum=args.momentum,
                      weight_decay=args.weight_decay, schedule=args.schedule, label_smoothing=args.label_smoothing,
                      temperature=args.temperature, channels_last=args.channels_last, amp=args.amp,
                      warmup_epochs=args.warmup_epochs, seed=args.seed, swa_start=args.swa_start)
    loader = BatchLoader(train_ds, batch_size=args.batch_size, shuffle=True, augment=not args.no_augment,
                         seed=args.seed, drop_last=True, device=device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    callbacks = _train_callbacks(args, train_ds, out, device)
    trainer = Trainer(model, cfg, loader, val_loader=_test_loader(test_ds, args, device) if args.eval_every else None,
                      callbacks=callbacks, device=device, checkpoint_dir=out / "train_state", resume=args.resume,
                      log_dir=out / "tb" if args.tensorboard else None, progress=not args.quiet)
    t0 = time.time()
    history = trainer.fit()
    seconds = time.time() - t0
    model.to("cpu").eval()
    if args.channels_last:
        model.to(memory_format=torch.contiguous_format)
    metrics = summarize(model, test_ds, args, "cpu")
    metrics.update({"model": args.model, "dataset": args.dataset, "seed": args.seed, "epochs": args.epochs,
                    "train_seconds": round(seconds, 1), "world_size": distributed.world_size(),
                    "global_batch_size": args.batch_size * distributed.world_size()})
    extra = _callback_metrics(callbacks)
    metrics.update(extra)
    if not distributed.is_main():  # under torchrun only rank 0 writes
        return 0
    from prunekit.io import save_with_metrics

    # checkpoint + metrics as a checked pair (temp files, then renamed; metrics record the checkpoint's hash)
    save_with_metrics(model, out, metrics, meta={"dataset": args.dataset, "train_config": config_dict(cfg),
                                                 "init_from": args.init_from, **extra, "history": history})
    print_metrics(metrics, False)
    print(f"wrote {out / 'model.pt'} and {out / 'metrics.json'}")
    return 0


def _train_callbacks(args: argparse.Namespace, train_ds: Any, out: Path, device: Any) -> list[Any]:
    """``--record-trajectory`` and ``--prune-at-epoch``: a trajectory recorder and/or an early-pruning callback."""
    from prunekit.train.trajectory import TrajectoryRecorder

    if args.prune_at_epoch is None:
        if args.prune_method or args.prune_target:
            raise PrunekitError("--prune-method / --prune-target need --prune-at-epoch K (the epoch to prune at)")
        if not args.record_trajectory:
            return []
        return [TrajectoryRecorder(out / "trajectory", window=args.trajectory_window)]
    if not (args.prune_method and args.prune_target):
        raise PrunekitError("--prune-at-epoch needs --prune-method and --prune-target")
    if args.prune_at_epoch > math.ceil(args.epochs):
        raise PrunekitError(f"--prune-at-epoch {args.prune_at_epoch} is after the last epoch ({args.epochs:g})")
    from prunekit.cli_types import parse_options
    from prunekit.data import BatchLoader, train_holdout_split
    from prunekit.early import early_pruning_callbacks
    from prunekit.methods import get_method_info
    from prunekit.methods.base import Target

    info = get_method_info(args.prune_method)
    options = parse_options(args.prune_option)
    info.cls(**options)  # options checked before training starts
    Target.parse(args.prune_target)
    data = None
    if info.needs_data:
        _, prune_ds = train_holdout_split(train_ds, min(args.prune_samples, len(train_ds) - 1), seed=args.seed)
        data = BatchLoader(prune_ds, batch_size=args.batch_size, shuffle=False, augment=False, seed=args.seed,
                           device=device)
    cbs = early_pruning_callbacks(args.prune_method, args.prune_target, args.prune_at_epoch, data=data,
                                  trajectory_dir=out / "trajectory", trajectory_window=args.trajectory_window,
                                  **options)
    if args.record_trajectory and not info.needs_trajectory:  # also record the last epoch, for later pruning
        cbs.insert(0, TrajectoryRecorder(out / "trajectory", window=args.trajectory_window))
    return cbs


def _callback_metrics(callbacks: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cb in callbacks:
        traj = getattr(cb, "trajectory", None)
        if traj is not None and hasattr(cb, "seconds"):
            out["trajectory"] = {"path": str(traj.path), "snapshots": traj.t, "parameters": traj.n,
                                 "record_seconds": round(cb.seconds, 2), "epoch": traj.meta.get("epoch")}
        res = getattr(cb, "result", None)
        if res is not None:
            rep = res.report
            out["pruned_at_epoch"] = {"epoch": cb.epoch, "method": cb.method, "target": cb.target,
                                      "compression": rep.get("compression"), "flops_speedup": rep.get("flops_speedup")}
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    _setup_runtime(args)
    device = _device(args.device)
    model = load_checked(args.checkpoint)
    meta = getattr(model, "prunekit_meta", {})
    dataset = args.dataset or meta.get("dataset")
    if not dataset:
        raise PrunekitError("the checkpoint does not record its dataset: pass --dataset")
    args.dataset = dataset
    _, test_ds = load_data(args)
    check_fits(model, test_ds.info, f"checkpoint {args.checkpoint}")
    metrics = summarize(model.eval(), test_ds, args, device)
    metrics.update({"checkpoint": str(args.checkpoint), "dataset": dataset,
                    "file_size": Path(args.checkpoint).stat().st_size})
    deployed = [r for r in args.runtimes if r != "eager"]
    if not args.no_latency and deployed:
        from prunekit.deploy import measure_runtimes

        info = test_ds.info
        lat = measure_runtimes({"model": model}, (info.in_channels, info.image_size, info.image_size),
                               runtimes=deployed, threads=args.threads)
        metrics["latency_by_runtime"] = {rt: res["model"] for rt, res in lat["runtimes"].items()}
        if lat["skipped"]:
            metrics["latency_skipped"] = lat["skipped"]
    print_metrics(metrics, args.json)
    return 0


def _input_shape(args: argparse.Namespace, meta: dict[str, Any]) -> tuple[int, ...]:
    """``--input-shape C,H,W``, else the shape of the dataset the checkpoint records."""
    from prunekit.data.datasets import dataset_info

    if args.input_shape:
        return args.input_shape
    name = args.dataset or meta.get("dataset")
    if not name:
        raise PrunekitError("the checkpoint does not record its dataset: pass --input-shape C,H,W "
                            "(e.g. 3,32,32) or --dataset NAME")
    info = dataset_info(name)
    return (info.in_channels, info.image_size, info.image_size)


def _check_export_out(out: Path, checkpoint: Path) -> None:
    """``export --out``: a file to write in an existing, writable folder -- not a folder, not the checkpoint."""
    if out.is_dir():
        raise PrunekitError(f"--out {str(out)!r} is a directory; give the file to write, e.g. {out / 'model.onnx'}")
    with contextlib.suppress(OSError):
        if out.exists() and out.resolve() == checkpoint.resolve():
            raise PrunekitError(f"--out {str(out)!r} is the checkpoint itself; give another file")
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)  # as export would
    except OSError as e:
        raise PrunekitError(f"--out {str(out)!r}: the folder {str(parent)!r} cannot be created: "
                            f"{e.strerror or e}") from None
    if not os.access(parent, os.W_OK):
        raise PrunekitError(f"--out {str(out)!r}: the folder {str(parent)!r} is not writable")


def cmd_export(args: argparse.Namespace) -> int:
    from prunekit.deploy import export

    model = load_checked(args.checkpoint)
    shape = _input_shape(args, getattr(model, "prunekit_meta", {}) or {})
    check_fits(model, None, f"checkpoint {args.checkpoint}", shape=shape)
    out = args.out or str(Path(args.checkpoint).with_suffix(".onnx" if args.format == "onnx" else ".ts"))
    _check_export_out(Path(out), Path(args.checkpoint))
    try:
        report = export(model, out, shape, format=args.format, fold_bn=not args.no_fold_bn,
                        merge_lowrank=args.merge_lowrank, atol=args.atol)
    except OSError as e:  # the disk filled up, the folder went away ...
        raise PrunekitError(f"--out {out!r} cannot be written: {e.strerror or e}") from None
    report["input_shape"] = list(shape)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(f"wrote {report['file']} ({report['format']}, {report['bytes']:,} bytes); outputs match eager "
              f"PyTorch to {report['max_abs_diff']:.2g}; {report['bn_folded']} BatchNorm folded, "
              f"{len(report['lowrank_merged'])} low-rank chains merged")
        for note in report["notes"]:
            print(f"note: {note}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from prunekit.inspection import inspect_checkpoint, plot_layers

    if args.png:
        png = Path(args.png)
        if png.is_dir():
            raise PrunekitError(f"--png {args.png!r} is a directory; give the file to write, e.g. layers.png")
    insp = inspect_checkpoint(args.checkpoint, base=args.base, input_shape=args.input_shape, dataset=args.dataset,
                              latency=not args.no_latency, batch_size=args.latency_batch_size,
                              repeats=args.repeats, threads=args.threads)
    if args.png:
        try:
            plot_layers(insp, args.png)
        except ImportError:
            raise PrunekitError("--png needs matplotlib: pip install matplotlib") from None
        except OSError as e:
            raise PrunekitError(f"--png {args.png!r} cannot be written: {e}") from None
    if args.json:
        print(json.dumps(insp.as_dict(), indent=2, sort_keys=True))
        return 0
    i = insp.info
    what = ", ".join(f"{k} {i[k]}" for k in ("architecture", "method", "target", "mode", "dataset") if i.get(k))
    print(f"{args.checkpoint}: {what}")
    print(insp.table())
    if args.png:
        print(f"wrote {args.png}")
    return 0


# ------------------------------------------------------------------------------------------------ parser
def _add_train_parser(sub: Any) -> None:
    """The ``train`` sub-command."""
    s = sub.add_parser("train", help="train a zoo model; writes OUT/model.pt and OUT/metrics.json")
    s.add_argument("--model", required=True)
    _add_data_args(s)
    s.add_argument("--epochs", type=T.POSITIVE, default=1)
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=T.SEED, default=0)
    s.add_argument("--lr", type=T.POSITIVE, default=0.1)
    s.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "adamw"])
    s.add_argument("--momentum", type=T.FRACTION, default=0.9)
    s.add_argument("--weight-decay", type=T.NON_NEGATIVE, default=5e-4)
    s.add_argument("--schedule", default="cosine", choices=["cosine", "step", "onecycle", "constant"])
    s.add_argument("--warmup-epochs", type=T.NON_NEGATIVE, default=0.0)
    s.add_argument("--label-smoothing", type=T.FRACTION, default=0.0)
    s.add_argument("--temperature", type=T.POSITIVE, default=1.0)
    s.add_argument("--channels-last", action="store_true")
    s.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    s.add_argument("--no-augment", action="store_true")
    s.add_argument("--eval-every", action="store_true", help="evaluate on the test split after every epoch")
    s.add_argument("--resume", action="store_true", help="resume from OUT/train_state/last.pt")
    s.add_argument("--tensorboard", action="store_true", help="write TensorBoard scalars to OUT/tb")
    s.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="start from the weights of this prunekit checkpoint (same model) instead of a random init")
    s.add_argument("--model-kwargs", type=T.json_object, default=None,
                   help='JSON options for the model, e.g. \'{"width": 2}\'')
    s.add_argument("--record-trajectory", action="store_true",
                   help="record the conv/linear parameters after every step of the last epoch to OUT/trajectory "
                        "(the input of the Koopman methods kmp / kgp / kmp_channel)")
    s.add_argument("--trajectory-window", type=T.POSITIVE_INT, default=None, metavar="T",
                   help="record the last T steps instead of one epoch (at least 3)")
    s.add_argument("--prune-at-epoch", type=T.POSITIVE_INT, default=None, metavar="K",
                   help="prune at the end of epoch K (masked in place), then keep training; a channel plan is "
                        "made physical at the end")
    s.add_argument("--prune-method", default=None, help="with --prune-at-epoch: the method")
    s.add_argument("--prune-target", default=None, help="with --prune-at-epoch: the target (params=4, flops=2 ...)")
    s.add_argument("--prune-option", action="append", default=[], metavar="KEY=VALUE",
                   help="with --prune-at-epoch: a method option (repeatable)")
    s.add_argument("--prune-samples", type=T.POSITIVE_INT, default=512,
                   help="with --prune-at-epoch: prune-set size for data-driven methods")
    s.add_argument("--swa-start", type=T.NON_NEGATIVE, default=None, metavar="EPOCH",
                   help="stochastic weight averaging: average the weights of every epoch end after EPOCH, then "
                        "recompute BatchNorm statistics (pair with --schedule constant and a small --lr)")
    _add_runtime_args(s)
    s.set_defaults(fn=cmd_train)


def _add_export_parsers(sub: Any) -> None:
    """The ``export`` and ``inspect`` sub-commands."""
    s = sub.add_parser("export", help="export a checkpoint to ONNX or TorchScript (BatchNorm folded, checked "
                                      "against eager PyTorch)")
    s.add_argument("checkpoint", help="a prunekit checkpoint (model.pt)")
    s.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    s.add_argument("--out", default=None, help="the file to write (default: beside the checkpoint, .onnx / .ts)")
    s.add_argument("--input-shape", type=T.SHAPE, default=None,
                   help="shape of one example, e.g. 3,32,32 (default: the checkpoint's dataset)")
    s.add_argument("--dataset", default=None, help="take the input shape from this dataset")
    s.add_argument("--no-fold-bn", action="store_true", help="keep BatchNorm layers as they are")
    s.add_argument("--merge-lowrank", choices=("auto", "always", "never"), default="auto",
                   help="merge low-rank chains back into one layer: where they are not much cheaper (auto), "
                        "always or never")
    s.add_argument("--atol", type=T.POSITIVE, default=1e-4,
                   help="largest allowed difference between the file's outputs and eager PyTorch")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("inspect", help="per-layer widths / ranks / sparsity, parameters, FLOPs and latency of a "
                                       "(pruned) checkpoint, before and after")
    s.add_argument("checkpoint", help="a prunekit checkpoint (model.pt)")
    s.add_argument("--base", default=None, metavar="CHECKPOINT",
                   help="the unpruned checkpoint to compare with (default: the widths the checkpoint's prune "
                        "report records, else its zoo architecture as built)")
    s.add_argument("--png", default=None, metavar="PATH", help="also write a bar chart of the layers to PATH")
    s.add_argument("--json", action="store_true", help="print the figures as JSON")
    s.add_argument("--input-shape", type=T.SHAPE, default=None,
                   help="shape of one example, e.g. 3,32,32 (default: the checkpoint's dataset, else its model's)")
    s.add_argument("--dataset", default=None, help="take the input shape from this dataset")
    s.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    s.add_argument("--latency-batch-size", type=T.POSITIVE_INT, default=1, metavar="B",
                   help="batch size of the latency measurement (default 1)")
    s.add_argument("--repeats", type=T.POSITIVE_INT, default=20, help="timed forward passes (median kept)")
    s.add_argument("--threads", type=T.THREADS, default=1, help="torch CPU threads while timing (default 1)")
    s.set_defaults(fn=cmd_inspect)


def build_parser() -> argparse.ArgumentParser:
    from prunekit._version import __version__

    p = argparse.ArgumentParser(prog="prunekit", description="Prune PyTorch networks and measure the result.")
    p.add_argument("--version", action="version", version=f"prunekit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("models", help="list the model zoo")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_models)

    s = sub.add_parser("datasets", help="list the datasets")
    s.set_defaults(fn=cmd_datasets)

    _add_train_parser(sub)

    s = sub.add_parser("eval", help="evaluate a checkpoint")
    s.add_argument("--checkpoint", required=True)
    _add_data_args(s, required=False)
    s.add_argument("--json", action="store_true")
    _add_runtime_args(s)
    s.set_defaults(fn=cmd_eval)

    _add_export_parsers(sub)

    for extra in _EXTRA_COMMANDS:
        extra(sub)
    for s in sub.choices.values():
        _add_output_args(s)
    return p


def _add_output_args(p: argparse.ArgumentParser) -> None:
    """``--quiet`` / ``--verbose`` on a sub-command that does not define them itself."""
    have = p._option_string_actions  # noqa: SLF001 - argparse has no public "has option" query
    if "--quiet" not in have:
        p.add_argument("--quiet", *[f for f in ("-q",) if f not in have], action="store_true",
                       help="no progress bars")
    if "--verbose" not in have:
        p.add_argument("--verbose", *[f for f in ("-v",) if f not in have], action="store_true",
                       help="every warning each time it occurs, with its source line; tracebacks with errors")


# Later modules (prune, methods, bench) add their sub-commands here.
_EXTRA_COMMANDS: list[Any] = []


def _register_extra_commands() -> None:
    import importlib

    _EXTRA_COMMANDS.clear()
    for mod in ("prunekit.cli_prune", "prunekit.bench.cli"):
        try:
            _EXTRA_COMMANDS.append(importlib.import_module(mod).add_commands)
        except ModuleNotFoundError as e:  # a sub-command family not installed/written yet
            if e.name != mod:
                raise


def main(argv: list[str] | None = None) -> int:
    """Run the command line. From the ``prunekit`` script (``argv=None``) warnings are shown the console way
    (:func:`console_warnings`); a program that calls ``main([...])`` keeps its own warning settings."""
    _register_extra_commands()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return EXIT_USAGE
    verbose = bool(getattr(args, "verbose", False))
    with console_warnings(verbose) if argv is None else contextlib.nullcontext():
        try:
            from prunekit import distributed

            distributed.init_from_env(getattr(args, "device", None))  # under torchrun: join the process group
            code = int(args.fn(args) or 0)
            distributed.shutdown()  # every rank finished: leave the group together
            return code
        except PrunekitError as e:
            if verbose:
                traceback.print_exc()
            print(f"prunekit: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print("prunekit: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # `prunekit ... | head`: the reader left; no traceback, no second error at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141


if __name__ == "__main__":
    sys.exit(main())
