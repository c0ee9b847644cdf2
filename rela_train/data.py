"""Streaming converted shards into training batches (webdataset pipeline style).

Per epoch, every process and DataLoader worker derives the same :class:`EpochPlan`
from ``(seed, epoch)``: the epoch's subset (method.md, step 3), a shuffled shard
order, and the subset's keys in that order cut into equal contiguous shares, one
per rank, and within a rank one per worker in whole batches. A worker then reads
only the shards that hold its share, keeps its keys, shuffles them in a buffer,
decodes, makes two views and hands them to the DataLoader's batching. So every
rank runs exactly the same number of steps, and every sample of the epoch's
subset is seen once in total, except the fewer than ``world x batch`` that do
not fill a last step.

Each batch is ``(view_1, view_2, features, labels)``: float32 ``[B, 3, S, S]`` twice,
the raw prior features float32 ``[B, D_prior]`` and the stored class labels int64
``[B]`` (-1 without class folders); the trainer turns features into targets on its
device with the dataset's PCA statistics.

The views follow the training phase through a flag shared with the workers:
ReLA views while the ReLA loss is active, the method's own views after the
switch. Batches already prefetched at the switch keep the ReLA views (at most
``workers x prefetch_factor`` batches).
"""

from __future__ import annotations

import gc
import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from rela_convert.formats import STORAGE_FORMATS, StorageFormat
from rela_convert.images import decode_rgb
from rela_convert.index import DatasetError, DatasetIndex, ShardRecord
from rela_convert.pca import PCAStatistics
from rela_train.subset import SubsetStrategy, key_mask
from rela_train.views import View, rela_view


class ConvertedDataset:
    """A converted dataset opened for training: index, keys and PCA statistics.

    Args:
        root: dataset folder.
        storage: which stored format to read (a name of :data:`rela_convert.formats.STORAGE_FORMATS`
            the dataset holds); None: the index's default (:attr:`DatasetIndex.storage`).

    Attributes:
        root: the dataset folder.
        index: its :class:`~rela_convert.index.DatasetIndex`.
        storage: the name of the format read.
        format: its :class:`~rela_convert.formats.StorageFormat` class (the shard reader).
        keys: int64 ``[N]`` sample keys in shard order.
        shards: the chosen format's :class:`~rela_convert.index.ShardRecord` list (``name``, ``num_samples``, ...).
        pca: :class:`~rela_convert.pca.PCAStatistics` of the prior features.

    Raises:
        rela_convert.index.DatasetError: not a (finished) converted dataset, or one without PCA
            statistics (fewer than 2 samples).
        ValueError: the dataset was not converted to ``storage``, or ``storage`` is not a registered
            format (:class:`~rela_convert.registry.RegistryError`).
    """

    def __init__(self, root: str | Path, storage: str | None = None) -> None:
        self.root = Path(root)
        self.index = DatasetIndex.load(self.root)
        self.storage = storage or self.index.storage
        try:
            self.shards: list[ShardRecord] = self.index.shards(self.storage)
        except ValueError as error:
            raise ValueError(f"{root}: {error}") from None
        self.format: type[StorageFormat] = STORAGE_FORMATS.get(self.storage)
        if self.index.pca is None:
            raise DatasetError(f"{root} holds fewer than 2 samples (no PCA statistics): nothing to train on")
        self.keys = np.load(self.root / self.index.keys_file)
        self.pca = PCAStatistics.load(self.root / self.index.pca["file"])

    @property
    def num_samples(self) -> int:
        """N, the samples stored."""
        return self.index.num_samples

    @property
    def train_size(self) -> int:
        """The default training input size, pixels: the data's own image size
        (:attr:`rela_convert.index.DatasetIndex.train_size`), never the prior's."""
        return self.index.train_size


