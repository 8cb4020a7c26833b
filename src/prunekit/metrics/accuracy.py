"""Accuracy metrics: top-1 / top-5, per-class accuracy and agreement with a reference model."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn

from prunekit.metrics._common import MetricsError, check_model, eval_mode

Device = str | torch.device


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device) for v in x)
    return x


def _call(model: nn.Module, x: Any) -> Any:
    if isinstance(x, Mapping):
        return model(**x)
    if isinstance(x, (list, tuple)):
        return model(*x)
    return model(x)


def _logits(out: Any, what: str) -> torch.Tensor:
    """Pull a ``(N, C)`` logits tensor out of a model output (tensor, tuple, dict or ``.logits``)."""
    if isinstance(out, Mapping) and "logits" in out:
        out = out["logits"]
    elif hasattr(out, "logits") and not isinstance(out, torch.Tensor):
        out = out.logits
    elif isinstance(out, (list, tuple)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise MetricsError(f"{what} returned {type(out).__name__}; expected a logits tensor of shape (N, C)")
    if out.dim() != 2:
        raise MetricsError(f"{what} returned logits of shape {tuple(out.shape)}; expected (N, C)")
    return out


def _split_batch(batch: Any, index: int) -> tuple[Any, torch.Tensor]:
    if isinstance(batch, Mapping):
        raise MetricsError(
            f"loader batch {index} is a mapping; expected (inputs, labels) pairs, e.g. from a DataLoader"
        )
    try:
        x, y = batch[0], batch[1]
    except (TypeError, IndexError, KeyError):
        raise MetricsError(
            f"loader batch {index} is {type(batch).__name__}; expected an (inputs, labels) pair"
        ) from None
    y = torch.as_tensor(y)
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise MetricsError(
            f"labels of loader batch {index} must be integer class indices of shape (N,), "
            f"got dtype {y.dtype} and shape {tuple(y.shape)}"
        )
    return x, y.long()


def _check_device(model: nn.Module, device: torch.device, what: str) -> None:
    for t in list(model.parameters()) + list(model.buffers()):
        here = t.device
        if here.type != device.type or (device.index is not None and here.index != device.index):
            raise MetricsError(
                f"{what} lives on {here} but evaluation was asked to run on {device}; "
                f"pass device={str(here)!r} or move the model first"
            )
        return


def _collect(
    model: nn.Module,
    loader: Iterable[Any],
    k: int | None,
    device: Device = "cpu",
    reference: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """One pass over ``loader``: top-``k`` predictions of ``model`` (``k=None``: up to 5), labels,
    the reference model's top-1 predictions (if given) and the number of classes (logit width)."""
    dev = torch.device(device)
    _check_device(model, dev, "model")
    if reference is not None:
        _check_device(reference, dev, "reference model")
    tops: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    refs: list[torch.Tensor] = []
    width: int | None = None
    models = (model,) if reference is None else (model, reference)
    with eval_mode(*models), torch.inference_mode():
        for i, batch in enumerate(loader):
            x, y = _split_batch(batch, i)
            x = _to_device(x, dev)
            out = _logits(_call(model, x), "model")
            if out.shape[0] != y.shape[0]:
                raise MetricsError(
                    f"loader batch {i}: model produced {out.shape[0]} predictions for {y.shape[0]} labels"
                )
            if width is None:
                width = int(out.shape[1])
            elif out.shape[1] != width:
                raise MetricsError(f"model output width changed from {width} to {out.shape[1]} at batch {i}")
            kk = min(k if k is not None else 5, width)
            tops.append(out.topk(kk, dim=1).indices.cpu())
            labels.append(y.cpu())
            if reference is not None:
                ref_out = _logits(_call(reference, x), "reference model")
                if ref_out.shape[0] != y.shape[0]:
                    raise MetricsError(f"loader batch {i}: reference model produced {ref_out.shape[0]} rows")
                refs.append(ref_out.argmax(dim=1).cpu())
    if width is None:
        raise MetricsError("the loader yielded no batches; cannot evaluate on an empty dataset")
    # clone outside inference mode so callers get ordinary tensors
    top = torch.cat(tops).clone()
    lab = torch.cat(labels).clone()
    ref = torch.cat(refs).clone() if reference is not None else None
    return top, lab, ref, width


