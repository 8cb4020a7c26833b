"""Batched image transforms on tensors (no torchvision, no per-image Python loop)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["crop_flip", "normalize", "random_crop_flip"]


def crop_flip(
    images: torch.Tensor,
    offset_y: torch.Tensor | None,
    offset_x: torch.Tensor | None,
    flip: torch.Tensor | None,
    padding: int = 4,
) -> torch.Tensor:
    """Crop each image of a batch at given offsets after zero padding, then optionally mirror it.

    ``images`` is ``B x C x H x W`` (any dtype, e.g. ``uint8``); ``offset_y``/``offset_x`` are ``B``
    integers in ``[0, 2 * padding]`` (None = no crop, i.e. offset ``padding``); ``flip`` is a ``B``
    boolean tensor (None = no flip). Output has the input's shape and dtype. One ``gather`` does it all.
    """
    b, c, h, w = images.shape
    dev = images.device
    p = int(padding) if offset_y is not None or offset_x is not None else 0
    src = F.pad(images, (p, p, p, p)) if p > 0 else images
    hp, wp = h + 2 * p, w + 2 * p
    oy = offset_y.to(dev, torch.int64) if offset_y is not None and p > 0 else torch.full((b,), p, device=dev)
    ox = offset_x.to(dev, torch.int64) if offset_x is not None and p > 0 else torch.full((b,), p, device=dev)
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = oy[:, None] + ar_h  # B x H
    cols = ox[:, None] + ar_w  # B x W
    if flip is not None:
        cols = torch.where(flip.to(dev)[:, None], ox[:, None] + (w - 1 - ar_w), cols)
    index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return torch.gather(src.reshape(b, c, hp * wp), 2, index).view(b, c, h, w)


def random_crop_flip(
    images: torch.Tensor,
    padding: int = 4,
    crop: bool = True,
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random crop with zero padding ``padding`` and/or random horizontal flip of a batch (CIFAR style)."""
    b = images.shape[0]
    oy = ox = fl = None
    if crop and padding > 0:
        oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
        ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    if flip:
        fl = torch.randint(0, 2, (b,), generator=generator).bool()
    if oy is None and fl is None:
        return images
    return crop_flip(images, oy, ox, fl, padding)


def normalize(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``uint8`` images (0..255) to floats ``(x / 255 - mean) / std`` with per-channel ``mean``/``std``."""
    c = images.shape[1]
    m = torch.as_tensor(mean, dtype=torch.float64)
    s = torch.as_tensor(std, dtype=torch.float64)
    if m.numel() not in (1, c) or s.numel() not in (1, c):
        raise ValueError(f"mean/std of length {m.numel()}/{s.numel()} for {c}-channel images")
    scale = (1.0 / (255.0 * s)).to(dtype).reshape(1, -1, 1, 1).to(images.device)
    shift = (m / s).to(dtype).reshape(1, -1, 1, 1).to(images.device)
    return images.to(dtype).mul_(scale).sub_(shift)
