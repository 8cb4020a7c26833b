"""Typed method options: every option of every method has a type, a default and one line of help.

A method declares its options as ``defaults`` (name -> default value). The option's type is the
type of its default (``bool``, ``int``, ``float``, ``str``); an option whose default is ``None``
or that takes a fixed set of values declares it in ``option_types`` (a :class:`OptionType`), and
``option_help`` gives its help line. Options shared by many methods (``samples``, ``seed``, ...)
take their type and help from :data:`COMMON` below, so a new method only describes what is new.

:func:`validate_options` checks a user's options against these types and converts what the
command line gives (``"512"`` -> 512, ``"true"`` -> True); an unknown or mistyped option raises
:class:`~prunekit.errors.PruningError` listing the valid options with their types.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prunekit.errors import PruningError


@dataclass(frozen=True)
class OptionType:
    """What an option accepts.

    ``kind``: ``"bool"``, ``"int"``, ``"float"``, ``"str"``, ``"floats"`` (a list of numbers) or
    ``"any"``; ``choices``: the allowed values (for ``str``); ``optional``: ``None`` is allowed;
    ``low`` / ``high``: inclusive bounds for numbers.
    """

    kind: str
    choices: tuple[Any, ...] | None = None
    optional: bool = False
    low: float | None = None
    high: float | None = None
    help: str = ""

    def describe(self) -> str:
        if self.choices is not None:
            text = "|".join(str(c) for c in self.choices)
        else:
            text = {"floats": "list of float"}.get(self.kind, self.kind)
            if self.low is not None and self.high is not None:
                text += f" in [{self.low:g}, {self.high:g}]"
            elif self.low is not None:
                text += f" >= {self.low:g}"
            elif self.high is not None:
                text += f" <= {self.high:g}"
        return text + (" or None" if self.optional else "")


def _t(kind: str, help: str, **kw: Any) -> OptionType:
    return OptionType(kind, help=help, **kw)


# Options shared by several methods: their type and help, unless a method says otherwise.
COMMON: dict[str, OptionType] = {
    "samples": _t("int", "prune-set examples the statistics are computed on", low=1),
    "seed": _t("int", "random seed (sampling, random scores)"),
    "batch_size": _t("int", "batch size of the statistics passes", low=1),
    "damping": _t("float", "damping added to curvature factors", low=0),
    "fisher": _t("str", "'true': labels sampled from the model's softmax; 'empirical': the data's labels",
                 choices=("true", "empirical")),
    "at": _t("str", "where the Taylor product is taken: the producers' outputs or the BatchNorm outputs",
             choices=("producer", "norm")),
    "k": _t("float", "keep fraction (id: per group, derived from the target if None; id_iter: per step)",
            optional=True, low=0, high=1),
    "criterion": _t("str", "error a step is chosen by: consumer outputs or the paper's activation error",
                    choices=("output", "paper")),
    "remeasure": _t("int", "rounds between which activations are re-measured (None: never)", optional=True,
                    low=1),
    "calibrate": _t("int", "prune examples used to calibrate the error gains (0: gains of 1)", low=0),
    "probe": _t("float", "fraction of a group's width the calibration cut simulates", low=0, high=1),
    "cache_mb": _t("float", "upper bound (MB) on the activation caches", low=0),
    "per_read_point": _t("bool", "one least-squares interpolation matrix per read point of a coupled group"),
    "group_error": _t("str", "how a coupled group's error proxy combines its read points",
                      choices=("sum", "stacked")),
    "tsqr_block": _t("str", "how TSQR reduces a block ('gram': Cholesky of the Gram matrix, 'qr': QR)",
                     choices=("gram", "qr")),
    "target_kind": _t("str", "cost a ratio= target reduces", choices=("flops", "params"), optional=True),
    "keep_ratio": _t("float", "fraction of the explained variance / energy kept (overrides the target)",
                     optional=True, low=0, high=1),
    "steps": _t("int", "outer steps (LC algorithm: L/C step pairs)", low=1),
    "mu0": _t("float", "initial penalty weight mu", low=0),
    "mu_growth": _t("float", "factor mu grows by per step", low=1),
    "lam": _t("float", "rank penalty lambda (None: found by bisection to meet the target)", optional=True, low=0),
    "l_steps": _t("int", "minibatches per L step", low=1),
    "lr": _t("float", "learning rate", low=0),
    "momentum": _t("float", "SGD momentum", low=0, high=1),
    "clip": _t("float", "gradient-norm clip", low=0),
    "imp_samples": _t("int", "training examples the importance statistics are averaged over", low=1),
    "temperature": _t("float", "logits are divided by this before the loss", low=0),
    "grasp_T": _t("float", "GraSP temperature of the Hessian-gradient product", low=0),
    "use_l2": _t("bool", "multiply the element-wise measure by |theta| (bias towards small magnitude)"),
    "use_init": _t("bool", "measure against the initial weights (|theta - theta0|)"),
    "keep_stem": _t("bool", "never prune the group fed by the first convolution"),
    "min_width": _t("float", "per-layer floor: every group keeps floor(min_width * width) + 1 channels",
                    low=0, high=1),
    "normalize": _t("str", "per-layer score normalisation before the global ranking",
                    choices=("l2", "max", "mean"), optional=True),
    "norm_fallback": _t("bool", "score groups without BatchNorm on their producers' weights instead of refusing"),
    "n_rounds": _t("int", "prune-and-train rounds", low=1),
    "prune_percent": _t("float", "fraction (or percentage < 100) of all scored filters removed", optional=True,
                        low=0, high=100),
    "thresholds": _t("floats", "cumulative prune fractions per round (override prune_percent, n_rounds)",
                     optional=True),
    "warmup_epochs": _t("int", "epochs of training before the first prune round", low=0),
    "preserve_moment": _t("bool", "keep the optimizer's momentum of surviving channels across rounds"),
    "alpha": _t("float", "EMA factor over tracked minibatches", low=0, high=1),
    "track_batches": _t("int", "minibatches the importance is tracked over (0: off)", low=0),
    "p": _t("int", "norm order", low=1),
    "group_reduction": _t("str", "how Torch-Pruning reduces importance over a group (its names: mean, sum, ...)"),
    "normalizer": _t("str", "Torch-Pruning's importance normaliser (its names: mean, max, sum, ...)", optional=True),
    "global_pruning": _t("bool", "Torch-Pruning: one global ranking (None: the engine's budget scope)",
                         optional=True),
    "max_pruning_ratio": _t("float", "Torch-Pruning: most of a layer that may be removed", low=0, high=1),
}


@dataclass(frozen=True)
class OptionSpec:
    """One option of one method, as `prunekit methods NAME` shows it."""

    name: str
    type: OptionType
    default: Any

    @property
    def help(self) -> str:
        return self.type.help

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type.describe(), "default": self.default, "help": self.help}


def _inferred(name: str, default: Any) -> OptionType:
    if name in COMMON:
        return COMMON[name]
    for py, kind in ((bool, "bool"), (int, "int"), (float, "float"), (str, "str")):
        if isinstance(default, py):
            return OptionType(kind)
    if isinstance(default, (list, tuple)):
        return OptionType("floats")
    return OptionType("any", optional=True)


def option_specs(cls: type) -> list[OptionSpec]:
    """The options of method class ``cls``: type (declared or inferred), default and help."""
    declared: Mapping[str, OptionType] = getattr(cls, "option_types", {}) or {}
    helps: Mapping[str, str] = getattr(cls, "option_help", {}) or {}
    out = []
    for name, default in getattr(cls, "defaults", {}).items():
        t = declared.get(name) or _inferred(name, default)
        if default is None and not t.optional:
            t = OptionType(t.kind, t.choices, True, t.low, t.high, t.help)
        if name in helps:
            t = OptionType(t.kind, t.choices, t.optional, t.low, t.high, helps[name])
        out.append(OptionSpec(name, t, default))
    return out


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _convert(value: Any, t: OptionType) -> Any:  # noqa: C901 - one branch per kind
    """``value`` as type ``t`` or ValueError."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if t.optional:
            return None
        raise ValueError("None is not allowed")
    if t.kind == "any":
        return value
    if t.kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError("not a boolean")
    if t.kind == "str":
        if t.choices is not None:
            if isinstance(value, bool):  # YAML's `true` for fisher=true
                value = str(value).lower()
            if value not in t.choices:
                raise ValueError(f"not one of {list(t.choices)}")
            return value
        if not isinstance(value, str):
            raise ValueError("not a string")
        return value
    if t.kind == "floats":
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ValueError("not a list of numbers")
        return [_number(v, "float", t) for v in value]
    return _number(value, t.kind, t)


