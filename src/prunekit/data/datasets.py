"""In-memory image datasets: :class:`ImageDataset`, :func:`get_dataset` and friends.

Every dataset is decoded once into ``uint8`` arrays, which are cached as ``.npz`` files in the user
cache (see :mod:`prunekit.data.sources`); later loads read the cache in well under a second.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from prunekit.data import formats, sources
from prunekit.data.info import (
    BUILTIN_INFO,
    CIFAR10_CLASSES,
    DATASET_NAMES,
    FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
    DatasetFormatError,
    DatasetInfo,
    canonical_name,
)
from prunekit.data.sources import (
    DownloadError,
    cache_dir,
    decoded_cache_path,
    downloads_enabled,
    fingerprint,
    load_arrays,
    not_found_error,
    save_arrays,
    search_roots,
)
from prunekit.errors import ConfigError, DatasetNotFoundError, UnknownNameError

__all__ = [
    "ImageDataset",
    "dataset_info",
    "get_dataset",
    "list_datasets",
    "train_holdout_split",
]

log = logging.getLogger("prunekit.data")

SPLITS = ("train", "test")
PathLike = str | os.PathLike[str]
Indices = torch.Tensor | np.ndarray | Sequence[int] | range | slice


class ImageDataset(torch.utils.data.Dataset):
    """A whole image-classification split held in memory.

    Attributes: ``images`` (``uint8`` tensor ``N x C x H x W``, contiguous), ``labels`` (``int64``
    tensor ``N``), ``classes`` (class names, index = label), ``info`` (:class:`DatasetInfo`) and
    ``split``. Indexing gives ``(uint8 image C x H x W, int label)``; use
    :class:`~prunekit.data.BatchLoader` for fast normalised (and augmented) batches.
    """

    def __init__(
        self,
        images: torch.Tensor | np.ndarray,
        labels: torch.Tensor | np.ndarray | Sequence[int],
        classes: Sequence[str],
        info: DatasetInfo,
        split: str = "train",
    ) -> None:
        images = torch.as_tensor(images)
        labels = torch.as_tensor(labels).to(torch.int64)
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DatasetFormatError(
                f"images must be a uint8 N x C x H x W tensor, got {images.dtype} {tuple(images.shape)}"
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise DatasetFormatError(f"{len(images)} images but labels of shape {tuple(labels.shape)}")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
            # found here, when the data is loaded -- not an epoch later as an index error in the loss
            bad = labels[(labels < 0) | (labels >= len(classes))]
            raise DatasetFormatError(
                f"{info.name} {split}: {len(bad)} label(s) outside 0..{len(classes) - 1} (e.g. {int(bad[0])}) "
                f"for {len(classes)} classes; the label file does not belong to this dataset or is corrupt"
            )
        self.images = images.contiguous()
        self.labels = labels.contiguous()
        self.classes = list(classes)
        self.info = info
        self.split = split

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    def __repr__(self) -> str:
        c, h, w = self.images.shape[1:] if len(self.images.shape) == 4 else (0, 0, 0)
        return (
            f"ImageDataset({self.info.name!r}, split={self.split!r}, n={len(self)}, "
            f"shape={c}x{h}x{w}, classes={len(self.classes)})"
        )

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(classes)``)."""
        return len(self.classes)

    def subset(self, indices: Indices) -> ImageDataset:
        """A new dataset holding the examples at ``indices`` (ints, a boolean mask, a range or a slice)."""
        if isinstance(indices, slice):
            idx = torch.arange(len(self))[indices]
        else:
            idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, torch.Tensor) else indices)
            if idx.dtype == torch.bool:
                if idx.shape != (len(self),):
                    raise ConfigError(
                        f"boolean mask of shape {tuple(idx.shape)} for a dataset of {len(self)}"
                    )
                idx = idx.nonzero().flatten()
            idx = idx.to(torch.int64).flatten()
        if len(idx) and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise ConfigError(f"subset indices out of range for a dataset of {len(self)} examples")
        idx = torch.where(idx < 0, idx + len(self), idx)
        return ImageDataset(
            self.images.index_select(0, idx),
            self.labels.index_select(0, idx),
            self.classes,
            self.info,
            self.split,
        )

    def class_counts(self) -> torch.Tensor:
        """Number of examples of each class (``int64``, length ``num_classes``)."""
        return torch.bincount(self.labels, minlength=len(self.classes))


# --------------------------------------------------------------------------- public functions


