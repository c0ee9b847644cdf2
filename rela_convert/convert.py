"""``rela convert``: run a prior once over an image tree and write shards (ReLA-D).

One data path for every storage format, device and number of processes. A sample's
key is its position in the sorted :func:`~rela_convert.tree.scan_tree` listing; samples
are stored in a seeded pseudo-random order (:func:`storage_order`), so that every shard
mixes the classes of a class-folder tree and training batches, read shard by shard, are
uniform random samples (method.md, stage 2). That order is cut into fixed ranges of
``shard_size`` stored positions (shard ``s`` holds positions ``s*shard_size ..``), and
process ``r`` of ``N`` converts shards ``r, r+N, ...``. DataLoader workers read each
file, decode it and make the prior's view (:func:`~rela_convert.images.prior_view`)
or report why it cannot be converted (with ``decode="device"`` JPEGs are instead
decoded in batches on the conversion device, :func:`~rela_convert.images.device_pixels`);
the process runs the prior on batches of positions that never cross a shard boundary
and streams every sample, in position order, through one shard writer per storage
format asked for (:data:`rela_convert.dataset.formats.STORAGE_FORMATS`: WebDataset tar, HDF5,
...). A finished shard is renamed into place and described by a record under
``OUT/.partial/`` (its keys, skips and a histogram of the shorter image sides it
saw); a killed conversion resumes at the unfinished shards. At the end the
float64 feature moments are summed over processes, the PCA statistics (method.md,
stage 1, step 2) are fitted, and process 0 writes ``keys.npy``, ``pca.npz``,
``skipped.jsonl`` and finally ``index.json``.

Same bytes however it runs: fixed shard and batch ranges give bit-identical
features and shards whether a shard is converted in one go, after a resume or by
another process, and each process sums moments in shard order (finished shards
are read back), so an interrupted and resumed run equals an uninterrupted one
byte for byte. With N processes the per-process sums are added by an all-reduce;
the PCA statistics then agree with a one-process run to float64 rounding.

Memory does not grow with N: one shard's features (``shard_size x D`` float32),
one HDF5 write block and the ``[D, D]`` float64 sums are held.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
import time
from collections import Counter, deque
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from rela_convert.config import ConvertOptions
from rela_convert.dataset.files import DatasetError, no_space, write_atomic, write_json_atomic
from rela_convert.dataset.formats import STORAGE_FORMATS, Sample, preferred_format
from rela_convert.dataset.index import INDEX_NAME, DatasetIndex
from rela_convert.dataset.pca import FeatureMoments, PCAStatistics
from rela_convert.devices import resolve_device
from rela_convert.distributed import Ranks
from rela_convert.images import (
    STORED_FORMATS,
    ImageDecodeError,
    device_decodable,
    device_pixels,
    open_image,
    prior_view,
)
from rela_convert.options import check
from rela_convert.priors import Prior, load_prior
from rela_convert.processes import die_with_parent
from rela_convert.tree import Listing, SourceFile, display_path, scan_tree

PARTIAL_DIR = ".partial"
JOB_FILE = "job.json"


class ConversionError(RuntimeError):
    """The conversion cannot run or produced nothing; the message says why and what to do."""


#: The rule of :func:`storage_order`, recorded in ``index.json``.
ORDER_RULE = "numpy.random.default_rng(seed).permutation(num_files)"


def storage_order(num_files: int, seed: int) -> np.ndarray:
    """The order in which samples are stored: int64 ``[num_files]``, stored position ``p``
    holds the file with key ``order[p]`` (:data:`ORDER_RULE`). Shard ``s`` holds positions
    ``[s*shard_size, (s+1)*shard_size)``, so every shard is a uniform random sample of the
    tree and batches read shard by shard are too (method.md, stage 2, Batches)."""
    return np.random.default_rng(seed).permutation(num_files)


class PriorInputs(Dataset):
    """Map-style dataset over source files in stored order; item ``p`` is a dict with
    ``position`` (``p``, the stored position), ``file`` (:class:`SourceFile`), and either
    ``image`` (encoded bytes), ``ext``, ``shorter_side`` (the smaller of the image's width
    and height, pixels) and, unless ``device_decode`` and :func:`device_decodable`,
    ``pixels`` (uint8 ``[3, S, S]``), or ``reason`` (why the file is skipped)."""

    def __init__(self, files: list[SourceFile], input_size: int, device_decode: bool = False) -> None:
        self.files = files
        self.input_size = input_size
        self.device_decode = device_decode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, position: int) -> dict:
        file = self.files[position]
        try:
            with open(file.path, "rb") as handle:
                data = handle.read()
            image = open_image(data)
            item = {"position": position, "file": file, "image": data, "ext": STORED_FORMATS[image.format]}
            item["shorter_side"] = min(image.size)
            if not (self.device_decode and device_decodable(image)):
                item["pixels"] = prior_view(image, self.input_size)  # may draft the image: size read above
            return item
        except ImageDecodeError as error:
            return {"position": position, "file": file, "reason": str(error)}
        except OSError as error:
            return {"position": position, "file": file, "reason": f"unreadable file: {error.strerror or error}"}


def collate(items: list[dict], prior: Prior | None = None) -> dict:
    """Stack the pixels of items decoded here into uint8 ``[B, 3, S, S]`` (``good``); keep
    JPEGs left to the device (``encoded``) and skipped items as lists. With ``prior`` (a CPU
    conversion with workers), run the prior here, in the worker (one thread), and return its
    ``features`` (float32 ``[B, D]``) instead of the pixels."""
    good = [item for item in items if "pixels" in item]
    encoded = [item for item in items if "image" in item and "pixels" not in item]
    pixels = torch.stack([item.pop("pixels") for item in good]) if good else None
    batch = {
        "pixels": pixels,
        "good": good,
        "encoded": encoded,
        "skipped": [item for item in items if "reason" in item],
    }
    if prior is not None:
        batch["features"] = (
            prior.features(pixels).numpy() if pixels is not None else np.zeros((0, prior.feature_dim), np.float32)
        )
        batch["pixels"] = None
    return batch


def record_path(out: Path, shard: int) -> Path:
    """Where the record of a finished shard lives until the index is written."""
    return out / PARTIAL_DIR / f"shard-{shard:06d}.json"


class ShardStream:
    """Routes samples, in stored-position order, into the shard of their position range
    (one writer per storage format), finishes each shard (files renamed, record written)
    when its range is complete, and sums the feature moments of this process's shards in
    shard order: ``finished`` shards (done by an earlier, interrupted run) are read back
    in their turn (from the preferred format, :func:`~rela_convert.dataset.formats.preferred_format`:
    HDF5 when written, features without reading past images). A shard's record holds its
    keys in stored order, its skips, the :class:`~rela_convert.dataset.index.ShardRecord` of each of
    its files and the histogram of the shorter image sides of its samples
    (``{str(pixels): count}``).

    Attributes:
        moments: :class:`FeatureMoments` of every sample of this process's shards once :meth:`close` ran.
        num_samples: samples in this process's shards (converted now or earlier).
    """

    def __init__(self, out: Path, options: ConvertOptions, feature_dim: int, finished: list[int]) -> None:
        self.out, self.options, self.feature_dim = out, options, feature_dim
        self.formats = {name: STORAGE_FORMATS.get(name) for name in options.formats}
        self.finished = deque(finished)
        self.moments = FeatureMoments.zeros(feature_dim)
        self.num_samples = 0
        self.current: int | None = None
        self.writers: dict = {}
        self.keys: list[int] = []
        self.features: list[np.ndarray] = []
        self.skipped: list[dict] = []
        self.shorter_sides: Counter = Counter()

    def add(self, position: int, sample: Sample, shorter_side: int) -> None:
        """Append a converted sample: ``position`` its stored position (positions must
        arrive in increasing order), ``shorter_side`` its source image's smaller side, pixels.

        Raises:
            OSError: a shard cannot be written.
        """
        self._switch_to(position)
        if not self.writers:
            self.writers = {
                name: format.writer(self.out / format.shard_file_name(self.current), self.options)
                for name, format in self.formats.items()
            }
        for writer in self.writers.values():
            writer.write(sample)
        self.keys.append(sample.key)
        self.features.append(sample.feature)
        self.shorter_sides[shorter_side] += 1

    def skip(self, position: int, file: SourceFile, reason: str) -> None:
        """Record a source file that could not be converted, in the shard of its stored ``position``."""
        self._switch_to(position)
        self.skipped.append({"path": display_path(file.relpath), "reason": reason})

    def close(self) -> None:
        """Finish the last shard and add the moments of the remaining finished shards."""
        self._finish_current()
        self._add_finished(before=None)

    def abort(self) -> None:
        """Drop the unfinished shard (its writers' temporary files; finished shards stay as they are)."""
        for writer in self.writers.values():
            if hasattr(writer, "abort"):  # optional for a storage format's writer
                writer.abort()
        self.writers = {}

    def _switch_to(self, position: int) -> None:
        shard = position // self.options.shard_size
        if shard != self.current:
            self._finish_current()
            self._add_finished(before=shard)
            self.current = shard

    def _finish_current(self) -> None:
        if self.current is None:
            return
        shards = {format: writer.close() for format, writer in self.writers.items()}
        if self.features:
            self.moments += FeatureMoments.of(np.stack(self.features))
            self.num_samples += len(self.features)
        sides = {str(side): count for side, count in self.shorter_sides.items()}
        record = {"shards": shards, "keys": self.keys, "skipped": self.skipped, "shorter_sides": sides}
        write_json_atomic(record_path(self.out, self.current), record)
        self.current, self.writers, self.keys, self.features, self.skipped = None, {}, [], [], []
        self.shorter_sides = Counter()

    def _add_finished(self, before: int | None) -> None:
        name = preferred_format(self.formats)
        while self.finished and (before is None or self.finished[0] < before):
            record = json.loads(record_path(self.out, self.finished.popleft()).read_text())
            if record["shards"]:
                features = self.formats[name].read_features(self.out / record["shards"][name]["name"])[1]
                self.moments += FeatureMoments.of(features)
                self.num_samples += len(features)


def _listing_sha256(listing: Listing) -> str:
    digest = hashlib.sha256()
    for file in listing.files:
        digest.update(file.relpath + b"\0")
    return digest.hexdigest()


def _job_description(src: Path, listing: Listing, prior: Prior, options: ConvertOptions) -> dict:
    """What must match for a conversion to resume into (or reuse) an existing OUT."""
    return {
        "source": str(src),
        "num_files": len(listing.files),
        "listing_sha256": _listing_sha256(listing),
        "prior": prior.spec,
        "prior_weights_sha256": prior.weights_sha256,
        "shard_size": options.shard_size,
        "formats": list(options.formats),
        "hdf5_compression": options.hdf5_compression,
        "decode": options.decode,
        "order_seed": options.order_seed,
    }


def _check_existing(out: Path, job: dict) -> bool:
    """True when ``out`` already holds this finished conversion; False when it is new,
    empty or holds an unfinished run of the same job.

    Raises:
        ConversionError: ``out`` holds a conversion with a different prior or other
            arguments, one of another format version, or other files.
    """
    for path in (out / INDEX_NAME, out / PARTIAL_DIR / JOB_FILE):
        if path.is_file():
            try:
                found = DatasetIndex.load(out).job if path.name == INDEX_NAME else json.loads(path.read_text())
            except DatasetError as error:
                raise ConversionError(f"{error} (into another OUT, or delete this one)") from None
            if found != job:
                differences = "; ".join(
                    f"{key}: {found.get(key)!r} there, {job.get(key)!r} now"
                    for key in sorted(set(found) | set(job))
                    if found.get(key) != job.get(key)
                )
                raise ConversionError(
                    f"{out} already holds a conversion made with other arguments ({differences}); choose another OUT "
                    "or delete it"
                )
            return path.name == INDEX_NAME
    if out.is_dir() and any(out.iterdir()):
        raise ConversionError(f"{out} is not empty and holds no rela conversion; choose a new or empty OUT")
    return False


def _check_options(options: ConvertOptions) -> None:
    """Raises ConversionError for options this conversion cannot run with (a value out of its declared range or
    choices, no storage format, a subset strategy that needs a selection, options a format cannot write)."""
    from rela_convert.dataset.subset import SUBSET_STRATEGIES, selection_strategies

    recordable = [name for name in SUBSET_STRATEGIES if name not in selection_strategies()]
    if options.subset not in recordable:  # the others need the selection: rela select computes it afterwards
        known = "the" if options.subset in SUBSET_STRATEGIES else "the unknown"
        raise ConversionError(
            f"convert records a subset strategy that needs no selection ({', '.join(recordable)}), not {known} "
            f"{options.subset!r}; record the others afterwards with rela select OUT --subset STRATEGY"
        )
    if not options.formats:
        raise ConversionError(f"give at least one storage format ({', '.join(STORAGE_FORMATS.names())})")
    try:
        check(options)
        for format in options.formats:
            STORAGE_FORMATS.get(format).check_options(options)
    except ValueError as error:
        raise ConversionError(str(error)) from None


def convert(
    src: str | Path, out: str | Path, prior_spec: str, options: ConvertOptions = ConvertOptions()
) -> DatasetIndex:
    """Convert an image tree into shards with prior features (method.md, stage 1).

    Runs as one process, or as one of N processes started by ``torch.distributed.run``
    (``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` set): then each process converts
    every N-th shard, and process 0 writes the index.

    Args:
        src: image tree root (``SRC/<folder>/<images>`` or flat).
        out: output directory (created; resumed if it holds an unfinished run of the same job).
        prior_spec: see :func:`rela_convert.priors.load_prior`.
        options: :class:`ConvertOptions`.

    Returns:
        The written :class:`~rela_convert.dataset.index.DatasetIndex`, with :attr:`~DatasetIndex.run` set to
        this call's figures, summed over processes and not stored in the index: ``converted`` and
        ``skipped`` (files handled now), ``seconds`` (prior pass, wall clock), ``images_per_s`` and
        ``already_done``.

    Raises:
        PriorSpecError: the prior cannot be built (before any work).
        NotADirectoryError: ``src`` is not a directory.
        ConversionError: bad options (unknown storage format, ...), OUT inside SRC, an incompatible or foreign OUT,
            no image files, or no image could be converted.
        OSError: the output cannot be written.
    """
    _check_options(options)
    prior = load_prior(prior_spec)
    src, out = Path(src).resolve(), Path(out)
    if out.resolve().is_relative_to(src):
        raise ConversionError(f"OUT {out} is inside SRC {src}; choose an output folder outside the image tree")
    listing = scan_tree(src)
    job = _job_description(src, listing, prior, options)
    ranks = Ranks.from_environment()
    try:
        return _convert(out, listing, prior, options, job, ranks)
    finally:
        ranks.close()


def _convert(
    out: Path, listing: Listing, prior: Prior, options: ConvertOptions, job: dict, ranks: Ranks
) -> DatasetIndex:
    if _check_existing(out, job):
        if ranks.rank == 0:
            shutil.rmtree(
                out / PARTIAL_DIR, ignore_errors=True
            )  # left over when killed just after the index was written
        index = DatasetIndex.load(out)
        index.run = {"converted": 0, "skipped": 0, "seconds": 0.0, "images_per_s": 0.0, "already_done": True}
        return index
    if not listing.files:
        raise ConversionError(
            f"no image files under {job['source']} (looked for {', '.join(sorted(STORED_FORMATS.values()))})"
        )
    ranks.barrier()  # every process has checked OUT before process 0 changes it
    if ranks.rank == 0:
        (out / PARTIAL_DIR).mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / PARTIAL_DIR / JOB_FILE, job)
    ranks.barrier()

    num_files, size = len(listing.files), options.shard_size
    num_shards = -(-num_files // size)
    mine = range(ranks.rank, num_shards, ranks.world)
    finished = [shard for shard in mine if record_path(out, shard).is_file()]
    # Batches are ranges of stored positions that never cross a shard boundary, so every batch (and
    # hence every feature, bit for bit) is the same whether a shard is converted in one run, after a
    # resume or by another process.
    batches = [
        list(range(start, min(start + options.batch_size, (shard + 1) * size, num_files)))
        for shard in mine
        if shard not in finished
        for start in range(shard * size, min((shard + 1) * size, num_files), options.batch_size)
    ]
    stream = ShardStream(out, options, prior.feature_dim, finished)
    device = resolve_device(options.device)
    if device.type == "cuda" and ranks.world > 1:
        device = torch.device("cuda", ranks.local_rank)

    started = time.perf_counter()
    stored = [listing.files[key] for key in storage_order(num_files, options.order_seed)]
    converted = _run_prior(prior, stored, batches, stream, device, options, options.progress and ranks.rank == 0)
    seconds = time.perf_counter() - started
    if ranks.world > 1:
        stream.moments.all_reduce()
    converted, handled, num_samples = ranks.reduce([converted, sum(map(len, batches)), stream.num_samples])
    seconds = ranks.reduce([seconds], "max")[0]
    ranks.barrier()  # every shard record is written
    if ranks.rank == 0:
        _finish(out, listing, prior, stream.moments, num_shards, options, job)
    ranks.barrier()
    if num_samples == 0:
        raise ConversionError(
            f"none of the {num_files} image files could be converted; reasons in {out / 'skipped.jsonl'}"
        )
    index = DatasetIndex.load(out)
    index.run = {
        "converted": int(converted),
        "skipped": int(handled - converted),
        "seconds": seconds,
        "images_per_s": converted / max(seconds, 1e-9),
        "already_done": False,
    }
    return index


def _prior_batch(batch: dict, prior: Prior, device: torch.device) -> tuple[list[dict], np.ndarray, list[dict]]:
    """Finish one collated batch: decode its JPEGs left to the device, and run the prior on
    ``device`` unless the worker already did.

    Returns:
        ``(converted items, their features float32 [len(items), D], skipped items)``.
    """
    good, skipped = batch["good"], batch["skipped"]
    if "features" in batch:
        return good, batch["features"], skipped
    pixels = [] if batch["pixels"] is None else [batch["pixels"].to(device, non_blocking=True)]
    if batch["encoded"]:
        decoded, reasons = device_pixels([item["image"] for item in batch["encoded"]], prior.input_size, device)
        good = good + [item for item, reason in zip(batch["encoded"], reasons) if reason is None]
        skipped = skipped + [
            {"position": item["position"], "file": item["file"], "reason": reason}
            for item, reason in zip(batch["encoded"], reasons)
            if reason is not None
        ]
        pixels += [] if decoded is None else [decoded]
    if not pixels:
        return good, np.zeros((0, prior.feature_dim), np.float32), skipped
    pixels = torch.cat(pixels)
    cuda = device.type == "cuda"
    if cuda:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        return good, prior.features(pixels).cpu().numpy(), skipped


def _run_prior(
    prior: Prior,
    stored: list[SourceFile],
    batches: list[list[int]],
    stream: ShardStream,
    device: torch.device,
    options: ConvertOptions,
    progress: bool,
) -> int:
    """Decode the files of ``batches`` (lists of positions in ``stored``, the source files in
    stored order) in ``options.workers`` processes (or JPEGs on ``device``), run the prior per
    batch on ``device``, stream samples and skips into ``stream``, in position order, and close it.

    Returns:
        Number of samples converted.
    """
    import torchvision.io  # noqa: F401  imported before the workers fork, so that each one
    import torchvision.transforms.v2.functional  # noqa: F401  does not import it again (~1.2 s CPU)

    cuda = device.type == "cuda"
    model = prior.model.to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    # On the CPU every worker decodes AND runs the prior, one thread each: a multi-threaded prior
    # here would share the cores with the decoding workers, and an oversubscribed OpenMP team
    # stalls at every barrier.
    workers = options.workers
    in_workers = device.type == "cpu" and workers > 0 and options.decode == "cpu"
    loader = DataLoader(
        PriorInputs(stored, prior.input_size, device_decode=options.decode == "device"),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=functools.partial(collate, prior=prior if in_workers else None),
        pin_memory=cuda,
        prefetch_factor=4 if workers else None,
        worker_init_fn=die_with_parent,  # a killed conversion leaves no worker behind
    )
    try:
        converted = _stream_batches(loader, prior, device, stream, sum(map(len, batches)), progress)
    except BaseException as error:
        stream.abort()  # no half-written shard, no write from a collected tar stream
        if isinstance(error, OSError):
            raise no_space(error, stream.out, _space_needed(stream, stored, batches)) from None
        raise
    return converted


def _stream_batches(
    loader: DataLoader, prior: Prior, device: torch.device, stream: ShardStream, total: int, progress: bool
) -> int:
    """Run the prior on each batch of ``loader`` and stream its samples and skips into ``stream``, in position
    order, then close it; returns the number of samples converted.

    Raises:
        OSError: a shard cannot be written.
    """
    converted = 0
    with tqdm(total=total, unit="img", desc="convert", disable=not progress, smoothing=0.1) as bar:
        for batch in loader:
            good, features, skipped = _prior_batch(batch, prior, device)
            samples = [
                Sample(item["file"].key, item["image"], item["ext"], feature, item["file"].label, item["file"].relpath)
                for item, feature in zip(good, features)
            ]
            events = list(zip(good, samples)) + [(item, None) for item in skipped]
            for item, sample in sorted(events, key=lambda event: event[0]["position"]):
                if sample is None:
                    stream.skip(item["position"], item["file"], item["reason"])
                else:
                    stream.add(item["position"], sample, item["shorter_side"])
            converted += len(samples)
            bar.update(len(good) + len(skipped))
            bar.set_postfix(skipped=bar.n - converted, refresh=False)
    stream.close()
    return converted


#: Bytes a sample takes in a shard besides its image (tar headers and padding, feature header), about.
SAMPLE_OVERHEAD = 3072


def _space_needed(stream: ShardStream, stored: list[SourceFile], batches: list[list[int]]) -> int:
    """About the bytes the shards of ``batches`` not finished yet still need: per sample and storage format, its
    source file's bytes (images are stored as they are), its feature and :data:`SAMPLE_OVERHEAD`."""
    size, formats = stream.options.shard_size, len(stream.formats)
    per_sample = SAMPLE_OVERHEAD + 4 * stream.feature_dim
    left = [
        position for batch in batches for position in batch if not record_path(stream.out, position // size).exists()
    ]
    return formats * sum(_file_bytes(stored[position].path) + per_sample for position in left)


def _file_bytes(path: str) -> int:
    """The size of file ``path`` in bytes (0 when it cannot be read)."""
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def image_sizes(shorter_sides: dict[int, int]) -> dict:
    """Summary of a histogram of shorter image sides (pixels -> number of samples, not empty):
    ``{"shorter_side_min", "shorter_side_median", "shorter_side_max"}``, ints in pixels; the
    median is the lower median (the ``(n - 1) // 2``-th smallest of the ``n`` samples)."""
    sides = sorted(shorter_sides)
    cumulative = np.cumsum([shorter_sides[side] for side in sides])
    median = sides[int(np.searchsorted(cumulative, (int(cumulative[-1]) + 1) // 2))]
    return {"shorter_side_min": sides[0], "shorter_side_median": median, "shorter_side_max": sides[-1]}


def _finish(
    out: Path,
    listing: Listing,
    prior: Prior,
    moments: FeatureMoments,
    num_shards: int,
    options: ConvertOptions,
    job: dict,
) -> None:
    """Gather the shard records; write ``skipped.jsonl`` and, when any sample was converted,
    ``keys.npy``, ``pca.npz`` (at least 2 samples) and the index (last); remove ``.partial``."""
    formats = {format: [] for format in options.formats}
    keys, skipped, shorter_sides = [], list(listing.skipped), Counter()
    for shard in range(num_shards):
        record = json.loads(record_path(out, shard).read_text())
        skipped.extend(record["skipped"])
        for format, info in record["shards"].items():
            formats[format].append(info)
        keys.extend(record["keys"])
        shorter_sides.update({int(side): count for side, count in record["shorter_sides"].items()})
    write_atomic(out / "skipped.jsonl", "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in skipped).encode())
    if not keys:
        return
    if moments.count != len(keys):
        raise ConversionError(f"internal error: {moments.count} feature moments for {len(keys)} samples")
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(keys, np.int64))
    write_atomic(out / "keys.npy", buffer.getvalue())
    pca = None
    if len(keys) >= 2:
        pca_bytes = PCAStatistics.fit(moments).to_bytes()
        write_atomic(out / "pca.npz", pca_bytes)
        pca = {"file": "pca.npz", "count": moments.count, "sha256": hashlib.sha256(pca_bytes).hexdigest()}
    DatasetIndex(
        num_samples=len(keys),
        num_skipped=len(skipped),
        classes=listing.classes,
        storage=preferred_format(formats),
        formats=formats,
        order={"seed": options.order_seed, "rule": ORDER_RULE},
        feature_dim=prior.feature_dim,
        feature_dtype="float32",
        prior=prior.describe(),
        keys_file="keys.npy",
        keys_sha256=hashlib.sha256(buffer.getvalue()).hexdigest(),
        image_sizes=image_sizes(shorter_sides),
        skipped_file="skipped.jsonl",
        subset={"strategy": options.subset, "data_ratio": options.data_ratio, "seed": options.seed},
        job=job,
        pca=pca,
    ).save(out)
    shutil.rmtree(out / PARTIAL_DIR)