def predictions(
    model: nn.Module, loader: Iterable[Any], device: Device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 predictions of ``model`` over ``loader`` and the matching labels.

    ``loader`` is any iterable of ``(inputs, labels)`` pairs. The model runs in eval mode under
    ``torch.inference_mode``; its training flags are restored afterwards.

    Returns:
        ``(preds, labels)``, two 1-D ``torch.long`` tensors on the CPU.
    """
    check_model(model)
    top, lab, _, _ = _collect(model, loader, 1, device)
    return top[:, 0].contiguous(), lab


def _per_class(hit: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    counts = torch.bincount(labels, minlength=num_classes).double()
    hits = torch.bincount(labels, weights=hit.double(), minlength=num_classes)
    return {str(c): float(hits[c] / counts[c]) for c in range(num_classes) if counts[c] > 0}


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    reference: nn.Module | torch.Tensor | None = None,
    num_classes: int | None = None,
    device: Device = "cpu",
) -> dict[str, Any]:
    """Accuracy of a classifier over ``loader``.

    Args:
        model: classifier returning ``(N, C)`` logits (a tuple's first element, a ``"logits"``
            entry or a ``.logits`` attribute are also accepted).
        loader: any iterable of ``(inputs, labels)`` pairs with integer labels; it is read once.
        reference: optional reference model (run on the same batches) or a precomputed 1-D
            ``LongTensor`` of its top-1 predictions, e.g. from :func:`predictions`, in loader order.
        num_classes: number of classes; defaults to the model's logit width. Labels must lie in
            ``[0, num_classes)``.
        device: where inputs are sent; the model(s) must already live there.

    Returns:
        ``{"top1", "top5", "per_class", "n"}`` (accuracies as fractions in ``[0, 1]``; ``top5``
        is top-``min(5, C)``; ``per_class`` maps the class index as a string to its top-1
        accuracy, for classes present in the data). With ``reference`` also ``"agreement"``,
        the fraction of examples whose top-1 prediction equals the reference's, and
        ``"agreement_per_class"``, that fraction per ground-truth class.
    """
    check_model(model)
    ref_model: nn.Module | None = None
    ref_preds: torch.Tensor | None = None
    if isinstance(reference, nn.Module):
        ref_model = reference
    elif isinstance(reference, torch.Tensor):
        if reference.dim() != 1 or reference.is_floating_point() or reference.dtype == torch.bool:
            raise MetricsError(
                "reference predictions must be a 1-D integer tensor (as returned by predictions()), "
                f"got dtype {reference.dtype} and shape {tuple(reference.shape)}"
            )
        ref_preds = reference.detach().cpu().long()
    elif reference is not None:
        raise MetricsError(
            f"reference must be a model or a LongTensor of predictions, got {type(reference).__name__}"
        )
    if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) < 1):
        raise MetricsError(f"num_classes must be a positive int, got {num_classes!r}")

    top, labels, ref_pred_run, width = _collect(model, loader, None, device, ref_model)
    if ref_pred_run is not None:
        ref_preds = ref_pred_run
    n_classes = int(num_classes) if num_classes is not None else width
    n = int(labels.numel())
    if labels.min() < 0 or labels.max() >= n_classes:
        raise MetricsError(
            f"labels must lie in [0, {n_classes}), found range [{int(labels.min())}, {int(labels.max())}]"
        )
    hit1 = top[:, 0] == labels
    hit5 = (top == labels[:, None]).any(dim=1)
    result: dict[str, Any] = {
        "top1": float(hit1.double().mean()),
        "top5": float(hit5.double().mean()),
        "per_class": _per_class(hit1, labels, n_classes),
        "n": n,
    }
    if ref_preds is not None:
        if ref_preds.numel() != n:
            raise MetricsError(
                f"reference holds {ref_preds.numel()} predictions but the loader yielded {n} examples"
            )
        agree = top[:, 0] == ref_preds
        result["agreement"] = float(agree.double().mean())
        result["agreement_per_class"] = _per_class(agree, labels, n_classes)
    return result