def list_datasets() -> list[str]:
    """Names of the built-in datasets (``get_dataset`` also accepts ``"folder:<path>"``)."""
    return list(DATASET_NAMES)


def dataset_info(name: str, **kw: Any) -> DatasetInfo:
    """The :class:`DatasetInfo` of a dataset.

    Built-in datasets need no data on disk; ``"synthetic"`` (with its keyword options) and
    ``"folder:<path>"`` compute their statistics from the (training) data.
    """
    key = canonical_name(name)
    if key in BUILTIN_INFO:
        return BUILTIN_INFO[key]
    if key == "synthetic":
        return _synthetic("train", **kw).info
    base = _folder_path(key)
    split = "train" if (base / "train").is_dir() else "test"
    return get_dataset(key, split, **kw).info


def get_dataset(
    name: str,
    split: str = "train",
    data_dir: PathLike | None = None,
    download: bool = True,
    **kw: Any,
) -> ImageDataset:
    """Load a split of a dataset into memory.

    Args:
        name: one of :func:`list_datasets` or ``"folder:<path>"`` (an image-folder tree
            ``<path>/{train,test}/<class>/<image>``; classes sorted alphabetically; equal image sizes).
        split: ``"train"`` or ``"test"``.
        data_dir: searched first; then ``$PRUNEKIT_DATA``, the user cache and ``/usr/share/datasets``.
        download: download the official files into the user cache when they are nowhere on disk.
        **kw: ``cache=False`` skips the decoded-array cache; ``"synthetic"`` takes ``num_classes=10,
            in_channels=3, image_size=32, n=512`` (train; the test split has ``n // 4``) and ``seed=0``.

    Raises:
        DatasetNotFoundError: the data is not on disk and could not be downloaded (the message lists
            every place searched and how to get the data).
        DatasetFormatError: a file is corrupt or an image folder is inconsistent.
        UnknownNameError: unknown dataset name or split.
    """
    key = canonical_name(name)
    if split not in SPLITS:
        raise UnknownNameError("split", str(split), list(SPLITS))
    if key == "synthetic":
        return _synthetic(split, **kw)
    use_cache = bool(kw.pop("cache", True))
    if kw:
        raise ConfigError(f"dataset {key!r} takes no option(s) {', '.join(sorted(kw))}")
    if key.startswith("folder:"):
        return _load_folder(_folder_path(key), split, None, use_cache)
    if key in ("fashion-mnist", "mnist"):
        return _load_idx(key, split, data_dir, download, use_cache)
    if key in ("cifar10", "cifar100"):
        return _load_cifar(key, split, data_dir, download, use_cache)
    return _load_cifar10_jpeg(split, data_dir, use_cache)


def train_holdout_split(
    ds: ImageDataset, holdout: int | float, seed: int = 0, *, stratify: bool = True
) -> tuple[ImageDataset, ImageDataset]:
    """Split ``ds`` into ``(train, holdout)`` subsets, e.g. to get a prune/calibration set.

    ``holdout`` is a number of examples (int) or a fraction in (0, 1) (float). The split is seeded and
    stratified by class (each class contributes in proportion to its size, exact total). Both parts
    keep the original order of examples and share ``ds.info``.
    """
    n = len(ds)
    if isinstance(holdout, bool) or not isinstance(holdout, int | float):
        raise ConfigError(f"holdout must be an int count or a float fraction, got {holdout!r}")
    if isinstance(holdout, float):
        if not 0.0 <= holdout < 1.0:
            raise ConfigError(f"a holdout fraction must be in [0, 1), got {holdout}")
        k = int(round(holdout * n))
    else:
        k = holdout
    if not 0 <= k < n:
        raise ConfigError(f"cannot hold out {k} of {n} examples (need 0 <= holdout < {n})")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g)
    if stratify and k > 0:
        labels = ds.labels[perm]
        counts = torch.bincount(labels)
        quota_f = counts.to(torch.float64) * (k / n)
        quota = quota_f.floor().to(torch.int64)
        short = k - int(quota.sum())
        if short > 0:  # largest remainders first (ties: lower class index)
            frac = quota_f - quota
            order = torch.argsort(-frac, stable=True)
            quota[order[:short]] += 1
        order = torch.argsort(labels, stable=True)  # grouped by class, random within class
        grouped = perm[order]
        glabels = labels[order]
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(n) - starts[glabels]
        held = grouped[rank < quota[glabels]]
    else:
        held = perm[:k]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[held] = True
    return ds.subset(~mask), ds.subset(mask)


