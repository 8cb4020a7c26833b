"""Example inputs and outputs of arbitrary models: one tensor, several positional tensors, keyword inputs;
outputs that are a tensor, a tuple / list, a dict, a dataclass or a Hugging Face ``ModelOutput``.

:class:`ExampleInputs` is what the engine traces and counts with when a model does not take one image
tensor. It is a ``tuple`` -- the per-example shape of its first tensor -- so code that only needs an input
shape (``torch.zeros(1, *shape)``) keeps working for single-tensor models, and it carries the real inputs
(``args`` / ``kwargs``, batch first) for everything that runs the model: the channel graph's trace, the FLOP
counter and the allocators' checks (:func:`run_model`, :func:`example_for`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from prunekit.errors import PruningError


class ExampleInputs(tuple):
    """Inputs of a model: ``model(*args, **kwargs)``; every tensor has the batch first.

    As a tuple it is the per-example shape of the first tensor (for code that needs only a shape).
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def __new__(cls, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None) -> ExampleInputs:
        args, kwargs = tuple(args), dict(kwargs or {})
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        if not tensors:
            raise PruningError("example_inputs must hold at least one tensor (a tensor, a tuple of tensors or a "
                               "dict of keyword tensors, batch first)")
        if any(t.dim() == 0 for t in tensors):
            raise PruningError("every example input tensor needs a batch dimension (batch first)")
        self = super().__new__(cls, tuple(int(s) for s in tensors[0].shape[1:]))
        self.args, self.kwargs = args, kwargs
        return self

    def __reduce__(self) -> Any:
        return (ExampleInputs, (self.args, self.kwargs))

    def __deepcopy__(self, memo: dict) -> ExampleInputs:
        return ExampleInputs(tuple(_map(a, lambda t: t.clone()) for a in self.args),
                             {k: _map(v, lambda t: t.clone()) for k, v in self.kwargs.items()})

    def __repr__(self) -> str:
        def desc(v: Any) -> str:
            return f"Tensor{tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__

        parts = [desc(a) for a in self.args] + [f"{k}={desc(v)}" for k, v in self.kwargs.items()]
        return f"ExampleInputs({', '.join(parts)})"

    @property
    def batch_size(self) -> int:
        return int(self._first.shape[0])

    @property
    def _first(self) -> torch.Tensor:
        return next(t for t in (*self.args, *self.kwargs.values()) if isinstance(t, torch.Tensor))

    # batch-like behaviour for methods written for one tensor: ``len(x)`` is the batch size, ``x[:n]``
    # the first n examples (``x[idx]`` those of an index tensor), ``x.shape`` / ``x.device`` those of the first tensor
    def __len__(self) -> int:
        return self.batch_size

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, (slice, torch.Tensor)):  # a slice or an index tensor of examples
            return ExampleInputs(tuple(_map(a, lambda t: t[i]) for a in self.args),
                                 {k: _map(v, lambda t: t[i]) for k, v in self.kwargs.items()})
        return tuple.__getitem__(self, i)

    def __iter__(self) -> Any:
        return tuple.__iter__(self)

    @property
    def shape(self) -> torch.Size:
        return self._first.shape

    @property
    def device(self) -> torch.device:
        return self._first.device

    def first(self, n: int = 1) -> ExampleInputs:
        """The first ``n`` examples (every tensor sliced along its batch dimension)."""
        return ExampleInputs(tuple(_map(a, lambda t: t[:n]) for a in self.args),
                             {k: _map(v, lambda t: t[:n]) for k, v in self.kwargs.items()})

    def split(self, size: int) -> tuple[ExampleInputs, ...]:
        """Consecutive batches of at most ``size`` examples (as ``torch.Tensor.split``)."""
        size = max(1, int(size))
        return tuple(self[i:i + size] for i in range(0, self.batch_size, size))

    def tensors(self) -> list[torch.Tensor]:
        """Every input tensor, positional first, then keyword (nested tuples / dicts flattened)."""
        return [t for v in (*self.args, *self.kwargs.values()) for t in flatten_outputs(v)]

    def to(self, device: torch.device | str) -> ExampleInputs:
        return ExampleInputs(tuple(_map(a, lambda t: t.to(device)) for a in self.args),
                             {k: _map(v, lambda t: t.to(device)) for k, v in self.kwargs.items()})

    def __call__(self, model: nn.Module) -> Any:
        return model(*self.args, **self.kwargs)


@contextlib.contextmanager
def accepting_examples(model: nn.Module) -> Iterator[nn.Module]:
    """While active, ``model(x)`` with ``x`` an :class:`ExampleInputs` runs ``model(*x.args, **x.kwargs)``:
    methods written for one input tensor then work on models with several / keyword inputs. The model's
    class is swapped for a subclass with that forward and restored on exit (paths, hooks, parameters
    are untouched)."""
    cls = type(model)
    orig = cls.forward

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and not kwargs and isinstance(args[0], ExampleInputs):
            return orig(self, *args[0].args, **args[0].kwargs)
        return orig(self, *args, **kwargs)

    model.__class__ = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
    try:
        yield model
    finally:
        if type(model).__bases__ == (cls,):
            model.__class__ = cls


