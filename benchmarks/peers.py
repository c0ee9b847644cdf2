"""Benchmark (issue 31): rela against the tools a researcher would otherwise pick, for conversion and for loading.

Everything runs in one process, interleaved: every round runs every variant once, in an order rotated by one
place each round (``--rounds``, default 3), so that a burst of load from other jobs on the machine hits the
variants alike. Each variant's figure is the median over rounds; each ratio is computed per round (paired:
rela and the peer of the same round) and its median reported. Besides images/s (wall clock), every run
records CPU milliseconds per image: this process plus its reaped child processes (DataLoader and writer
workers, ``os.times``), which moves far less than wall time when other jobs share the cores. The 1-minute
load average is recorded at every run.

Inputs: ``cifar``: the first ``--cifar-images`` (default 5,000) CIFAR-10 train images at 32 px, prior the
CIFAR ResNet-20 (64-d); ``imagenet``: all 500 images of the shared ImageNet sample (full-size JPEGs) at
224 px, prior ``rand:mobilenet_v3_small@224`` (random weights: speed does not depend on them; the sample
has 500 images, fewer than the 5,000 of the CIFAR input).

Conversion (every variant: the same listing, the same files in rela's stored order, the same decode
(``rela_convert.images.prior_pixels``), the prior run in ``--workers`` DataLoader-style worker processes
with one torch thread each, on batches of ``--batch-size`` images; keys, encoded image bytes, features and
labels written):

- ``rela tar`` / ``rela hdf5``: ``rela_convert.convert.convert`` (``rela convert``'s Python API), end to end;
- ``mds``: MosaicML streaming ``MDSWriter`` fed by a DataLoader running the prior in its workers;
- ``litdata``: LitData ``optimize`` (its own ``num_workers`` processes run the prior, one batch per input);
- ``webdataset``: webdataset ``ShardWriter`` fed like ``mds`` (8 shards, so each loading worker gets some).

An untimed check then reads every output back: for every key, the same encoded image bytes (those of the
source file) and the same feature (equal to rela's, bit for bit).

Loading, one epoch of every sample (drop-last batches of ``--batch-size``, ``--workers`` workers), each batch
two float32 ``[B, 3, S, S]`` views:

- tier a, Python data loaders with identical views (read, decode, two RandomResizedCrop(S) scale (0.08, 1) +
  horizontal flip views, ``ToTensor`` + ImageNet ``Normalize``): ``rela stream`` (``TrainStream`` in the
  method phase with exactly those views, through :func:`rela_stream_loader`, from the tar or the HDF5
  shards), ``litdata`` (``StreamingDataset`` + ``StreamingDataLoader``), ``mds`` (``StreamingDataset`` +
  DataLoader), ``webdataset`` (``WebDataset`` + DataLoader). Pass: rela stream >= the best of these peers.
  ``rela_loader`` (``rela_train.rela_loader``, rela's own ReLA views with colour jitter and greyscale, and PCA
  targets) is listed beside them, outside the pass/fail;
- tier b, the ceiling (each timed on its second epoch: the first builds the pipeline or JIT-compiles it):
  NVIDIA DALI on the CPU (``device_id=None``; ``fn.readers.webdataset`` over rela's tar
  shards, ``fn.decoders.image``, ``fn.random_resized_crop``, ``fn.crop_mirror_normalize`` with a random
  mirror; ``--workers`` threads) and FFCV (its own ``.beton`` file, written untimed; JPEG-compressed images;
  ``RandomResizedCropRGBImageDecoder`` + ``RandomHorizontalFlip``, two pipelines over the one image field).

A peer that is not installed (``pip install -e .[peers]``, docs/performance.md) or fails is skipped: the
reason is printed and recorded in the JSON. Outputs: a table, ``benchmarks/results/peers.json`` and the plot
``docs/_static/peers.png``.

Usage, from the project root::

    .venv/bin/python benchmarks/peers.py [--inputs cifar,imagenet] [--cifar-images 5000] [--rounds 3]
        [--workers 2] [--batch-size 64] [--parts convert,load] [--rela-augment cpu]
        [--out benchmarks/results/peers.json] [--plot docs/_static/peers.png]
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from _data import (
    CIFAR_PRIOR,
    IMAGENET_PRIOR,
    PROJECT,
    RESULTS,
    Clock,
    cifar_subset,
    imagenet_sample,
    machine,
    warm_page_cache,
    write_json,
)
from torch.utils.data import DataLoader, Dataset

from rela_convert.config import ConvertOptions
from rela_convert.convert import storage_order
from rela_convert.images import prior_pixels
from rela_convert.tree import scan_tree
from rela_train.config import AUGMENTS, TrainConfig
from rela_train.views import IMAGENET_MEAN, IMAGENET_STD, ViewParams

CONVERTERS = ("rela tar", "rela hdf5", "mds", "litdata", "webdataset")
LOADERS_A = ("rela stream (tar)", "rela stream (hdf5)", "rela_loader", "litdata", "mds", "webdataset")
LOADERS_B = ("dali (cpu)", "ffcv")
RELA_CONVERTERS = ("rela tar", "rela hdf5")
RELA_LOADERS = ("rela stream (tar)", "rela stream (hdf5)")
#: Outside the pass/fail of tier a: rela's own loader with its heavier ReLA views.
OUTSIDE_PASS = ("rela_loader",)
WDS_SHARDS = 8


class Skipped(Exception):
    """A peer that cannot run here (not installed, or failed); the message is the reason."""


@dataclass
class Case:
    """One input: its tree, its sorted listing and the prior every converter runs."""

    name: str
    source: Path
    prior: str
    size: int  # view side S of the loading tier, pixels
    files: list  # rela_convert.tree.SourceFile, sorted (key = position)


def default_augment() -> str:
    """``rela train``'s default ``--augment`` (the train config's default)."""
    return next(item.default for item in fields(TrainConfig) if item.name == "augment")


# ---------------------------------------------------------------------------------------------------- conversion


def stored_files(case: Case, seed: int = 0) -> list:
    """The source files in rela's stored order (:func:`rela_convert.convert.storage_order`), which every peer
    converts too, so that every variant runs the prior on the same batches (same features, bit for bit)."""
    return [case.files[key] for key in storage_order(len(case.files), seed)]


class _PriorItems(Dataset):
    """Item ``p``: (key, encoded bytes, label, prior pixels uint8 ``[3, S, S]``) of stored file ``p``."""

    def __init__(self, files: list, size: int) -> None:
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, position: int):
        file = self.files[position]
        with open(file.path, "rb") as handle:
            data = handle.read()
        return file.key, data, -1 if file.label is None else file.label, prior_pixels(data, self.size)


def _prior_collate(items: list, prior) -> dict:
    """In the worker: the batch's keys, bytes, labels and prior features (float32 ``[B, D]``)."""
    keys, images, labels, pixels = zip(*items)
    return {
        "keys": list(keys),
        "images": list(images),
        "labels": list(labels),
        "features": prior.features(torch.stack(pixels)).numpy(),
    }


