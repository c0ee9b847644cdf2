"""The stream of one rank's training batches (webdataset pipeline style): what the trainer drives (epoch, phase,
DataLoader) and the loop each DataLoader worker runs.

Per epoch, every process and DataLoader worker derives the same
:class:`~rela_train.data.plan.EpochPlan` from ``(seed, epoch)``. A worker then reads only the shards that hold its
share (:class:`~rela_train.data.shards.ShardReader`), keeps its keys, shuffles them in a buffer (seeded), decodes,
makes two views and stacks them into batches.

Everything a batch holds is a function of (seed, epoch, step): the augmentations of a
sample are seeded by (seed, epoch, key) (:func:`~rela_train.data.batch.sample_seed`), the shuffle buffer by
(seed, epoch, rank, worker), and an epoch can be started at any step
(:meth:`TrainStream.set_epoch`): the workers skip the samples of the batches before it
(read, not decoded) and take the parts of the workers that deliver the next batches
(:func:`~rela_train.data.plan.worker_schedule`). That is what makes a resumed run bit-identical to an
uninterrupted one.

Each batch is ``(view_1, view_2, features, labels)``: float32 ``[B, 3, S, S]`` twice,
the raw prior features float32 ``[B, D_prior]`` and the stored class labels int64
``[B]`` (-1 without class folders); the trainer turns features into targets on its
device with the dataset's PCA statistics. With ``reports`` (what ``rela train`` reads)
a :class:`~rela_train.data.batch.Batch` also carries its report: the samples that could not be used (an image
that does not decode, a malformed feature: each is replaced by another sample of the
same batch, so every rank keeps its number of steps), the shards whose SHA-256 a worker
checked before first reading them, and a stream error (a shard that fails the check or
cannot be read).

The views follow the training phase set before an iteration starts
(:meth:`TrainStream.set_phase`): ReLA views while the ReLA loss is active, the method's own
views after the switch; at a switch within an epoch the trainer restarts the epoch's stream
at the next step.

By default (``augment="dali"`` when NVIDIA DALI is installed, :mod:`rela_train.dali_views`) a worker hands a whole
batch's encoded images to DALI, which decodes them and makes both views with compiled CPU operators, every random
parameter drawn by rela from (seed, epoch, key); with ``augment="cpu"`` the views are made image by image (lightly /
torchvision on PIL images, :mod:`rela_train.views`). With views made on the training device (``augment="device"``,
``rela train --augment device``,
:mod:`rela_train.device_views`) the workers only decode: a batch's ``view_1`` is then its decoded
pictures, uint8 ``[B, 3, H, W]`` (each shrunk to at most ``2 S`` px on its longer side, at the top-left,
edges repeated into the rest), and ``view_2`` their sizes, int64 ``[B, 4]`` (source height and width,
decoded height and width); the trainer makes both views of the phase on its device.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import signal
from typing import Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from rela_convert.dataset.converted import ConvertedDataset
from rela_convert.dataset.subset import SubsetStrategy, key_mask
from rela_convert.images import ImageDecodeError, decode_rgb, open_image
from rela_convert.processes import die_with_parent
from rela_train.config import resolve_augment
from rela_train.dali_views import DaliDecodeError, DaliViews
from rela_train.data.batch import Batch, preserved_global_rng, sample_seed, seed_augmentations
from rela_train.data.plan import EpochPlan, worker_schedule
from rela_train.data.shards import ShardReader, StreamError, first_line
from rela_train.device_views import decode_for_device, decode_size, stack_decoded
from rela_train.views import View, rela_view


def freeze_inherited_objects(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: move every object the worker inherited from the
    training process into the garbage collector's permanent generation (``gc.freeze``).
    Collections in the worker then never write to those objects' pages, which copy-on-write
    would otherwise duplicate, little by little, in every worker over an epoch
    (``benchmarks/memory.py``: one epoch over 50k CIFAR-10 samples peaked at 761 MiB tree PSS
    without, 641 MiB with; the reader's 50k / 5k ratio went from 1.35 to 0.93)."""
    gc.freeze()


