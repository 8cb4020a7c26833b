"""Experiment files: YAML -> typed, validated :class:`Experiment` (pydantic v2).

An experiment names a model and a dataset, where the base model comes from (a
checkpoint, or a training spec when the checkpoint is absent), the methods and
the target grid, the seeds, the fine-tuning budget shared by every method, the
prune-set size and how to measure. ``--set key=value`` overrides (dotted keys,
YAML-parsed values) are applied to the raw document before validation, and the
resolved configuration is written next to the results.

Minimal example::

    name: lenet5-demo
    model: lenet5
    dataset: fashion-mnist
    base:
      checkpoint: benchmarks/checkpoints/lenet5-fashion-mnist.pt   # used when it exists
      train: {epochs: 2, lr: 0.05}                                  # else trained once and cached
    methods: [l1, {name: random, label: random-0}]
    targets: {weight: ["params=2", "params=4"], channel: ["flops=1.5", "flops=2"]}
    seeds: [0]
    finetune: {epochs: 0.2, lr: 0.01}

An optional ``prune_train`` section (:class:`PruneTrainSpec`) turns every cell into prune-and-train (the
gradient-flow framework): ``prune_train: {from: init, rounds: 3, epochs_per_round: 0.2}`` with ``ratio=P``
targets (fraction of all filters removed); the ``finetune`` section is then the final training.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from prunekit.errors import ConfigError, PrunekitError

GRANULARITIES = ("weight", "channel", "lowrank")


class _Strict(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------- sections
class TrainSpec(_Strict):
    """A training run: base-model training or the (shared) fine-tuning budget.

    ``epochs`` may be fractional (0.2 = a fifth of an epoch); ``epochs: 0`` disables fine-tuning.
    ``augment``: None uses the dataset's default augmentation. ``seed`` seeds base-model training;
    fine-tuning in a cell uses the cell's seed instead.
    """

    epochs: float = Field(1.0, ge=0)
    lr: float = Field(0.01, gt=0)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: float = Field(0.9, ge=0)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "step", "onecycle", "constant"] = "cosine"
    milestones: list[float] = Field(default_factory=lambda: [0.5, 0.75])
    gamma: float = 0.1
    warmup_epochs: float = Field(0.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    batch_size: int = Field(128, ge=1)
    augment: bool | None = None
    channels_last: bool = False
    amp: bool = False
    seed: int = 0


class BaseSpec(_Strict):
    """Where the base (dense) model comes from.

    ``checkpoint`` is used when the file exists; otherwise the model is trained with ``train``
    (once: it is cached by configuration hash in ``cache_dir``, default ``OUT/base``). Methods that need a
    parameter trajectory (Koopman) use ``trajectory``, else the one recorded beside the checkpoint; a base
    trained here records its last epoch when the experiment has such a method. A short ``train`` from
    initialisation (``epochs: 2``) followed by the shared fine-tuning is *early pruning*: every cell prunes
    the network after epoch 2 and training continues for the fine-tuning budget.
    """

    checkpoint: str | None = None
    train: TrainSpec | None = None
    cache_dir: str | None = None
    # Koopman methods: the parameter trajectory of the base model (a folder written by
    # `prunekit train --record-trajectory`); default: the one beside the checkpoint, or, for a base
    # trained here, recorded over its last epoch
    trajectory: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> BaseSpec:
        if self.checkpoint is None and self.train is None:
            raise ValueError("give base.checkpoint (a prunekit checkpoint) or base.train (a training spec), or both")
        if self.train is not None and self.train.epochs <= 0:
            raise ValueError("base.train.epochs must be > 0")
        return self


class ThenSpec(_Strict):
    """A method applied to the result of the previous one (composition), at its own target, which is
    relative to the model it receives (``params=1.3``: 1.3x fewer parameters than after the previous step)."""

    name: str
    target: str
    options: dict[str, Any] = Field(default_factory=dict)


class MethodSpec(_Strict):
    """One method of the comparison: registered name, its options, an optional display label and targets.

    ``then`` composes methods: each cell prunes with this method at the cell's target, then with every
    ``then`` step in turn (e.g. ``{name: id_iter, label: id_iter+pca, then: [{name: pca, target: params=1.5}]}``).
    The row reports the final model; list the first method alone as well to have both steps in the table.
    """

    name: str
    options: dict[str, Any] = Field(default_factory=dict)
    label: str | None = None
    targets: list[str] | None = None  # overrides the grid of the method's granularity
    then: list[ThenSpec] = Field(default_factory=list)

    @property
    def display(self) -> str:
        return self.label or self.name


class TargetGrid(_Strict):
    """Targets per granularity (weight methods: compression grid; channel / low-rank: FLOPs grid)."""

    weight: list[str] = Field(default_factory=lambda: ["params=2", "params=4", "params=8", "params=16", "params=32"])
    channel: list[str] = Field(default_factory=lambda: ["flops=1.5", "flops=2", "flops=3", "flops=4"])
    lowrank: list[str] = Field(default_factory=lambda: ["flops=1.5", "flops=2", "flops=3", "flops=4"])

    def for_granularity(self, granularity: str) -> list[str]:
        return list(getattr(self, granularity))


class PruneSpec(_Strict):
    """Engine options shared by every cell (None: the engine's default)."""

    mode: Literal["physical", "masked"] | None = None
    scope: Literal["global", "layerwise"] | None = None
    # channel multiple: an int (1: none), "runtime" (the latency-aware search's multiples; also rounds the
    # gradient-flow global count) or None (the engine default, 8/16/32 by width)
    round_to: Annotated[int, Field(ge=1)] | Literal["runtime"] | None = None
    rounds: int | None = Field(None, ge=1)
    floor: float | None = Field(None, ge=0, lt=1)  # every layer keeps at least this fraction (engine default 0.05)
    cap: float | None = Field(None, gt=0, le=1)  # at most this fraction of a layer is removed
    # latency-aware channel ranking: "proxy" (engine default), "measured" (time layers on this machine in eager
    # PyTorch), "onnxruntime" (time them in ONNX Runtime), "off"
    latency_aware: Literal["proxy", "measured", "onnxruntime", "off"] | None = None
    prune_set: int = Field(1024, ge=0)  # examples held out of the training split for the methods (per seed)
    batch_size: int = Field(128, ge=1)
    # the prune -> retrain cascade: with rounds >= 2, retrain this many epochs (the finetune section's settings,
    # on the training set) after every round but the last; after the last the finetune section runs as usual
    round_epochs: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _cascade_rounds(self) -> PruneSpec:
        if self.round_epochs and (self.rounds or 1) < 2:
            raise ValueError("prune.round_epochs retrains between rounds: set prune.rounds >= 2")
        return self


class PruneTrainSpec(_Strict):
    """Prune-and-train cells (the gradient-flow paper's framework, :func:`prunekit.prune_train.prune_and_train`).

    With this section every cell, instead of one-shot pruning, starts from ``start`` (``init``: a fresh random
    initialisation seeded by the cell's seed; ``base``: the base model) and reaches its target -- ``ratio=P``,
    the fraction P of all scored filters, one global ranking -- over ``rounds`` rounds of ``epochs_per_round``
    training epochs (SGD ``lr`` / ``momentum`` / ``weight_decay``, constant lr) followed by scoring and physical
    removal of ``r_k = P / (k P + n (1 - P))`` of the filters left (or the cumulative ``thresholds``). The final
    training is the experiment's ``finetune`` section (the budget shared by all methods). ``rounds: 1,
    epochs_per_round: 0, from: base`` is one-shot pruning of the base model to a global filter fraction.
    The key ``from`` is accepted for ``start``.
    """

    start: Literal["init", "base"] = "init"
    rounds: int = Field(1, ge=1)
    epochs_per_round: float = Field(1.0, ge=0)
    warmup_epochs: float = Field(0.0, ge=0)
    thresholds: list[float] | None = None
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(128, ge=1)
    augment: bool | None = None
    preserve_moment: bool | None = None  # None: the method's option
    train_temperature: float = Field(1.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _from_alias(cls, v: Any) -> Any:
        if isinstance(v, dict) and "from" in v:
            v = dict(v)
            if "start" in v:
                raise ValueError("give prune_train.from or prune_train.start, not both")
            v["start"] = v.pop("from")
        return v


class MeasureSpec(_Strict):
    """How results are measured."""

    eval_subset: int | None = Field(None, ge=1)  # evaluate on this many test examples (stratified); None: all
    eval_batch_size: int = Field(512, ge=1)
    latency: bool = True
    latency_batch_sizes: list[int] = Field(default_factory=lambda: [1, 64])
    latency_warmup: int = Field(5, ge=0)
    latency_repeats: int = Field(20, ge=1)
    latency_budget_s: float = Field(10.0, gt=0)  # per batch size
    threads: int | None = Field(None, ge=1)  # torch threads for the latency measurement
    gpu_latency: bool = True  # also time on the GPU when the run device is CUDA
    # deployment runtimes timed besides eager PyTorch (skipped, with the reason, when not installed)
    runtimes: list[Literal["onnxruntime", "torchscript"]] = Field(default_factory=lambda: ["onnxruntime"])
    rebase_latency: bool = True  # time the base model again in every cell, right before the pruned one
    epoch_time: bool = False  # time one training epoch of the base model (finetune spec) in the run, for ratios

    @field_validator("latency_batch_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(b < 1 for b in v):
            raise ValueError("latency_batch_sizes must be a non-empty list of positive ints")
        return v


class Experiment(_Strict):
    """A whole benchmark: model x dataset x methods x targets x seeds."""

    name: str = "experiment"
    description: str = ""
    model: str
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    dataset: str
    dataset_kwargs: dict[str, Any] = Field(default_factory=dict)  # e.g. synthetic: {n: 256, image_size: 16}
    data_dir: str | None = None
    download: bool = True
    base: BaseSpec
    methods: Literal["all"] | list[MethodSpec] = "all"
    # with `methods: all`: per-method options / targets / labels for some of the registered methods
    # (each entry replaces that method's default entry; e.g. a reachable target grid for one family);
    # with a list of methods, the list's own entries are used as given
    method_overrides: list[MethodSpec] = Field(default_factory=list)
    exclude_methods: list[str] = Field(default_factory=list)
    targets: TargetGrid = Field(default_factory=TargetGrid)
    seeds: list[int] = Field(default_factory=lambda: [0])
    finetune: TrainSpec = Field(default_factory=TrainSpec)
    prune: PruneSpec = Field(default_factory=PruneSpec)
    measure: MeasureSpec = Field(default_factory=MeasureSpec)
    prune_train: PruneTrainSpec | None = None  # prune-and-train cells instead of one-shot pruning
    device: str = "auto"
    threads: int | None = Field(None, ge=1)

    # -- field validation ---------------------------------------------------------------------------
    @field_validator("methods", mode="before")
    @classmethod
    def _methods_shorthand(cls, v: Any) -> Any:
        if isinstance(v, str) and v != "all":
            v = [s.strip() for s in v.split(",") if s.strip()]
        if isinstance(v, list):
            return [{"name": m} if isinstance(m, str) else m for m in v]
        return v

    @field_validator("targets", mode="before")
    @classmethod
    def _targets_shorthand(cls, v: Any) -> Any:
        if isinstance(v, (list, str)):  # one list for every granularity
            items = [v] if isinstance(v, str) else v
            return {g: list(items) for g in GRANULARITIES}
        return v

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds_shorthand(cls, v: Any) -> Any:
        return [v] if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("seeds")
    @classmethod
    def _seeds_unique(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("seeds must not be empty")
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {v}")
        return v

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        from prunekit.models import list_models

        names = list_models()
        if v not in names:
            raise ValueError(f"unknown model {v!r}; valid models: {', '.join(names)}")
        return v

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        from prunekit.data.info import canonical_name

        try:
            return canonical_name(v)
        except PrunekitError as e:
            raise ValueError(str(e)) from None

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu") and not v.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {v!r}")
        return v

    @model_validator(mode="after")
    def _check_methods_and_targets(self) -> Experiment:
        from prunekit.methods import list_methods
        from prunekit.methods.base import Target

        valid = list_methods()
        for i, name in enumerate(self.exclude_methods):
            if name not in valid:
                raise ValueError(f"exclude_methods[{i}]: unknown method {name!r}; valid methods: {', '.join(valid)}")
        for g in GRANULARITIES:
            for j, t in enumerate(self.targets.for_granularity(g)):
                _check_target(Target, t, f"targets.{g}[{j}]")
        if self.prune_train is not None:
            self._check_prune_train(Target)
        for i, m in enumerate(self.method_overrides):
            _check_method_spec(m, f"method_overrides[{i}]", valid, Target)
            if [o.name for o in self.method_overrides].count(m.name) > 1:
                raise ValueError(f"method_overrides[{i}]: {m.name!r} is overridden more than once")
        if self.methods == "all":
            return self
        seen: dict[tuple[str, str], int] = {}
        labels: dict[str, int] = {}
        for i, m in enumerate(self.methods):
            _check_method_spec(m, f"methods[{i}]", valid, Target)
            for j, step in enumerate(m.then):
                where = f"methods[{i}].then[{j}]"
                _check_name_options(step.name, step.options, where, valid)
                _check_target(Target, step.target, f"{where}.target")
            key = (m.name, json.dumps([m.options, [t.model_dump() for t in m.then]], sort_keys=True, default=str))
            if key in seen:
                raise ValueError(f"methods[{i}] repeats methods[{seen[key]}] ({m.name} with the same options)")
            seen[key] = i
            if m.display in labels:
                raise ValueError(f"methods[{i}]: label {m.display!r} already used by methods[{labels[m.display]}]; "
                                 "give one of them a distinct `label`")
            labels[m.display] = i
        return self

    def _check_prune_train(self, target_cls: Any) -> None:
        """Prune-and-train cells need channel methods and ``ratio=P`` targets (fraction of filters removed)."""
        from prunekit.methods import get_method_info

        specs = [] if self.methods == "all" else self.method_specs()
        for i, m in enumerate(specs):
            if get_method_info(m.name).granularity != "channel":
                raise ValueError(f"methods[{i}]: prune_train needs channel methods; {m.name!r} is "
                                 f"{get_method_info(m.name).granularity}")
        grids = [("targets.channel", self.targets.channel)] + [
            (f"methods[{i}].targets", m.targets) for i, m in enumerate(specs) if m.targets]
        for where, items in grids:
            for j, t in enumerate(items):
                if target_cls.parse(t).kind != "ratio":
                    raise ValueError(f"{where}[{j}]: prune_train removes a fraction of the filters: use ratio=P, "
                                     f"not {t!r}")

    # -- derived ------------------------------------------------------------------------------------
    def method_specs(self) -> list[MethodSpec]:
        """The methods of the comparison (``all`` expanded to every registered method), minus exclusions."""
        from prunekit.methods import list_methods

        if self.methods == "all":
            over = {m.name: m for m in self.method_overrides}
            specs = [over.get(n, MethodSpec(name=n)) for n in list_methods()]
        else:
            specs = list(self.methods)
        return [s for s in specs if s.name not in self.exclude_methods]

    def targets_for(self, spec: MethodSpec) -> list[str]:
        from prunekit.methods import get_method_info
        from prunekit.methods.base import Target

        raw = spec.targets if spec.targets is not None else self.targets.for_granularity(
            get_method_info(spec.name).granularity)
        out: list[str] = []
        for t in raw:
            s = str(Target.parse(t))
            if s not in out:
                out.append(s)
        return out

    def relevant(self) -> dict[str, Any]:
        """The part of the configuration every cell's result depends on (besides method, target, seed)."""
        d = self.model_dump(mode="json")
        base = d["base"]
        return {
            "model": d["model"], "model_kwargs": d["model_kwargs"], "dataset": d["dataset"],
            "dataset_kwargs": d["dataset_kwargs"],
            "base": {"checkpoint": base["checkpoint"], "train": base["train"]},
            "finetune": d["finetune"], "eval_subset": d["measure"]["eval_subset"],
            "prune": {k: v for k, v in d["prune"].items() if k != "round_epochs" or v is not None},
            # only when set, so that the hashes (cell ids) of one-shot experiments do not change
            **({"prune_train": d["prune_train"]} if d.get("prune_train") is not None else {}),
        }

    def config_hash(self) -> str:
        return stable_hash(self.relevant())

    def cell_relevant(self) -> dict[str, Any]:
        """What every cell's result depends on besides its method, target, seed *and the base model*: like
        :meth:`relevant`, without where the base comes from (checkpoint path, training spec) -- a cell is bound
        to the base model by its content fingerprint instead, so a moved checkpoint keeps its results and a
        replaced one at the same path does not."""
        d = self.relevant()
        d.pop("base")
        if self.base.trajectory:
            d["base_trajectory"] = self.base.trajectory
        return d

    def cell_config(self, spec: MethodSpec, target: str, seed: int) -> dict[str, Any]:
        """The resolved configuration of one cell (without the base model): hashed into its config hash."""
        return {"experiment": self.cell_relevant(), "method": spec.name, "options": dict(spec.options),
                "target": target, "seed": seed, "then": [t.model_dump(mode="json") for t in spec.then]}


def _check_name_options(name: str, options: dict[str, Any], where: str, valid: Sequence[str]) -> None:
    """A registered method name, and options that method accepts (checked when it is available)."""
    from prunekit.methods import create_method, get_method_info

    if name not in valid:
        raise ValueError(f"{where}.name: unknown method {name!r}; valid methods: {', '.join(valid)}")
    if get_method_info(name).available():
        try:
            create_method(name, **options)
        except PrunekitError as e:
            raise ValueError(f"{where}.options: {e}") from None


def _check_method_spec(m: MethodSpec, where: str, valid: Sequence[str], target_cls: Any) -> None:
    """A method entry: known name, options the method accepts, valid targets."""
    _check_name_options(m.name, m.options, where, valid)
    for j, t in enumerate(m.targets or []):
        _check_target(target_cls, t, f"{where}.targets[{j}]")


def _check_target(target_cls: Any, spec: str, where: str) -> None:
    try:
        target_cls.parse(spec)
    except PrunekitError as e:
        raise ValueError(f"{where}: {e}") from None


def stable_hash(obj: Any, n: int = 12) -> str:
    """A short hex digest of a JSON-serialisable object (key order independent)."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha1(blob.encode()).hexdigest()[:n]


# --------------------------------------------------------------------------------------------- loading
def _preset_root() -> Any:
    return resources.files("prunekit.bench") / "presets"


def list_presets() -> list[str]:
    """Names of the bundled presets (``prunekit bench NAME``)."""
    root = _preset_root()
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def read_experiment_file(name_or_path: str | Path) -> tuple[dict[str, Any], str]:
    """The raw YAML document of a preset name or an experiment file, and where it came from."""
    p = Path(name_or_path)
    if p.is_file():
        try:
            text, source = p.read_text(encoding="utf-8"), str(p)
        except UnicodeDecodeError as e:
            raise ConfigError(f"experiment file {str(p)!r} is not UTF-8 text (byte {e.start}: "
                              f"{e.object[e.start:e.start + 1]!r}); save it as UTF-8") from None
        except OSError as e:
            raise ConfigError(f"experiment file {str(p)!r} cannot be read: {e.strerror or e}") from None
    elif p.suffix in (".yaml", ".yml") or p.parent != Path("."):
        raise ConfigError(f"experiment file {str(p)!r} does not exist (bundled presets: {', '.join(list_presets())})")
    else:
        res = _preset_root() / f"{p.name}.yaml"
        if not res.is_file():
            raise ConfigError(f"unknown preset {str(name_or_path)!r} (and no such file); valid presets: "
                              f"{', '.join(list_presets())}")
        text, source = res.read_text(), f"preset:{p.name}"
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: an experiment file must be a YAML mapping, got {type(doc).__name__}")
    return doc, source


def apply_overrides(doc: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides (dotted keys; list items by index; values parsed as YAML)."""
    import copy

    doc = copy.deepcopy(doc)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value (e.g. finetune.epochs=0.5), got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        parts = key.split(".")
        node: Any = doc
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {key}: {where!r} indexes a list of {len(node)} item(s)")
                idx = int(part)
                if last:
                    node[idx] = value
                else:
                    if isinstance(node[idx], str):  # a method given by name: expand to a mapping
                        node[idx] = {"name": node[idx]}
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if not isinstance(node.get(part), (dict, list)):
                        node[part] = {}
                    node = node[part]
            else:
                raise ConfigError(f"--set {key}: {'.'.join(parts[:depth])!r} is a {type(node).__name__}, "
                                  "not a mapping")
    return doc


def _valid_keys(model: type[BaseModel], loc: Sequence[Any]) -> list[str] | None:
    """The field names of the config section at ``loc`` (for "unknown key" messages)."""
    cls: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or cls is None:
            continue
        field = cls.model_fields.get(part) if hasattr(cls, "model_fields") else None
        if field is None:
            return None
        cls = _model_in(field.annotation)
    return sorted(cls.model_fields) if cls is not None and hasattr(cls, "model_fields") else None


def _model_in(annotation: Any) -> type[BaseModel] | None:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _format_loc(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith(("literal[", "function-", "list[", "Literal[")):
            continue  # union branch names pydantic inserts
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def validation_message(err: ValidationError, source: str) -> str:
    """Turn a pydantic error into one line per problem naming the key and the valid choices."""
    lines = []
    seen = set()
    for e in err.errors():
        loc = [p for p in e["loc"] if not (isinstance(p, str) and p.startswith(("literal[", "list[", "function-")))]
        key = _format_loc(loc)
        if e["type"] == "extra_forbidden":
            valid = _valid_keys(Experiment, loc)
            msg = f"unknown key {key!r}" + (f"; valid keys: {', '.join(valid)}" if valid else "")
        elif e["type"] == "literal_error":
            msg = f"{key}: {e['msg'].replace('Input should be', 'must be')} (got {e.get('input')!r})"
        elif e["type"] == "missing":
            msg = f"missing required key {key!r}"
        else:
            text = e["msg"].removeprefix("Value error, ")
            msg = f"{key}: {text}" if key != "(top level)" else text
            if "input" in e and e["type"] not in ("value_error", "assertion_error"):
                msg += f" (got {e['input']!r})"
        if msg not in seen:
            seen.add(msg)
            lines.append(msg)
    # a union ("all" or a list) reports the same mistake twice; keep it short
    return f"{source}: invalid experiment:\n  " + "\n  ".join(lines)


def load_experiment(name_or_path: str | Path | dict[str, Any], overrides: Sequence[str] = ()) -> Experiment:
    """Load a preset name, an experiment file or a raw mapping, apply ``--set`` overrides and validate.

    Raises :class:`~prunekit.errors.ConfigError` naming the offending key and the valid choices.
    """
    if isinstance(name_or_path, dict):
        doc, source = name_or_path, "experiment"
    else:
        doc, source = read_experiment_file(name_or_path)
    doc = apply_overrides(doc, overrides)
    try:
        return Experiment.model_validate(doc)
    except ValidationError as e:
        raise ConfigError(validation_message(e, source)) from None


def dump_experiment(exp: Experiment, path: Path, header: str = "") -> None:
    """Write the resolved configuration (``methods: all`` expanded) as YAML, atomically (usual permissions)."""
    from prunekit.io import atomic_write_text

    d = exp.model_dump(mode="json")
    d["methods"] = [s.model_dump(mode="json", exclude_defaults=True) for s in exp.method_specs()]
    d["exclude_methods"] = []
    text = (header + "\n" if header else "") + yaml.safe_dump(d, sort_keys=False, default_flow_style=None)
    atomic_write_text(path, text)


__all__ = ["BaseSpec", "Experiment", "MeasureSpec", "MethodSpec", "PruneSpec", "PruneTrainSpec", "TargetGrid",
           "ThenSpec", "TrainSpec",
           "apply_overrides", "dump_experiment", "list_presets", "load_experiment", "read_experiment_file",
           "stable_hash"]