def prior_batches(case: Case, prior, args) -> DataLoader:
    """The batches every DataLoader-fed peer writes: ``--batch-size`` stored positions each, the prior run in
    ``--workers`` processes (one torch thread each, the DataLoader's default in its workers)."""
    files = stored_files(case)
    batches = [
        list(range(start, min(start + args.batch_size, len(files)))) for start in range(0, len(files), args.batch_size)
    ]
    return DataLoader(
        _PriorItems(files, prior.input_size),
        batch_sampler=batches,
        num_workers=args.workers,
        collate_fn=functools.partial(_prior_collate, prior=prior),
        prefetch_factor=4,
        multiprocessing_context="fork",
    )


def convert_rela(case: Case, out: Path, args, storage: str) -> int:
    """``rela convert SRC OUT --prior P --format storage --workers W --batch-size B`` through its Python API."""
    from rela_convert.convert import convert

    options = ConvertOptions(batch_size=args.batch_size, workers=args.workers, formats=(storage,), progress=False)
    return int(convert(case.source, out, case.prior, options).run["converted"])


def convert_mds(case: Case, out: Path, args) -> int:
    """MosaicML streaming: ``MDSWriter`` in this process, fed by :func:`prior_batches`."""
    from streaming import MDSWriter

    from rela_convert.priors import load_prior

    scan_tree(case.source)  # every variant lists the tree, as rela convert does
    prior = load_prior(case.prior)
    columns = {"key": "int", "image": "bytes", "feature": "ndarray:float32", "label": "int"}
    count = 0
    with MDSWriter(out=str(out), columns=columns, compression=None) as writer:
        loader = prior_batches(case, prior, args)
        for batch in loader:
            for key, image, label, feature in zip(batch["keys"], batch["images"], batch["labels"], batch["features"]):
                writer.write({"key": key, "image": image, "feature": feature, "label": label})
                count += 1
        del loader
    return count


def _litdata_batch(batch: list, prior, size: int):
    """LitData ``optimize``'s ``fn``: one input is a batch of stored files; the prior runs here, in its worker."""
    torch.set_num_threads(1)
    images = []
    for file in batch:
        with open(file.path, "rb") as handle:
            images.append(handle.read())
    features = prior.features(torch.stack([prior_pixels(data, size) for data in images])).numpy()
    for file, image, feature in zip(batch, images, features):
        yield {"key": file.key, "image": image, "feature": feature, "label": -1 if file.label is None else file.label}


def convert_litdata(case: Case, out: Path, args) -> int:
    """LitData ``optimize`` with ``--workers`` worker processes, one input per batch of ``--batch-size`` files."""
    import litdata

    from rela_convert.priors import load_prior

    scan_tree(case.source)
    prior = load_prior(case.prior)
    files = stored_files(case)
    inputs = [files[start : start + args.batch_size] for start in range(0, len(files), args.batch_size)]
    litdata.optimize(
        fn=functools.partial(_litdata_batch, prior=prior, size=prior.input_size),
        inputs=inputs,
        output_dir=str(out),
        num_workers=args.workers,
        chunk_bytes="64MB",
        reorder_files=False,
        start_method="fork",
        mode="overwrite",
        verbose=False,
    )
    return len(files)


def convert_webdataset(case: Case, out: Path, args) -> int:
    """webdataset ``ShardWriter`` (its default encoder: ``.npy`` features, decimal ``.cls``) in this process, fed by
    :func:`prior_batches`; :data:`WDS_SHARDS` shards."""
    import webdataset as wds

    from rela_convert.priors import load_prior

    scan_tree(case.source)
    prior = load_prior(case.prior)
    out.mkdir(parents=True)
    count = 0
    with wds.ShardWriter(
        str(out / "shard-%06d.tar"), maxcount=math.ceil(len(case.files) / WDS_SHARDS), verbose=0
    ) as sink:
        loader = prior_batches(case, prior, args)
        for batch in loader:
            for key, image, label, feature in zip(batch["keys"], batch["images"], batch["labels"], batch["features"]):
                sink.write({"__key__": f"{key:09d}", "jpg": image, "npy": feature, "cls": label})
                count += 1
        del loader
    return count