def init_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` of :meth:`TrainStream.loader`: :func:`freeze_inherited_objects`, end with the
    training process however it ends (:func:`~rela_convert.processes.die_with_parent`), and
    ignore SIGINT / SIGTERM, which the training process handles (it finishes its step, saves and exits,
    then shuts its workers down): a worker killed by a signal sent to the whole process group would
    otherwise make the DataLoader fail before the checkpoint is written."""
    freeze_inherited_objects(worker_id)
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _views_only(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``collate_fn`` of :meth:`TrainStream.loader` without reports: the four tensors; raises the report's error."""
    if batch.report["error"]:
        raise StreamError(batch.report["error"])
    return batch.view_1, batch.view_2, batch.features, batch.labels


class _Collate:
    """``collate_fn`` of :meth:`TrainStream.loader` with ``collate``: raises the report's error, else
    ``collate(batch)``."""

    def __init__(self, collate: Callable[[Batch], object]) -> None:
        self.collate = collate

    def __call__(self, batch: Batch):
        if batch.report["error"]:
            raise StreamError(batch.report["error"])
        return self.collate(batch)


def _whole_batch(batch: Batch) -> Batch:
    """``collate_fn`` of :meth:`TrainStream.loader` with reports: the batch as the worker made it."""
    return batch


class TrainStream(IterableDataset):
    """The batches of one epoch of one rank (see the module docstring), from any step on.

    Iterating the stream itself yields samples ``(view_1, view_2, feature, label)`` (float32
    ``[3, S, S]`` twice, float32 ``[D_prior]``, int64); :meth:`loader` yields whole batches.

    Args:
        dataset: the converted dataset.
        input_size: training input size S, pixels (of the ReLA views).
        method_views: the method's own two views (``Method.views(S)``: :class:`rela_train.views.CPUView`, whose
            ``params`` the DALI views are built from), used after the switch.
        data_ratio: r; each epoch keeps ``floor(r*N)`` samples.
        seed: seed of subset draws, shard order, shuffle buffer and augmentations.
        batch_size: images per step on each rank.
        rank, world: this process among the training processes.
        shuffle_buffer: samples held for shuffling per worker.
        subset: the per-epoch draw rule (:mod:`rela_convert.dataset.subset`); None: ``random``.
        verify_shards: ``first``: check each shard's SHA-256 against the index before a worker first
            reads it (unless its reader has it among its ``verified`` names); ``off``: never
            (:class:`rela_train.data.shards.ShardReader`).
        augment: ``dali``: the workers make the views with NVIDIA DALI's CPU operators, a batch at a time
            (:mod:`rela_train.dali_views`); ``cpu``: the workers make the views image by image (lightly / torchvision
            on PIL images); ``device``: they only decode, to at most :func:`rela_train.device_views.decode_size` px
            on the longer side, and the batches hold decoded pictures (see :class:`~rela_train.data.batch.Batch`)
            for :class:`rela_train.device_views.DeviceViews`; ``auto``: ``dali`` when DALI imports, else ``cpu``
            (:func:`rela_train.config.resolve_augment`).

    Attributes:
        epoch, start_step: what the next iteration yields (:meth:`set_epoch`).
        rela_phase: whether the next iteration makes ReLA views (:meth:`set_phase`).
        reader: the :class:`~rela_train.data.shards.ShardReader` of the workers (its ``verified``: names of the
            shards already checked, which the trainer fills from the workers' reports).
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
        augment: str = "auto",
    ) -> None:
        self.augment, self.decode_size = resolve_augment(augment), decode_size(input_size)
        self.reader = ShardReader(dataset, verify_shards)
        self.root = dataset.root
        self.shard_sizes = [int(shard["num_samples"]) for shard in dataset.shards]
        self.feature_dim = int(dataset.index.feature_dim)
        self.keys = dataset.keys
        self.data_ratio, self.seed, self.batch_size = data_ratio, seed, batch_size
        self.rank, self.world, self.shuffle_buffer = rank, world, shuffle_buffer
        self.subset = subset
        self.rela_view = rela_view(input_size)
        self.method_views = method_views
        self.method_params = tuple(getattr(view, "params", None) for view in method_views)
        if self.augment == "dali" and None in self.method_params:
            raise ValueError("augment='dali' needs the method's views as rela_train.views.CPUView (ViewParams.cpu())")
        self.dali_views: dict[bool, DaliViews] = {}
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
        """This epoch's :class:`~rela_train.data.plan.EpochPlan` (identical in every process and worker)."""
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

    def loader(
        self, workers: int, pin_memory: bool = False, reports: bool = False, collate: Callable | None = None
    ) -> DataLoader:
        """The DataLoader ``rela train`` iterates: the epoch's batches from :attr:`start_step` on, made by
        ``workers`` processes (0: in the calling process) with 2 batches prefetched each.

        The batches are a function of (seed, epoch, step, rank, world, workers, phase): an epoch started at
        step ``k`` yields exactly the batches ``k, k+1, ...`` of an epoch started at 0. The loader draws no
        number from the calling process's generators (in-process loading restores them after each batch).

        Args:
            reports: yield :class:`~rela_train.data.batch.Batch` (with each batch's report); else 4-tuples.
            collate: else, what to yield: ``collate(batch)`` of each :class:`~rela_train.data.batch.Batch` whose
                report holds no error (run in the worker; picklable), e.g. :func:`rela_train.loader.rela_loader`'s
                dicts.

        Returns:
            DataLoader of ``(view_1, view_2, features, labels)``: float32 ``[B, 3, S, S]`` twice,
            float32 ``[B, D_prior]`` and int64 ``[B]``, or of :class:`~rela_train.data.batch.Batch` with ``reports``.

        Raises:
            rela_train.data.shards.StreamError: (while iterating, without ``reports``) a shard that cannot be read
                or fails its hash check, or a worker none of whose samples can be used.
        """
        return DataLoader(
            _Batches(self),
            batch_size=None,
            num_workers=workers,
            collate_fn=_whole_batch if reports else _Collate(collate) if collate else _views_only,
            pin_memory=pin_memory,
            prefetch_factor=2 if workers else None,
            worker_init_fn=init_worker if workers else None,
            multiprocessing_context="fork" if workers else None,
            generator=torch.Generator().manual_seed(0),  # the workers' base seed is unused: no global draw
        )

    def make_views(self, image: bytes, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The two views of encoded ``image`` for this epoch and phase, with the augmentations seeded by
        (seed, epoch, ``key``) (:func:`~rela_train.data.batch.sample_seed`); the global generators are reseeded (see
        :func:`~rela_train.data.batch.preserved_global_rng` for in-process use).

        With ``augment="device"``: no views, the decoded picture and its sizes
        (:func:`rela_train.device_views.decode_for_device`; nothing random). With ``augment="dali"``: nothing is
        done here (DALI reads, decodes and makes the batch's views at once, :meth:`_stack`).

        Returns:
            float32 ``[3, S, S]`` twice; with ``augment="device"`` uint8 ``[3, h, w]`` and int64 ``[4]``; with
            ``augment="dali"`` the encoded ``image`` alone (a 1-tuple).

        Raises:
            rela_convert.images.ImageDecodeError: bytes that are not a readable image (other errors from
                the views are possible on odd pictures).
        """
        if self.augment == "device":
            return decode_for_device(image, self.decode_size)
        if self.augment == "dali":
            return (image,)
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

    def _make_batch(self, chunk: list[dict], report: dict) -> Batch:
        """Views of a chunk of ``batch_size`` samples; a sample that cannot be used is listed in the report and
        replaced by the next usable one of the chunk (with augmentations seeded by its own key)."""
        views: list[tuple | None] = [None] * len(chunk)
        for i, sample in enumerate(chunk):
            reason = sample.get("error") or self._feature_problem(sample.get("feature"))
            if reason is None:
                try:
                    views[i] = self.make_views(sample["image"], sample["key"])
                except ImageDecodeError as error:
                    reason = str(error)
                except Exception as error:  # odd pictures can fail inside the views
                    reason = f"{type(error).__name__}: {first_line(error)}"
            if reason is not None:
                self._list_bad(report, sample, reason)
        while True:
            good = [i for i, view in enumerate(views) if view is not None]
            if not good:
                first = report["bad"][0]
                report["error"] = (
                    f"no sample of a batch of {len(chunk)} could be used (e.g. key {first['key']} in shard "
                    f"{first['shard']}: {first['reason']}): check the dataset with rela inspect {self.root} --verify"
                )
                return self._empty_batch(report)
            source = [
                i if view is not None else min((j for j in good if j > i), default=good[0])
                for i, view in enumerate(views)
            ]
            rows = [
                view if view is not None else self._replacement(chunk, views, source[i], i)
                for i, view in enumerate(views)
            ]
            try:
                view_1, view_2 = self._stack(rows, [int(sample["key"]) for sample in chunk])
                break
            except DaliDecodeError:  # a picture whose header reads but whose data DALI cannot decode: list it
                failed = self._undecodable(chunk, views, good)
                if not failed:  # every image decodes alone: DALI fails on the batch itself
                    raise
                for i, reason in failed.items():
                    views[i] = None
                    self._list_bad(report, chunk[i], reason)
        return Batch(
            view_1,
            view_2,
            torch.from_numpy(np.stack([chunk[j]["feature"] for j in source]).astype(np.float32, copy=False)),
            torch.tensor([int(chunk[j]["label"]) for j in source], dtype=torch.int64),
            torch.tensor([int(chunk[j]["key"]) for j in source], dtype=torch.int64),
            report,
        )

    @staticmethod
    def _list_bad(report: dict, sample: dict, reason: str) -> None:
        """Add ``sample`` (its key and shard) to the batch report's unusable samples, with ``reason``."""
        report["bad"].append({"key": int(sample["key"]), "shard": sample.get("shard"), "reason": reason})

    def _undecodable(self, chunk: list[dict], views: list, rows: list[int]) -> dict[int, str]:
        """The ``rows`` of a batch whose image DALI cannot decode alone, with the reason (Pillow's reading of its
        header where that fails, as with ``augment="cpu"``, else DALI's)."""
        failed = {}
        for i in rows:
            try:
                self._stack([views[i]], [int(chunk[i]["key"])])
            except DaliDecodeError as error:
                try:
                    open_image(chunk[i]["image"])
                    failed[i] = f"corrupt or truncated image data (DALI: {first_line(error)})"
                except ImageDecodeError as header:
                    failed[i] = str(header)
        return failed

    def _replacement(self, chunk: list[dict], views: list, source: int, row: int) -> tuple:
        """What row ``row`` of a batch holds in place of its unusable sample: sample ``source``'s image with the
        augmentations of the row's own key (its views, decoded picture or image and size; see :meth:`make_views`)."""
        try:
            return self.make_views(chunk[source]["image"], chunk[row]["key"])
        except Exception:  # decoded once already: only its random views could fail
            return views[source]

    def _stack(self, rows: list[tuple], keys: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch's ``(view_1, view_2)`` from the rows of :meth:`make_views` (``keys``: each row's key, which seeds
        its views with ``augment="dali"``).

        Raises:
            rela_train.dali_views.DaliDecodeError: with ``augment="dali"``, an image DALI cannot decode.
        """
        if self.augment == "device":
            return stack_decoded(rows)
        if self.augment == "dali":
            views = self._dali_views()
            seeds = [sample_seed(self.seed, self.epoch, key) for key in keys]
            return views([image for (image,) in rows], seeds)
        return torch.stack([view[0] for view in rows]), torch.stack([view[1] for view in rows])

    def _dali_views(self) -> DaliViews:
        """The DALI views of the current phase (built on first use in this process)."""
        if self.rela_phase not in self.dali_views:
            pair = (self.rela_view.params,) * 2 if self.rela_phase else self.method_params
            self.dali_views[self.rela_phase] = DaliViews(*pair, self.batch_size)
        return self.dali_views[self.rela_phase]

    @staticmethod
    def _empty_batch(report: dict) -> Batch:
        empty = torch.zeros(0)
        no_rows = torch.zeros(0, dtype=torch.int64)
        return Batch(empty, empty, empty, no_rows, no_rows, report)

    def iter_batches(self) -> Iterator[Batch]:
        """This worker's batches of the epoch from :attr:`start_step` on (see :meth:`loader`).

        The worker plays the part of the worker that would deliver batch ``start_step`` in an iteration
        from the epoch's start (rotated ids, :func:`~rela_train.data.plan.worker_schedule`), skips the samples of its
        batches before ``start_step`` after the shuffle buffer (reading, not decoding, them), and makes the rest:
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
        verified: dict = {}  # shards checked since the last batch
        samples = self.reader.read(shards, mine, verified)
        shuffled = wds.shuffle(
            self.shuffle_buffer,
            initial=min(self.shuffle_buffer, 100),
            seed=hash((self.seed, self.epoch, self.rank, logical)),
        )(samples)
        rng = preserved_global_rng if worker is None else contextlib.nullcontext
        try:
            for batch in self._usable_batches(self._chunks(shuffled, keys, int(done[logical]), batches), rng):
                yield self._with_verified(batch, verified)
                if batch.report["error"]:
                    return
        except StreamError as error:
            yield self._with_verified(self._empty_batch({**self._new_report(), "error": str(error)}), verified)

    def _usable_batches(self, chunks: Iterator[list[dict]], rng: Callable) -> Iterator[Batch]:
        """The batches of ``chunks`` (made under the context ``rng()``), one per chunk. A batch none of whose samples
        can be used (each listed in its report) trains on the samples of the next usable batch instead (a copy of it;
        its samples are listed with it, not again), or of the last one at the end of the stream: the run goes on
        within ``--max-bad``, with every rank's number of steps kept. Only when no batch of the worker has a usable
        sample does the stream end, with the first one's error and every sample listed.
        """
        unusable: list[dict] = []  # reports of the batches waiting for the next usable one
        usable = None
        for chunk in chunks:
            with rng():
                batch = self._make_batch(chunk, self._new_report())
            if batch.report["error"]:
                unusable.append(batch.report)
                continue
            usable = batch
            yield from (self._copy_of(usable, report) for report in unusable)
            unusable = []
            yield batch
        if usable is not None:
            yield from (self._copy_of(usable, report) for report in unusable)
        elif unusable:  # no usable sample at all: the stream ends, listing them all
            yield self._empty_batch({**unusable[0], "bad": [bad for report in unusable for bad in report["bad"]]})

    @staticmethod
    def _copy_of(batch: Batch, report: dict) -> Batch:
        """A copy of ``batch``'s tensors with ``report`` (its error cleared)."""
        return Batch(*(tensor.clone() for tensor in batch[:5]), {**report, "error": None})

    def _chunks(self, shuffled: Iterator[dict], keys: np.ndarray, done: int, batches: int) -> Iterator[list[dict]]:
        """The worker's batches of samples, ``batch_size`` each: the shuffled stream after the ``done`` batches already
        trained (read, not decoded), then, for samples that never came (a record whose key could not be read),
        placeholders filling its last batches up to ``batches`` in all.

        Raises:
            StreamError: from reading the stream.
        """
        seen = {sample["key"] for sample in itertools.islice(shuffled, done * self.batch_size)}
        chunk: list[dict] = []
        for sample in shuffled:
            seen.add(sample["key"])
            chunk.append(sample)
            if len(chunk) == self.batch_size:
                yield chunk
                chunk, batches = [], batches - 1
        missing = iter(sorted(set(keys.tolist()) - seen))
        for _ in range(batches):
            while len(chunk) < self.batch_size:
                chunk.append({"key": next(missing, -1), "shard": None, "error": "sample missing from its shard"})
            yield chunk
            chunk = []

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

    def __len__(self) -> int:
        """The batches of the epoch from the stream's start step on."""
        return max(self.stream.plan().steps - self.stream.start_step, 0)

    def __iter__(self) -> Iterator[Batch]:
        return self.stream.iter_batches()
