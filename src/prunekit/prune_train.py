"""Prune-and-train (the gradient-flow paper's framework): prune a network *while* training it.

:func:`prune_and_train` reaches a target fraction ``p`` of filters removed over ``n`` rounds. After an optional
warm-up, each round trains ``epochs_per_round`` epochs, scores every channel with the method, and physically
removes the fraction ``r_k = p / (k p + n (1 - p))`` of the channels still alive (or manual cumulative
``thresholds``), chosen by one global ranking of the raw scores with a per-layer floor; then the final training
runs. Coupled channels (residual streams, depthwise convolutions) are removed together; with ``preserve_moment``
the SGD momentum buffers are sliced to the surviving channels (:func:`prunekit.schedule.slice_optimizer_state_`)
instead of being reset.

"Filters" are counted as channels of the prunable coupled groups that the method scores (a residual stream's
channel counts once, although several convolutions write it; the stem's group is left alone by the gradient-flow
methods' ``keep_stem``). The number kept after round ``k`` is ``round(N0 * prod_{j<=k} (1 - r_j))`` of the
original ``N0``, so after the last round exactly ``round(N0 (1 - p))`` remain whatever the rounding on the way
(unless the per-layer floors forbid it; the history then says so).

Usage::

    model, history = prune_and_train(create_model("resnet56", num_classes=100), "gf_biased_loss",
                                     prune_percent=0.75, n_rounds=25, train_loader=loader, final_epochs=160)

The command line reaches it through :func:`add_prune_train_args` / :func:`run_prune_train`.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from prunekit import cli_types as T
from prunekit.errors import PruningError
from prunekit.methods.base import BudgetOptions, ChannelScorer, Method, PruneContext, Target
from prunekit.methods.gradflow import GradFlowScorer, first_conv_path, schedule_ratios
from prunekit.surgery.allocate import allocate_filter_count, allocate_global_count  # noqa: F401  (re-exported)
from prunekit.surgery.plan import Plan

__all__ = ["add_prune_train_args", "allocate_global_count", "prune_and_train", "prune_train_kwargs",
           "run_prune_train", "wants_prune_train"]


# --------------------------------------------------------------------------------------------- helpers
class _PhaseLoader:
    """Wraps the training loader: shifts ``set_epoch`` by an offset (each phase gets fresh epochs) and remembers
    the last batch it yielded (tracked second-order scores recompute on it)."""

    def __init__(self, loader: Any, offset: int):
        self.loader, self.offset = loader, offset
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch + self.offset)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.loader:
            self.last = batch
            yield batch


class _Tracker:
    """Trainer callback: EMA of the method's scores over the last ``track_batches`` minibatches of a phase.

    First- and zeroth-order measures use the training step's own gradient (``p.grad``, as the seed did);
    Hessian measures recompute on the minibatch (BN in eval mode, ``grasp_T``).
    """

    def __init__(self, method: GradFlowScorer, model: nn.Module, ctx: PruneContext, loader: _PhaseLoader):
        self.method, self.ctx, self.loader = method, ctx, loader
        self.groups = method.scored_groups(model, ctx)
        self.paths = sorted({p for g in self.groups for p in method.group_terms(model, g)})
        self.ema: dict[str, torch.Tensor] | None = None
        self.n = 0

    def on_batch_end(self, trainer: Any, loss: float) -> None:
        k = int(self.method.track_batches)
        if trainer.step <= trainer.total_steps - k:
            return
        model, m = trainer.model, self.method
        if "hg" in m.needs:
            x, y = self.loader.last
            s = m.minibatch_scores(model, self.ctx, x.to(trainer.device), y.to(trainer.device), self.groups)
        else:
            params = dict(model.named_parameters())
            grads = {p: (params[p].grad if params[p].grad is not None else torch.zeros_like(params[p])).detach()
                     for p in self.paths}
            stats = {}
            if "grad" in m.needs:
                stats["grad"] = grads
            if "grad_sq" in m.needs:
                stats["grad_sq"] = {p: g.square() for p, g in grads.items()}
            s = m.scores_from_stats(model, self.ctx, self.groups, stats)
        a = float(m.alpha)
        self.ema = s if self.ema is None else {key: a * s[key] + (1 - a) * self.ema[key] for key in s}
        self.n += 1


def _as_loader(data: Any, batch_size: int, train: bool, seed: int) -> Any:
    """A loader from a dataset (ImageDataset -> BatchLoader, torch Dataset -> DataLoader); loaders pass through."""
    if data is None:
        return None
    from prunekit.data import BatchLoader, ImageDataset

    if isinstance(data, ImageDataset):
        return BatchLoader(data, batch_size=batch_size, shuffle=train, augment=train, seed=seed)
    if isinstance(data, torch.utils.data.Dataset) and not hasattr(data, "__iter__"):
        return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=train)
    return data


class _RoundTrajectories:
    """For methods that need a parameter trajectory (Koopman): a recorder over the last epoch of every round's
    training (a fresh one after each physical pruning step), in a temporary folder removed at the end."""

    def __init__(self, method: Method, epochs_per_round: float):
        info = getattr(method, "info", None)
        self.active = bool(info is not None and info.needs_trajectory)
        if self.active and epochs_per_round <= 0:
            raise PruningError(f"method {method.name!r} prunes from the trajectory recorded while training: "
                               "prune-and-train needs epochs_per_round > 0")
        self.recorder: Any = None
        self._dir: Any = None

    def placeholder(self, ctx: PruneContext) -> PruneContext:
        import dataclasses

        return dataclasses.replace(ctx, trajectory="recorded in each round") if self.active else ctx

    def callbacks(self, k: int) -> list[Any]:
        if not self.active:
            return []
        import tempfile

        from prunekit.train.trajectory import TrajectoryRecorder

        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="prunekit-trajectory-")
        self.recorder = TrajectoryRecorder(f"{self._dir.name}/round{k}")
        return [self.recorder]

    def trajectory(self) -> Any:
        return self.recorder.trajectory if self.active and self.recorder is not None else None

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


def _scored_channels(scores: dict[str, torch.Tensor]) -> int:
    return sum(len(s) for s in scores.values())


@dataclass
class _Schedule:
    """The resolved prune-and-train settings: explicit arguments win over the method's options."""

    ratios: list[float]
    prune_percent: float | None
    preserve_moment: bool
    warmup_epochs: float
    keep_stem: bool
    min_width: float
    tracking: bool
    use_init: bool

    @classmethod
    def resolve(cls, method: Method, prune_percent: float | None, n_rounds: int | None,
                thresholds: Sequence[float] | None, preserve_moment: bool | None,
                warmup_epochs: float | None) -> _Schedule:
        opts = dict(getattr(method, "options", {}))
        if thresholds is None:
            thresholds = opts.get("thresholds")
        prune_percent = opts.get("prune_percent") if prune_percent is None else prune_percent
        n_rounds = int(opts.get("n_rounds", 1) if n_rounds is None else n_rounds)
        if prune_percent is None and thresholds is None:
            raise PruningError("prune-and-train needs prune_percent (the fraction of filters to remove) or thresholds")
        gf = isinstance(method, GradFlowScorer)
        return cls(ratios=schedule_ratios(prune_percent or 0.0, n_rounds, thresholds), prune_percent=prune_percent,
                   preserve_moment=bool(opts.get("preserve_moment", False) if preserve_moment is None
                                        else preserve_moment),
                   warmup_epochs=float(opts.get("warmup_epochs", 0) if warmup_epochs is None else warmup_epochs),
                   keep_stem=bool(opts.get("keep_stem", True)), min_width=float(opts.get("min_width", 0.05)),
                   tracking=gf and int(opts.get("track_batches", 0)) > 0, use_init=gf and bool(opts.get("use_init")))


