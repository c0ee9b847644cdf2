"""Streaming converted shards into training batches (webdataset pipeline style).

Per epoch: shard order shuffled from ``(seed, epoch)`` -> shards split across
ranks and DataLoader workers -> samples -> keep the epoch's subset (method.md,
step 3) -> shuffle buffer -> decode -> two views -> batch. Each batch is
``(view_1, view_2, features)``: float32 ``[B, 3, S, S]`` twice and the raw prior
features float32 ``[B, D_prior]``; the trainer turns features into targets on its
device with the dataset's PCA statistics.

The views follow the training phase through a flag shared with the workers:
ReLA views while the ReLA loss is active, the method's own views after the switch.
Batches already prefetched at the switch keep the ReLA views (at most
``workers x prefetch_factor`` batches).
"""

from __future__ import annotations

import multiprocessing
import random
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from rela_convert.images import STORED_FORMATS, decode_rgb
from rela_convert.index import load_index
from rela_convert.pca import PCAStatistics
from rela_convert.shards import FEATURE_FIELD, decode_feature
from rela_train.subset import draw_random, key_mask
from rela_train.views import method_views, rela_view

IMAGE_FIELDS = tuple(STORED_FORMATS.values())


class ConvertedDataset:
    """A converted dataset opened for training: index, keys and PCA statistics.

    Attributes:
        root: dataset folder.
        index: the parsed ``index.json``.
        keys: int64 ``[N]`` sample keys in shard order.
        pca: :class:`~rela_convert.pca.PCAStatistics` of the prior features.

    Raises:
        rela_convert.index.DatasetError: not a (finished) converted dataset.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.index = load_index(self.root)
        self.keys = np.load(self.root / self.index["keys_file"])
        self.pca = PCAStatistics.load(self.root / self.index["pca"]["file"])

    @property
    def num_samples(self) -> int:
        return int(self.index["num_samples"])

    @property
    def input_size(self) -> int:
        """The prior's input size, pixels: the default training size."""
        return int(self.index["prior"]["input_size"])

    def shard_urls(self) -> list[str]:
        return [str(self.root / shard["name"]) for shard in self.index["shards"]]


def record_image(record: dict) -> bytes:
    """The encoded image bytes of a shard record, whatever its format extension."""
    for field in IMAGE_FIELDS:
        if field in record:
            return record[field]
    raise KeyError(f"sample {record.get('__key__')} holds no image ({', '.join(IMAGE_FIELDS)})")


class TrainStream(IterableDataset):
    """Iterable of ``(view_1, view_2, feature)`` for one epoch (see the module docstring).

    Args:
        dataset: the converted dataset.
        input_size: training input size S, pixels.
        method: self-supervised method name (for its views).
        data_ratio: r; each epoch keeps ``floor(r*N)`` samples.
        seed: seed of subset draws, shard order and shuffle buffer.
        shuffle_buffer: samples held for shuffling per worker.
    """

    def __init__(self, dataset: ConvertedDataset, input_size: int, method: str, data_ratio: float, seed: int, shuffle_buffer: int = 2000) -> None:
        self.urls = dataset.shard_urls()
        self.keys = dataset.keys
        self.input_size, self.data_ratio, self.seed, self.shuffle_buffer = input_size, data_ratio, seed, shuffle_buffer
        self.rela_view = rela_view(input_size)
        self.method_views = method_views(method, input_size)
        self.rela_phase = multiprocessing.get_context("fork").Value("b", 1)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose subset and order the next iteration yields (call before ``iter``)."""
        self.epoch = epoch

    def make_views(self, record: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = decode_rgb(record_image(record))
        if self.rela_phase.value:
            view_1, view_2 = self.rela_view(image), self.rela_view(image)
        else:
            view_1, view_2 = self.method_views[0](image), self.method_views[1](image)
        return view_1, view_2, torch.from_numpy(decode_feature(record[FEATURE_FIELD]))

    def __iter__(self):
        mask = key_mask(draw_random(self.keys, self.data_ratio, self.seed, self.epoch), int(self.keys.max()))
        urls = list(self.urls)
        random.Random(f"{self.seed}-{self.epoch}").shuffle(urls)
        worker = torch.utils.data.get_worker_info()
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(urls),
            wds.split_by_node,
            wds.split_by_worker,
            wds.tarfile_to_samples(),
            wds.select(lambda record: mask[int(record["__key__"])]),
            wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), seed=hash((self.seed, self.epoch, worker.id if worker else 0))),
            wds.map(self.make_views),
        )
        return iter(pipeline)
