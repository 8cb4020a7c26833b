"""Batches checked where they enter pruning: ``(x, y)`` pairs of the model's input shape, float inputs,
integer labels within the model's classes -- one :class:`DatasetFormatError` naming the batch and what was
expected, instead of a shape error deep inside a method or an index error in the loss."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from prunekit.data.info import DatasetFormatError

__all__ = ["CheckedBatches", "check_batch"]


def check_batch(batch: Any, i: int, input_shape: tuple[int, ...] | None, num_classes: int | None) -> None:
    """Raise :class:`DatasetFormatError` unless ``batch`` is an ``(x, y)`` pair that fits the model.

    ``x`` is checked only when it is a tensor (a tuple / dict of inputs goes to models with several inputs);
    its shape only when ``input_shape`` is a plain shape. ``y``: integer labels, one per example (``(N,)``) or
    one per output position (``(N, ...)``: a segmentation map, a language model's tokens), in
    ``[0, num_classes)`` when ``num_classes`` is known."""
    where = f"data batch {i}"
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        got = type(batch).__name__ + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        raise DatasetFormatError(f"{where} is a {got}, not an (x, y) pair: give (inputs, labels) batches "
                                 "(label-free methods take pairs too; their labels are not used)")
    x, y = batch
    # a plain (C, H, W): image batches; ExampleInputs (models with several / token inputs) are not checked
    image = input_shape is not None and not hasattr(input_shape, "kwargs")
    if isinstance(x, torch.Tensor) and image:
        if not x.is_floating_point():
            raise DatasetFormatError(f"{where}: inputs are {x.dtype}; expected floating-point tensors "
                                     "(normalised images, e.g. from prunekit.data.BatchLoader)")
        if tuple(x.shape[1:]) != tuple(input_shape):
            raise DatasetFormatError(f"{where}: inputs of shape {tuple(x.shape)}; the model takes "
                                     f"N x {' x '.join(map(str, input_shape))}")
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.ndim < 1:
        what = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise DatasetFormatError(f"{where}: labels are {what}; expected an integer tensor of one class index "
                                 "per example (N,) or per output position (N, ...)")
    n = len(x) if isinstance(x, torch.Tensor) else None
    if n is not None and len(y) != n:
        raise DatasetFormatError(f"{where}: {len(y)} labels for {n} inputs")
    if num_classes and len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DatasetFormatError(f"{where}: labels {int(y.min())}..{int(y.max())}; expected 0..{num_classes - 1} "
                                 f"(the model has {num_classes} outputs)")


class CheckedBatches:
    """``data`` (any iterable of batches) with every batch checked by :func:`check_batch` as it is read.
    Other attributes (``len``, ``batch_size``, ``set_epoch`` ...) are the wrapped object's."""

    def __init__(self, data: Any, input_shape: tuple[int, ...] | None, num_classes: int | None):
        self.data, self.input_shape, self.num_classes = data, input_shape, num_classes

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.data):
            check_batch(batch, i, self.input_shape, self.num_classes)
            yield batch

    def __len__(self) -> int:
        return len(self.data)

    def __getattr__(self, name: str) -> Any:
        if name == "data":  # not set yet (copy / pickle): no recursion
            raise AttributeError(name)
        return getattr(self.data, name)
