"""Static description of the built-in datasets: :class:`DatasetInfo`, class names, aliases."""

from __future__ import annotations

from dataclasses import dataclass

from prunekit.errors import PrunekitError, UnknownNameError

__all__ = [
    "AUGMENTATIONS",
    "BUILTIN_INFO",
    "DATASET_NAMES",
    "DatasetFormatError",
    "DatasetInfo",
    "canonical_name",
]


class DatasetFormatError(PrunekitError, ValueError):
    """A dataset file exists but is corrupt, truncated, of the wrong format or inconsistent."""


#: Augmentation policies understood by :class:`prunekit.data.BatchLoader`.
#: ``"cifar"``: random crop with zero padding + random horizontal flip; ``"crop"``: only the crop;
#: ``"flip"``: only the flip; ``"none"``: nothing.
AUGMENTATIONS = ("cifar", "crop", "flip", "none")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a loader need to know about a dataset.

    ``mean``/``std`` are per-channel statistics in 0..1 pixel units (``len == in_channels``);
    ``augment`` is the default training augmentation (one of :data:`AUGMENTATIONS`).
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str = "none"
    description: str = ""

    @property
    def input_size(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return (self.in_channels, self.image_size, self.image_size)



_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR10_STD = (0.2470, 0.2435, 0.2616)

BUILTIN_INFO: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,), "none", "Zalando Fashion-MNIST, 28x28 grayscale"
    ),
    "mnist": DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,), "none", "MNIST digits, 28x28 grayscale"),
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, _CIFAR10_MEAN, _CIFAR10_STD, "cifar", "CIFAR-10, 32x32 RGB"),
    "cifar100": DatasetInfo(
        "cifar100",
        100,
        3,
        32,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        "cifar",
        "CIFAR-100 (fine labels), 32x32 RGB",
    ),
    "cifar10-jpeg": DatasetInfo(
        "cifar10-jpeg",
        10,
        3,
        32,
        _CIFAR10_MEAN,
        _CIFAR10_STD,
        "cifar",
        "CIFAR-10 re-encoded as JPEG files (lossy; compare methods with each other only)",
    ),
}

#: Names accepted by ``get_dataset`` (besides ``"folder:<path>"``), in display order.
DATASET_NAMES = ("fashion-mnist", "mnist", "cifar10", "cifar100", "cifar10-jpeg", "synthetic")

_ALIASES = {
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
    "cifar-100": "cifar100",
    "cifar_100": "cifar100",
    "cifar10_jpeg": "cifar10-jpeg",
    "cifar-10-jpeg": "cifar10-jpeg",
}

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
MNIST_CLASSES = [str(i) for i in range(10)]
CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def canonical_name(name: str) -> str:
    """Normalise a dataset name (case, common aliases); ``folder:`` paths are returned unchanged.

    Raises :class:`~prunekit.errors.UnknownNameError` for names that are not datasets.
    """
    if not isinstance(name, str):
        raise UnknownNameError("dataset", repr(name), [*DATASET_NAMES, "folder:<path>"])
    if name.startswith("folder:"):
        return name
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASET_NAMES:
        raise UnknownNameError("dataset", name, [*DATASET_NAMES, "folder:<path>"])
    return key
