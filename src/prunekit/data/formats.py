"""Readers for the on-disk formats: IDX (MNIST family), CIFAR python pickles, image folders.

Everything here works on numpy arrays (no torch), so that the image decoders can run in worker
processes cheaply. Images are returned as ``uint8`` arrays of shape ``N x C x H x W``.
"""

from __future__ import annotations

import gzip
import io
import multiprocessing as mp
import os
import pickle
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prunekit.data.info import DatasetFormatError

__all__ = [
    "IMAGE_EXTENSIONS",
    "channel_stats",
    "decode_image_tar",
    "decode_images",
    "list_image_folder",
    "load_cifar",
    "read_idx",
    "stack_images",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".webp")

# IDX type codes -> big-endian numpy dtypes
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

# Below this many images decoding in worker processes does not pay for starting them.
_POOL_MIN_IMAGES = 4000


# --------------------------------------------------------------------------- IDX


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse an IDX file (gzip-compressed or not) into a numpy array of its declared shape and type."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DatasetFormatError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetFormatError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetFormatError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(raw) - header != count * dtype.itemsize:
        raise DatasetFormatError(
            f"{path}: IDX header declares shape {shape} ({count * dtype.itemsize} bytes of data) "
            f"but the file holds {len(raw) - header} bytes (truncated or corrupt download?)"
        )
    arr = np.frombuffer(raw, dtype, count=count, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


# --------------------------------------------------------------------------- CIFAR pickles


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only allows what the official CIFAR batches contain (numpy arrays, builtins)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


def _unpickle(data: bytes, where: str) -> dict[str, Any]:
    try:
        obj = _CifarUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as e:
        raise DatasetFormatError(f"{where} is not a valid CIFAR python batch: {e}") from None
    if not isinstance(obj, dict):
        raise DatasetFormatError(f"{where} is not a valid CIFAR python batch (not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


_CIFAR_LAYOUT = {
    # name: (directory inside the archive, train files, test files, meta file, label key, names key)
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        "labels",
        "label_names",
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_labels", "fine_label_names"),
}


def cifar_layout(name: str) -> tuple[str, list[str], list[str], str, str, str]:
    """``(dir, train files, test files, meta file, label key, class-names key)`` of the official pickles."""
    return _CIFAR_LAYOUT[name]


def load_cifar(
    name: str, split: str, source: Path, default_classes: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read CIFAR-10/100 ``split`` from the official pickle directory or ``.tar.gz`` archive ``source``.

    Returns ``(images N x 3 x 32 x 32 uint8, labels int64, class names)``.
    """
    subdir, train_files, test_files, meta_file, label_key, names_key = _CIFAR_LAYOUT[name]
    wanted = train_files if split == "train" else test_files
    blobs: dict[str, bytes] = {}
    if source.is_dir():
        for fname in [*wanted, meta_file]:
            p = source / fname
            if p.is_file():
                blobs[fname] = p.read_bytes()
    else:
        try:
            with tarfile.open(source, "r:*") as tf:
                for member in tf:
                    base = member.name.rsplit("/", 1)[-1]
                    if member.isfile() and base in (*wanted, meta_file):
                        f = tf.extractfile(member)
                        if f is not None:
                            blobs[base] = f.read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DatasetFormatError(f"cannot read CIFAR archive {source}: {e}") from None
    missing = [f for f in wanted if f not in blobs]
    if missing:
        raise DatasetFormatError(f"{source} lacks the CIFAR batch file(s) {', '.join(missing)}")
    images, labels = [], []
    for fname in wanted:
        batch = _unpickle(blobs[fname], f"{source}/{fname}")
        if "data" not in batch or label_key not in batch:
            raise DatasetFormatError(f"{source}/{fname} has no {label_key!r}/'data' entries")
        data = np.asarray(batch["data"], dtype=np.uint8)
        lab = np.asarray(batch[label_key], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(lab) != len(data):
            raise DatasetFormatError(
                f"{source}/{fname}: expected data of shape N x 3072 with N labels, "
                f"got {data.shape} and {len(lab)} labels"
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(lab)
    classes: list[str] = []
    if meta_file in blobs:
        meta = _unpickle(blobs[meta_file], f"{source}/{meta_file}")
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get(names_key, [])]
    img = np.ascontiguousarray(np.concatenate(images))
    lab = np.concatenate(labels)
    n_cls = int(lab.max()) + 1 if len(lab) else 0
    if len(classes) < n_cls:
        fallback = list(default_classes or [])
        expected = max(n_cls, 100 if name == "cifar100" else 10)
        classes = fallback if len(fallback) >= n_cls else [f"class_{i:03d}" for i in range(expected)]
    return img, lab, classes


# --------------------------------------------------------------------------- image folders


def list_image_folder(
    split_dir: Path, classes: Sequence[str] | None = None
) -> tuple[list[str], list[Path], np.ndarray]:
    """Files of an image-folder split ``split_dir/<class>/<image>``, sorted by class then file name.

    ``classes`` fixes the class list (e.g. taken from the train split); by default the sorted
    sub-directory names, each of which must then hold an image (an empty folder is a
    :class:`DatasetFormatError`, not a class without examples). Returns ``(classes, paths, labels)``.
    """
    found = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    own_classes = classes is None  # the class list comes from this split's folders
    if classes is None:
        classes = found
    else:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise DatasetFormatError(
                f"{split_dir} has class folder(s) {', '.join(extra)} that the train split does not have"
            )
    index = {c: i for i, c in enumerate(classes)}
    paths: list[Path] = []
    labels: list[int] = []
    for c in found:
        with os.scandir(split_dir / c) as it:
            names = sorted(
                e.name
                for e in it
                if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS)
            )
        if not names and own_classes:
            # an empty class folder would become a class the model must predict but never sees
            raise DatasetFormatError(
                f"{split_dir / c} holds no image files ({', '.join(IMAGE_EXTENSIONS)}): a class without "
                "training images cannot be learnt; remove the folder or add its images"
            )
        paths += [split_dir / c / n for n in names]
        labels += [index[c]] * len(names)
    return list(classes), paths, np.asarray(labels, dtype=np.int64)


def _to_array(data: bytes | str, where: str) -> np.ndarray:
    """Decode one image to ``H x W`` (grayscale) or ``H x W x 3`` (everything else) uint8."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            if im.mode in ("L", "LA", "1", "I;16", "I", "F") or (im.mode == "P" and _palette_is_gray(im)):
                im = im.convert("L")
            elif im.mode != "RGB":
                im = im.convert("RGB")
            return np.asarray(im, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DatasetFormatError(f"cannot decode image {where}: {e}") from None


def _palette_is_gray(im: Any) -> bool:
    pal = im.getpalette() or []
    return all(pal[i] == pal[i + 1] == pal[i + 2] for i in range(0, len(pal) - 2, 3))


def _decode_paths(paths: Sequence[str]) -> list[np.ndarray]:
    return [_to_array(p, p) for p in paths]


def _decode_tar_part(args: tuple[str, str, int, int]) -> tuple[list[str], list[np.ndarray]]:
    """Worker: decode every ``n_parts``-th image file (offset ``part``) under ``prefix`` of a tarball."""
    tar_path, prefix, part, n_parts = args
    names: list[str] = []
    arrays: list[np.ndarray] = []
    k = 0
    with tarfile.open(tar_path, "r:*") as tf:
        for member in tf:
            name = member.name[2:] if member.name.startswith("./") else member.name
            if not (member.isfile() and name.startswith(prefix) and name.lower().endswith(IMAGE_EXTENSIONS)):
                continue
            if k % n_parts == part:
                f = tf.extractfile(member)
                if f is not None:
                    names.append(name)
                    arrays.append(_to_array(f.read(), f"{tar_path}:{name}"))
            k += 1
    return names, arrays


def _pool_map(fn: Callable[[Any], Any], jobs: list[Any], workers: int) -> list[Any]:
    if workers <= 1 or len(jobs) <= 1:
        return [fn(j) for j in jobs]
    method = "fork" if "fork" in mp.get_all_start_methods() else None
    try:
        pool = mp.get_context(method).Pool(workers)
    except (AssertionError, OSError, ValueError):  # e.g. inside a daemonic worker process: decode here
        return [fn(j) for j in jobs]
    with pool:
        return pool.map(fn, jobs)


def default_workers() -> int:
    """Worker processes used to decode images (``$PRUNEKIT_DECODE_WORKERS`` or the CPU count, at most 8)."""
    env = os.environ.get("PRUNEKIT_DECODE_WORKERS", "")
    if env.isdigit():
        return max(1, int(env))
    return max(1, min(8, os.cpu_count() or 1))


def decode_images(paths: Sequence[Path], workers: int | None = None) -> list[np.ndarray]:
    """Decode image files (in worker processes when there are many) in order."""
    workers = default_workers() if workers is None else workers
    strs = [str(p) for p in paths]
    if len(strs) < _POOL_MIN_IMAGES:
        workers = 1
    n_chunks = workers * 4 if workers > 1 else 1
    size = -(-len(strs) // n_chunks) if strs else 1
    chunks = [strs[i : i + size] for i in range(0, len(strs), size)]
    out: list[np.ndarray] = []
    for part in _pool_map(_decode_paths, chunks, workers):
        out += part
    return out


def decode_image_tar(tar_path: Path, prefix: str = "", workers: int | None = None) -> dict[str, np.ndarray]:
    """Decode every image file under ``prefix`` in a tarball without unpacking it: ``{member: array}``."""
    workers = default_workers() if workers is None else workers
    try:
        parts = _pool_map(
            _decode_tar_part, [(str(tar_path), prefix, i, workers) for i in range(workers)], workers
        )
    except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as e:
        raise DatasetFormatError(f"cannot read archive {tar_path}: {e}") from None
    out: dict[str, np.ndarray] = {}
    for names, arrays in parts:
        out.update(zip(names, arrays))
    return out


def stack_images(arrays: Sequence[np.ndarray], names: Sequence[str]) -> np.ndarray:
    """Stack decoded images into ``N x C x H x W``; all must have the same size (else a clear error).

    Grayscale images are repeated to 3 channels when any image of the set is in colour.
    """
    if not arrays:
        raise DatasetFormatError("no images to stack")
    h, w = arrays[0].shape[:2]
    for a, n in zip(arrays, names):
        if a.shape[:2] != (h, w):
            raise DatasetFormatError(
                f"image {n} is {a.shape[1]}x{a.shape[0]} but {names[0]} is {w}x{h}; all images of an "
                "image-folder dataset must have the same size (resize them first)"
            )
    color = any(a.ndim == 3 for a in arrays)
    c = 3 if color else 1
    out = np.empty((len(arrays), c, h, w), dtype=np.uint8)
    for i, a in enumerate(arrays):
        out[i] = a.transpose(2, 0, 1) if a.ndim == 3 else a[None]
    return out


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std (0..1 units) of ``N x C x H x W`` uint8 images via histograms."""
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = np.bincount(np.ascontiguousarray(images[:, c]).reshape(-1), minlength=256).astype(np.float64)
        total = hist.sum()
        if total == 0:
            means.append(0.0)
            stds.append(1.0)
            continue
        m = float((hist * values).sum() / total)
        var = float((hist * (values - m) ** 2).sum() / total)
        std = var**0.5
        means.append(round(m, 6))
        stds.append(round(std, 6) if std > 1e-6 else 1.0)  # constant channel: do not blow it up
    return tuple(means), tuple(stds)