def read_back(name: str, out: Path) -> dict[int, tuple[bytes, np.ndarray]]:
    """Every sample of a conversion output: key -> (encoded image bytes, feature float32 ``[D]``)."""
    samples: dict[int, tuple[bytes, np.ndarray]] = {}
    if name.startswith("rela"):
        from rela_convert.dataset.formats import STORAGE_FORMATS
        from rela_convert.dataset.index import DatasetIndex

        index = DatasetIndex.load(out)
        storage = STORAGE_FORMATS.get(index.storage)
        for shard in index.shards():
            for sample in storage.iter_samples(out / shard["name"]):
                samples[sample["key"]] = (sample["image"], np.asarray(sample["feature"], np.float32))
    elif name == "mds":
        from streaming import StreamingDataset
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
        dataset = StreamingDataset(local=str(out), shuffle=False, batch_size=1)
        for position in range(len(dataset)):
            sample = dataset[position]
            samples[int(sample["key"])] = (bytes(sample["image"]), np.asarray(sample["feature"], np.float32))
        del dataset
    elif name == "litdata":
        import litdata

        dataset = litdata.StreamingDataset(str(out))
        for position in range(len(dataset)):
            sample = dataset[position]
            samples[int(sample["key"])] = (bytes(sample["image"]), np.asarray(sample["feature"], np.float32))
    elif name == "webdataset":
        import webdataset as wds

        shards = sorted(str(path) for path in out.glob("*.tar"))
        for record in wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples()):
            samples[int(record["__key__"])] = (record["jpg"], np.load(io.BytesIO(record["npy"])).astype(np.float32))
    return samples


def check_outputs(case: Case, outputs: dict[str, Path]) -> dict:
    """Untimed: every output holds, for every key, the source file's bytes and rela tar's feature (or the first
    output's). Returns per output ``{"samples", "same_images", "same_features", "max_feature_difference"}``."""
    truth_images = {file.key: Path(file.path).read_bytes() for file in case.files}
    reference_name = "rela tar" if "rela tar" in outputs else next(iter(outputs))
    reference = read_back(reference_name, outputs[reference_name])
    report = {}
    for name, out in outputs.items():
        try:
            samples = reference if name == reference_name else read_back(name, out)
        except Exception as error:  # a reader that fails is reported, not fatal
            report[name] = {"error": f"{type(error).__name__}: {error}"}
            continue
        same_keys = samples.keys() == truth_images.keys() == reference.keys()
        difference = max(
            (float(np.abs(samples[key][1] - reference[key][1]).max()) for key in samples if key in reference),
            default=float("nan"),
        )
        report[name] = {
            "samples": len(samples),
            "same_keys": same_keys,
            "same_images": same_keys and all(samples[key][0] == truth_images[key] for key in samples),
            "same_features": same_keys and all(np.array_equal(samples[key][1], reference[key][1]) for key in samples),
            "max_feature_difference": difference,
        }
    return report


CONVERT_FUNCTIONS: dict[str, Callable] = {
    "rela tar": functools.partial(convert_rela, storage="webdataset"),
    "rela hdf5": functools.partial(convert_rela, storage="hdf5"),
    "mds": convert_mds,
    "litdata": convert_litdata,
    "webdataset": convert_webdataset,
}


# ------------------------------------------------------------------------------------------------------- loading


def peer_views(size: int):
    """The tier-a views of the peers: RandomResizedCrop(S) (scale (0.08, 1), bilinear), horizontal flip,
    ``ToTensor``, ImageNet ``Normalize`` (torchvision v1): float32 ``[3, S, S]``."""
    import torchvision.transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD)),
        ]
    )


class TwoViews:
    """Encoded image bytes -> the two tier-a views of the decoded RGB picture (PIL)."""

    def __init__(self, size: int) -> None:
        self.view = peer_views(size)

    def __call__(self, data: bytes):
        from PIL import Image

        picture = Image.open(io.BytesIO(data)).convert("RGB")
        return self.view(picture), self.view(picture)


def rela_stream_loader(dataset, size: int, workers: int, batch_size: int, augment: str):
    """rela's loading as the tier-a peers load: ``TrainStream`` over a converted dataset (folder), one epoch of
    every sample (data ratio 1), in the method phase with the method's views set to exactly the peers' views
    (RandomResizedCrop(S) scale (0.08, 1) + flip, no colour), ``augment`` as given, reading the dataset's
    preferred stored format. Returns the DataLoader of ``(view_1, view_2, features,
    labels)`` (float32 ``[B, 3, S, S]`` twice).

    The one place that builds rela's loader here: ``TrainStream``'s API is changing (its ``method_views`` will
    take :class:`~rela_train.views.ViewParams` pairs instead of CPU callables), so only this function follows it.
    """
    from rela_convert.dataset.converted import ConvertedDataset
    from rela_train.data.stream import TrainStream

    opened = ConvertedDataset(dataset)
    params = ViewParams(size, crop_scale=(0.08, 1.0), jitter_prob=0, grey_prob=0)  # crop + flip only
    # Today's API takes CPU callables: params.cpu(). Once TrainStream takes ViewParams pairs, pass (params, params).
    views = (params.cpu(), params.cpu())
    stream = TrainStream(opened, size, views, data_ratio=1.0, seed=0, batch_size=batch_size, augment=augment)
    stream.set_phase(False)  # the method's views
    stream.set_epoch(0)
    return stream.loader(workers)


