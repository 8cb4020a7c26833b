""":class:`BatchLoader`: fast, deterministic batches of normalised (and augmented) images."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from prunekit.data.datasets import ImageDataset
from prunekit.data.info import AUGMENTATIONS
from prunekit.data.transforms import crop_flip
from prunekit.errors import ConfigError, UnknownNameError

__all__ = ["BatchLoader", "epoch_seed"]

_MASK64 = (1 << 64) - 1


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed for (``seed``, ``epoch``) (splitmix64 of both)."""
    z = ((int(seed) & _MASK64) * 0x9E3779B97F4A7C15 + (int(epoch) & _MASK64) + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


class BatchLoader:
    """Iterate ``(x, y)`` batches over an :class:`ImageDataset`.

    ``x`` is ``float32`` ``B x C x H x W`` normalised with ``ds.info.mean``/``std``; ``y`` is ``int64``.
    All work is batched tensor ops on the in-memory ``uint8`` images (no per-image Python code).

    Args:
        ds: the dataset.
        batch_size: examples per batch.
        shuffle: reshuffle every epoch.
        augment: False/None/"none" = no augmentation; True = the dataset's default (``ds.info.augment``:
            "cifar" for CIFAR-like data, "none" for MNIST-like data); or a policy name: "cifar"
            (random crop with zero padding ``padding`` + random horizontal flip), "crop", "flip".
        seed: with the epoch number, determines shuffling and augmentation: epoch ``e`` of two loaders
            with the same seed yields identical batches.
        drop_last: drop the last incomplete batch.
        channels_last: return ``x`` in channels-last memory format.
        device: where batches are produced; on a non-CPU device the ``uint8`` images are copied there
            once and cropping/normalisation run there.
        padding: zero padding of the random crop (pixels).
        rank, world_size: data-parallel sharding (see :mod:`prunekit.distributed`): each global batch is
            ``batch_size * world_size`` examples of one shared order and this loader yields the ``rank``-th
            slice of it, so ``world_size`` loaders together yield what one loader at the global batch
            size yields. A last global batch with fewer examples than ranks is dropped.

    Call :meth:`set_epoch` before iterating to pick the epoch; iterating without it advances an
    internal epoch counter (0, 1, 2, ...).
    """

    def __init__(
        self,
        ds: ImageDataset,
        batch_size: int = 128,
        shuffle: bool = False,
        augment: bool | str | None = False,
        seed: int = 0,
        drop_last: bool = False,
        channels_last: bool = False,
        device: str | torch.device = "cpu",
        *,
        padding: int = 4,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ConfigError(f"padding must be an int >= 0, got {padding!r}")
        if augment is True:
            policy = ds.info.augment
        elif augment is False or augment is None:
            policy = "none"
        else:
            policy = str(augment).lower()
        if policy not in AUGMENTATIONS:
            raise UnknownNameError("augmentation", str(augment), list(AUGMENTATIONS))
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"invalid device {device!r}: {e}") from None
        self.dataset = ds
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.augment = policy
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.channels_last = bool(channels_last)
        self.padding = padding
        self.shard(rank, world_size)
        self._next_epoch = 0
        self._images: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None

    # -- epochs -------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch ``epoch`` (shuffle and augmentation depend only on seed, epoch)."""
        self._next_epoch = int(epoch)

    @property
    def epoch(self) -> int:
        """The epoch the next iteration will produce."""
        return self._next_epoch

    def shard(self, rank: int, world_size: int) -> BatchLoader:
        """Yield only rank ``rank``'s slice of every global batch of ``world_size`` ranks (in place)."""
        for name, v in (("rank", rank), ("world_size", world_size)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"{name} must be an int, got {v!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.rank, self.world_size = rank, world_size
        return self

    def __len__(self) -> int:
        n, g = len(self.dataset), self.batch_size * self.world_size
        if self.drop_last or 0 < n % g < self.world_size:
            return n // g
        return -(-n // g)

    def _slice(self, b: int, n: int) -> tuple[int, int]:
        """This rank's examples ``lo:hi`` of global batch ``b``."""
        g = self.batch_size * self.world_size
        glo, ghi = b * g, min(n, (b + 1) * g)
        m = ghi - glo
        return glo + m * self.rank // self.world_size, glo + m * (self.rank + 1) // self.world_size

    def __repr__(self) -> str:
        return (
            f"BatchLoader({self.dataset!r}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
            f"augment={self.augment!r}, seed={self.seed}, device={str(self.device)!r})"
        )

    # -- iteration ----------------------------------------------------------------------------

    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._images is None or self._labels is None:
            ds = self.dataset
            if self.device.type == "cpu":
                self._images, self._labels = ds.images, ds.labels
            else:
                self._images = ds.images.to(self.device)
                self._labels = ds.labels.to(self.device)
        return self._images, self._labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self._next_epoch
        self._next_epoch = epoch + 1
        return self._batches(epoch)

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self._tensors()
        n = len(self.dataset)
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        order = torch.randperm(n, generator=g) if self.shuffle else None
        crop = self.augment in ("cifar", "crop") and self.padding > 0
        flip = self.augment in ("cifar", "flip")
        offsets = torch.randint(0, 2 * self.padding + 1, (2, n), generator=g) if crop else None
        flips = torch.randint(0, 2, (n,), generator=g).bool() if flip else None
        mean = torch.as_tensor(self.dataset.info.mean, dtype=torch.float64)
        std = torch.as_tensor(self.dataset.info.std, dtype=torch.float64)
        if mean.numel() != images.shape[1] or std.numel() != images.shape[1]:
            raise ConfigError(
                f"dataset info has {mean.numel()} mean / {std.numel()} std values for "
                f"{images.shape[1]}-channel images"
            )
        scale = (1.0 / (255.0 * std)).to(torch.float32).reshape(1, -1, 1, 1).to(self.device)
        shift = (mean / std).to(torch.float32).reshape(1, -1, 1, 1).to(self.device)
        on_cpu = self.device.type == "cpu"
        for b in range(len(self)):
            lo, hi = self._slice(b, n)
            if order is None:
                xb, yb = images[lo:hi], labels[lo:hi]
            else:
                idx = order[lo:hi] if on_cpu else order[lo:hi].to(self.device, non_blocking=True)
                xb, yb = images.index_select(0, idx), labels.index_select(0, idx)
            if crop or flip:
                xb = crop_flip(
                    xb,
                    offsets[0, lo:hi] if offsets is not None else None,
                    offsets[1, lo:hi] if offsets is not None else None,
                    flips[lo:hi] if flips is not None else None,
                    self.padding,
                )
            x = xb.to(torch.float32).mul_(scale).sub_(shift)  # (x / 255 - mean) / std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, yb
