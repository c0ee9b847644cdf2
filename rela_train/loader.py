"""The converted data as a plain torch DataLoader (:func:`rela_loader`): one epoch's distilled subset in the batches
``rela train`` trains on, for a training loop of one's own.

The batches are those of :class:`rela_train.data.stream.TrainStream` (the stream ``rela train`` reads; no second data
path): the epoch's subset of ``floor(r * N)`` samples (method.md, stage 1, step 3), the same order, the same views
seeded by (seed, epoch, key), the same standardised PCA targets
(:func:`rela_convert.dataset.pca.standardised_targets`). With the same seed, batch size, workers and ranks, batch
``i`` of epoch ``e`` is the batch ``rela train`` takes at that step.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from rela_convert.dataset.converted import ConvertedDataset
from rela_convert.dataset.pca import standardised_targets
from rela_convert.dataset.remote import RemoteFolder, is_url, settings
from rela_convert.dataset.subset import load_strategy
from rela_train.data.batch import Batch
from rela_train.data.stream import TrainStream
from rela_train.methods import METHODS
from rela_train.views import rela_view

#: ``views=`` of :func:`rela_loader` for the ReLA phase's views (else a method's name: its own views).
RELA_VIEWS = "rela"


class BatchDict:
    """``collate`` of :func:`rela_loader`: a stream :class:`~rela_train.data.batch.Batch` as a dict with the
    standardised targets (computed in the DataLoader worker).

    Args:
        mean: float32 ``[D_prior]``; weight: float32 ``[D_prior, d]`` (:meth:`rela_convert.dataset.pca.PCAStatistics.
            projection`).
    """

    def __init__(self, mean: torch.Tensor, weight: torch.Tensor) -> None:
        self.mean, self.weight = mean, weight

    def __call__(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {
            "view1": batch.view_1,
            "view2": batch.view_2,
            "target": standardised_targets(batch.features, self.mean, self.weight),
            "key": batch.keys,
            "label": batch.labels,
        }


def open_dataset(dataset: ConvertedDataset | str | Path, cache_dir: str | Path | None = None) -> ConvertedDataset:
    """``dataset`` opened (a folder or URL; an opened :class:`ConvertedDataset` as it is); ``cache_dir``: where shards
    fetched from a URL are kept (``rela train --cache-dir``; default: ``RELA_CACHE_DIR``, else none).

    Raises:
        ValueError: ``cache_dir`` for a dataset that is not given as a URL.
        rela_convert.dataset.files.DatasetError: not a converted dataset.
    """
    if cache_dir is not None:
        if isinstance(dataset, ConvertedDataset) or not is_url(str(dataset)):
            raise ValueError(f"cache_dir is for a dataset given as a URL, not {dataset}")
        options, _, limit = settings()
        dataset = RemoteFolder(str(dataset), options, Path(cache_dir).expanduser(), limit)
    return dataset if isinstance(dataset, ConvertedDataset) else ConvertedDataset(dataset)


def rela_loader(
    dataset: ConvertedDataset | str | Path,
    *,
    batch_size: int,
    input_size: int | None = None,
    data_ratio: float | None = None,
    seed: int = 0,
    epoch: int = 0,
    workers: int = 2,
    views: str = RELA_VIEWS,
    target_dim: int | None = None,
    cache_dir: str | Path | None = None,
    rank: int | None = None,
    world: int | None = None,
    augment: str = "auto",
) -> DataLoader:
    """A DataLoader over epoch ``epoch``'s distilled subset of a converted dataset, in uniform batches as
    ``rela train`` streams them (ReLA-D data for ReLA-F; Sun, Jiang, Lin, NeurIPS 2024; method.md, stage 2).

    Args:
        dataset: a :class:`ConvertedDataset`, or its folder or URL.
        batch_size: images per batch (on each rank).
        input_size: training input size S, pixels; None: the dataset's image size (32 for CIFAR).
        data_ratio: r, the fraction of the N samples drawn afresh for this epoch (``floor(r * N)``); None: the
            dataset index's default.
        seed: seed of the subset draws, order and augmentations (``rela train --seed``).
        epoch: 0-based epoch: which subset and order.
        workers: DataLoader worker processes (0: in the calling process; it leaves the caller's random
            generators untouched).
        views: ``"rela"`` (the ReLA views: RandomResizedCrop scale (0.5, 1), flip, colour jitter, greyscale) or a
            method's name (``"byol"``, ``"simclr"``, ...: that method's own two views, for after the switch).
        target_dim: d of the targets is ``min(target_dim, D_prior)``; None: D_prior. Give the backbone's feature
            size (512 for ResNet-18), as ``rela train`` does.
        cache_dir: for a dataset given as a URL: where fetched shards are kept.
        rank, world: this process among data-parallel processes (each gets its equal share of the epoch); None:
            from ``torch.distributed`` when it is initialised, else 0 and 1.
        augment: how the workers make the views (``rela train --augment``, without ``device``): ``dali`` (NVIDIA
            DALI, a batch at a time), ``cpu`` (PIL, image by image) or ``auto`` (``dali`` when installed).

    Returns:
        A DataLoader (``len()``: the batches of the epoch) of dicts: ``"view1"``, ``"view2"``: float32
        ``[B, 3, S, S]`` (ImageNet-normalised); ``"target"``: float32 ``[B, d]`` standardised PCA targets;
        ``"key"``: int64 ``[B]`` dataset keys; ``"label"``: int64 ``[B]`` class indices (-1 without class folders).

    Raises:
        ValueError: a subset smaller than one batch on every rank, an unknown ``views`` name, ``batch_size`` or
            ``target_dim`` below 1, ``data_ratio`` outside (0, 1], ``augment`` ``device`` or unknown.
        rela_convert.dataset.files.DatasetError: not a converted dataset.
        rela_train.data.shards.StreamError: (while iterating) a shard that cannot be read.
    """
    if batch_size < 1 or (target_dim is not None and target_dim < 1):
        raise ValueError(f"batch_size and target_dim must be at least 1, got {batch_size} and {target_dim}")
    if data_ratio is not None and not 0 < data_ratio <= 1:
        raise ValueError(f"data_ratio must be in (0, 1], got {data_ratio}")
    if augment == "device":
        raise ValueError("rela_loader makes the views in its workers: augment is auto, dali or cpu, not device")
    if views != RELA_VIEWS and views not in METHODS.names():
        raise ValueError(f"views is {RELA_VIEWS!r} or a method name ({', '.join(METHODS.names())}), not {views!r}")
    dataset = open_dataset(dataset, cache_dir)
    input_size = input_size or dataset.train_size
    if rank is None or world is None:
        distributed = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    rela = views == RELA_VIEWS
    own_views = (rela_view(input_size),) * 2 if rela else METHODS.get(views).views(input_size)
    stream = TrainStream(
        dataset,
        input_size,
        own_views,
        data_ratio or float(dataset.index.subset["data_ratio"]),
        seed,
        batch_size,
        rank,
        world,
        subset=load_strategy(dataset.root, dataset.index, None, dataset.keys),
        augment=augment,
    )
    stream.set_epoch(epoch)
    stream.set_phase(rela)
    stream.plan()  # a subset smaller than one batch raises here, not in the first iteration
    mean, weight = dataset.pca.projection(target_dim or dataset.pca.feature_dim)
    return stream.loader(workers, collate=BatchDict(mean, weight))
