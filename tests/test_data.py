"""Tests of prunekit.data: formats, look-up and caching, errors, splitting and the batch loader."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from prunekit.data import (
    BatchLoader,
    DatasetFormatError,
    DatasetInfo,
    ImageDataset,
    crop_flip,
    dataset_info,
    formats,
    get_dataset,
    list_datasets,
    sources,
    train_holdout_split,
)
from prunekit.data.sources import DownloadError
from prunekit.errors import DatasetNotFoundError, PrunekitError, UnknownNameError

REAL_DOWNLOAD = sources.download_file  # saved before the autouse fixture replaces it
SHARED = Path(os.environ.get("PRUNEKIT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(autouse=True)
def _hermetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache, no $PRUNEKIT_DATA, no system roots and no network for every test."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("PRUNEKIT_CACHE", str(cache))
    monkeypatch.delenv("PRUNEKIT_DATA", raising=False)
    monkeypatch.delenv("PRUNEKIT_OFFLINE", raising=False)
    monkeypatch.setattr(sources, "SYSTEM_ROOTS", [tmp_path / "system"])

    def no_network(url: str, dest: Path, **kw: object) -> Path:
        raise DownloadError(f"{url}: URLError: no network in tests")

    monkeypatch.setattr(sources, "download_file", no_network)
    return cache


# --------------------------------------------------------------------------- helpers


def write_idx(path: Path, arr: np.ndarray, compress: bool = True) -> None:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    header = bytes([0, 0, codes[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def write_mnist(d: Path, n_train: int = 12, n_test: int = 5, compress: bool = True) -> dict[str, np.ndarray]:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        suffix = ".gz" if compress else ""
        write_idx(d / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(d / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
        out[split], out[split + "_labels"] = images, labels
    return out


def cifar_batch(n: int, seed: int, label_key: str) -> dict[bytes, object]:
    rng = np.random.default_rng(seed)
    return {
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key.encode(): [int(v) for v in rng.integers(0, 10, n)],
        b"batch_label": b"fake",
    }


def write_png(path: Path, size: tuple[int, int], color: tuple[int, int, int], mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color)
    img = img.convert(mode)
    img.save(path)


# --------------------------------------------------------------------------- registry / info


def test_list_and_info() -> None:
    names = list_datasets()
    for n in ("fashion-mnist", "mnist", "cifar10", "cifar100", "cifar10-jpeg", "synthetic"):
        assert n in names
    info = dataset_info("cifar10")
    assert (info.num_classes, info.in_channels, info.image_size, info.augment) == (10, 3, 32, "cifar")
    assert info.mean == pytest.approx((0.4914, 0.4822, 0.4465)) and len(info.std) == 3
    fm = dataset_info("Fashion_MNIST")
    assert (fm.name, fm.in_channels, fm.image_size, fm.augment, fm.mean) == (
        "fashion-mnist",
        1,
        28,
        "none",
        (0.2860,),
    )
    assert dataset_info("cifar100").num_classes == 100
    with pytest.raises(UnknownNameError, match="valid datasets"):
        get_dataset("imagenet-99")
    with pytest.raises(UnknownNameError):
        get_dataset("synthetic", "validation")


# --------------------------------------------------------------------------- IDX


def test_read_idx_gz_raw_and_errors(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", arr)
    write_idx(tmp_path / "a", arr, compress=False)
    np.testing.assert_array_equal(formats.read_idx(tmp_path / "a.gz"), arr)
    np.testing.assert_array_equal(formats.read_idx(tmp_path / "a"), arr)
    ints = np.array([1, -2, 70000], dtype=">i4")
    write_idx(tmp_path / "i", ints, compress=False)
    np.testing.assert_array_equal(formats.read_idx(tmp_path / "i"), [1, -2, 70000])
    (tmp_path / "bad").write_bytes(b"\x12\x34\x56\x78" + bytes(10))
    with pytest.raises(DatasetFormatError, match="not an IDX file"):
        formats.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes((tmp_path / "a").read_bytes()[:-5])
    with pytest.raises(DatasetFormatError, match="truncated"):
        formats.read_idx(tmp_path / "short")


@pytest.mark.parametrize("layout", ["subdir", "direct", "raw-files"])
def test_mnist_from_idx_files_and_cache(tmp_path: Path, _hermetic: Path, layout: str) -> None:
    root = tmp_path / "data"
    files_dir = root / "mnist" if layout == "subdir" else root
    ref = write_mnist(files_dir, compress=layout != "raw-files")
    ds = get_dataset("mnist", "train", data_dir=root)
    assert isinstance(ds, ImageDataset) and len(ds) == 12
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (12, 1, 28, 28) and ds.images.is_contiguous()
    assert ds.labels.dtype == torch.int64
    np.testing.assert_array_equal(ds.images[:, 0].numpy(), ref["train"])
    np.testing.assert_array_equal(ds.labels.numpy(), ref["train_labels"])
    assert ds.classes == [str(i) for i in range(10)] and ds.info.name == "mnist"
    test = get_dataset("mnist", "test", data_dir=root)
    assert len(test) == 5 and test.split == "test"
    assert len(list((_hermetic / "decoded").glob("mnist-*.npz"))) == 2
    # the decoded cache is used the second time (the files need not be read again)...
    again = get_dataset("mnist", "train", data_dir=root)
    assert torch.equal(again.images, ds.images)
    # ...and invalidated when a source file changes
    write_mnist(files_dir, n_train=20, compress=layout != "raw-files")
    assert len(get_dataset("mnist", "train", data_dir=root)) == 20
    assert len(list((_hermetic / "decoded").glob("mnist-train-*.npz"))) == 1  # stale entry pruned


def test_env_var_root_and_corrupt_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_mnist(tmp_path / "env" / "fashion-mnist")
    monkeypatch.setenv("PRUNEKIT_DATA", str(tmp_path / "env"))
    ds = get_dataset("fashion-mnist", "test")
    assert len(ds) == 5 and ds.classes[0] == "T-shirt/top" and ds.info.mean == (0.2860,)
    (tmp_path / "env" / "fashion-mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bgarbage")
    with pytest.raises(DatasetFormatError, match="train-images-idx3-ubyte.gz"):
        get_dataset("fashion-mnist", "train")


def test_download_path_is_used_and_verified(
    tmp_path: Path, _hermetic: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "upstream"
    write_mnist(src)
    calls = []

    def fake_download(url: str, dest: Path, **kw: object) -> Path:
        calls.append((url, kw))
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes((src / url.rsplit("/", 1)[-1]).read_bytes())
        return dest

    monkeypatch.setattr(sources, "download_file", fake_download)
    ds = get_dataset("fashion-mnist", "train")
    assert len(ds) == 12
    assert calls[0][0].endswith("/train-images-idx3-ubyte.gz") and "sha256" in calls[0][1]
    assert (_hermetic / "fashion-mnist" / "train-labels-idx1-ubyte.gz").is_file()
    calls.clear()
    get_dataset("fashion-mnist", "train")  # now found in the user cache: no second download
    assert calls == []


def test_download_file_checksum_mismatch(tmp_path: Path) -> None:
    download_file = REAL_DOWNLOAD
    src = tmp_path / "f.bin"
    src.write_bytes(b"hello")
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download_file(src.as_uri(), tmp_path / "out" / "f.bin", md5="0" * 32)
    assert not (tmp_path / "out" / "f.bin").exists()
    got = download_file(src.as_uri(), tmp_path / "out" / "f.bin", md5="5d41402abc4b2a76b9719d911017c592")
    assert got.read_bytes() == b"hello"
    with pytest.raises(DownloadError, match="URLError"):
        download_file((tmp_path / "missing").as_uri(), tmp_path / "out" / "g.bin")


# --------------------------------------------------------------------------- missing data


def test_missing_dataset_error_names_every_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRUNEKIT_DATA", str(tmp_path / "envdir"))
    with pytest.raises(DatasetNotFoundError) as exc:
        get_dataset("fashion-mnist", "train", data_dir=tmp_path / "given")
    msg = str(exc.value)
    assert isinstance(exc.value, PrunekitError)
    assert "'fashion-mnist'" in msg
    for place in (tmp_path / "given", tmp_path / "envdir", tmp_path / "cache", tmp_path / "system"):
        assert str(place) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "PRUNEKIT_DATA" in msg
    assert "fashion-mnist.s3-website.eu-central-1.amazonaws.com" in msg and "no network in tests" in msg
    assert "Traceback" not in msg

    with pytest.raises(DatasetNotFoundError) as exc:
        get_dataset("cifar100", "test", download=False)
    msg = str(exc.value)
    assert "download=False" in msg and "www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in msg
    assert str(tmp_path / "system") in msg
    with pytest.raises(DatasetNotFoundError, match="cifar10-jpeg"):
        get_dataset("cifar10-jpeg", data_dir=tmp_path)


def test_offline_env_disables_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRUNEKIT_OFFLINE", "1")
    with pytest.raises(DatasetNotFoundError, match="PRUNEKIT_OFFLINE"):
        get_dataset("mnist")


# --------------------------------------------------------------------------- CIFAR pickles


def test_cifar10_pickle_dir(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    batches = [cifar_batch(3, i, "labels") for i in range(6)]
    for i, b in enumerate(batches[:5]):
        (d / f"data_batch_{i + 1}").write_bytes(pickle.dumps(b, protocol=2))
    (d / "test_batch").write_bytes(pickle.dumps(batches[5], protocol=2))
    names = [f"c{i}".encode() for i in range(10)]
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    train = get_dataset("cifar10", "train", data_dir=tmp_path)
    assert len(train) == 15 and train.images.shape == (15, 3, 32, 32) and train.classes[3] == "c3"
    first = batches[0][b"data"][0]
    # CIFAR rows are the R plane, then G, then B, each row-major
    np.testing.assert_array_equal(train.images[0, 0].numpy(), first[:1024].reshape(32, 32))
    np.testing.assert_array_equal(train.images[0, 2].numpy(), first[2048:].reshape(32, 32))
    assert train.labels.tolist()[:3] == batches[0][b"labels"]
    test = get_dataset("cifar10", "test", data_dir=tmp_path)
    assert len(test) == 3 and test.info.augment == "cifar"


def test_cifar100_from_tarball(tmp_path: Path) -> None:
    tar_path = tmp_path / "cifar-100-python.tar.gz"
    members = {
        "train": cifar_batch(7, 1, "fine_labels"),
        "test": cifar_batch(4, 2, "fine_labels"),
        "meta": {b"fine_label_names": [f"f{i}".encode() for i in range(100)]},
    }
    with tarfile.open(tar_path, "w:gz") as tf:
        for name, obj in members.items():
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    ds = get_dataset("cifar100", "train", data_dir=tmp_path)
    assert len(ds) == 7 and ds.info.num_classes == 100 and ds.classes[99] == "f99"
    assert ds.labels.tolist() == members["train"][b"fine_labels"]
    assert len(get_dataset("cifar-100", "test", data_dir=tmp_path)) == 4


def write_cifar10_tar(path: Path, n: int = 2) -> None:
    with tarfile.open(path, "w:gz") as tf:
        for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
            data = pickle.dumps(cifar_batch(n, i, "labels"), protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_cifar10_download_into_cache(
    tmp_path: Path, _hermetic: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def fake_download(url: str, dest: Path, **kw: object) -> Path:
        calls.append((url, kw))
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_cifar10_tar(dest)
        return dest

    monkeypatch.setattr(sources, "download_file", fake_download)
    ds = get_dataset("cifar10", "train")
    assert len(ds) == 10 and ds.classes[0] == "airplane"  # no batches.meta: the standard names
    assert calls == [
        (
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            {"md5": "c58f30108f718f92721af3b95e74349a"},
        )
    ]
    assert (_hermetic / "cifar-10-python.tar.gz").is_file()
    assert len(get_dataset("cifar10", "test")) == 2 and len(calls) == 1


def test_cifar_pickle_refuses_foreign_objects(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / "test_batch").write_bytes(pickle.dumps({b"data": Path("x"), b"labels": []}))
    with pytest.raises(DatasetFormatError, match="not a valid CIFAR"):
        get_dataset("cifar10", "test", data_dir=tmp_path)


# --------------------------------------------------------------------------- image folders


def make_folder(root: Path, size: tuple[int, int] = (6, 6)) -> None:
    colors = {"cat": (200, 10, 10), "ant": (10, 200, 10), "bee": (10, 10, 200)}
    for split, n in (("train", 3), ("test", 1)):
        for cls, color in colors.items():
            for i in range(n):
                write_png(root / split / cls / f"{i}.png", size, color)
    write_png(root / "train" / "bee" / "extra.jpg", size, (0, 0, 255))  # JPEG mixed in
    (root / "train" / "bee" / "notes.txt").write_text("not an image")


def test_image_folder(tmp_path: Path) -> None:
    make_folder(tmp_path / "imgs")
    ds = get_dataset(f"folder:{tmp_path / 'imgs'}", "train")
    assert ds.classes == ["ant", "bee", "cat"]
    assert len(ds) == 10 and ds.images.shape == (10, 3, 6, 6)
    assert ds.class_counts().tolist() == [3, 4, 3]
    assert ds.images[0, :, 0, 0].tolist() == [10, 200, 10]  # first ant image, RGB order
    info = ds.info
    assert (
        info.num_classes == 3 and info.in_channels == 3 and info.image_size == 6 and info.augment == "cifar"
    )
    x = ds.images.double() / 255
    assert info.mean == pytest.approx(x.mean((0, 2, 3)).tolist(), abs=1e-5)
    assert info.std == pytest.approx(x.std((0, 2, 3), unbiased=False).tolist(), abs=1e-5)
    test = get_dataset(f"folder:{tmp_path / 'imgs'}", "test")
    assert len(test) == 3 and test.labels.tolist() == [0, 1, 2] and test.info.mean == info.mean
    assert dataset_info(f"folder:{tmp_path / 'imgs'}") == info


def test_image_folder_grayscale_and_errors(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        write_png(tmp_path / "g" / "train" / cls / "0.png", (5, 5), (90, 90, 90), mode="L")
    g = get_dataset(f"folder:{tmp_path / 'g'}")
    assert g.images.shape == (2, 1, 5, 5) and g.info.augment == "none"
    with pytest.raises(DatasetNotFoundError, match="no test/ directory"):
        get_dataset(f"folder:{tmp_path / 'g'}", "test")
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        get_dataset(f"folder:{tmp_path / 'nope'}")

    make_folder(tmp_path / "mixed")
    write_png(tmp_path / "mixed" / "train" / "cat" / "big.png", (8, 8), (1, 2, 3))
    with pytest.raises(DatasetFormatError, match=r"big\.png"):
        get_dataset(f"folder:{tmp_path / 'mixed'}")
    make_folder(tmp_path / "broken")
    (tmp_path / "broken" / "train" / "ant" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DatasetFormatError, match=r"bad\.png"):
        get_dataset(f"folder:{tmp_path / 'broken'}")


def test_image_folder_mixed_modes_and_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "m"
    write_png(root / "train" / "a" / "0.png", (4, 4), (255, 0, 0))
    write_png(root / "train" / "b" / "0.png", (4, 4), (7, 7, 7), mode="L")  # gray next to colour: RGB
    write_png(root / "train" / "b" / "1.png", (4, 4), (0, 9, 0), mode="RGBA")
    write_png(root / "test" / "a" / "0.png", (4, 4), (50, 50, 50), mode="L")  # gray-only test split
    train = get_dataset(f"folder:{root}")
    assert train.images.shape == (3, 3, 4, 4) and train.images[1, :, 0, 0].tolist() == [7, 7, 7]
    test = get_dataset(f"folder:{root}", "test")
    assert test.images.shape == (1, 3, 4, 4) and test.classes == ["a", "b"]
    # the worker-process path gives the same result and reports bad files by name
    paths = sorted((root / "train").rglob("*.png"))
    monkeypatch.setattr(formats, "_POOL_MIN_IMAGES", 0)
    serial = formats.decode_images(paths, workers=1)
    pooled = formats.decode_images(paths, workers=2)
    assert all(np.array_equal(a, b) for a, b in zip(serial, pooled))
    (root / "train" / "b" / "2.png").write_bytes(b"garbage")
    with pytest.raises(DatasetFormatError, match=r"2\.png"):
        formats.decode_images([*paths, root / "train" / "b" / "2.png"], workers=2)


def test_cifar10_jpeg_from_small_tarball(tmp_path: Path) -> None:
    tar_path = tmp_path / "cifar10-jpeg.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tf:
        for split, n in (("train", 2), ("test", 1)):
            for cls in ("dog", "airplane"):
                for i in range(n):
                    buf = io.BytesIO()
                    Image.new("RGB", (32, 32), (250, 0, 0) if cls == "dog" else (0, 0, 250)).save(buf, "JPEG")
                    info = tarfile.TarInfo(f"{split}/{cls}/{i:04d}.jpg")
                    info.size = buf.tell()
                    buf.seek(0)
                    tf.addfile(info, buf)
    ds = get_dataset("cifar10-jpeg", "train", data_dir=tmp_path)
    assert ds.classes == ["airplane", "dog"] and ds.labels.tolist() == [0, 0, 1, 1]
    assert ds.images.shape == (4, 3, 32, 32) and ds.images[2, 0].float().mean() > 200
    assert ds.info.mean == pytest.approx((0.4914, 0.4822, 0.4465))
    assert len(get_dataset("cifar10-jpeg", "test", data_dir=tmp_path)) == 2


# --------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_configurable() -> None:
    a = get_dataset("synthetic", "train", seed=3)
    b = get_dataset("synthetic", "train", seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert len(a) == 512 and a.images.shape[1:] == (3, 32, 32) and a.info.num_classes == 10
    assert len(get_dataset("synthetic", "test", seed=3)) == 128
    c = get_dataset("synthetic", "train", num_classes=4, in_channels=1, image_size=16, n=40)
    assert c.images.shape == (40, 1, 16, 16) and c.class_counts().tolist() == [10, 10, 10, 10]
    assert dataset_info("synthetic", in_channels=1).in_channels == 1
    # learnable: nearest class mean on the train set classifies the test set well
    test = get_dataset("synthetic", "test", seed=3)
    means = torch.stack([a.images[a.labels == k].float().mean(0) for k in range(10)])
    dist = torch.cdist(test.images.float().flatten(1), means.flatten(1))
    assert (dist.argmin(1) == test.labels).float().mean() > 0.9
    with pytest.raises(PrunekitError):
        get_dataset("synthetic", colour=True)


# --------------------------------------------------------------------------- splitting


def indexed_dataset(n: int = 200, num_classes: int = 4) -> ImageDataset:
    """Each image's first pixel is its index, so subsets can be traced back."""
    images = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    labels = torch.tensor([0] * (n // 2) + [k % (num_classes - 1) + 1 for k in range(n - n // 2)])
    info = DatasetInfo("indexed", num_classes, 1, 2, (0.5,), (0.25,))
    return ImageDataset(images, labels, [str(i) for i in range(num_classes)], info)


def test_train_holdout_split() -> None:
    ds = indexed_dataset()
    train, hold = train_holdout_split(ds, 50, seed=1)
    assert len(train) == 150 and len(hold) == 50
    ids_t = set(train.images[:, 0, 0, 0].tolist())
    ids_h = set(hold.images[:, 0, 0, 0].tolist())
    assert not ids_t & ids_h and len(ids_t | ids_h) == 200
    assert hold.class_counts().tolist() == [25, 9, 8, 8]  # stratified: half of the holdout is class 0
    train2, hold2 = train_holdout_split(ds, 50, seed=1)
    assert torch.equal(hold.images, hold2.images) and torch.equal(train.labels, train2.labels)
    _, hold3 = train_holdout_split(ds, 50, seed=2)
    assert not torch.equal(hold.images, hold3.images)
    t, h = train_holdout_split(ds, 0.1)
    assert (len(t), len(h)) == (180, 20) and h.info is ds.info
    assert len(train_holdout_split(ds, 0)[1]) == 0
    for bad in (200, -1, 1.5, "10"):
        with pytest.raises(PrunekitError):
            train_holdout_split(ds, bad)  # type: ignore[arg-type]


def test_subset_variants() -> None:
    ds = indexed_dataset(20)
    assert ds.subset([3, 1]).images[:, 0, 0, 0].tolist() == [3, 1]
    assert len(ds.subset(slice(0, 5))) == 5 and len(ds.subset(ds.labels == 0)) == 10
    assert len(ds.subset(np.arange(4))) == 4
    with pytest.raises(PrunekitError):
        ds.subset([25])


# --------------------------------------------------------------------------- loader


def test_loader_shapes_dtypes_and_normalisation() -> None:
    ds = get_dataset("synthetic", "train", n=300)
    loader = BatchLoader(ds, batch_size=64)
    assert len(loader) == 5 and len(BatchLoader(ds, 64, drop_last=True)) == 4
    batches = list(loader)
    assert [len(x) for x, _ in batches] == [64, 64, 64, 64, 44]
    x, y = batches[0]
    assert x.dtype == torch.float32 and x.shape == (64, 3, 32, 32) and y.dtype == torch.int64
    assert torch.equal(y, ds.labels[:64])  # no shuffle: dataset order
    mean, std = torch.tensor(ds.info.mean), torch.tensor(ds.info.std)
    expected = (ds.images[:64].float() / 255 - mean[:, None, None]) / std[:, None, None]
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)
    allx = torch.cat([b[0] for b in batches])
    assert allx.mean((0, 2, 3)).abs().max() < 1e-3 and (allx.std((0, 2, 3)) - 1).abs().max() < 1e-2
    cl = next(iter(BatchLoader(ds, 8, channels_last=True)))[0]
    assert cl.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(PrunekitError):
        BatchLoader(ds, batch_size=0)
    with pytest.raises(UnknownNameError):
        BatchLoader(ds, augment="mixup")


def test_loader_determinism_and_epochs() -> None:
    ds = get_dataset("synthetic", "train", n=200)

    def epoch_data(loader: BatchLoader) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*loader)
        return torch.cat(xs), torch.cat(ys)

    a = BatchLoader(ds, 32, shuffle=True, augment="cifar", seed=5)
    b = BatchLoader(ds, 32, shuffle=True, augment="cifar", seed=5)
    a.set_epoch(3)
    b.set_epoch(3)
    xa, ya = epoch_data(a)
    xb, yb = epoch_data(b)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert sorted(ya.tolist()) == sorted(ds.labels.tolist())  # a permutation of the dataset
    a.set_epoch(4)
    assert not torch.equal(epoch_data(a)[1], ya)
    # without set_epoch the counter advances: the 2nd iteration of a fresh loader is epoch 1
    c = BatchLoader(ds, 32, shuffle=True, augment="cifar", seed=5)
    epoch_data(c)
    assert c.epoch == 1
    second = epoch_data(c)
    d = BatchLoader(ds, 32, shuffle=True, augment="cifar", seed=5)
    d.set_epoch(1)
    assert torch.equal(epoch_data(d)[0], second[0])
    other_seed = BatchLoader(ds, 32, shuffle=True, augment="cifar", seed=6)
    other_seed.set_epoch(3)
    assert not torch.equal(epoch_data(other_seed)[1], ya)


