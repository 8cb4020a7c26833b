"""One-call summary of a model: accuracy, size, FLOPs and latency."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from prunekit.metrics._common import InputShape, MetricsError, check_model
from prunekit.metrics.accuracy import Device, evaluate
from prunekit.metrics.flops import count_flops, effective_flops
from prunekit.metrics.latency import measure_latency
from prunekit.metrics.size import count_params


def model_summary(
    model: nn.Module,
    input_shape: InputShape,
    loader: Iterable[Any] | None = None,
    reference: nn.Module | torch.Tensor | None = None,
    latency: bool = True,
    *,
    num_classes: int | None = None,
    device: Device = "cpu",
    **latency_kw: Any,
) -> dict[str, Any]:
    """Collect the standard metrics of ``model`` in one dict.

    Keys: ``"params"``, ``"nonzero_params"`` (:func:`count_params`), ``"flops"``
    (:func:`count_flops`), ``"effective_flops"`` (:func:`effective_flops`); with a ``loader``
    also ``"top1"``, ``"top5"``, ``"per_class"`` and ``"n"`` (:func:`evaluate`), and with a
    ``reference`` (model or precomputed predictions) ``"agreement"`` and
    ``"agreement_per_class"``; with ``latency=True`` ``"latency_ms"``, the dict of
    :func:`measure_latency` (``latency_kw`` are passed on to it). Keys that do not apply are absent.
    """
    check_model(model)
    if reference is not None and loader is None:
        raise MetricsError("a reference for agreement needs a loader to evaluate on")
    if latency_kw and not latency:
        raise MetricsError(f"latency options {sorted(latency_kw)} given but latency=False")
    summary: dict[str, Any] = {}
    if loader is not None:
        summary.update(evaluate(model, loader, reference=reference, num_classes=num_classes, device=device))
    summary.update(count_params(model))
    summary["flops"] = count_flops(model, input_shape)
    summary["effective_flops"] = effective_flops(model, input_shape)
    if latency:
        summary["latency_ms"] = measure_latency(model, input_shape, **latency_kw)
    return summary
