"""Helpers shared by the metrics modules: errors, eval-mode handling, example inputs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from prunekit.errors import PrunekitError

InputShape = Sequence[int] | torch.Tensor


class MetricsError(PrunekitError, ValueError):
    """A metric cannot be computed from the given model, data or arguments."""


def check_model(model: Any, what: str = "model") -> nn.Module:
    """Raise :class:`MetricsError` unless ``model`` is an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        raise MetricsError(f"{what} must be a torch.nn.Module, got {type(model).__name__}")
    return model


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's first parameter (or buffer); CPU/float32 if it has none."""
    device, dtype = torch.device("cpu"), torch.float32
    for t in list(model.parameters()) + list(model.buffers()):
        device = t.device
        if t.is_floating_point():
            return device, t.dtype
    return device, dtype


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode; restore every submodule's own ``training`` flag on exit.

    Flags are restored module by module (not with ``model.train(flag)``) so that mixed
    states, such as a training model with frozen BatchNorm layers, survive unchanged.
    """
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def example_input(model: nn.Module, input_shape: InputShape, batch_size: int = 1) -> torch.Tensor:
    """A batch of inputs for ``model``.

    ``input_shape`` is the shape of ONE example, e.g. ``(C, H, W)``, and yields a zero tensor
    of shape ``(batch_size, *input_shape)`` on the model's device with its floating dtype.
    A tensor is taken as a ready-made batch (its first dimension is the batch) and returned as is
    (moved to the model's device).
    """
    device, dtype = model_device_dtype(model)
    if isinstance(input_shape, torch.Tensor):
        if input_shape.dim() == 0:
            raise MetricsError("an example input tensor needs a batch dimension")
        return input_shape.to(device)
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise MetricsError(
            f"input_shape must be a sequence of positive ints such as (3, 32, 32), got {input_shape!r}"
        ) from None
    if any(isinstance(s, bool) for s in input_shape) or any(s <= 0 for s in shape):
        raise MetricsError(f"input_shape must contain positive ints only, got {input_shape!r}")
    if batch_size < 1:
        raise MetricsError(f"batch size must be >= 1, got {batch_size}")
    return torch.zeros((batch_size, *shape), device=device, dtype=dtype)


def batch_size_of(x: torch.Tensor) -> int:
    """Number of examples in an example-input batch."""
    return int(x.shape[0]) if x.dim() > 0 else 1