def test_augmentation_policies() -> None:
    ds = get_dataset("synthetic", "train", n=64)
    plain = torch.cat([x for x, _ in BatchLoader(ds, 16)])
    aug = torch.cat([x for x, _ in BatchLoader(ds, 16, augment=True)])  # synthetic's default: none
    assert torch.equal(plain, aug)
    cifar = torch.cat([x for x, _ in BatchLoader(ds, 16, augment="cifar")])
    assert cifar.shape == plain.shape and not torch.equal(cifar, plain)
    flip = torch.cat([x for x, _ in BatchLoader(ds, 16, augment="flip")])
    same = (flip == plain).flatten(1).all(1)
    mirrored = (flip == plain.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 0 < int(mirrored.sum()) < 64
    mn = ImageDataset(ds.images[:, :1], ds.labels, ds.classes, dataset_info("mnist"))
    assert (
        BatchLoader(mn, augment=True).augment == "none" and BatchLoader(mn, augment="crop").augment == "crop"
    )


def test_crop_flip_matches_reference() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 8, 8), generator=g, dtype=torch.uint8)
    oy = torch.tensor([0, 8, 4, 1, 3, 8])
    ox = torch.tensor([0, 8, 4, 7, 2, 0])
    fl = torch.tensor([False, True, False, True, False, True])
    out = crop_flip(x, oy, ox, fl, padding=4)
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(6):
        ref = padded[i, :, oy[i] : oy[i] + 8, ox[i] : ox[i] + 8]
        if fl[i]:
            ref = ref.flip(2)
        assert torch.equal(out[i], ref)
    assert torch.equal(crop_flip(x, None, None, torch.ones(6, dtype=torch.bool)), x.flip(3))
    assert out[1, :, 4:, :4].eq(0).all()  # zero padding, mirrored to the left


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(not (SHARED / "fashion-mnist").is_dir(), reason="shared Fashion-MNIST not available")
def test_real_fashion_mnist() -> None:
    train = get_dataset("fashion-mnist", "train", data_dir=SHARED, download=False)
    test = get_dataset("fashion-mnist", "test", data_dir=SHARED, download=False)
    assert (len(train), len(test)) == (60000, 10000)
    assert train.images.shape == (60000, 1, 28, 28) and len(train.classes) == 10
    assert train.class_counts().tolist() == [6000] * 10
    x = train.images.float() / 255
    assert float(x.mean()) == pytest.approx(0.2860, abs=1e-3) and float(x.std()) == pytest.approx(
        0.3530, abs=1e-3
    )


@pytest.mark.slow
@pytest.mark.skipif(
    not (SHARED / "cifar10-jpeg.tar.gz").is_file(), reason="shared CIFAR-10 JPEGs not available"
)
def test_real_cifar10_jpeg(request: pytest.FixtureRequest) -> None:
    """Decodes the 60k JPEGs (~10-30 s): only with ``-m slow`` or ``PRUNEKIT_SLOW_TESTS=1``."""
    expr = request.config.getoption("markexpr") or ""
    if os.environ.get("PRUNEKIT_SLOW_TESTS") != "1" and ("slow" not in expr or "not slow" in expr):
        pytest.skip("slow: run with -m slow or PRUNEKIT_SLOW_TESTS=1")
    train = get_dataset("cifar10-jpeg", "train", data_dir=SHARED, download=False)
    assert train.images.shape == (50000, 3, 32, 32) and train.class_counts().tolist() == [5000] * 10
    test = get_dataset("cifar10-jpeg", "test", data_dir=SHARED, download=False)
    assert len(test) == 10000 and test.classes == train.classes
    n = sum(len(x) for x, _ in BatchLoader(train, 256, shuffle=True, augment=True))
    assert n == 50000