def _channel_method(method: str | Method, method_options: dict[str, Any]) -> ChannelScorer:
    from prunekit.methods.registry import create_method

    if isinstance(method, str):
        method = create_method(method, **method_options)
    elif method_options:
        raise PruningError("method options are given with a method instance: set them on the instance")
    if not isinstance(method, ChannelScorer):
        raise PruningError(f"prune-and-train needs a channel scoring method, not {type(method).__name__} "
                           f"({getattr(method, 'name', '?')})")
    return method


class _PruneTrain:
    """The state of one prune-and-train run across its phases: the model (and its initial copy for
    ``use_init``), the optimizer carried between phases, the epoch counter, the channel graph and the
    original widths. :meth:`round` is one pruning step; :func:`prune_and_train` drives the phases."""

    def __init__(self, model: nn.Module, method: ChannelScorer, sched: _Schedule, train_loader: Any,
                 test_loader: Any, config: Any, input_shape: tuple[int, ...], device: torch.device,
                 epochs_per_round: float, initial_state: dict[str, torch.Tensor] | None, progress: bool):
        from prunekit.surgery.graph import analyze

        self.model, self.method, self.sched, self.config = model, method, sched, config
        self.train_loader, self.test_loader = train_loader, test_loader
        self.input_shape, self.device, self.progress = input_shape, device, progress
        self.epochs_per_round = epochs_per_round
        self.optimizer: Any = None
        self.epoch = self.phase = 0
        self.init_model = None
        if sched.use_init:
            self.init_model = copy.deepcopy(model)
            if initial_state is not None:
                self.init_model.load_state_dict(initial_state)
        stem = first_conv_path(model)
        self.ignored = (stem,) if sched.keep_stem and stem else None
        self.graph = analyze(model, input_shape, ignored=self.ignored)
        self.original = {k: g.size for k, g in self.graph.groups.items()}
        self.n0: int | None = None
        self.left = 1.0
        self.koop = _RoundTrajectories(method, epochs_per_round)  # Koopman: one trajectory recorded per round

    def train(self, epochs: float, schedule: str, callbacks: Sequence[Any] = (),
              loader: _PhaseLoader | None = None) -> list[dict[str, Any]]:
        """Train ``epochs`` epochs (a new phase: fresh data order, the optimizer carried over unless reset)."""
        from prunekit.train import Trainer

        if epochs <= 0:
            return []
        loader = loader or _PhaseLoader(self.train_loader, self.epoch)
        loader.offset = self.epoch
        trainer = Trainer(self.model, self.config(epochs, schedule, self.phase), loader, val_loader=self.test_loader,
                          callbacks=callbacks, device=self.device, progress=self.progress,
                          log_epochs=self.progress, optimizer=self.optimizer)
        records = trainer.fit()
        self.optimizer = trainer.optimizer
        self.epoch += math.ceil(epochs)
        self.phase += 1
        return records

    def evaluate(self) -> float | None:
        if self.test_loader is None:
            return None
        from prunekit.metrics import evaluate

        return float(evaluate(self.model, self.test_loader, device=self.device)["top1"])

    def context(self) -> PruneContext:
        init = self.init_model.state_dict() if self.init_model is not None else None
        return PruneContext(target=Target("ratio", 0.0), input_shape=self.input_shape,
                            budget=BudgetOptions(scope="global", floor=self.sched.min_width, ignored=self.ignored),
                            data=self.train_loader, device=self.device, graph=self.graph,
                            original_sizes=dict(self.original), initial_state=init)

    def _scores(self, ctx: PruneContext, tracker: _Tracker | None) -> dict[str, torch.Tensor]:
        if tracker is not None and tracker.ema is not None:
            scores = tracker.ema
        else:
            self.method.check(ctx)
            scores = self.method.checked_scores(self.model, ctx, torch.float32)
        scores = {key: v.detach().double().cpu() for key, v in scores.items()}
        for key, v in scores.items():
            if not torch.isfinite(v).all():
                raise PruningError(f"method {self.method.name!r} produced non-finite scores for group {key!r}")
        if not scores:
            raise PruningError(f"method {self.method.name!r} scored no channel group: the model has nothing "
                               f"prunable (skipped layers: {self.graph.skipped or 'none'})")
        return scores

    def _apply(self, plan: Plan) -> None:
        from prunekit.schedule import slice_optimizer_state_
        from prunekit.surgery.apply import apply_plan_
        from prunekit.surgery.graph import analyze

        old_params = dict(self.model.named_parameters())
        kept_dims = self.graph.kept_dims(plan.channels)
        apply_plan_(self.model, plan, self.graph, "physical", self.input_shape)
        if self.init_model is not None:
            apply_plan_(self.init_model, plan, None, "physical", self.input_shape)
        if self.sched.preserve_moment and self.optimizer is not None:
            slice_optimizer_state_(self.optimizer, old_params, self.model, kept_dims)
        else:
            self.optimizer = None  # a fresh optimizer (momentum reset), as the seed did
        self.graph = analyze(self.model, self.input_shape, ignored=self.ignored, warn=False)

    def round(self, k: int, r: float) -> dict[str, Any]:
        """Round ``k``: train ``epochs_per_round`` epochs, score, remove the round's share of the filters
        (global count with per-layer floors) and record what happened."""
        ctx = self.context()
        loader = _PhaseLoader(self.train_loader, self.epoch)
        tracker = _Tracker(self.method, self.model, ctx, loader) if self.sched.tracking else None
        records = self.train(self.epochs_per_round, "constant", [tracker] if tracker else self.koop.callbacks(k),
                             loader)
        ctx.trajectory = self.koop.trajectory()
        t0 = time.time()
        scores = self._scores(ctx, tracker)
        seconds = time.time() - t0
        alive = _scored_channels(scores)
        if self.n0 is None:
            self.n0 = alive
        self.left *= 1 - r
        target_keep = int(round(self.n0 * self.left))
        keep, kept_now = allocate_filter_count(scores, self.original, target_keep, self.sched.min_width)
        if kept_now != target_keep:
            warnings.warn(f"prunekit: round {k} keeps {kept_now} channels instead of {target_keep}: the per-layer "
                          f"floor (min_width={self.sched.min_width}) leaves nothing more to remove", stacklevel=3)
        if keep:
            self._apply(Plan(method=self.method.name, channels=keep, meta={"round": k, "ratio": r}))
        return {"round": k, "ratio": r, "train": records, "score_seconds": seconds,
                "tracked_batches": tracker.n if tracker is not None else 0,
                "channels_before": alive, "channels_kept": kept_now, "target_kept": target_keep,
                "fraction_left": kept_now / max(1, self.n0), "widths": self.widths(),
                "top1_after_pruning": self.evaluate(), "plan_meta": dict(getattr(self.method, "meta", {}))}

    def widths(self) -> dict[str, int]:
        return {key: g.size for key, g in self.graph.groups.items()}


