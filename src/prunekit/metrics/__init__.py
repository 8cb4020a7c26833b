"""Metrics for pruned models: accuracy, agreement, parameter counts, FLOPs, latency and size.

>>> from prunekit.metrics import count_flops, count_params
>>> count_flops(model, (3, 32, 32))  # multiply-adds for one example
"""

from prunekit.metrics._common import MetricsError
from prunekit.metrics.accuracy import evaluate, predictions
from prunekit.metrics.flops import LayerMacs, count_flops, effective_flops, layer_macs
from prunekit.metrics.latency import measure_latency
from prunekit.metrics.size import count_params, effective_parameters, file_size
from prunekit.metrics.summary import model_summary

__all__ = [
    "LayerMacs",
    "MetricsError",
    "count_flops",
    "count_params",
    "effective_flops",
    "effective_parameters",
    "evaluate",
    "file_size",
    "layer_macs",
    "measure_latency",
    "model_summary",
    "predictions",
]
