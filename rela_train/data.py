"""Streaming converted shards into training batches (webdataset pipeline style).

Per epoch, every process and DataLoader worker derives the same :class:`EpochPlan`
from ``(seed, epoch)``: the epoch's subset (method.md, step 3), a shuffled shard
order, and the subset's keys in that order cut into equal contiguous shares, one
per rank, and within a rank one per worker in whole batches. A worker then reads
only the shards that hold its share, keeps its keys, shuffles them in a buffer
(seeded), decodes, makes two views and stacks them into batches. So every
rank runs exactly the same number of steps, and every sample of the epoch's
subset is seen once in total, except the fewer than ``world x batch`` that do
not fill a last step.

Everything a batch holds is a function of (seed, epoch, step): the augmentations of a
sample are seeded by (seed, epoch, key) (:func:`sample_seed`), the shuffle buffer by
(seed, epoch, rank, worker), and an epoch can be started at any step
(:meth:`TrainStream.set_epoch`): the workers skip the samples of the batches before it
(read, not decoded) and take the parts of the workers that deliver the next batches
(:func:`worker_schedule`). That is what makes a resumed run bit-identical to an
uninterrupted one.

Each batch is ``(view_1, view_2, features, labels)``: float32 ``[B, 3, S, S]`` twice,
the raw prior features float32 ``[B, D_prior]`` and the stored class labels int64
``[B]`` (-1 without class folders); the trainer turns features into targets on its
device with the dataset's PCA statistics. With ``reports`` (what ``rela train`` reads)
a :class:`Batch` also carries its report: the samples that could not be used (an image
that does not decode, a malformed feature: each is replaced by another sample of the
same batch, so every rank keeps its number of steps), the shards whose SHA-256 a worker
checked before first reading them, and a stream error (a shard that fails the check or
cannot be read).

The views follow the training phase set before an iteration starts
(:meth:`TrainStream.set_phase`): ReLA views while the ReLA loss is active, the method's own
views after the switch; at a switch within an epoch the trainer restarts the epoch's stream
at the next step.

With views made on the training device (``augment="device"``, ``rela train --augment device``,
:mod:`rela_train.device_views`) the workers only decode: a batch's ``view_1`` is then its decoded
pictures, uint8 ``[B, 3, H, W]`` (each shrunk to at most ``2 S`` px on its longer side, at the top-left,
edges repeated into the rest), and ``view_2`` their sizes, int64 ``[B, 4]`` (source height and width,
decoded height and width); the trainer makes both views of the phase on its device.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import random
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from rela_convert.dataset.files import DatasetError, sha256_file
from rela_convert.dataset.formats import STORAGE_FORMATS, StorageFormat
from rela_convert.dataset.formats.webdataset import iter_records, sample_from_record
from rela_convert.dataset.index import DatasetIndex, ShardRecord
from rela_convert.dataset.pca import PCAStatistics
from rela_convert.dataset.remote import ContentMismatchError, RemoteError, RemoteFolder, dataset_root, read_small
from rela_convert.dataset.subset import SubsetStrategy, key_mask
from rela_convert.images import ImageDecodeError, decode_rgb
from rela_train.device_views import decode_for_device, decode_size, stack_decoded
from rela_train.views import View, rela_view


class ConvertedDataset:
    """A converted dataset opened for training: index, keys and PCA statistics.

    Args:
        root: dataset folder, or its URL (``s3://...``, ``https://...``: :mod:`rela_convert.dataset.remote`; storage
            options and shard cache from the environment, as ``rela train --storage-options / --cache-dir`` set
            them).
        storage: which stored format to read (a name of :data:`rela_convert.dataset.formats.STORAGE_FORMATS`
            the dataset holds); None: the index's default (:attr:`DatasetIndex.storage`).

    Attributes:
        root: the dataset folder (a :class:`~pathlib.Path`), or a :class:`~rela_convert.dataset.remote.RemoteFolder`
            for a URL (shards are then fetched by the workers that read them, :meth:`TrainStream._read`).
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
            subset: the draw rule (:mod:`rela_convert.dataset.subset`); None: ``random``.

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


