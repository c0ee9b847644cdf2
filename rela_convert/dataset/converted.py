"""A converted dataset opened for reading: its index, keys, PCA statistics and shard list, from a folder or a URL.

What both stages read of a dataset before its shards: ``rela train`` and ``rela study`` (the data stream,
:mod:`rela_train.data`), the benchmarks. The shards themselves are read by the stream's workers
(:class:`rela_train.data.shards.ShardReader`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rela_convert.dataset.files import DatasetError
from rela_convert.dataset.formats import STORAGE_FORMATS, StorageFormat
from rela_convert.dataset.index import DatasetIndex, ShardRecord
from rela_convert.dataset.pca import PCAStatistics
from rela_convert.dataset.remote import RemoteFolder, dataset_root, read_small


class ConvertedDataset:
    """A converted dataset opened for reading: index, keys, PCA statistics and the shard records of one format.

    Args:
        root: dataset folder, or its URL (``s3://...``, ``https://...``: :mod:`rela_convert.dataset.remote`; storage
            options and shard cache from the environment, as ``rela train --storage-options / --cache-dir`` set
            them).
        storage: which stored format to read (a name of :data:`rela_convert.dataset.formats.STORAGE_FORMATS`
            the dataset holds); None: the index's default (:attr:`DatasetIndex.storage`).

    Attributes:
        root: the dataset folder (a :class:`~pathlib.Path`), or a :class:`~rela_convert.dataset.remote.RemoteFolder`
            for a URL (shards are then fetched by the workers that read them,
            :meth:`rela_train.data.shards.ShardReader.read`).
        index: its :class:`~rela_convert.dataset.index.DatasetIndex`.
        storage: the name of the format read.
        format: its :class:`~rela_convert.dataset.formats.StorageFormat` class (the shard reader).
        keys: int64 ``[N]`` sample keys in shard order.
        shards: the chosen format's :class:`~rela_convert.dataset.index.ShardRecord` list (``name``,
            ``num_samples``, ...).
        pca: :class:`~rela_convert.dataset.pca.PCAStatistics` of the prior features.

    Raises:
        rela_convert.dataset.files.DatasetError: not a (finished) converted dataset, or one without PCA
            statistics (fewer than 2 samples).
        ValueError: the dataset was not converted to ``storage``, or ``storage`` is not a registered
            format (:class:`~rela_convert.registry.RegistryError`).
        rela_convert.dataset.remote.ContentMismatchError: (URL) ``keys.npy`` or ``pca.npz`` differs from its SHA-256
            in the index, also when fetched again.
        OSError: a file cannot be read (:class:`~rela_convert.dataset.remote.RemoteError` at a URL, after the retries).
    """

    def __init__(self, root: str | Path | RemoteFolder, storage: str | None = None) -> None:
        self.root: Path | RemoteFolder = dataset_root(root)
        self.index = DatasetIndex.load(self.root)
        self.storage = storage or self.index.storage
        try:
            self.shards: list[ShardRecord] = self.index.shards(self.storage)
        except ValueError as error:
            raise ValueError(f"{root}: {error}") from None
        self.format: type[StorageFormat] = STORAGE_FORMATS.get(self.storage)
        if self.index.pca is None:
            raise DatasetError(f"{root} holds fewer than 2 samples (no PCA statistics): nothing to train on")
        self.keys = np.load(read_small(self.root, self.index.keys_file, self.index.keys_sha256))
        self.pca = PCAStatistics.load(read_small(self.root, self.index.pca["file"], self.index.pca["sha256"]))

    @property
    def num_samples(self) -> int:
        """N, the samples stored."""
        return self.index.num_samples

    @property
    def train_size(self) -> int:
        """The default training input size, pixels: the data's own image size
        (:attr:`rela_convert.dataset.index.DatasetIndex.train_size`), never the prior's."""
        return self.index.train_size