# --------------------------------------------------------------------------------------------- the driver
def prune_and_train(
    model: nn.Module,
    method: str | Method,
    prune_percent: float | None,
    n_rounds: int | None,
    train_loader: Any,
    test_loader: Any = None,
    *,
    epochs_per_round: float = 1,
    final_epochs: float = 0,
    lr: float = 0.1,
    momentum: float = 0.9,
    wd: float = 1e-4,
    batch_size: int = 128,
    thresholds: Sequence[float] | None = None,
    preserve_moment: bool | None = None,
    warmup_epochs: float | None = None,
    final_schedule: str = "cosine",
    train_temperature: float = 1.0,
    initial_state: dict[str, torch.Tensor] | None = None,
    input_shape: tuple[int, ...] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = False,
    **method_options: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Prune ``model`` in place while training it; returns ``(model, history)``.

    Args:
        model: a random init or a trained checkpoint (any model the channel engine can trace).
        method: a registered channel method name (``"gf_loss"``, ``"gf_grasp"``, ``"l1"``...) or an instance.
        prune_percent: fraction ``p`` of the prunable filters to remove in total (a value > 1 is a percentage;
            None: the method's ``prune_percent`` option).
        n_rounds: rounds the pruning is spread over (ignored when ``thresholds`` is given; None: the method's
            ``n_rounds`` option).
        train_loader: iterable of ``(x, y)`` training batches (or a dataset: batched by ``batch_size``); it is
            also the data the importance is estimated on (``imp_samples`` of it).
        test_loader: optional; evaluated after every epoch and right after each pruning step.
        epochs_per_round: training epochs before each pruning step.
        final_epochs: training epochs after the last round (``final_schedule`` learning-rate schedule).
        lr, momentum, wd: SGD settings of the whole procedure (constant lr during warm-up and rounds).
        thresholds: manual cumulative fractions removed after each round (override ``prune_percent`` /
            ``n_rounds``).
        preserve_moment: slice the optimizer's momentum to the kept channels instead of resetting it
            (default: the method's ``preserve_moment`` option, else False).
        warmup_epochs: epochs trained before the first round (default: the method's option, else 0).
        train_temperature: the training loss uses ``logits / train_temperature`` (the seed trained at its
            importance temperature, 5; prunekit's default is plain cross-entropy).
        initial_state: initial weights for ``use_init`` (default: the model's weights when called); they are
            pruned alongside the model so shapes always match.
        input_shape: ``(C, H, W)``; default from the first training batch.
        method_options: the method's options (``imp_samples``, ``temperature``, ``track_batches``...).

    Returns:
        the pruned, trained model (the same object) and a history dict: ``schedule`` (per-round fractions),
        ``warmup`` / ``final`` epoch records, ``rounds`` (per round: training records, channels kept, widths,
        accuracy right after pruning, seconds spent scoring) and ``channels`` (original / final counts).
    """
    from prunekit.metrics import count_params
    from prunekit.train import TrainConfig

    method = _channel_method(method, method_options)
    sched = _Schedule.resolve(method, prune_percent, n_rounds, thresholds, preserve_moment, warmup_epochs)
    device = torch.device(device)
    model.to(device)
    train_loader = _as_loader(train_loader, batch_size, True, seed)
    test_loader = _as_loader(test_loader, batch_size, False, seed)
    if input_shape is None:
        input_shape = tuple(next(iter(train_loader))[0].shape[1:])

    def config(epochs: float, schedule: str, phase: int) -> Any:
        return TrainConfig(epochs=epochs, lr=lr, momentum=momentum, nesterov=False, weight_decay=wd,
                           schedule=schedule, temperature=train_temperature, seed=seed + phase)

    run = _PruneTrain(model, method, sched, train_loader, test_loader, config, input_shape, device,
                      epochs_per_round, initial_state, progress)
    method.check(run.koop.placeholder(run.context()))  # fail fast (missing data, bad options) before any training
    history: dict[str, Any] = {"method": method.name, "options": dict(getattr(method, "options", {})),
                               "prune_percent": sched.prune_percent, "n_rounds": len(sched.ratios),
                               "schedule": sched.ratios, "preserve_moment": sched.preserve_moment,
                               "warmup": [], "rounds": [], "final": []}
    history["base"] = {"params": count_params(model)["params"], "flops": run.graph.cost.base_flops}
    history["warmup"] = run.train(sched.warmup_epochs, "constant")
    try:
        for k, r in enumerate(sched.ratios, 1):
            history["rounds"].append(run.round(k, r))
    finally:
        run.koop.close()
    history["final"] = run.train(final_epochs, final_schedule)
    history["channels"] = {"original": run.n0,
                           "final": history["rounds"][-1]["channels_kept"] if sched.ratios else run.n0,
                           "widths": run.widths(), "original_widths": run.original}
    history["pruned"] = {"params": count_params(model)["params"], "flops": run.graph.cost.base_flops}
    if test_loader is not None:
        history["top1"] = run.evaluate()
    return model, history


# --------------------------------------------------------------------------------------------- CLI hook
def add_prune_train_args(parser: argparse.ArgumentParser) -> None:
    """Add the prune-and-train options to ``prunekit prune``'s parser (options it already has are left alone).

    ``--epochs-per-round E`` switches ``prunekit prune`` to prune-and-train (see :func:`wants_prune_train`);
    ``--rounds N`` is the number of rounds.
    """
    have = set(parser._option_string_actions)  # noqa: SLF001 - argparse offers no public query
    group = parser.add_argument_group("prune-and-train (prune while training; METHODS.md section 1)")

    def add(flag: str, **kw: Any) -> None:
        if flag not in have:
            group.add_argument(flag, **kw)

    add("--rounds", type=T.POSITIVE_INT, default=1, help="pruning rounds")
    add("--epochs-per-round", type=T.NON_NEGATIVE, default=None,
        help="train E epochs before each pruning round (enables prune-and-train)")
    add("--final-epochs", type=T.NON_NEGATIVE, default=0.0, help="training epochs after the last round")
    add("--warmup-epochs", type=T.NON_NEGATIVE, default=None, help="training epochs before the first round")
    add("--thresholds", default=None,
        help="manual cumulative fractions (or percentages) removed after each round, e.g. '10,50,80'")
    add("--preserve-moment", action="store_true", default=None,
        help="keep SGD momentum across rounds (sliced to the kept channels)")
    add("--lr", type=T.POSITIVE, default=0.1, help="SGD learning rate")
    add("--momentum", type=T.FRACTION, default=0.9, help="SGD momentum")
    add("--weight-decay", type=T.NON_NEGATIVE, default=1e-4, help="SGD weight decay")
    add("--train-temperature", type=float, default=1.0, help="training loss uses logits / T")


def wants_prune_train(args: argparse.Namespace) -> bool:
    """Whether ``prunekit prune`` was asked for prune-and-train (``--epochs-per-round`` given)."""
    return getattr(args, "epochs_per_round", None) is not None


def _parse_thresholds(spec: Any) -> list[float] | None:
    if spec is None or spec == "":
        return None
    if isinstance(spec, (list, tuple)):
        return [float(t) for t in spec]
    return [float(t) for t in str(spec).strip("[] ").replace(" ", "").split(",") if t]


def _prune_fraction(args: argparse.Namespace) -> float:
    for name in ("prune_percent", "ratio"):
        v = getattr(args, name, None)
        if v is not None:
            return float(v)
    spec = getattr(args, "target", None)
    if spec is None:
        raise PruningError("prune-and-train needs a target: --target ratio=P (fraction of filters removed)")
    t = Target.parse(spec)
    if t.kind != "ratio":
        raise PruningError(f"prune-and-train removes a fraction of filters: use --target ratio=P, not {t}")
    return float(t.value)


def prune_train_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :func:`prune_and_train` from parsed command-line arguments."""
    kw: dict[str, Any] = {
        "prune_percent": _prune_fraction(args),
        "n_rounds": int(getattr(args, "rounds", 1) or 1),
        "epochs_per_round": float(getattr(args, "epochs_per_round", None) or 1),
        "final_epochs": float(getattr(args, "final_epochs", 0) or 0),
        "lr": float(getattr(args, "lr", 0.1)),
        "momentum": float(getattr(args, "momentum", 0.9)),
        "wd": float(getattr(args, "weight_decay", 1e-4)),
        "thresholds": _parse_thresholds(getattr(args, "thresholds", None)),
        "preserve_moment": getattr(args, "preserve_moment", None),
        "warmup_epochs": getattr(args, "warmup_epochs", None),
        "train_temperature": float(getattr(args, "train_temperature", 1.0)),
        "batch_size": int(getattr(args, "batch_size", 128)),
        "seed": int(getattr(args, "seed", 0)),
        "progress": not getattr(args, "quiet", False),
    }
    return kw


def run_prune_train(args: argparse.Namespace, model: nn.Module, train_loader: Any, test_loader: Any = None,
                    method_options: dict[str, Any] | None = None,
                    device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Run :func:`prune_and_train` for ``prunekit prune`` (``args.method``; options from the parsed arguments).

    The CLI loads the model and data and writes the outputs; this maps the arguments.
    """
    kw = prune_train_kwargs(args)
    opts = dict(method_options or {})
    for k in set(kw) & set(opts):  # e.g. --option prune_percent=P: the option wins over the derived value
        kw[k] = opts.pop(k)
    return prune_and_train(model, args.method, train_loader=train_loader, test_loader=test_loader, device=device,
                           **kw, **opts)