class _ViewsDataset:
    """Mixin for map-style streaming datasets: each item -> (view_1, view_2, feature, label)."""

    def _views(self, sample: dict):
        view_1, view_2 = self.two_views(bytes(sample["image"]))
        return view_1, view_2, torch.from_numpy(np.array(sample["feature"], np.float32)), int(sample["label"])


def load_litdata(out: Path, size: int, args):
    """LitData ``StreamingDataset`` (shuffled) decoding + views in ``StreamingDataLoader`` workers."""
    import litdata

    class Views(litdata.StreamingDataset, _ViewsDataset):
        def __getitem__(self, index):
            return self._views(super().__getitem__(index))

    dataset = Views(str(out), shuffle=True, drop_last=True, seed=0)
    dataset.two_views = TwoViews(size)
    return litdata.StreamingDataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, drop_last=True)


def load_mds(out: Path, size: int, args):
    """MosaicML ``StreamingDataset`` (local, shuffled) decoding + views in DataLoader workers."""
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    class Views(StreamingDataset, _ViewsDataset):
        def __getitem__(self, index):
            return self._views(super().__getitem__(index))

    clean_stale_shared_memory()
    dataset = Views(local=str(out), shuffle=True, batch_size=args.batch_size, shuffle_seed=0)
    dataset.two_views = TwoViews(size)
    return DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, drop_last=True)


def load_webdataset(out: Path, size: int, args):
    """``wds.WebDataset`` over its :data:`WDS_SHARDS` shards (split across workers), shuffle buffer 1,000,
    decode (PIL) + views in DataLoader workers."""
    import webdataset as wds

    two_views = TwoViews(size)

    def views(sample):
        view_1, view_2 = two_views(sample["jpg"])
        return view_1, view_2, torch.from_numpy(np.load(io.BytesIO(sample["npy"]))), int(sample["cls"])

    shards = sorted(str(path) for path in out.glob("*.tar"))
    dataset = wds.WebDataset(shards, shardshuffle=len(shards), seed=0, empty_check=False).shuffle(1000).map(views)
    return DataLoader(dataset.batched(args.batch_size, partial=False), batch_size=None, num_workers=args.workers)