# --------------------------------------------------------------------------- cache helper


def _cached(
    dataset: str,
    split: str,
    sources: Sequence[Path],
    decode: Callable[[], dict[str, np.ndarray]],
    use_cache: bool,
    extra: str = "",
    keys: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Decoded arrays of ``dataset``/``split``, from the cache when its sources are unchanged."""
    if not use_cache:
        return decode()
    path = decoded_cache_path(dataset, split, fingerprint(sources, extra))
    arrays = load_arrays(path, keys)
    if arrays is None:
        arrays = decode()
        save_arrays(path, arrays)
    return arrays


def _make(arrays: dict[str, np.ndarray], info: DatasetInfo, split: str) -> ImageDataset:
    classes = [str(c) for c in arrays["classes"]]
    return ImageDataset(
        torch.from_numpy(arrays["images"]), torch.from_numpy(arrays["labels"]), classes, info, split
    )


def _describe_dir(d: Path, origin: str, missing: Sequence[str] = ()) -> str:
    """One line of the "looked in" list: the directory, why it was searched and what was wrong."""
    if not d.is_dir():
        state = "does not exist"
    elif missing:
        state = f"incomplete, missing {', '.join(missing)}"
    else:
        state = "no dataset files"
    return f"{d} ({origin}; {state})"


# --------------------------------------------------------------------------- MNIST family (IDX)

_IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_URLS = {
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    "mnist": [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ],
}
_IDX_CHECKSUMS = {  # ("sha256" | "md5", hex) of the official .gz files
    "fashion-mnist": {
        "train-images-idx3-ubyte": (
            "sha256",
            "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
        ),
        "train-labels-idx1-ubyte": (
            "sha256",
            "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
        ),
        "t10k-images-idx3-ubyte": (
            "sha256",
            "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
        ),
        "t10k-labels-idx1-ubyte": (
            "sha256",
            "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
        ),
    },
    "mnist": {
        "train-images-idx3-ubyte": ("md5", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        "train-labels-idx1-ubyte": ("md5", "d53e105ee54ea40749a09fcbcd1e9432"),
        "t10k-images-idx3-ubyte": ("md5", "9fb629c4189551a2d022fa330f9573f3"),
        "t10k-labels-idx1-ubyte": ("md5", "ec29112dd5afa0611ce80d1b7f02629c"),
    },
}
_TORCHVISION_DIRS = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}


def _idx_candidates(stem: str) -> list[str]:
    dotted = stem.replace("-idx", ".idx")  # some mirrors ship "train-images.idx3-ubyte"
    return [stem + ".gz", stem, dotted + ".gz", dotted]


def _find_idx(d: Path, stem: str) -> Path | None:
    for name in _idx_candidates(stem):
        if (d / name).is_file():
            return d / name
    return None


def _decode_idx(images_path: Path, labels_path: Path, classes: list[str]) -> dict[str, np.ndarray]:
    images = formats.read_idx(images_path)
    labels = formats.read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetFormatError(
            f"{images_path}: expected uint8 images N x H x W, got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise DatasetFormatError(
            f"{labels_path}: {labels.shape} labels for {len(images)} images in {images_path}"
        )
    return {
        "images": np.ascontiguousarray(images[:, None]),
        "labels": labels.astype(np.int64),
        "classes": np.asarray(classes),
    }


def _load_idx(
    key: str, split: str, data_dir: PathLike | None, download: bool, use_cache: bool
) -> ImageDataset:
    stems = _IDX_STEMS[split]
    classes = FASHION_MNIST_CLASSES if key == "fashion-mnist" else MNIST_CLASSES
    looked: list[str] = []
    found: tuple[Path, Path] | None = None
    for root in search_roots(data_dir):
        for d in (root.path / key, root.path / _TORCHVISION_DIRS[key] / "raw", root.path):
            files = [_find_idx(d, s) for s in stems]
            if all(files):
                found = (files[0], files[1])  # type: ignore[assignment]
                break
            missing = [s + "[.gz]" for s, f in zip(stems, files) if f is None]
            looked.append(_describe_dir(d, root.origin, missing if any(files) else ()))
        if found:
            break
    note = "Downloading was not attempted (download=False)."
    if found is None and download and not downloads_enabled():
        note = "Downloading is disabled ($PRUNEKIT_OFFLINE is set)."
    elif found is None and download:
        found, note = _download_idx(key, stems)
    if found is None:
        dest = cache_dir() / key
        files = ", ".join(s + ".gz" for s in (*_IDX_STEMS["train"], *_IDX_STEMS["test"]))
        howto = [
            f"pass --data-dir DIR (data_dir=DIR) or set PRUNEKIT_DATA=DIR, where DIR/{key}/ or DIR "
            f"holds {files}"
        ]
        if key == "fashion-mnist":
            howto.append(
                "on Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist "
                "(installs /usr/share/datasets/fashion-mnist)"
            )
            howto.append(
                f"or download the files from {_IDX_URLS[key][0]} "
                f"(see https://github.com/zalandoresearch/fashion-mnist) into {dest}"
            )
        else:
            howto.append(f"or download the files from {_IDX_URLS[key][0]} into {dest}")
        raise not_found_error(key, split, looked, download_note=note, howto=howto)
    images_path, labels_path = found
    arrays = _cached(
        key,
        split,
        [images_path, labels_path],
        lambda: _decode_idx(images_path, labels_path, classes),
        use_cache,
    )
    return _make(arrays, BUILTIN_INFO[key], split)


def _download_idx(key: str, stems: Sequence[str]) -> tuple[tuple[Path, Path] | None, str]:
    dest_dir = cache_dir() / key
    errors: list[str] = []
    for base in _IDX_URLS[key]:
        try:
            paths = []
            for stem in stems:
                kind, digest = _IDX_CHECKSUMS[key][stem]
                sums = {"sha256": digest} if kind == "sha256" else {"md5": digest}
                paths.append(sources.download_file(base + stem + ".gz", dest_dir / (stem + ".gz"), **sums))
            return (paths[0], paths[1]), ""
        except DownloadError as e:
            errors.append(str(e))
    return None, "Download failed: " + "; ".join(errors)


# --------------------------------------------------------------------------- CIFAR (python pickles)

_CIFAR_ARCHIVES = {
    "cifar10": ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
}
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"


def _load_cifar(
    key: str, split: str, data_dir: PathLike | None, download: bool, use_cache: bool
) -> ImageDataset:
    subdir, train_files, test_files, meta_file, _, _ = formats.cifar_layout(key)
    wanted = train_files if split == "train" else test_files
    archive, md5 = _CIFAR_ARCHIVES[key]
    looked: list[str] = []
    source: Path | None = None
    for root in search_roots(data_dir):
        for base in (root.path, root.path / key):
            d = base / subdir
            present = [f for f in wanted if (d / f).is_file()]
            if len(present) == len(wanted):
                source = d
                break
            missing = [f for f in wanted if f not in present]
            looked.append(_describe_dir(d, root.origin, missing if present else ()))
            if (base / archive).is_file():
                source = base / archive
                break
            looked.append(f"{base / archive} ({root.origin}; not there)")
        if source:
            break
    note = "Downloading was not attempted (download=False)."
    if source is None and download and not downloads_enabled():
        note = "Downloading is disabled ($PRUNEKIT_OFFLINE is set)."
    elif source is None and download:
        try:
            source = sources.download_file(_CIFAR_URL + archive, cache_dir() / archive, md5=md5)
        except DownloadError as e:
            note = f"Download failed: {e}"
    if source is None:
        howto = [
            f"pass --data-dir DIR (data_dir=DIR) or set PRUNEKIT_DATA=DIR, where DIR holds {archive} "
            f"or the unpacked {subdir}/",
            f"or download {_CIFAR_URL}{archive} (md5 {md5}) into {cache_dir()}",
        ]
        raise not_found_error(key, split, looked, download_note=note, howto=howto)
    src_files = (
        [source]
        if not source.is_dir()
        else [source / f for f in (*wanted, meta_file) if (source / f).is_file()]
    )
    src = source

    def decode() -> dict[str, np.ndarray]:
        images, labels, classes = formats.load_cifar(
            key, split, src, CIFAR10_CLASSES if key == "cifar10" else None
        )
        return {"images": images, "labels": labels, "classes": np.asarray(classes)}

    return _make(_cached(key, split, src_files, decode, use_cache), BUILTIN_INFO[key], split)


# --------------------------------------------------------------------------- image folders


def _folder_path(key: str) -> Path:
    raw = key[len("folder:") :].strip()
    if not raw:
        raise ConfigError(
            "'folder:' needs a path, e.g. folder:/data/my-images (with train/ and test/ inside)"
        )
    return Path(raw).expanduser().resolve()


def _folder_info(
    name: str, arrays: dict[str, np.ndarray], mean: Sequence[float], std: Sequence[float]
) -> DatasetInfo:
    n, c, h, w = arrays["images"].shape
    if h != w:
        raise DatasetFormatError(
            f"{name}: images are {w}x{h}; prunekit's models need square images (resize or crop them first)"
        )
    return DatasetInfo(
        name,
        len(arrays["classes"]),
        int(c),
        int(h),
        tuple(float(m) for m in mean),
        tuple(float(s) for s in std),
        "cifar" if c == 3 else "none",
        f"image folder {name[len('folder:') :]}" if name.startswith("folder:") else "",
    )


def _folder_arrays(
    base: Path, split: str, dataset: str, use_cache: bool, keys: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    split_dir = base / split
    if not split_dir.is_dir():
        raise DatasetNotFoundError(
            f"image folder {base} has no {split}/ directory (expected {base}/train/<class>/<image> and "
            f"{base}/test/<class>/<image>)"
        )
    train_dir = base / "train"
    train_classes = None
    if split != "train" and train_dir.is_dir():
        train_classes = sorted(
            d.name for d in train_dir.iterdir() if d.is_dir() and not d.name.startswith(".")
        )

    def decode() -> dict[str, np.ndarray]:
        classes, paths, labels = formats.list_image_folder(split_dir, train_classes)
        if not paths:
            raise DatasetFormatError(
                f"no image files ({', '.join(formats.IMAGE_EXTENSIONS)}) under {split_dir}/<class>/"
            )
        log.info("decoding %d images under %s (once; cached afterwards)", len(paths), split_dir)
        images = formats.stack_images(formats.decode_images(paths), [str(p) for p in paths])
        mean, std = formats.channel_stats(images)
        return {
            "images": images,
            "labels": labels,
            "classes": np.asarray(classes),
            "mean": np.asarray(mean),
            "std": np.asarray(std),
        }

    extra = "\0".join(train_classes or [])
    return _cached(dataset, split, [split_dir], decode, use_cache, extra=extra, keys=keys)


def _load_folder(base: Path, split: str, builtin: DatasetInfo | None, use_cache: bool) -> ImageDataset:
    if not base.is_dir():
        raise DatasetNotFoundError(f"image folder {base} does not exist")
    name = builtin.name if builtin else f"folder:{base}"
    arrays = _folder_arrays(base, split, name, use_cache)
    if builtin is not None:
        return _make(arrays, builtin, split)
    stats = arrays
    if split != "train" and (base / "train").is_dir():
        stats = _folder_arrays(base, "train", name, use_cache, keys=("mean", "std"))
        c, c_train = arrays["images"].shape[1], len(stats["mean"])
        if c != c_train:
            if c != 1:
                raise DatasetFormatError(f"{base}: {split}/ has colour images but train/ only grayscale ones")
            arrays = dict(arrays, images=np.repeat(arrays["images"], c_train, axis=1))
    return _make(arrays, _folder_info(name, arrays, stats["mean"], stats["std"]), split)


# --------------------------------------------------------------------------- CIFAR-10 as JPEG files

_JPEG_ARCHIVE = "cifar10-jpeg.tar.gz"


def _load_cifar10_jpeg(split: str, data_dir: PathLike | None, use_cache: bool) -> ImageDataset:
    info = BUILTIN_INFO["cifar10-jpeg"]
    looked: list[str] = []
    for root in search_roots(data_dir):
        tar = root.path / _JPEG_ARCHIVE
        if tar.is_file():
            return _jpeg_from_tar(tar, split, info, use_cache)
        looked.append(f"{tar} ({root.origin}; not there)")
        d = root.path / "cifar10-jpeg"
        if (d / split).is_dir():
            return _load_folder(d, split, info, use_cache)
        looked.append(_describe_dir(d / split, root.origin))
    raise not_found_error(
        "cifar10-jpeg",
        split,
        looked,
        download_note="This JPEG copy of CIFAR-10 has no download URL ('cifar10' is the official data).",
        howto=[
            f"pass --data-dir DIR (data_dir=DIR) or set PRUNEKIT_DATA=DIR, where DIR holds {_JPEG_ARCHIVE} "
            "or an unpacked cifar10-jpeg/ with train/<class>/*.jpg and test/<class>/*.jpg",
            "or use the dataset 'cifar10' (downloads the official CIFAR-10 from https://www.cs.toronto.edu/~kriz/)",
        ],
    )


def _split_members(
    decoded: dict[str, np.ndarray],
) -> dict[str, tuple[list[str], list[np.ndarray], list[str]]]:
    """Group ``.../<split>/<class>/<file>`` members by split: (classes, arrays, names), sorted."""
    groups: dict[str, list[tuple[str, str, str]]] = {s: [] for s in SPLITS}
    for name in decoded:
        parts = name.split("/")
        if len(parts) >= 3 and parts[-3] in groups:
            groups[parts[-3]].append((parts[-2], parts[-1], name))
    out = {}
    train_classes = sorted({c for c, _, _ in groups["train"]})
    for split, items in groups.items():
        items.sort()
        classes = train_classes or sorted({c for c, _, _ in items})
        out[split] = (classes, [decoded[n] for _, _, n in items], [n for _, _, n in items])
    return out


def _jpeg_from_tar(tar: Path, split: str, info: DatasetInfo, use_cache: bool) -> ImageDataset:
    fp = fingerprint([tar])
    path = decoded_cache_path(info.name, split, fp)
    arrays = load_arrays(path) if use_cache else None
    if arrays is None:
        log.info("decoding the images of %s (once; cached afterwards)", tar)
        groups = _split_members(formats.decode_image_tar(tar))
        for s, (classes, imgs, names) in groups.items():
            if not imgs:
                if s == split:
                    raise DatasetFormatError(f"{tar} has no {s}/<class>/<image> files")
                continue
            index = {c: i for i, c in enumerate(classes)}
            missing = sorted({n.split("/")[-2] for n in names} - set(index))
            if missing:
                raise DatasetFormatError(
                    f"{tar}: {s}/ has class folder(s) {', '.join(missing)} absent from train/"
                )
            a = {
                "images": formats.stack_images(imgs, [f"{tar}:{n}" for n in names]),
                "labels": np.asarray([index[n.split("/")[-2]] for n in names], dtype=np.int64),
                "classes": np.asarray(classes),
            }
            if use_cache:
                save_arrays(decoded_cache_path(info.name, s, fp), a)
            if s == split:
                arrays = a
    assert arrays is not None
    return _make(arrays, info, split)


# --------------------------------------------------------------------------- synthetic


def _synthetic(
    split: str,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    n: int = 512,
    seed: int = 0,
    **kw: Any,
) -> ImageDataset:
    """Deterministic learnable data: a smooth random pattern per class plus per-image noise and shift."""
    kw.pop("cache", None)
    if kw:
        raise ConfigError(
            "dataset 'synthetic' takes num_classes, in_channels, image_size, n, seed; "
            f"not {', '.join(sorted(kw))}"
        )
    for label, v, lo in (
        ("num_classes", num_classes, 2),
        ("in_channels", in_channels, 1),
        ("image_size", image_size, 4),
        ("n", n, 1),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"synthetic dataset: {label} must be an int >= {lo}, got {v!r}")
    images, labels = _synthetic_arrays(split, num_classes, in_channels, image_size, n, seed)
    train_images = (
        images
        if split == "train"
        else _synthetic_arrays("train", num_classes, in_channels, image_size, n, seed)[0]
    )
    mean, std = formats.channel_stats(train_images.numpy())
    info = DatasetInfo(
        "synthetic",
        num_classes,
        in_channels,
        image_size,
        mean,
        std,
        "none",
        f"synthetic: {num_classes} classes, {in_channels}x{image_size}x{image_size}, seed {seed}",
    )
    return ImageDataset(images, labels, [f"class_{i}" for i in range(num_classes)], info, split)


def _synthetic_arrays(
    split: str, num_classes: int, in_channels: int, image_size: int, n: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(int(seed))
    coarse = torch.rand(num_classes, in_channels, 4, 4, generator=g)
    patterns = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
    count = n if split == "train" else max(1, n // 4)
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + (1 if split == "train" else 2))
    labels = (torch.arange(count) % num_classes)[torch.randperm(count, generator=g)]
    noise = torch.randn(count, in_channels, image_size, image_size, generator=g) * 0.18
    brightness = (torch.rand(count, 1, 1, 1, generator=g) - 0.5) * 0.2
    x = 0.2 + 0.6 * patterns[labels] + noise + brightness
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
    return images, labels
