"""Model registry: ``@register_model`` + ``create_model`` + ``list_models``.

Every factory takes ``num_classes`` and ``in_channels`` plus its own keyword
options and returns an ``nn.Module``. ``create_model`` records how the model was
built in ``model.prunekit_config`` so that checkpoints can rebuild it without
pickling classes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from prunekit.errors import ConfigError, UnknownNameError


@dataclass(frozen=True)
class ModelInfo:
    name: str
    factory: Callable[..., nn.Module]
    family: str
    description: str
    input_size: tuple[int, int, int]  # default (C, H, W) the model is meant for
    tiny_kwargs: dict[str, Any] = field(default_factory=dict)  # small widths for tests


_MODELS: dict[str, ModelInfo] = {}


def register_model(
    name: str,
    *,
    family: str,
    description: str = "",
    input_size: tuple[int, int, int] = (3, 32, 32),
    tiny_kwargs: dict[str, Any] | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a model factory under ``name``; duplicate names raise ``ValueError``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        doc_lines = (fn.__doc__ or "").strip().splitlines()
        desc = description or (doc_lines[0] if doc_lines else "")
        _MODELS[name] = ModelInfo(name, fn, family, desc, tuple(input_size), dict(tiny_kwargs or {}))
        return fn

    return deco


def list_models(family: str | None = None) -> list[str]:
    """Names of registered models, optionally only those of one ``family``."""
    return sorted(n for n, i in _MODELS.items() if family is None or i.family == family)


def get_model_info(name: str) -> ModelInfo:
    try:
        return _MODELS[name]
    except KeyError:
        raise UnknownNameError("model", name, list(_MODELS)) from None


# size-like constructor options: must be positive, and bounded so that a typo or a crafted checkpoint cannot
# make a constructor allocate without limit (width=1e6)
_SIZE_LIMITS = {"num_classes": 1_000_000, "in_channels": 4096, "image_size": 8192, "width": 64.0, "depth": 1000,
                "patch_size": 1024, "dim": 65536, "embed_dim": 65536, "heads": 1024, "num_heads": 1024,
                "mlp_ratio": 64.0}


def _check_sizes(name: str, options: dict[str, Any]) -> None:
    for key, limit in _SIZE_LIMITS.items():
        if key not in options:
            continue
        v = options[key]
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 < v <= limit
        if isinstance(limit, int) and ok and v != int(v):
            ok = False
        if not ok:
            kind = "an integer" if isinstance(limit, int) else "a number"
            raise ConfigError(f"model {name!r}: option {key}={v!r} must be {kind} in (0, {limit:g}]")


def create_model(name: str, num_classes: int = 10, in_channels: int | None = None, **kwargs: Any) -> nn.Module:
    """Build registered model ``name``.

    >>> m = create_model("resnet20", num_classes=10)

    ``in_channels`` defaults to the model's registered ``input_size``.
    """
    info = get_model_info(name)
    if in_channels is None:  # the model's natural input (1 for LeNets, 3 for the CIFAR models)
        in_channels = info.input_size[0]
    _check_sizes(name, {"num_classes": num_classes, "in_channels": in_channels, **kwargs})
    try:
        model = info.factory(num_classes=num_classes, in_channels=in_channels, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad options for model {name!r}: {e}") from None
    model.prunekit_config = {
        "name": name,
        "num_classes": int(num_classes),
        "in_channels": int(in_channels),
        "kwargs": dict(kwargs),
    }
    return model


def create_model_for_dataset(name: str, info: Any, **kwargs: Any) -> nn.Module:
    """Build ``name`` sized for a dataset (``info``: DatasetInfo with num_classes, in_channels, image_size)."""
    import inspect

    model_info = get_model_info(name)
    params = inspect.signature(model_info.factory).parameters
    if "image_size" in params and "image_size" not in kwargs:
        kwargs["image_size"] = int(info.image_size)
    return create_model(name, num_classes=int(info.num_classes), in_channels=int(info.in_channels), **kwargs)