def load_dali(tar_dir: Path, size: int, args):
    """NVIDIA DALI on the CPU over rela's tar shards: a generator of (view_1, view_2) torch float32 batches."""
    from nvidia.dali import fn, pipeline_def, types

    shards = sorted(str(path) for path in tar_dir.glob("shard-*.tar"))
    count = sum(
        json.loads((tar_dir / "index.json").read_text())["formats"]["webdataset"][i]["num_samples"]
        for i in range(len(shards))
    )

    @pipeline_def(batch_size=args.batch_size, num_threads=args.workers, device_id=None, seed=0)
    def pipeline():
        jpegs, labels = fn.readers.webdataset(
            paths=shards, ext=["jpg", "cls"], random_shuffle=True, initial_fill=1000, name="reader"
        )
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        views = []
        for _ in range(2):
            crop = fn.random_resized_crop(images, size=(size, size), random_area=(0.08, 1.0))
            views.append(
                fn.crop_mirror_normalize(
                    crop,
                    dtype=types.FLOAT,
                    output_layout="CHW",
                    mean=[255 * value for value in IMAGENET_MEAN],
                    std=[255 * value for value in IMAGENET_STD],
                    mirror=fn.random.coin_flip(),
                )
            )
        return views[0], views[1], labels

    pipe = pipeline()
    pipe.build()

    class Epochs:
        """Each iteration: one epoch of full batches as torch float32 (view_1, view_2)."""

        def __iter__(self):
            for _ in range(count // args.batch_size):
                view_1, view_2, _ = pipe.run()
                yield torch.from_numpy(view_1.as_array()), torch.from_numpy(view_2.as_array())

    return Epochs()


def write_ffcv(case: Case, path: Path) -> None:
    """Untimed set-up of the FFCV peer: its ``.beton`` file of every image (JPEG, quality 90) and label. The image
    is stored twice (``image``, ``image_2``): FFCV 1.0 decodes a field once per pipeline and has no way to run two
    pipelines over one field, so two views need two fields (each view decodes its JPEG, as in every variant)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from PIL import Image

    class Pictures(Dataset):
        def __len__(self):
            return len(case.files)

        def __getitem__(self, key):
            file = case.files[key]
            picture = Image.open(file.path).convert("RGB")
            return picture, picture, -1 if file.label is None else file.label

    image = RGBImageField(write_mode="jpg", jpeg_quality=90)
    writer = DatasetWriter(str(path), {"image": image, "image_2": image, "label": IntField()}, num_workers=2)
    writer.from_indexed_dataset(Pictures())


def load_ffcv(path: Path, size: int, args):
    """FFCV ``Loader`` (random order, ``--workers`` threads): two ``RandomResizedCropRGBImageDecoder`` + flip +
    ``NormalizeImage`` + ``ToTensor`` + ``ToTorchImage`` pipelines over the two image fields, drop last."""
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, ToTensor, ToTorchImage

    mean, std = np.array(IMAGENET_MEAN) * 255, np.array(IMAGENET_STD) * 255

    def view():
        return [
            RandomResizedCropRGBImageDecoder((size, size)),
            RandomHorizontalFlip(),
            NormalizeImage(mean, std, np.float32),
            ToTensor(),
            ToTorchImage(),
        ]

    return Loader(
        str(path),
        batch_size=args.batch_size,
        num_workers=args.workers,
        order=OrderOption.RANDOM,
        drop_last=True,
        pipelines={"image": view(), "image_2": view(), "label": [IntDecoder()]},
        seed=0,
    )


def time_epoch(loader: Iterable, size: int) -> dict:
    """Iterate one epoch: images delivered, wall seconds, CPU seconds (workers reaped inside), first-batch seconds.

    Raises:
        RuntimeError: a batch whose first view is not float32 ``[B, 3, S, S]``.
    """
    images, first = 0, None
    with Clock() as clock:
        iterator = iter(loader)
        for batch in iterator:
            view = batch["view1"] if isinstance(batch, dict) else batch[0]
            if first is None:
                first = time.perf_counter() - clock.wall
                if view.dtype != torch.float32 or tuple(view.shape[1:]) != (3, size, size):
                    raise RuntimeError(f"a view of {tuple(view.shape)} {view.dtype}, expected float32 [B, 3, S, S]")
            images += len(view)
        del iterator  # DataLoader workers exit and are reaped inside the clock
    return {"images": images, "wall": clock.wall, "cpu": clock.cpu, "first_batch_s": first}


# ------------------------------------------------------------------------------------------------------ the runs


def rounds(names: list[str], count: int) -> Iterable[tuple[int, list[str]]]:
    """Round ``r`` runs every name once, the order rotated by ``r`` places."""
    for round_ in range(count):
        shift = round_ % len(names)
        yield round_, names[shift:] + names[:shift]


def summarise(runs: dict[str, list[dict]], rela: tuple[str, ...], peers: list[str]) -> dict:
    """Medians per variant and per-round paired ratios of each rela variant over each peer and the best peer."""
    summary: dict = {"variants": {}, "ratios": {}}
    for name, values in runs.items():
        ok = [value for value in values if "images_per_s" in value]
        if ok:
            summary["variants"][name] = {
                "images_per_s": statistics.median(value["images_per_s"] for value in ok),
                "cpu_ms_per_image": statistics.median(value["cpu_ms_per_image"] for value in ok),
                "runs": len(ok),
            }
    present = [peer for peer in peers if peer in summary["variants"]]
    for ours in rela:
        if ours not in summary["variants"]:
            continue
        entry = {}
        for peer in present:
            pairs = [(a, b) for a, b in zip(runs[ours], runs[peer]) if "images_per_s" in a and "images_per_s" in b]
            entry[peer] = {
                "speed": statistics.median(a["images_per_s"] / b["images_per_s"] for a, b in pairs),
                "cpu": statistics.median(b["cpu_ms_per_image"] / a["cpu_ms_per_image"] for a, b in pairs),
            }
        if present:
            best = [
                (runs[ours][i], max((runs[peer][i] for peer in present), key=lambda run: run.get("images_per_s", 0)))
                for i in range(len(runs[ours]))
            ]
            best = [(a, b) for a, b in best if "images_per_s" in a and "images_per_s" in b]
            entry["best peer"] = {
                "speed": statistics.median(a["images_per_s"] / b["images_per_s"] for a, b in best),
                "cpu": statistics.median(
                    min(runs[peer][i]["cpu_ms_per_image"] for peer in present if "cpu_ms_per_image" in runs[peer][i])
                    / runs[ours][i]["cpu_ms_per_image"]
                    for i in range(len(runs[ours]))
                    if "cpu_ms_per_image" in runs[ours][i]
                ),
            }
            entry["pass"] = entry["best peer"]["speed"] >= 1.0
        summary["ratios"][ours] = entry
    return summary


def run_convert(case: Case, args, scratch: Path, skipped: dict, count: int) -> tuple[dict, dict[str, Path]]:
    """``count`` conversion rounds of one input; keeps the first round's outputs (for the check and the loading)."""
    names = [name for name in CONVERTERS if name in args.converters and name not in skipped]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    kept: dict[str, Path] = {}
    for round_, order in rounds(names, count):
        for name in order:
            if name in skipped:
                runs[name].append({"skipped": skipped[name]})
                continue
            out = Path(tempfile.mkdtemp(prefix="convert-", dir=scratch)) / "out"
            load = os.getloadavg()[0]
            try:
                with Clock() as clock:
                    count = CONVERT_FUNCTIONS[name](case, out, args)
            except Exception as error:
                skipped[name] = (
                    f"failed: {type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
                )
                print(f"  {name}: skipped, {skipped[name]}", flush=True)
                traceback.print_exc()
                runs[name].append({"skipped": skipped[name]})
                continue
            if count != len(case.files):
                raise SystemExit(f"error: {name} converted {count} of {len(case.files)} images of {case.name}")
            run = {
                "round": round_,
                "images_per_s": count / clock.wall,
                "cpu_ms_per_image": 1e3 * clock.cpu / count,
                "wall_s": clock.wall,
                "load_average_1min": load,
            }
            runs[name].append(run)
            print(
                f"  {case.name} convert round {round_ + 1}: {name:12s} {run['images_per_s']:8.1f} images/s "
                f"{run['cpu_ms_per_image']:6.2f} CPU ms/image (load {load:.2f})",
                flush=True,
            )
            if name not in kept:
                kept[name] = out
            else:
                shutil.rmtree(out.parent, ignore_errors=True)
    peers = [name for name in names if name not in RELA_CONVERTERS]
    return {"runs": runs, **summarise(runs, RELA_CONVERTERS, peers)}, kept


def loader_factories(case: Case, outputs: dict[str, Path], args, scratch: Path, skipped: dict) -> dict[str, Callable]:
    """What each loading variant needs (set up untimed, e.g. FFCV's file); peers that cannot run go to ``skipped``."""
    factories: dict[str, Callable] = {}
    size = case.size
    if "rela tar" in outputs:
        factories["rela stream (tar)"] = lambda: rela_stream_loader(
            outputs["rela tar"], size, args.workers, args.batch_size, args.rela_augment
        )
        factories["rela_loader"] = lambda: _rela_loader(outputs["rela tar"], size, args)
        factories["dali (cpu)"] = lambda: load_dali(outputs["rela tar"], size, args)
    if "rela hdf5" in outputs:
        factories["rela stream (hdf5)"] = lambda: rela_stream_loader(
            outputs["rela hdf5"], size, args.workers, args.batch_size, args.rela_augment
        )
    for name, function in (("litdata", load_litdata), ("mds", load_mds), ("webdataset", load_webdataset)):
        if name in outputs:
            factories[name] = functools.partial(function, outputs[name], size, args)
    if "ffcv" in args.loaders and "ffcv" not in skipped:
        try:
            path = scratch / f"{case.name}.beton"
            write_ffcv(case, path)
            factories["ffcv"] = functools.partial(load_ffcv, path, size, args)
        except Exception as error:
            skipped["ffcv"] = f"failed: {type(error).__name__}: {first_line(error)}"
            print(f"  ffcv: skipped, {skipped['ffcv']}", flush=True)
    return factories


def _rela_loader(dataset: Path, size: int, args):
    from rela_train import rela_loader

    return rela_loader(dataset, batch_size=args.batch_size, input_size=size, data_ratio=1.0, workers=args.workers)


def first_line(error: BaseException) -> str:
    """The first line of an error's message."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def run_load(case: Case, outputs: dict[str, Path], args, scratch: Path, skipped: dict) -> dict:
    """The loading rounds of one input (tiers a and b)."""
    factories = loader_factories(case, outputs, args, scratch, skipped)
    names = [name for name in LOADERS_A + LOADERS_B if name in factories and name in args.loaders]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_, order in rounds(names, args.rounds):
        for name in order:
            if name in skipped:
                runs[name].append({"skipped": skipped[name]})
                continue
            load = os.getloadavg()[0]
            try:
                loader = factories[name]()
                if name in LOADERS_B:  # the ceiling: a steady epoch, after one that builds / JIT-compiles
                    time_epoch(loader, case.size)
                timed = time_epoch(loader, case.size)
            except Exception as error:
                skipped[name] = f"failed: {type(error).__name__}: {first_line(error)}"
                print(f"  {name}: skipped, {skipped[name]}", flush=True)
                traceback.print_exc()
                runs[name].append({"skipped": skipped[name]})
                continue
            run = {
                "round": round_,
                "images": timed["images"],
                "images_per_s": timed["images"] / timed["wall"],
                "cpu_ms_per_image": 1e3 * timed["cpu"] / timed["images"],
                "wall_s": timed["wall"],
                "first_batch_s": timed["first_batch_s"],
                "load_average_1min": load,
            }
            runs[name].append(run)
            print(
                f"  {case.name} load round {round_ + 1}: {name:18s} {run['images_per_s']:8.1f} images/s "
                f"{run['cpu_ms_per_image']:6.2f} CPU ms/image ({run['images']} images, load {load:.2f})",
                flush=True,
            )
    tier_a = [name for name in names if name in LOADERS_A and name not in RELA_LOADERS and name not in OUTSIDE_PASS]
    summary = summarise(runs, RELA_LOADERS, tier_a)
    tier_b = [name for name in names if name in LOADERS_B]
    ceiling = summarise(runs, RELA_LOADERS, tier_b)["ratios"]
    return {"runs": runs, **summary, "ratios_to_tier_b": ceiling, "tier_a_peers": tier_a, "tier_b": tier_b}


def quiet_numba_finalizers() -> None:
    """Leave out the ``KeyError`` that numba's dispatcher finalizers raise (ignored) when FFCV's compiled
    pipelines are collected: noise in the output, not a failure."""
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyError) and "numba" in "".join(
            traceback.format_tb(unraisable.exc_traceback)
        ):
            return
        previous(unraisable)

    sys.unraisablehook = hook


def warm_case(case: Case) -> None:
    """Untimed, before the rounds: every source file read once (a warm page cache for every variant, whichever
    runs first) and the prior built once (first-use costs of its modules)."""
    from rela_convert.priors import load_prior

    warm_page_cache([Path(file.path) for file in case.files])
    load_prior(case.prior)


def warm_up() -> None:
    """Import what rela's conversion and loading import lazily, so that the first timed run does not pay it."""
    import h5py  # noqa: F401
    import torchvision.io  # noqa: F401
    import torchvision.transforms.v2.functional  # noqa: F401
    import webdataset  # noqa: F401

    import rela_train.data.stream  # noqa: F401


def check_peers(args) -> dict[str, str]:
    """Import every peer asked for; returns name -> why it is skipped (not installed) for those that do not import."""
    modules = {
        "mds": "streaming",
        "litdata": "litdata",
        "webdataset": "webdataset",
        "dali (cpu)": "nvidia.dali",
        "ffcv": "ffcv.loader",
    }
    skipped = {}
    for name, module in modules.items():
        if name not in args.converters and name not in args.loaders:
            continue
        try:
            __import__(module)
        except Exception as error:  # ImportError, or a broken install raising anything
            skipped[name] = (
                f"not importable ({module}: {type(error).__name__}: {first_line(error)}); pip install -e .[peers]"
            )
            print(f"{name}: skipped, {skipped[name]}", flush=True)
    return skipped


def make_case(name: str, args, scratch: Path) -> Case:
    if name == "cifar":
        source = cifar_subset(args.cifar_images, PROJECT / ".cache" / f"cifar-{args.cifar_images}")
        return Case(name, source, CIFAR_PRIOR, 32, scan_tree(source).files)
    if name == "imagenet":
        source = imagenet_sample()
        return Case(name, source, args.imagenet_prior, 224, scan_tree(source).files)
    raise SystemExit(f"error: unknown input {name!r}; use cifar and/or imagenet")


def print_tables(results: list[dict]) -> None:
    """The conversion and loading tables (medians; ratios are medians of per-round ratios)."""
    for result in results:
        for part, rela in (("convert", RELA_CONVERTERS), ("load", RELA_LOADERS)):
            if part not in result:
                continue
            data = result[part]
            print(f"\n{result['input']} ({result['images']} images, {result['size']} px), {part}:")
            header = f"{'variant':20s} {'images/s':>9s} {'CPU ms/img':>11s}  " + "  ".join(
                f"{name + ' / it':>22s}" for name in rela if name in data["variants"]
            )
            print(header)
            print("-" * len(header))
            for name, value in data["variants"].items():
                ratios = "  ".join(
                    f"{data['ratios'][ours][name]['speed']:9.2f}x {data['ratios'][ours][name]['cpu']:6.2f}x cpu"
                    if name in data["ratios"].get(ours, {})
                    else f"{'':22s}"
                    for ours in rela
                    if ours in data["variants"]
                )
                print(f"{name:20s} {value['images_per_s']:9.1f} {value['cpu_ms_per_image']:11.2f}  {ratios}")
            for ours, entry in data["ratios"].items():
                if "best peer" in entry:
                    verdict = "PASS" if entry["pass"] else "FAIL"
                    print(
                        f"{ours} / best peer: {entry['best peer']['speed']:.2f}x images/s, "
                        f"{entry['best peer']['cpu']:.2f}x less CPU per image: {verdict}"
                    )
            for ours, entry in data.get("ratios_to_tier_b", {}).items():
                if "best peer" in entry:
                    print(f"{ours} / tier b ceiling: {entry['best peer']['speed']:.2f}x images/s")


def markdown_tables(results: list[dict]) -> str:
    """The results as the Markdown tables of docs/performance.md: per input and part, each variant's median
    images/s and CPU ms per image, and the median per-round ratio of rela tar (conversion) or rela stream
    (loading, from HDF5 and from tar) to it."""
    lines = []
    for result in results:
        for part, ours in (("convert", ("rela tar",)), ("load", RELA_LOADERS)):
            if part not in result:
                continue
            data = result[part]
            title = "conversion" if part == "convert" else "loading"
            lines.append(f"\n{result['input']}, {result['images']} images at {result['size']} px, {title}:\n")
            present = [name for name in ours if name in data["variants"]]
            heads = " | ".join(f"{name} / it (images/s, CPU)" for name in present)
            lines.append(f"| variant | tier | images/s | CPU ms/image | {heads} |")
            lines.append("| --- | --- | ---: | ---: |" + " ---: |" * len(present))
            for name, value in data["variants"].items():
                tier = (
                    "rela"
                    if name.startswith("rela")
                    else ("b" if name in LOADERS_B else "a")
                    if part == "load"
                    else "peer"
                )
                cells = []
                for rela in present:
                    pair = data["ratios"].get(rela, {}).get(name) or data.get("ratios_to_tier_b", {}).get(rela, {}).get(
                        name
                    )
                    cells.append(f"{pair['speed']:.2f}x, {pair['cpu']:.2f}x" if pair else "")
                bold = "**" if name in present else ""
                lines.append(
                    f"| {bold}{name}{bold} | {tier} | {value['images_per_s']:,.0f} | {value['cpu_ms_per_image']:.2f} | "
                    + " | ".join(cells)
                    + " |"
                )
            for rela in present:
                entry = data["ratios"].get(rela, {})
                if "best peer" in entry:
                    lines.append(
                        f"\n{rela} / best {'tier-a ' if part == 'load' else ''}peer, median of the rounds: "
                        f"{entry['best peer']['speed']:.2f}x images/s, {entry['best peer']['cpu']:.2f}x less CPU per "
                        f"image: **{'pass' if entry['pass'] else 'fail'}**."
                    )
            loads = [
                run["load_average_1min"] for runs in data["runs"].values() for run in runs if "load_average_1min" in run
            ]
            if loads:
                lines.append(f"\nLoad average (1 min) during the runs: {min(loads):.1f} to {max(loads):.1f}.")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """Horizontal bars of the median images/s, one row per input and one column per part (conversion, loading);
    rela's bars orange, tier-b loaders grey, loading on a log scale (tier b is an order of magnitude faster at
    32 px); each bar labelled with its value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [part for part in ("convert", "load") if any(part in result for result in results)]
    if not parts:
        return
    figure, axes = plt.subplots(len(results), len(parts), figsize=(6 * len(parts), 2.9 * len(results)), squeeze=False)
    for row, result in zip(axes, results):
        for axis, part in zip(row, parts):
            if part not in result:
                axis.axis("off")
                continue
            variants = result[part]["variants"]
            names = list(variants)[::-1]
            speeds = [variants[name]["images_per_s"] for name in names]
            colours = [
                "tab:orange" if name.startswith("rela") else "tab:grey" if name in LOADERS_B else "tab:blue"
                for name in names
            ]
            axis.barh(names, speeds, color=colours)
            for position, speed in enumerate(speeds):
                axis.text(speed, position, f" {speed:,.0f}", va="center", fontsize=7)
            if part == "load":
                axis.set_xscale("log")
            axis.set_xlim(right=max(speeds) * (3 if part == "load" else 1.2))
            title = "conversion" if part == "convert" else "loading (log scale)"
            axis.set_title(f"{result['input']}, {result['images']} images at {result['size']} px: {title}", fontsize=9)
            axis.set_xlabel("images/s, median of the rounds", fontsize=8)
            axis.tick_params(labelsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--inputs", default="cifar,imagenet", help="comma-separated: cifar, imagenet (default both)")
    parser.add_argument("--cifar-images", type=int, default=5000, help="CIFAR-10 train images (default 5000)")
    parser.add_argument(
        "--imagenet-prior",
        default=IMAGENET_PRIOR,
        help=f"prior of the ImageNet input, for every converter (default {IMAGENET_PRIOR})",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds, order rotated (default 3)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of every variant (default 2)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch, every variant (default 64)")
    parser.add_argument("--parts", default="convert,load", help="comma-separated: convert, load (default both)")
    parser.add_argument(
        "--converters", default=",".join(CONVERTERS), help=f"subset of {','.join(CONVERTERS)} (default all)"
    )
    parser.add_argument(
        "--loaders",
        default=",".join(LOADERS_A + LOADERS_B),
        help=f"subset of {','.join(LOADERS_A + LOADERS_B)} (default all)",
    )
    parser.add_argument(
        "--rela-augment",
        default=default_augment(),
        choices=AUGMENTS,
        help=f"TrainStream's augment for the rela stream rows (default {default_augment()}, rela train's default)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "peers.json", help="JSON results (default %(default)s)")
    parser.add_argument(
        "--plot", type=Path, default=PROJECT / "docs" / "_static" / "peers.png", help="bar plot (default %(default)s)"
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        help="measure nothing: print the tables (and the Markdown of docs/performance.md) of this results file and "
        "redraw --plot from it",
    )
    args = parser.parse_args(argv)
    if args.from_json:
        payload = json.loads(args.from_json.read_text())
        print_tables(payload["results"])
        print(markdown_tables(payload["results"]))
        plot(payload["results"], args.plot)
        return payload
    args.converters = [name.strip() for name in args.converters.split(",") if name.strip()]
    args.loaders = [name.strip() for name in args.loaders.split(",") if name.strip()]
    parts = {part.strip() for part in args.parts.split(",")}
    if not parts <= {"convert", "load"} or args.rounds < 1 or args.workers < 1 or args.batch_size < 1:
        raise SystemExit("error: --parts is convert and/or load; --rounds, --workers and --batch-size are >= 1")
    if "load" in parts:  # loading reads what the conversions wrote
        args.converters = list(
            dict.fromkeys(args.converters + [n for n in CONVERTERS if n in ("rela tar", "rela hdf5")])
        )
    # This process only loads priors (a probe forward pass) and drives workers: one torch thread, so that idle
    # OpenMP threads spinning on a shared machine add no noise to every variant's CPU time.
    torch.set_num_threads(1)
    info = machine()
    skipped = check_peers(args)
    warm_up()
    quiet_numba_finalizers()
    results = []
    with tempfile.TemporaryDirectory(prefix="peers-", dir=PROJECT / ".cache") as folder:
        scratch = Path(folder)
        for name in [name.strip() for name in args.inputs.split(",") if name.strip()]:
            case = make_case(name, args, scratch)
            result = {"input": name, "images": len(case.files), "size": case.size, "prior": case.prior}
            print(f"{name}: {len(case.files)} images, views {case.size} px, prior {case.prior}", flush=True)
            case_skipped = dict(skipped)
            warm_case(case)
            count = args.rounds if "convert" in parts else 1
            converted, outputs = run_convert(case, args, scratch, case_skipped, count)
            if "convert" in parts:
                result["convert"] = converted
                result["check"] = check_outputs(case, outputs)
                for output, verdict in result["check"].items():
                    print(f"  check {output}: {verdict}", flush=True)
            if "load" in parts:
                result["load"] = run_load(case, outputs, args, scratch, case_skipped)
            result["skipped"] = case_skipped
            results.append(result)
    info["load_average_1min_at_end"] = os.getloadavg()[0]
    print_tables(results)
    payload = {
        "machine": info,
        "settings": {
            "rounds": args.rounds,
            "workers": args.workers,
            "batch_size": args.batch_size,
            "rela_augment": args.rela_augment,
            "cifar_images": args.cifar_images,
            "imagenet_prior": args.imagenet_prior,
            "wds_shards": WDS_SHARDS,
        },
        "versions": peer_versions(),
        "results": results,
    }
    print(markdown_tables(results))
    write_json(args.out, payload)
    plot(results, args.plot)
    return payload


def peer_versions() -> dict:
    """Installed versions of the peers (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("mosaicml-streaming", "litdata", "webdataset", "nvidia-dali-cuda120", "ffcv", "numpy"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return versions


if __name__ == "__main__":
    main()