def _number(value: Any, kind: str, t: OptionType) -> int | float:
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError("not a number") from None
    if not isinstance(value, (int, float)):
        raise ValueError("not a number")
    if math.isnan(value):
        raise ValueError("NaN is not allowed")
    if kind == "int":
        if math.isinf(value) or float(value) != int(value):
            raise ValueError("not an integer")
        value = int(value)
    if (t.low is not None and value < t.low) or (t.high is not None and value > t.high):
        raise ValueError(f"out of range {t.describe()}")
    return value


def validate_options(cls: type, method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` checked against ``cls``'s typed options, converted, and merged over the defaults."""
    specs = {s.name: s for s in option_specs(cls)}

    def valid() -> str:
        return ", ".join(f"{s.name} ({s.type.describe()}, default {s.default!r})" for s in specs.values()) or "none"

    unknown = sorted(set(options) - set(specs))
    if unknown:
        raise PruningError(f"method {method!r} has no option(s) {unknown}; valid options: {valid()}")
    out = {name: s.default for name, s in specs.items()}
    for name, value in options.items():
        try:
            out[name] = _convert(value, specs[name].type)
        except ValueError as e:
            raise PruningError(f"method {method!r}: option {name}={value!r} is invalid ({e}); {name} takes "
                               f"{specs[name].type.describe()} (default {specs[name].default!r}). Valid options: "
                               f"{valid()}") from None
    return out


__all__ = ["COMMON", "OptionSpec", "OptionType", "option_specs", "validate_options"]
