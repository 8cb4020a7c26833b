"""Pruning schedules: one-shot or iterative, with fine-tuning between rounds.

A target removes a fraction ``p`` of something (channels per layer for ``ratio=p``; of the
multiply-adds for ``flops=X``, ``p = 1 - 1/X``; of the parameters for ``params=X``). Iterative
pruning reaches it over ``n`` rounds; round ``k`` removes the fraction ``r_k`` of what is left:

* ``"geometric"``: the same ``r_k = 1 - (1 - p)^(1/n)`` every round;
* ``"linear"``: the cumulative fraction grows linearly, ``p * k / n``;
* ``"gradflow"``: ``r_k = p / (k p + n (1 - p))`` (METHODS.md section 1; after ``n`` rounds exactly
  ``1 - p`` remains);
* ``thresholds=[c_1, ..., c_n]``: explicit cumulative fractions (the last one is ``p``).

:class:`FineTuner` trains between rounds with :class:`prunekit.train.Trainer` and keeps its
optimizer (momentum buffers sliced to the surviving channels) across rounds; :func:`cascade` is the
prune -> retrain loop with geometric keep ratios (``prunekit.prune(..., **cascade(train, rounds, epochs))``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from prunekit.errors import PruningError
from prunekit.methods.base import Target

SCHEDULES = ("geometric", "linear", "gradflow")


def round_fractions(
    p: float, rounds: int, schedule: str = "geometric", thresholds: Sequence[float] | None = None
) -> list[float]:
    """Fraction ``r_k`` of what is left that round ``k`` (1-based) removes; ``prod(1 - r_k) = 1 - p``."""
    cum = cumulative_fractions(p, rounds, schedule, thresholds)
    out, prev = [], 0.0
    for c in cum:
        out.append((c - prev) / (1 - prev) if prev < 1 else 0.0)
        prev = c
    return out


def cumulative_fractions(
    p: float, rounds: int, schedule: str = "geometric", thresholds: Sequence[float] | None = None
) -> list[float]:
    """Fraction removed after each round (the last entry is ``p``)."""
    if not 0 <= p < 1:
        raise PruningError(f"the fraction to remove must be in [0, 1), got {p}")
    if thresholds is not None:
        th = [float(t) for t in thresholds]
        if not th or any(not 0 <= a < 1 for a in th) or any(b < a for a, b in zip(th, th[1:])):
            raise PruningError(
                f"thresholds must be non-decreasing cumulative fractions in [0, 1), got {thresholds}"
            )
        if abs(th[-1] - p) > 1e-9:
            raise PruningError(f"the last threshold ({th[-1]}) must equal the target fraction ({p:.6g})")
        return th
    if rounds < 1:
        raise PruningError(f"rounds must be >= 1, got {rounds}")
    if schedule == "geometric":
        q = (1 - p) ** (1 / rounds)
        return [1 - q**k for k in range(1, rounds + 1)]
    if schedule == "linear":
        return [p * k / rounds for k in range(1, rounds + 1)]
    if schedule == "gradflow":
        left, out = 1.0, []
        for k in range(1, rounds + 1):
            r = p / (k * p + rounds * (1 - p))
            left *= 1 - r
            out.append(1 - left)
        out[-1] = p  # exact despite rounding
        return out
    raise PruningError(
        f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)} or thresholds=[...]"
    )


def target_fraction(target: Target) -> float:
    """The fraction ``p`` a target removes."""
    if target.kind == "ratio":
        return float(target.value)
    return 1.0 - 1.0 / float(target.value)


# --------------------------------------------------------------------------------------------- optimizer
def slice_optimizer_state_(
    optimizer: torch.optim.Optimizer,
    old_params: dict[str, nn.Parameter],
    model: nn.Module,
    kept: dict[str, dict[int, torch.Tensor]],
) -> torch.optim.Optimizer:
    """Carry optimizer state (momentum, Adam moments) across physical channel removal, in place.

    ``old_params``: ``dict(model.named_parameters())`` captured before pruning; ``kept``: the kept
    positions per tensor and dimension (:meth:`ChannelGraph.kept_dims`). State of every surviving
    parameter is sliced to the kept channels and re-keyed to the new parameter object; the param
    groups are rewritten to the model's current parameters (new ones join the group of matching
    dimensionality).
    """
    new_params = dict(model.named_parameters())
    old_to_new: dict[int, nn.Parameter] = {}
    for name, old in old_params.items():
        new = new_params.get(name)
        if new is None:
            continue
        old_to_new[id(old)] = new
        st = optimizer.state.pop(old, None)
        if st is None:
            continue
        dims = kept.get(name, {})
        sliced: dict[str, Any] = {}
        for k, v in st.items():
            if torch.is_tensor(v) and tuple(v.shape) == tuple(old.shape) and v.dim() > 0:
                for d, idx in dims.items():
                    v = v.index_select(d, idx.to(v.device))
                if tuple(v.shape) != tuple(new.shape):
                    break
                sliced[k] = v.clone()
            else:
                sliced[k] = v
        else:
            optimizer.state[new] = sliced
    placed: set[int] = set()
    for group in optimizer.param_groups:
        ps = []
        for p in group["params"]:
            q = old_to_new.get(id(p))
            if q is not None and id(q) not in placed:
                ps.append(q)
                placed.add(id(q))
        group["params"] = ps
    leftovers = [p for p in new_params.values() if id(p) not in placed]
    for p in leftovers:  # new parameters (e.g. low-rank factors): a group of the same kind, else the first
        target = next(
            (
                g
                for g in optimizer.param_groups
                if g["params"] and (g["params"][0].dim() > 1) == (p.dim() > 1)
            ),
            optimizer.param_groups[0],
        )
        target["params"].append(p)
    return optimizer


# --------------------------------------------------------------------------------------------- fine-tuning
class FineTuner:
    """Fine-tune a (pruned) model between rounds and after the last one.

    ``ft(model, epochs)`` trains with :class:`prunekit.train.Trainer` on ``data`` (an iterable of
    ``(x, y)`` batches, e.g. a :class:`prunekit.data.BatchLoader`). The optimizer survives across
    calls; :meth:`pruned` slices its momentum to the kept channels after a physical pruning step
    (``keep_optimizer_state=False`` starts each call afresh). ``history`` collects the per-epoch
    records of every call.
    """

    def __init__(
        self,
        data: Any,
        config: Any = None,
        *,
        epochs: float = 1.0,
        device: str | torch.device = "cpu",
        keep_optimizer_state: bool = True,
        progress: bool = False,
        **config_overrides: Any,
    ):
        from prunekit.train import TrainConfig

        if config is None:
            config = TrainConfig(epochs=epochs, schedule="cosine", **config_overrides)
        elif config_overrides:
            config = type(config)(**{**config.__dict__, **config_overrides})
        self.data = data
        self.config = config
        self.epochs = epochs
        self.device = device
        self.keep_optimizer_state = keep_optimizer_state
        self.progress = progress
        self.optimizer: torch.optim.Optimizer | None = None
        self.history: list[dict[str, Any]] = []

    def pruned(
        self, old_params: dict[str, nn.Parameter], model: nn.Module, kept: dict[str, dict[int, torch.Tensor]]
    ) -> None:
        """Tell the fine-tuner that ``model`` was pruned (``old_params``: its parameters before)."""
        if self.optimizer is not None and self.keep_optimizer_state:
            slice_optimizer_state_(self.optimizer, old_params, model, kept)

    def __call__(self, model: nn.Module, epochs: float | None = None) -> list[dict[str, Any]]:
        from prunekit.train import Trainer

        epochs = self.epochs if epochs is None else epochs
        if epochs <= 0:
            return []
        cfg = type(self.config)(**{**self.config.__dict__, "epochs": epochs})
        opt = self.optimizer if self.keep_optimizer_state else None
        if opt is not None and not _same_params(opt, model):
            opt = None
        trainer = Trainer(model, cfg, self.data, device=self.device, progress=self.progress, optimizer=opt)
        hist = trainer.fit()
        self.optimizer = trainer.optimizer
        self.history.extend(hist)
        return hist


def _same_params(opt: torch.optim.Optimizer, model: nn.Module) -> bool:
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    return ids == {id(p) for p in model.parameters()}


FineTuneFn = Callable[[nn.Module, float], Any]


def cascade(data: Any, rounds: int, epochs: float, *, retrain_last: bool = True, config: Any = None,
            device: str | torch.device = "cpu", **train: Any) -> dict[str, Any]:
    """Keyword arguments of :func:`prunekit.prune` for the prune -> retrain cascade (the provable-pruning seed's
    protocol, METHODS.md section 5): ``rounds`` pruning steps whose keep ratios form a geometric sequence
    (round ``k`` keeps ``(1 - p)^(k / rounds)`` of the base's cost, so the last one meets the target), each
    followed by ``epochs`` epochs of retraining on ``data`` (the training set; not the prune set), the optimizer
    carried across rounds (:class:`FineTuner`). ``retrain_last=False`` leaves the retraining after the last step
    to the caller (the benchmark's shared fine-tune). Works with any method: the method scores (and the
    sensitivities of SiPP / PFP are recomputed) on the retrained model each round.

    >>> kw = cascade(train_loader, rounds=4, epochs=2)  # doctest: +SKIP
    >>> prunekit.prune(model, "pfp", "flops=3", prune_set, **kw)  # doctest: +SKIP
    """
    if rounds < 1:
        raise PruningError(f"a cascade needs rounds >= 1, got {rounds}")
    if epochs < 0:
        raise PruningError(f"retraining epochs must be >= 0, got {epochs}")
    if data is None:
        raise PruningError("a cascade retrains between its rounds: pass the training data")
    tuner = FineTuner(data, config, epochs=epochs, device=device, **train)
    return {"rounds": int(rounds), "schedule": "geometric", "finetune": tuner, "finetune_last": bool(retrain_last)}


__all__ = [
    "SCHEDULES",
    "FineTuner",
    "cascade",
    "cumulative_fractions",
    "round_fractions",
    "slice_optimizer_state_",
    "target_fraction",
]
