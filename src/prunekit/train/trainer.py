"""The training loop every prunekit workflow uses (base training, fine-tuning, prune-and-train).

Callbacks see the trainer after every batch and epoch: the Koopman trajectory
recorder and prune-and-train rounds plug in there.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from prunekit import distributed
from prunekit.errors import PrunekitError


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (all plain values: it is saved with results)."""

    epochs: float = 1
    lr: float = 0.1
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "step", "onecycle", "constant"] = "cosine"
    milestones: tuple[float, ...] = (0.5, 0.75)  # step schedule: fractions of the run
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    temperature: float = 1.0  # logits are divided by it in the loss
    channels_last: bool = False
    amp: bool = False  # mixed precision, CUDA only
    grad_clip: float | None = None
    seed: int = 0
    # stochastic weight averaging: from this epoch on, the weights at every epoch end are averaged;
    # after the last epoch the model takes the average and its BatchNorm statistics are recomputed
    swa_start: float | None = None

    def validate(self) -> None:
        for name in ("epochs", "lr", "momentum", "weight_decay", "warmup_epochs", "label_smoothing", "temperature",
                     "gamma"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise PrunekitError(f"{name} must be a finite number, got {v!r}")
        for name, lo, hi in (("momentum", 0, 1), ("label_smoothing", 0, 1)):
            if not lo <= getattr(self, name) < hi:
                raise PrunekitError(f"{name} must be in [{lo}, {hi}), got {getattr(self, name)}")
        for name in ("weight_decay", "warmup_epochs"):
            if getattr(self, name) < 0:
                raise PrunekitError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.epochs <= 0:
            raise PrunekitError(f"epochs must be > 0, got {self.epochs}")
        if self.lr <= 0:
            raise PrunekitError(f"lr must be > 0, got {self.lr}")
        if self.temperature <= 0:
            raise PrunekitError(f"temperature must be > 0, got {self.temperature}")
        if self.swa_start is not None and not 0 <= self.swa_start < self.epochs:
            raise PrunekitError(f"swa_start must be in [0, epochs={self.epochs}), got {self.swa_start}: weights are "
                                "averaged over the epochs that end after it")
        for name, choices in (("optimizer", ("sgd", "adam", "adamw")),
                              ("schedule", ("cosine", "step", "onecycle", "constant"))):
            if getattr(self, name) not in choices:
                raise PrunekitError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")


class Callback(Protocol):
    """Hooks called by :class:`Trainer`; implement any subset (missing ones are skipped)."""

    def on_train_begin(self, trainer: Trainer) -> None: ...
    def on_batch_end(self, trainer: Trainer, loss: float) -> None: ...
    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None: ...
    def on_train_end(self, trainer: Trainer) -> None: ...


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    params = list(params)
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]  # no weight decay on BN/LN/biases
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(cfg: TrainConfig, step: int, total: int, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate at optimisation ``step`` of ``total``."""
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "onecycle":
        up = max(1, int(0.3 * total))
        if step < up:
            return 0.04 + 0.96 * step / up
        t = (step - up) / max(1, total - up)
        return 0.5 * (1 + math.cos(math.pi * t)) * (1 - 4e-4) + 4e-4
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    if cfg.schedule == "step":
        return cfg.gamma ** sum(t >= m for m in cfg.milestones)
    return 1.0


class Trainer:
    """Train ``model`` on ``train_loader`` for ``cfg.epochs`` epochs.

    ``checkpoint_dir``: a ``last.pt`` is written after every epoch and training resumes
    from it when ``resume=True``. ``optimizer``: pass one to keep its state across
    prune-and-train rounds. ``log_dir``: TensorBoard scalars when tensorboard is installed.

    Under ``torchrun`` (see :mod:`prunekit.distributed`) the model is trained in
    ``DistributedDataParallel``, a :class:`~prunekit.data.BatchLoader` is sharded over the ranks, epoch
    metrics are summed over ranks, and only rank 0 shows progress, prints and writes checkpoints.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        train_loader: Any,
        val_loader: Any = None,
        callbacks: Iterable[Any] = (),
        device: str | torch.device = "cpu",
        checkpoint_dir: str | os.PathLike | None = None,
        resume: bool = False,
        log_dir: str | os.PathLike | None = None,
        progress: bool = True,
        log_epochs: bool = True,
        optimizer: torch.optim.Optimizer | None = None,
        keep_initial_weights: bool = False,
    ):
        cfg.validate()
        self.cfg, self.model = cfg, model
        self.train_loader, self.val_loader = train_loader, val_loader
        self.callbacks = list(callbacks)
        self.device = torch.device(device)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.progress = progress
        self.log_epochs = log_epochs
        self.history: list[dict[str, Any]] = []
        self.epoch = 0  # epochs completed
        self.step = 0  # optimisation steps taken
        self.stop = False  # a callback may set it
        self.last_loss = float("nan")
        self.model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.main = distributed.is_main()
        if distributed.active() and getattr(train_loader, "world_size", None) == 1:
            train_loader.shard(distributed.rank(), distributed.world_size())
        self.net = distributed.wrap(model, self.device)  # what the training step calls (DDP under torchrun)
        self.progress = progress and self.main
        self.log_epochs = log_epochs and self.main
        self.initial_state = ({k: v.detach().clone() for k, v in model.state_dict().items()}
                              if keep_initial_weights else None)
        seed_everything(cfg.seed)
        self.optimizer = optimizer or make_optimizer(model.parameters(), cfg)
        self.base_lrs = [g.get("initial_lr", g["lr"]) for g in self.optimizer.param_groups]
        for g, lr in zip(self.optimizer.param_groups, self.base_lrs):
            g["initial_lr"] = lr
        self.use_amp = cfg.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.use_amp else None
        self._tb = self._make_tb(log_dir)
        self.swa_model: Any = None  # torch.optim.swa_utils.AveragedModel once averaging has started
        self.swa_averaged = 0  # how many epoch-end weights went into the final average
        if _has_len(train_loader) and len(train_loader) == 0:
            raise PrunekitError(f"the training data gives no batch ({_describe_loader(train_loader)}): no "
                                "optimisation step could be taken; lower the batch size or give more data")
        if resume and self.checkpoint_dir and (self.checkpoint_dir / "last.pt").exists():
            self._load_state(self.checkpoint_dir / "last.pt")

    # -- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _make_tb(log_dir: Any) -> Any:
        if not log_dir:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed: scalars go to history.json only
            return None
        return SummaryWriter(str(log_dir))

    def _call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(self, *args)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, len(self.train_loader))

    @property
    def total_steps(self) -> int:
        return max(1, int(round(self.cfg.epochs * self.steps_per_epoch)))

    def set_lr(self) -> float:
        f = lr_factor(self.cfg, self.step, self.total_steps, self.steps_per_epoch)
        for g, lr in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = lr * f
        return self.base_lrs[0] * f

    def loss_fn(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits / self.cfg.temperature, y, label_smoothing=self.cfg.label_smoothing)

    # -- checkpointing -----------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "history": json.dumps(self.history),
            "torch_rng": torch.get_rng_state(),
            # what a resume must match: the schedule depends on every one of them
            "resume_config": json.dumps(self._resume_config(), sort_keys=True),
            **({"swa": self.swa_model.state_dict()} if self.swa_model is not None else {}),
        }

    def save_state(self, path: Path) -> None:
        """Write the resumable state atomically (rank 0 only under torchrun)."""
        if self.main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(self._state(), tmp)
            os.replace(tmp, path)
        distributed.barrier()

    def _resume_config(self) -> dict[str, Any]:
        keep = ("epochs", "lr", "optimizer", "momentum", "nesterov", "weight_decay", "schedule", "milestones",
                "gamma", "warmup_epochs", "label_smoothing", "temperature", "grad_clip", "seed", "swa_start")
        d = config_dict(self.cfg)
        return {**{k: d[k] for k in keep}, "steps_per_epoch": self.steps_per_epoch}

    def _check_resume_config(self, path: Path, saved_json: Any) -> None:
        """The saved state was written by the same settings as this run's, else exit 2 naming each that differs
        (a resume with another epoch count, learning rate or batch size would silently follow another schedule)."""
        try:
            saved = json.loads(str(saved_json))
        except ValueError:
            saved = None
        if not isinstance(saved, dict):
            raise PrunekitError(f"cannot resume from {path}: its recorded settings are damaged; delete it or train "
                                "into another --out without --resume")
        now = self._resume_config()
        diff = [k for k in now if k in saved and saved[k] != now[k]]
        if diff:
            names = {"steps_per_epoch": "batches per epoch (--batch-size or the dataset)"}
            parts = [f"{names.get(k, '--' + k.replace('_', '-'))}: saved {saved[k]!r}, now {now[k]!r}" for k in diff]
            raise PrunekitError(f"cannot resume from {path}: it was saved by a run with other settings ("
                                f"{'; '.join(parts)}); resume with the same settings, or train into another --out "
                                "without --resume")

    def _load_state(self, path: Path) -> None:
        try:
            with warnings.catch_warnings():  # torch's notes about the refused pickle are not for the user
                warnings.simplefilter("ignore")
                st = torch.load(path, map_location=self.device, weights_only=True)
            if not isinstance(st, dict):
                raise TypeError(type(st).__name__)
        except Exception as e:  # noqa: BLE001 - a damaged or foreign file: say which and what to do
            raise PrunekitError(f"cannot resume from {path}: it is not a prunekit training state ({type(e).__name__}); "
                                "delete it or train into another --out without --resume") from None
        try:
            self.model.load_state_dict(st["model"])
            self.optimizer.load_state_dict(st["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()
            raise PrunekitError(f"cannot resume from {path}: it was saved for another model or optimizer than this "
                                f"command builds ({first[-1].strip() if first else type(e).__name__}); resume with the "
                                "same --model / --model-kwargs / --optimizer, or train into another --out") from None
        if "resume_config" in st:  # states of older versions do not record it
            self._check_resume_config(path, st["resume_config"])
        try:
            self.epoch, self.step = int(st["epoch"]), int(st["step"])
            self.history = json.loads(st["history"])
            torch.set_rng_state(st["torch_rng"].cpu())
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            raise PrunekitError(f"cannot resume from {path}: its training state is damaged ({type(e).__name__}: "
                                f"{e}); delete it or train into another --out without --resume") from None
        if "swa" in st:
            self._swa().load_state_dict(st["swa"])

    # -- the loop ----------------------------------------------------------------------------------
    def train_epoch(self) -> dict[str, Any]:
        model, dev = self.net, self.device
        model.train()
        if hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(self.epoch)
        n_batches = self.steps_per_epoch
        budget = self.total_steps - self.step  # fractional last epoch
        tot_loss, tot_correct, tot_n, t0 = 0.0, 0, 0, time.time()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=min(n_batches, budget), desc=f"epoch {self.epoch + 1}", leave=False, dynamic_ncols=True)
        for i, (x, y) in enumerate(self.train_loader):
            if i >= budget or self.stop:
                break
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            if self.cfg.channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            lr = self.set_lr()
            with torch.autocast(dev.type, dtype=torch.float16, enabled=self.use_amp):
                logits = model(x)
                loss = self.loss_fn(logits, y)
            if not torch.isfinite(loss):
                raise PrunekitError(f"training diverged (loss={loss.item()}) at epoch {self.epoch + 1} step "
                                    f"{self.step}; lower the learning rate (now {lr:.4g})")
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
            if self.cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), self.cfg.grad_clip)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.step += 1
            self.last_loss = loss.item()
            tot_loss += self.last_loss * len(y)
            tot_correct += (logits.argmax(1) == y).sum().item()
            tot_n += len(y)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{self.last_loss:.3f}", lr=f"{lr:.3g}")
            self._call("on_batch_end", self.last_loss)
            if self._tb is not None:
                self._tb.add_scalar("train/loss", self.last_loss, self.step)
        if bar is not None:
            bar.close()
        tot_loss, tot_correct, tot_n = distributed.all_reduce_sum([tot_loss, tot_correct, tot_n])
        return {"train_loss": tot_loss / max(1, tot_n), "train_top1": tot_correct / max(1, tot_n),
                "seconds": time.time() - t0, "lr": self.optimizer.param_groups[0]["lr"]}

    # -- stochastic weight averaging ---------------------------------------------------------------
    def _swa(self) -> Any:
        if self.swa_model is None:
            from torch.optim.swa_utils import AveragedModel

            self.swa_model = AveragedModel(self.model, use_buffers=False)
        return self.swa_model

    def _finish_swa(self) -> None:
        """Load the averaged weights into the model and recompute BatchNorm statistics on the training data."""
        from torch.optim.swa_utils import update_bn

        with torch.no_grad():
            for p, q in zip(self.model.parameters(), self.swa_model.module.parameters()):
                p.copy_(q)
        cl = self.cfg.channels_last
        batches = (x.to(self.device).contiguous(memory_format=torch.channels_last) if cl and x.ndim == 4
                   else x.to(self.device) for x, _ in self.train_loader)
        update_bn(batches, self.model, device=self.device)
        n = int(self.swa_model.n_averaged)
        self.swa_averaged = n
        if self.log_epochs:
            print(f"swa: averaged the weights of {n} epoch ends, BatchNorm statistics recomputed", flush=True)

    def evaluate(self, loader: Any = None) -> dict[str, Any]:
        from prunekit.metrics import evaluate

        return evaluate(self.model, loader or self.val_loader, device=self.device)

    def fit(self) -> list[dict[str, Any]]:
        """Run the remaining epochs; returns the per-epoch history."""
        self._call("on_train_begin")
        n_epochs = math.ceil(self.cfg.epochs)
        while self.epoch < n_epochs and self.step < self.total_steps and not self.stop:
            record = {"epoch": self.epoch + 1, **self.train_epoch()}
            self.epoch += 1
            if self.val_loader is not None:
                ev = self.evaluate()
                record.update({"val_top1": ev["top1"], "val_top5": ev["top5"]})
            self.history.append(record)
            if self._tb is not None:
                for k, v in record.items():
                    if isinstance(v, (int, float)) and k != "epoch":
                        self._tb.add_scalar(f"epoch/{k}", v, self.epoch)
            if self.log_epochs:
                msg = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
                print(msg, flush=True)
            if self.cfg.swa_start is not None and self.epoch > self.cfg.swa_start:
                self._swa().update_parameters(self.model)
            self._call("on_epoch_end", record)
            if self.checkpoint_dir is not None:
                self.save_state(self.checkpoint_dir / "last.pt")
        if self.step == 0 and not self.stop:  # not a success: nothing was trained
            raise PrunekitError(f"training took no optimisation step ({_describe_loader(self.train_loader)}); "
                                "lower the batch size or give more data")
        if self.swa_model is not None and not self.stop:
            self._finish_swa()
        self._call("on_train_end")
        if self._tb is not None:
            self._tb.flush()
        return self.history


def _has_len(obj: Any) -> bool:
    try:
        len(obj)
    except TypeError:
        return False
    return True


def _describe_loader(loader: Any) -> str:
    ds, bs = getattr(loader, "dataset", None), getattr(loader, "batch_size", None)
    parts = [f"{len(ds)} examples" if _has_len(ds) else "", f"batch size {bs}" if bs else "",
             "the last incomplete batch dropped" if getattr(loader, "drop_last", False) else ""]
    return ", ".join(p for p in parts if p) or f"{type(loader).__name__} yielded no batch"


def train(model: nn.Module, train_loader: Any, cfg: TrainConfig | None = None, **kwargs: Any) -> list[dict]:
    """Convenience wrapper: ``Trainer(model, cfg, train_loader, **kwargs).fit()``."""
    return Trainer(model, cfg or TrainConfig(), train_loader, **kwargs).fit()


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["milestones"] = list(d["milestones"])
    return d


__all__ = ["TrainConfig", "Trainer", "Callback", "train", "make_optimizer", "lr_factor", "seed_everything",
           "config_dict"]