@dataclass(frozen=True)
class EpochPlan:
    """Which samples each rank and worker trains on in one epoch.

    Attributes:
        keys: int64 ``[world * steps * batch_size]``: the epoch's subset keys in
            shuffled shard order, truncated to whole steps on every rank.
        shard_order: int ``[num_shards]``: the epoch's shard order.
        shard_of_key: int ``[len(keys)]``: shard index holding each key.
        steps: optimiser steps per rank.
    """

    keys: np.ndarray
    shard_order: np.ndarray
    shard_of_key: np.ndarray
    steps: int

    @classmethod
    def make(
        cls,
        dataset_keys: np.ndarray,
        shard_sizes: list[int],
        data_ratio: float,
        seed: int,
        epoch: int,
        world: int,
        batch_size: int,
        subset: SubsetStrategy | None = None,
    ) -> "EpochPlan":
        """Draw the epoch's subset and lay it out in a shuffled shard order.

        Args:
            dataset_keys: int64 ``[N]`` keys in stored shard order.
            shard_sizes: samples per shard, in stored order (sums to N).
            subset: the draw rule (:mod:`rela_train.subset`); None: ``random``.

        Raises:
            ValueError: the subset is smaller than one step on every rank.
        """
        drawn = (subset or SubsetStrategy()).draw(dataset_keys, data_ratio, seed, epoch)
        steps = len(drawn) // (world * batch_size)  # dedup may draw fewer than floor(r*N)
        if steps == 0:
            raise ValueError(
                f"floor(data ratio {data_ratio} x {len(dataset_keys)} samples) is less than one step of "
                f"{world} ranks x batch {batch_size}; raise --data-ratio or lower --batch-size"
            )
        chosen = key_mask(drawn, int(dataset_keys.max()))
        order = np.random.default_rng([seed, epoch, 1]).permutation(len(shard_sizes))
        starts = np.concatenate([[0], np.cumsum(shard_sizes)])
        keys = [dataset_keys[starts[shard] : starts[shard + 1]] for shard in order]
        shard_ids = [np.full(len(part), shard) for part, shard in zip(keys, order)]
        all_keys, all_shards = np.concatenate(keys), np.concatenate(shard_ids)
        kept = chosen[all_keys]
        total = steps * world * batch_size
        return cls(all_keys[kept][:total], order, all_shards[kept][:total], steps)

    def share(self, rank: int, world: int, worker: int, workers: int, batch_size: int) -> tuple[np.ndarray, list[int]]:
        """The keys of one (rank, worker) and the shards to read for them, in epoch order.

        A rank's share is ``steps * batch_size`` consecutive keys; its workers split
        it in whole batches (worker ``w`` gets batches ``w*steps//workers`` to
        ``(w+1)*steps//workers``).

        Returns:
            ``(keys int64 [n], shard indices)``.
        """
        first_batch, last_batch = worker * self.steps // workers, (worker + 1) * self.steps // workers
        start = (rank * self.steps + first_batch) * batch_size
        stop = (rank * self.steps + last_batch) * batch_size
        needed = set(self.shard_of_key[start:stop].tolist())
        shards = [int(shard) for shard in self.shard_order if shard in needed]
        return self.keys[start:stop], shards