def worker_schedule(steps: int, workers: int) -> np.ndarray:
    """Which worker delivers each batch of a rank's epoch, in the order the DataLoader yields them.

    Worker ``w`` holds batches ``w*steps//workers`` to ``(w+1)*steps//workers`` of the rank's share
    (:meth:`EpochPlan.share`); the DataLoader takes one batch from each worker in turn, skipping
    workers that have none left. With ``workers == 0`` (in-process loading) there is one worker.

    Returns:
        int64 ``[steps]``: the worker index of batch ``i`` of the epoch.
    """
    workers = max(workers, 1)
    counts = [(w + 1) * steps // workers - w * steps // workers for w in range(workers)]
    order = [w for r in range(max(counts, default=0)) for w in range(workers) if r < counts[w]]
    return np.asarray(order, dtype=np.int64)


def sample_seed(seed: int, epoch: int, key: int) -> int:
    """Seed (an int in ``[0, 2**64)``) of the augmentations of sample ``key`` in ``epoch`` of a run
    seeded with ``seed``: a sample's views depend on nothing else (not on the worker, the batch
    or what was read before), which is what lets a run resume at any step."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def seed_augmentations(seed: int) -> None:
    """Seed the generators the views draw from: torch's CPU generator, Python's ``random`` and
    NumPy's global generator (lightly's blur and solarisation)."""
    torch.random.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


@contextlib.contextmanager
def preserved_global_rng():
    """Restore torch's CPU generator, Python's ``random`` and NumPy's global generator on exit: views made in
    the training process (``workers == 0``) leave the training's own randomness untouched."""
    states = torch.random.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.random.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])


