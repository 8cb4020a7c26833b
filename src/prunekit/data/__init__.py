"""Datasets for pruning experiments: loading, caching, splitting and fast batching.

>>> from prunekit.data import get_dataset, BatchLoader
>>> train = get_dataset("fashion-mnist", "train")          # doctest: +SKIP
>>> for x, y in BatchLoader(train, 128, shuffle=True):    # doctest: +SKIP
...     ...

Datasets: ``fashion-mnist``, ``mnist`` (IDX files), ``cifar10``, ``cifar100`` (official python
pickles or their ``.tar.gz``), ``cifar10-jpeg`` (CIFAR-10 as JPEG files), ``synthetic`` (generated)
and ``folder:<path>`` (any ``<path>/{train,test}/<class>/<image>`` tree). Files are searched in
``data_dir``, ``$PRUNEKIT_DATA``, the user cache and ``/usr/share/datasets``, downloaded if missing
(where an official URL exists), decoded once and cached as ``uint8`` arrays.
"""

from prunekit.data.datasets import ImageDataset, dataset_info, get_dataset, list_datasets, train_holdout_split
from prunekit.data.info import AUGMENTATIONS, DatasetFormatError, DatasetInfo
from prunekit.data.loader import BatchLoader
from prunekit.data.sources import cache_dir
from prunekit.data.transforms import crop_flip, normalize, random_crop_flip

__all__ = [
    "AUGMENTATIONS",
    "BatchLoader",
    "DatasetFormatError",
    "DatasetInfo",
    "ImageDataset",
    "cache_dir",
    "crop_flip",
    "dataset_info",
    "get_dataset",
    "list_datasets",
    "normalize",
    "random_crop_flip",
    "train_holdout_split",
]