def freeze_inherited_objects(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: move every object the worker inherited from the
    training process into the garbage collector's permanent generation (``gc.freeze``).
    Collections in the worker then never write to those objects' pages, which copy-on-write
    would otherwise duplicate, little by little, in every worker over an epoch
    (``benchmarks/memory.py``: one epoch over 50k CIFAR-10 samples peaked at 761 MiB tree PSS
    without, 641 MiB with; the reader's 50k / 5k ratio went from 1.35 to 0.93)."""
    gc.freeze()


class TrainStream(IterableDataset):
    """Iterable of ``(view_1, view_2, feature, label)`` for one epoch of one rank (see the module docstring).

    Args:
        dataset: the converted dataset.
        input_size: training input size S, pixels (of the ReLA views).
        method_views: the method's own two views (``Method.views(S)``), used after the switch.
        data_ratio: r; each epoch keeps ``floor(r*N)`` samples.
        seed: seed of subset draws, shard order and shuffle buffer.
        batch_size: images per step on each rank.
        rank, world: this process among the training processes.
        shuffle_buffer: samples held for shuffling per worker.
        subset: the per-epoch draw rule (:mod:`rela_train.subset`); None: ``random``.
    """

    def __init__(
        self,
        dataset: ConvertedDataset,
        input_size: int,
        method_views: tuple[View, View],
        data_ratio: float,
        seed: int,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        shuffle_buffer: int = 2000,
        subset: SubsetStrategy | None = None,
    ) -> None:
        self.root, self.format = dataset.root, dataset.format
        self.shard_names = [shard["name"] for shard in dataset.shards]
        self.shard_sizes = [int(shard["num_samples"]) for shard in dataset.shards]
        self.keys = dataset.keys
        self.data_ratio, self.seed, self.batch_size = data_ratio, seed, batch_size
        self.rank, self.world, self.shuffle_buffer = rank, world, shuffle_buffer
        self.subset = subset
        self.rela_view = rela_view(input_size)
        self.method_views = method_views
        self._rela_phase = multiprocessing.get_context("fork").Value("b", 1)  # shared with the workers
        self.epoch = 0

    def set_phase(self, rela: bool) -> None:
        """Make the next samples use the ReLA views (``True``) or the method's own views; workers
        already running see the change at their next sample."""
        self._rela_phase.value = int(rela)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose subset and order the next iteration yields (call before ``iter``)."""
        self.epoch = epoch

    def plan(self) -> EpochPlan:
        """This epoch's :class:`EpochPlan` (identical in every process and worker)."""
        return EpochPlan.make(
            self.keys,
            self.shard_sizes,
            self.data_ratio,
            self.seed,
            self.epoch,
            self.world,
            self.batch_size,
            self.subset,
        )

    def loader(self, workers: int, pin_memory: bool = False) -> DataLoader:
        """The DataLoader ``rela train`` iterates: batches of ``batch_size`` (last partial batch
        dropped), ``workers`` processes (0: in the calling process) with 2 batches prefetched each.

        Returns:
            DataLoader of ``(view_1, view_2, features, labels)``: float32 ``[B, 3, S, S]`` twice,
            float32 ``[B, D_prior]`` and int64 ``[B]``.
        """
        return DataLoader(
            self,
            batch_size=self.batch_size,
            num_workers=workers,
            drop_last=True,
            pin_memory=pin_memory,
            prefetch_factor=2 if workers else None,
            worker_init_fn=freeze_inherited_objects if workers else None,
            multiprocessing_context="fork" if workers else None,  # the workers share the phase flag (a fork Value)
        )

    def make_views(self, sample: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        image = decode_rgb(sample["image"])
        if self._rela_phase.value:
            view_1, view_2 = self.rela_view(image), self.rela_view(image)
        else:
            view_1, view_2 = self.method_views[0](image), self.method_views[1](image)
        return view_1, view_2, torch.from_numpy(sample["feature"]), sample["label"]

    def read_shards(self, source):
        """Pipeline stage: shard descriptors ``{"url": path}`` -> the sample dicts of
        :meth:`rela_convert.formats.StorageFormat.iter_samples` (of the dataset's chosen format)."""
        for shard in source:
            yield from self.format.iter_samples(shard["url"])

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        keys, shards = self.plan().share(self.rank, self.world, worker_id, workers, self.batch_size)
        mine = key_mask(keys, int(self.keys.max()))
        pipeline = wds.DataPipeline(
            wds.SimpleShardList([str(self.root / self.shard_names[shard]) for shard in shards]),
            self.read_shards,
            wds.select(lambda sample: mine[sample["key"]]),
            wds.shuffle(
                self.shuffle_buffer,
                initial=min(self.shuffle_buffer, 100),
                seed=hash((self.seed, self.epoch, self.rank, worker_id)),
            ),
            wds.map(self.make_views),
        )
        return iter(pipeline)