def freeze_inherited_objects(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: move every object the worker inherited from the
    training process into the garbage collector's permanent generation (``gc.freeze``).
    Collections in the worker then never write to those objects' pages, which copy-on-write
    would otherwise duplicate, little by little, in every worker over an epoch
    (``benchmarks/memory.py``: one epoch over 50k CIFAR-10 samples peaked at 761 MiB tree PSS
    without, 641 MiB with; the reader's 50k / 5k ratio went from 1.35 to 0.93)."""
    gc.freeze()


def init_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` of :meth:`TrainStream.loader`: :func:`freeze_inherited_objects`, and
    ignore SIGINT / SIGTERM, which the training process handles (it finishes its step, saves and exits,
    then shuts its workers down): a worker killed by a signal sent to the whole process group would
    otherwise make the DataLoader fail before the checkpoint is written."""
    freeze_inherited_objects(worker_id)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class StreamError(RuntimeError):
    """The training data cannot be read on (a damaged or replaced shard, or a batch without a usable
    sample); the message (one line) names the shard and the fix."""


class Batch(NamedTuple):
    """One step's batch of one rank, as :meth:`TrainStream.loader` yields it with ``reports=True``.

    Attributes:
        view_1, view_2: float32 ``[B, 3, S, S]``; with views made on the device (``TrainStream.augment ==
            "device"``): the decoded pictures uint8 ``[B, 3, H, W]`` and their sizes int64 ``[B, 4]``
            (:func:`rela_train.device_views.stack_decoded`).
        features: float32 ``[B, D_prior]`` raw prior features.
        labels: int64 ``[B]`` (-1 without class folders).
        report: ``{"bad": [{"key", "shard", "reason"}, ...]`` (samples that could not be used: each was
            replaced by another sample of the batch), ``"verified": {shard name: sha256}`` (shards whose
            hash this worker checked since its last batch), ``"error"``: None, or a one-line message:
            the stream cannot go on and the batch's tensors are empty}.
    """

    view_1: torch.Tensor
    view_2: torch.Tensor
    features: torch.Tensor
    labels: torch.Tensor
    report: dict


def _views_only(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``collate_fn`` of :meth:`TrainStream.loader` without reports: the four tensors; raises the report's error."""
    if batch.report["error"]:
        raise StreamError(batch.report["error"])
    return batch.view_1, batch.view_2, batch.features, batch.labels


def _whole_batch(batch: Batch) -> Batch:
    """``collate_fn`` of :meth:`TrainStream.loader` with reports: the batch as the worker made it."""
    return batch


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def tolerant_samples(format: type[StorageFormat], path: Path) -> Iterator[dict]:
    """The sample dicts of one shard (:meth:`StorageFormat.iter_samples`), where a WebDataset sample whose
    members cannot be decoded comes as ``{"key", "error": reason}`` instead of ending the shard; a record
    whose key cannot be read is left out (the stream fills its place, :meth:`TrainStream.iter_batches`).

    Raises:
        OSError, ValueError, ...: the file cannot be opened or read as a whole.
    """
    if format.registered_name != "webdataset":
        yield from format.iter_samples(path)
        return
    for record in iter_records(path):
        try:
            yield sample_from_record(record)
        except Exception as error:  # a damaged member: this sample only
            try:
                key = int(record["__key__"])
            except (KeyError, ValueError):
                continue
            yield {"key": key, "error": f"damaged sample record ({_first_line(error)})"}


class TrainStream(IterableDataset):
    """The batches of one epoch of one rank (see the module docstring), from any step on.

    Iterating the stream itself yields samples ``(view_1, view_2, feature, label)`` (float32
    ``[3, S, S]`` twice, float32 ``[D_prior]``, int64); :meth:`loader` yields whole batches.

    Args:
        dataset: the converted dataset.
        input_size: training input size S, pixels (of the ReLA views).
        method_views: the method's own two views (``Method.views(S)``), used after the switch.
        data_ratio: r; each epoch keeps ``floor(r*N)`` samples.
        seed: seed of subset draws, shard order, shuffle buffer and augmentations.
        batch_size: images per step on each rank.
        rank, world: this process among the training processes.
        shuffle_buffer: samples held for shuffling per worker.
        subset: the per-epoch draw rule (:mod:`rela_convert.dataset.subset`); None: ``random``.
        verify_shards: ``first``: check each shard's SHA-256 against the index before a worker first
            reads it (unless its name is in :attr:`verified`); ``off``: never.
        augment: ``cpu``: the workers make the views; ``device``: they only decode, to at most
            :func:`rela_train.device_views.decode_size` px on the longer side, and the batches hold decoded
            pictures (see :class:`Batch`) for :class:`rela_train.device_views.DeviceViews`.

    Attributes:
        epoch, start_step: what the next iteration yields (:meth:`set_epoch`).
        rela_phase: whether the next iteration makes ReLA views (:meth:`set_phase`).
        verified: names of the shards already checked (the trainer fills it from the workers' reports).
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
        verify_shards: str = "off",
        augment: str = "cpu",
    ) -> None:
        if verify_shards not in ("first", "off"):
            raise ValueError(f"verify_shards is first or off, not {verify_shards!r}")
        if augment not in ("cpu", "device"):
            raise ValueError(f"augment is cpu or device, not {augment!r}")
        self.augment, self.decode_size = augment, decode_size(input_size)
        self.root, self.format = dataset.root, dataset.format
        self.shard_names = [shard["name"] for shard in dataset.shards]
        self.shard_sizes = [int(shard["num_samples"]) for shard in dataset.shards]
        self.shard_hashes = [shard["sha256"] for shard in dataset.shards]
        self.shard_bytes = [int(shard["bytes"]) for shard in dataset.shards]
        self.feature_dim = int(dataset.index.feature_dim)
        self.keys = dataset.keys
        self.data_ratio, self.seed, self.batch_size = data_ratio, seed, batch_size
        self.rank, self.world, self.shuffle_buffer = rank, world, shuffle_buffer
        self.subset = subset
        self.rela_view = rela_view(input_size)
        self.method_views = method_views
        self.verify_shards = verify_shards
        self.verified: set[str] = set()
        self.rela_phase = True
        self.epoch = 0
        self.start_step = 0

    def set_phase(self, rela: bool) -> None:
        """Make the next iteration use the ReLA views (``True``) or the method's own views. Workers
        are forked when an iteration starts: a change reaches them at the next iteration (in-process
        loading sees it at once)."""
        self.rela_phase = bool(rela)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch whose subset and order the next iteration yields, from its batch ``start_step``
        (0-based; the batches before it are skipped before decoding). Call before ``iter``."""
        self.epoch, self.start_step = epoch, start_step

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

    def loader(self, workers: int, pin_memory: bool = False, reports: bool = False) -> DataLoader:
        """The DataLoader ``rela train`` iterates: the epoch's batches from :attr:`start_step` on, made by
        ``workers`` processes (0: in the calling process) with 2 batches prefetched each.

        The batches are a function of (seed, epoch, step, rank, world, workers, phase): an epoch started at
        step ``k`` yields exactly the batches ``k, k+1, ...`` of an epoch started at 0. The loader draws no
        number from the calling process's generators (in-process loading restores them after each batch).

        Args:
            reports: yield :class:`Batch` (with each batch's report); else 4-tuples.

        Returns:
            DataLoader of ``(view_1, view_2, features, labels)``: float32 ``[B, 3, S, S]`` twice,
            float32 ``[B, D_prior]`` and int64 ``[B]``, or of :class:`Batch` with ``reports``.

        Raises:
            StreamError: (while iterating, without ``reports``) a shard that cannot be read or fails its
                hash check, or a batch without any usable sample.
        """
        return DataLoader(
            _Batches(self),
            batch_size=None,
            num_workers=workers,
            collate_fn=_whole_batch if reports else _views_only,
            pin_memory=pin_memory,
            prefetch_factor=2 if workers else None,
            worker_init_fn=init_worker if workers else None,
            multiprocessing_context="fork" if workers else None,
            generator=torch.Generator().manual_seed(0),  # the workers' base seed is unused: no global draw
        )

    def make_views(self, image: bytes, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The two views of encoded ``image`` for this epoch and phase, with the augmentations seeded by
        (seed, epoch, ``key``) (:func:`sample_seed`); the global generators are reseeded (see
        :func:`preserved_global_rng` for in-process use).

        With ``augment="device"``: no views, the decoded picture and its sizes
        (:func:`rela_train.device_views.decode_for_device`; nothing random).

        Returns:
            float32 ``[3, S, S]`` twice; with ``augment="device"`` uint8 ``[3, h, w]`` and int64 ``[4]``.

        Raises:
            rela_convert.images.ImageDecodeError: bytes that are not a readable image (other errors from
                the views are possible on odd pictures).
        """
        if self.augment == "device":
            return decode_for_device(image, self.decode_size)
        seed_augmentations(sample_seed(self.seed, self.epoch, key))
        picture = decode_rgb(image)
        if self.rela_phase:
            return self.rela_view(picture), self.rela_view(picture)
        return self.method_views[0](picture), self.method_views[1](picture)

    def _feature_problem(self, feature) -> str | None:
        if not isinstance(feature, np.ndarray) or feature.shape != (self.feature_dim,):
            shape = getattr(feature, "shape", type(feature).__name__)
            return f"malformed prior feature (shape {shape}, expected ({self.feature_dim},))"
        if not np.isfinite(feature).all():
            return "prior feature with NaN or infinite values"
        return None

    def _read(self, shards: list[int], mine: np.ndarray, verified: dict) -> Iterator[dict]:
        """Samples of ``shards`` whose key is in ``mine``, with their ``shard`` name; checks each shard's hash
        first (``verify_shards``), adding the checked ones to ``verified`` (name -> sha256). Raises
        :class:`StreamError` for a shard that fails it or cannot be read."""
        if isinstance(self.root, RemoteFolder):
            yield from self._read_remote(shards, mine, verified)
            return
        for shard in shards:
            name, path = self.shard_names[shard], self.root / self.shard_names[shard]
            fix = f"check the dataset with rela inspect {self.root} --verify, then convert it again (it resumes)"
            if self.verify_shards == "first" and name not in self.verified:
                try:
                    digest = sha256_file(path)
                except OSError as error:
                    raise StreamError(f"shard {path} cannot be read ({_first_line(error)}): {fix}") from None
                if digest != self.shard_hashes[shard]:
                    raise StreamError(
                        f"shard {path} does not match the SHA-256 that {self.root}/index.json records for it "
                        f"(damaged or replaced since the conversion): {fix}"
                    )
                self.verified.add(name)
                verified[name] = digest
            yield from self._own_samples(path, name, mine, path, fix)

    def _own_samples(self, path, name: str, mine: np.ndarray, where, fix: str) -> Iterator[dict]:
        """Samples of the shard file ``path`` whose key is in ``mine``, tagged with ``shard = name``; a shard that
        cannot be read raises :class:`StreamError` naming ``where`` (its path or URL) and ``fix``."""
        try:
            for sample in tolerant_samples(self.format, path):
                if mine[sample["key"]]:
                    sample["shard"] = name
                    yield sample
        except Exception as error:  # a damaged tar or HDF5 file raises many kinds of errors
            raise StreamError(f"shard {where} cannot be read ({_first_line(error)}): {fix}") from None

    def _read_remote(self, shards: list[int], mine: np.ndarray, verified: dict) -> Iterator[dict]:
        """:meth:`_read` for a dataset at a URL: each shard is fetched whole just before it is read, the next one while
        it is read (into the shard cache, or a temporary file deleted once read;
        :meth:`rela_convert.dataset.remote.RemoteFolder.shards_ahead`), its size and
        SHA-256 checked as it is written (a mismatch is fetched once more), transient errors retried. A cached
        shard is re-hashed when ``verify_shards`` is ``first`` and the run has not checked it yet. Raises
        :class:`StreamError` (one line naming the shard) for a shard that fails, cannot be fetched or read."""
        folder, names = self.root, [self.shard_names[shard] for shard in shards]
        check = self.verify_shards == "first"
        requests = [
            (name, self.shard_bytes[shard], self.shard_hashes[shard], check and name not in self.verified)
            for name, shard in zip(names, shards)
        ]
        fetched = folder.shards_ahead(requests)  # the next shard downloads while this one is read
        try:
            for name in names:
                url = folder / name
                try:
                    path, digest = next(fetched)
                except ContentMismatchError as error:
                    raise StreamError(str(error)) from None
                except FileNotFoundError:
                    raise StreamError(
                        f"shard {url} is missing: check the dataset with rela inspect {folder} --verify"
                    ) from None
                except OSError as error:  # RemoteError after the retries, a full cache disk, ...
                    what = _first_line(error) if isinstance(error, RemoteError) else f"{url} ({_first_line(error)})"
                    raise StreamError(f"shard {what}; once fixed, run the same command again (it resumes)") from None
                if digest is not None and check:
                    self.verified.add(name)
                    verified[name] = digest
                yield from self._own_samples(
                    path, name, mine, url, f"check the dataset with rela inspect {folder} --verify"
                )
        finally:
            fetched.close()

    def _make_batch(self, chunk: list[dict], report: dict) -> Batch:
        """Views of a chunk of ``batch_size`` samples; a sample that cannot be used is listed in the report and
        replaced by the next usable one of the chunk (with augmentations seeded by its own key)."""
        views: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(chunk)
        bad = []
        for i, sample in enumerate(chunk):
            reason = sample.get("error") or self._feature_problem(sample.get("feature"))
            if reason is None:
                try:
                    views[i] = self.make_views(sample["image"], sample["key"])
                except ImageDecodeError as error:
                    reason = str(error)
                except Exception as error:  # odd pictures can fail inside the views
                    reason = f"{type(error).__name__}: {_first_line(error)}"
            if reason is not None:
                bad.append(i)
                report["bad"].append({"key": int(sample["key"]), "shard": sample.get("shard"), "reason": reason})
        good = [i for i, view in enumerate(views) if view is not None]
        if not good:
            first = report["bad"][0]
            report["error"] = (
                f"no sample of a batch of {len(chunk)} could be used (e.g. key {first['key']} in shard "
                f"{first['shard']}: {first['reason']}): check the dataset with rela inspect {self.root} --verify"
            )
            return self._empty_batch(report)
        source = list(range(len(chunk)))
        for i in bad:
            source[i] = min((j for j in good if j > i), default=good[0])
            try:
                views[i] = self.make_views(chunk[source[i]]["image"], chunk[i]["key"])
            except Exception:  # decoded once already: only its random views could fail
                views[i] = views[source[i]]
        view_1, view_2 = (
            stack_decoded(views)
            if self.augment == "device"
            else (torch.stack([view[0] for view in views]), torch.stack([view[1] for view in views]))
        )
        return Batch(
            view_1,
            view_2,
            torch.from_numpy(np.stack([chunk[j]["feature"] for j in source]).astype(np.float32, copy=False)),
            torch.tensor([int(chunk[j]["label"]) for j in source], dtype=torch.int64),
            report,
        )

    @staticmethod
    def _empty_batch(report: dict) -> Batch:
        empty = torch.zeros(0)
        return Batch(empty, empty, empty, torch.zeros(0, dtype=torch.int64), report)

    def iter_batches(self) -> Iterator[Batch]:
        """This worker's batches of the epoch from :attr:`start_step` on (see :meth:`loader`).

        The worker plays the part of the worker that would deliver batch ``start_step`` in an iteration
        from the epoch's start (rotated ids, :func:`worker_schedule`), skips the samples of its batches
        before ``start_step`` after the shuffle buffer (reading, not decoding, them), and makes the rest:
        so the DataLoader yields exactly the batches ``start_step, start_step + 1, ...`` of an
        uninterrupted iteration. A shard error ends the stream with a batch whose report holds it.
        """
        worker = torch.utils.data.get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        plan = self.plan()
        schedule = worker_schedule(plan.steps, workers)
        start = min(self.start_step, plan.steps)
        if start >= plan.steps:
            return
        done = np.bincount(schedule[:start], minlength=workers)
        logical = (worker_id + int(schedule[start])) % workers
        keys, shards = plan.share(self.rank, self.world, logical, workers, self.batch_size)
        batches = len(keys) // self.batch_size - int(done[logical])
        if batches <= 0:
            return
        mine = key_mask(keys, int(self.keys.max()))
        report, verified = self._new_report(), {}  # shards checked since the last batch
        samples = self._read(shards, mine, verified)
        shuffled = wds.shuffle(
            self.shuffle_buffer,
            initial=min(self.shuffle_buffer, 100),
            seed=hash((self.seed, self.epoch, self.rank, logical)),
        )(samples)
        rng = preserved_global_rng if worker is None else contextlib.nullcontext
        seen: set[int] = set()
        try:
            for _ in range(int(done[logical]) * self.batch_size):  # batches already trained: read, not decoded
                seen.add(next(shuffled)["key"])
            chunk: list[dict] = []
            for sample in shuffled:
                seen.add(sample["key"])
                chunk.append(sample)
                if len(chunk) == self.batch_size:
                    with rng():
                        batch = self._make_batch(chunk, report)
                    yield self._with_verified(batch, verified)
                    if batch.report["error"]:
                        return
                    report, chunk, batches = self._new_report(), [], batches - 1
        except StopIteration:
            chunk = []
        except StreamError as error:
            report["error"] = str(error)
            yield self._with_verified(self._empty_batch(report), verified)
            return
        # Samples that never came (a record whose key could not be read): fill the worker's last batches.
        missing = iter(sorted(set(keys.tolist()) - seen))
        while batches > 0:
            while len(chunk) < self.batch_size:
                chunk.append({"key": next(missing, -1), "shard": None, "error": "sample missing from its shard"})
            with rng():
                batch = self._make_batch(chunk, report)
            yield self._with_verified(batch, verified)
            if batch.report["error"]:
                return
            report, chunk, batches = self._new_report(), [], batches - 1

    @staticmethod
    def _new_report() -> dict:
        return {"bad": [], "verified": {}, "error": None}

    @staticmethod
    def _with_verified(batch: Batch, verified: dict) -> Batch:
        """The batch with the shards checked since the previous batch in its report (and ``verified`` emptied)."""
        batch.report["verified"] = dict(verified)
        verified.clear()
        return batch

    def __iter__(self):
        """Samples ``(view_1, view_2, feature, label)`` of this worker's batches (:meth:`iter_batches`).

        Raises:
            StreamError: see :meth:`loader`.
        """
        for batch in self.iter_batches():
            view_1, view_2, features, labels = _views_only(batch)
            for row in range(len(labels)):
                yield view_1[row], view_2[row], features[row], labels[row]


class _Batches(IterableDataset):
    """The DataLoader's dataset: :meth:`TrainStream.iter_batches` of the stream (one item per batch)."""

    def __init__(self, stream: TrainStream) -> None:
        self.stream = stream

    def __iter__(self) -> Iterator[Batch]:
        return self.stream.iter_batches()