def _map(v: Any, fn: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return fn(v)
    if isinstance(v, (tuple, list)):
        return type(v)(_map(x, fn) for x in v)
    if isinstance(v, dict):
        return {k: _map(x, fn) for k, x in v.items()}
    return v


def _cat(parts: Sequence[Any]) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(parts))
    if isinstance(first, (tuple, list)):
        return type(first)(_cat([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _cat([p[k] for p in parts]) for k in first}
    return first  # a non-tensor argument (a flag, a scale): the same in every batch


def cat_inputs(xs: Sequence[Any]) -> Any:
    """Batches of model inputs joined along the batch dimension: tensors with ``torch.cat``; batches of several
    / keyword inputs (:class:`ExampleInputs`, tuples, dicts) input by input, as one :class:`ExampleInputs`."""
    if not xs:
        raise PruningError("no input batches to concatenate")
    if all(isinstance(x, torch.Tensor) for x in xs):
        return torch.cat(list(xs))
    exs = [as_example_inputs(x) for x in xs]
    if len({(len(e.args), tuple(e.kwargs)) for e in exs}) != 1:
        raise PruningError("the input batches do not all hold the same inputs: they cannot be concatenated")
    return ExampleInputs(_cat([e.args for e in exs]), _cat([e.kwargs for e in exs]))


def input_tensors(x: Any) -> list[torch.Tensor]:
    """Every tensor of a batch of model inputs (one tensor, :class:`ExampleInputs`, a tuple or a dict)."""
    if isinstance(x, ExampleInputs):
        return x.tensors()
    return flatten_outputs(x)


def primary_output(out: Any) -> torch.Tensor:
    """The output a loss or a logit statistic is taken of: the output itself when it is a tensor, else its
    ``logits`` entry (Hugging Face ``ModelOutput``, dicts, dataclasses) if it has one, else its first tensor
    (the first head of a tuple of heads)."""
    if isinstance(out, torch.Tensor):
        return out
    named = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(named, torch.Tensor):
        return named
    tensors = flatten_outputs(out)
    if not tensors:
        raise PruningError(f"the model returned {type(out).__name__} without a tensor: there is no output to "
                           "take a loss or logits of")
    return tensors[0]


def as_example_inputs(x: Any) -> ExampleInputs:
    """``x`` as :class:`ExampleInputs`: a tensor (one positional input), a tuple / list of inputs (positional)
    or a dict (keyword inputs); every tensor batch first."""
    if isinstance(x, ExampleInputs):
        return x
    if isinstance(x, torch.Tensor):
        return ExampleInputs((x,))
    if isinstance(x, Mapping):
        return ExampleInputs((), dict(x))
    if isinstance(x, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in x):
        return ExampleInputs(tuple(x))
    raise PruningError(f"example_inputs must be a tensor, a tuple of tensors or a dict of keyword tensors, got "
                       f"{type(x).__name__}")


def is_example(x: Any) -> bool:
    """Whether ``x`` is a ready example (tensor, tuple / list / dict of tensors), not a shape."""
    if isinstance(x, (torch.Tensor, ExampleInputs, Mapping)):
        return True
    return isinstance(x, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in x)


def run_model(model: nn.Module, x: Any) -> Any:
    """``model`` called on ``x``: :class:`ExampleInputs` are unpacked, anything else is one argument."""
    if isinstance(x, ExampleInputs):
        return x(model)
    return model(x)


def example_for(model: nn.Module, spec: Any, batch: int = 1) -> Any:
    """A batch of ``batch`` example(s) on the model's device: ``spec`` is :class:`ExampleInputs` (sliced),
    a tensor batch (sliced) or a per-example shape (random normal floats)."""
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    if isinstance(spec, ExampleInputs):
        return spec.first(batch).to(dev)
    if isinstance(spec, torch.Tensor):
        return spec[:batch].to(dev)
    return torch.randn((batch, *(int(s) for s in spec)), device=dev)


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """Every tensor of a model output, in a fixed order: a tensor, tuples / lists, dicts (including Hugging
    Face ``ModelOutput``), dataclasses and objects with ``to_tuple()``; other values are dropped."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in flatten_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten_outputs(v)]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [t for f in dataclasses.fields(out) for t in flatten_outputs(getattr(out, f.name))]
    to_tuple = getattr(out, "to_tuple", None)
    if callable(to_tuple):
        return flatten_outputs(to_tuple())
    return []


def output_names(out: Any, prefix: str = "output") -> list[str]:
    """Names of the tensors :func:`flatten_outputs` returns (``output[0]``, ``output['logits']``, ...)."""
    if isinstance(out, torch.Tensor):
        return [prefix]
    if isinstance(out, Mapping):
        return [n for k, v in out.items() for n in output_names(v, f"{prefix}[{k!r}]")]
    if isinstance(out, (tuple, list)):
        return [n for i, v in enumerate(out) for n in output_names(v, f"{prefix}[{i}]")]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [n for f in dataclasses.fields(out) for n in output_names(getattr(out, f.name), f"{prefix}.{f.name}")]
    to_tuple = getattr(out, "to_tuple", None)
    if callable(to_tuple):
        return output_names(to_tuple(), prefix)
    return []


def max_output_difference(a: Any, b: Any) -> float:
    """The largest element-wise ``|a - b|`` over every output tensor of two calls of (pruned variants of) one
    model; raises :class:`PruningError` when their structure or shapes differ."""
    ta, tb = flatten_outputs(a), flatten_outputs(b)
    names = output_names(a)
    if len(ta) != len(tb):
        raise PruningError(f"the outputs differ in structure: {len(ta)} tensors against {len(tb)}")
    worst = 0.0
    for n, x, y in zip(names, ta, tb):
        if x.shape != y.shape:
            raise PruningError(f"{n} has shape {tuple(x.shape)} in one model and {tuple(y.shape)} in the other")
        if x.is_floating_point():
            worst = max(worst, float((x.detach() - y.detach()).abs().max()) if x.numel() else 0.0)
        elif not torch.equal(x, y):
            worst = float("inf")
    return worst


__all__ = [
    "ExampleInputs",
    "accepting_examples",
    "as_example_inputs",
    "cat_inputs",
    "example_for",
    "flatten_outputs",
    "input_tensors",
    "is_example",
    "max_output_difference",
    "output_names",
    "primary_output",
    "run_model",
]
