"""``rela convert``: run a prior once over an image tree and write shards (ReLA-D).

Data path (one path, CPU or GPU): the sorted :func:`~rela_convert.tree.scan_tree`
listing is cut into fixed ranges of ``shard_size`` files; DataLoader workers read
each file, decode it and make the prior's view (:func:`~rela_convert.images.prior_pixels`);
the main process runs the prior on whole batches and streams every sample into
the shard of its range. A finished shard is renamed into place and described
by a small record under ``OUT/.partial/``, so a killed conversion resumes at the
first unfinished shard and produces byte-identical output. At the end the PCA
statistics (method.md, stage 1, step 2) are fitted from float64 running sums,
and ``keys.npy``, ``pca.npz``, ``skipped.jsonl`` and finally ``index.json`` are written.

Memory does not grow with N: at most one shard's features (``shard_size x D``
float32) plus the ``[D, D]`` float64 sums are held.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from rela_convert.devices import resolve_device
from rela_convert.images import ImageDecodeError, STORED_FORMATS, open_image, prior_pixels
from rela_convert.index import FORMAT_NAME, FORMAT_VERSION, INDEX_NAME, write_atomic, write_json_atomic
from rela_convert.pca import FeatureMoments, PCAStatistics
from rela_convert.priors import Prior, load_prior
from rela_convert.shards import Sample, WebDatasetShardWriter, read_features
from rela_convert.tree import Listing, SourceFile, display_path, scan_tree

PARTIAL_DIR = ".partial"
SUBSET_STRATEGIES = ("random",)


class ConversionError(RuntimeError):
    """The conversion cannot run or produced nothing; the message says why and what to do."""


@dataclass(frozen=True)
class ConvertOptions:
    """Options of :func:`convert` (see ``rela convert --help`` for units and defaults)."""

    shard_size: int = 5000
    batch_size: int = 256
    workers: int = 2
    device: str = "auto"
    data_ratio: float = 0.5
    subset: str = "random"
    seed: int = 0
    progress: bool = True


class PriorInputs(Dataset):
    """Map-style dataset over source files; item ``i`` is a dict with ``file``
    (:class:`SourceFile`), and either ``pixels`` (uint8 ``[3, S, S]``), ``image``
    (encoded bytes) and ``ext``, or ``reason`` (why the file is skipped)."""

    def __init__(self, files: list[SourceFile], input_size: int) -> None:
        self.files = files
        self.input_size = input_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, position: int) -> dict:
        file = self.files[position]
        try:
            with open(file.path, "rb") as handle:
                data = handle.read()
            ext = STORED_FORMATS[open_image(data).format]
            return {"file": file, "pixels": prior_pixels(data, self.input_size), "image": data, "ext": ext}
        except ImageDecodeError as error:
            return {"file": file, "reason": str(error)}
        except OSError as error:
            return {"file": file, "reason": f"unreadable file: {error.strerror or error}"}


def collate(items: list[dict]) -> dict:
    """Stack the pixels of readable items into uint8 ``[B, 3, S, S]``; keep the rest as lists."""
    good = [item for item in items if "pixels" in item]
    return {
        "pixels": torch.stack([item["pixels"] for item in good]) if good else None,
        "good": good,
        "skipped": [item for item in items if "reason" in item],
    }


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}.tar"


class ShardStream:
    """Routes samples, in key order, into the shard of their file range and
    finishes each shard (tar renamed, record written) when its range is complete."""

    def __init__(self, out: Path, shard_size: int) -> None:
        self.out, self.shard_size = out, shard_size
        self.partial = out / PARTIAL_DIR
        self.current: int | None = None
        self.writer: WebDatasetShardWriter | None = None
        self.keys: list[int] = []
        self.features: list[np.ndarray] = []
        self.skipped: list[dict] = []
        self.moments: dict[int, FeatureMoments] = {}

    def record_path(self, shard: int) -> Path:
        return self.partial / f"shard-{shard:06d}.json"

    def add(self, sample: Sample) -> None:
        """Append a converted sample (keys must arrive in increasing order)."""
        self._switch_to(sample.key)
        if self.writer is None:
            self.writer = WebDatasetShardWriter(self.out / shard_name(self.current))
        self.writer.write(sample)
        self.keys.append(sample.key)
        self.features.append(sample.feature)

    def skip(self, file: SourceFile, reason: str) -> None:
        """Record a source file that could not be converted."""
        self._switch_to(file.key)
        self.skipped.append({"path": display_path(file.relpath), "reason": reason})

    def _switch_to(self, key: int) -> None:
        shard = key // self.shard_size
        if shard != self.current:
            self.finish()
            self.current = shard

    def finish(self) -> None:
        """Close the current shard: rename the tar, keep its moments, write its record."""
        if self.current is None:
            return
        info = None
        if self.writer is not None:
            info = self.writer.close()
            features = np.stack(self.features)
            self.moments[self.current] = FeatureMoments.of(features)
        write_json_atomic(self.record_path(self.current), {"shard": info, "keys": self.keys, "skipped": self.skipped})
        self.current, self.writer, self.keys, self.features, self.skipped = None, None, [], [], []


def _job_description(src: Path, listing: Listing, prior: Prior, options: ConvertOptions) -> dict:
    """What must match for a conversion to resume into (or reuse) an existing OUT."""
    return {
        "source": str(src),
        "num_files": len(listing.files),
        "prior": prior.spec,
        "prior_weights_sha256": prior.weights_sha256,
        "shard_size": options.shard_size,
    }


def _check_existing(out: Path, job: dict) -> bool:
    """True when ``out`` already holds this finished conversion.

    Raises:
        ConversionError: ``out`` holds a conversion with a different prior or arguments.
    """
    for path in (out / INDEX_NAME, out / PARTIAL_DIR / "job.json"):
        if path.is_file():
            found = json.loads(path.read_text())
            found = found.get("job", found)
            if found != job:
                differences = ", ".join(f"{key}: {found.get(key)!r} there, {value!r} now" for key, value in job.items() if found.get(key) != value)
                raise ConversionError(f"{out} already holds a conversion made with other arguments ({differences}); choose another OUT or delete it")
            return path.name == INDEX_NAME
    return False


def convert(src: str | Path, out: str | Path, prior_spec: str, options: ConvertOptions = ConvertOptions()) -> dict:
    """Convert an image tree into shards with prior features (method.md, stage 1).

    Args:
        src: image tree root (``SRC/<folder>/<images>`` or flat).
        out: output directory (created; resumed if it holds an unfinished run of the same job).
        prior_spec: see :func:`rela_convert.priors.load_prior`.
        options: :class:`ConvertOptions`.

    Returns:
        The ``index.json`` content, plus a ``"run"`` entry with this call's
        figures (``converted``, ``skipped``, ``seconds``, ``images_per_s``)
        that is not stored in the index.

    Raises:
        PriorSpecError: the prior cannot be built (before any work).
        NotADirectoryError: ``src`` is not a directory.
        ConversionError: incompatible existing output, or no image could be converted.
        OSError: the output cannot be written.
    """
    if options.subset not in SUBSET_STRATEGIES:
        raise ConversionError(f"unknown subset strategy {options.subset!r}; use one of {', '.join(SUBSET_STRATEGIES)}")
    if not 0 < options.data_ratio <= 1:
        raise ConversionError(f"--data-ratio must be in (0, 1], got {options.data_ratio}")
    prior = load_prior(prior_spec)
    src, out = Path(src).resolve(), Path(out)
    listing = scan_tree(src)
    job = _job_description(src, listing, prior, options)
    if _check_existing(out, job):
        index = json.loads((out / INDEX_NAME).read_text())
        return {**index, "run": {"converted": 0, "skipped": 0, "seconds": 0.0, "images_per_s": 0.0, "already_done": True}}
    if not listing.files:
        raise ConversionError(f"no image files under {src} (looked for {', '.join(sorted(STORED_FORMATS.values()))})")

    stream = ShardStream(out, options.shard_size)
    stream.partial.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stream.partial / "job.json", job)
    num_shards = -(-len(listing.files) // options.shard_size)
    todo = [shard for shard in range(num_shards) if not stream.record_path(shard).is_file()]
    # Batches never cross a shard boundary, so every batch (and hence every feature, bit for
    # bit) is the same whether a shard is converted in one run or after a resume.
    batches = [
        list(range(start, min(start + options.batch_size, (shard + 1) * options.shard_size, len(listing.files))))
        for shard in todo
        for start in range(shard * options.shard_size, min((shard + 1) * options.shard_size, len(listing.files)), options.batch_size)
    ]

    started = time.perf_counter()
    converted = _run_prior(prior, listing, batches, stream, options)
    seconds = time.perf_counter() - started
    index = _finish(out, src, listing, prior, stream, num_shards, options, job)
    if index["num_samples"] == 0:
        raise ConversionError(f"none of the {len(listing.files)} image files could be converted; reasons in {out / 'skipped.jsonl'}")
    skipped_now = sum(map(len, batches)) - converted
    return {**index, "run": {"converted": converted, "skipped": skipped_now, "seconds": seconds, "images_per_s": converted / max(seconds, 1e-9), "already_done": False}}


def _run_prior(prior: Prior, listing: Listing, batches: list[list[int]], stream: ShardStream, options: ConvertOptions) -> int:
    """Decode the files of ``batches`` (lists of keys) in workers, run the prior per batch, stream samples into shards.

    Returns:
        Number of samples converted.
    """
    device = resolve_device(options.device)
    cuda = device.type == "cuda"
    model = prior.model.to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    loader = DataLoader(
        PriorInputs(listing.files, prior.input_size),
        batch_sampler=batches,
        num_workers=options.workers,
        collate_fn=collate,
        pin_memory=cuda,
        prefetch_factor=4 if options.workers else None,
        persistent_workers=False,
    )
    converted = 0
    with tqdm(total=sum(map(len, batches)), unit="img", desc="convert", disable=not options.progress, smoothing=0.1) as bar:
        for batch in loader:
            features = np.zeros((0, prior.feature_dim), np.float32)
            if batch["pixels"] is not None:
                pixels = batch["pixels"].to(device, non_blocking=True)
                if cuda:
                    pixels = pixels.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                    features = prior.features(pixels).cpu().numpy()
            samples = [
                Sample(item["file"].key, item["image"], item["ext"], feature, item["file"].label, item["file"].relpath)
                for item, feature in zip(batch["good"], features)
            ]
            events = [(sample.key, sample) for sample in samples] + [(item["file"].key, item) for item in batch["skipped"]]
            for _, event in sorted(events, key=lambda pair: pair[0]):
                if isinstance(event, Sample):
                    stream.add(event)
                else:
                    stream.skip(event["file"], event["reason"])
            converted += len(samples)
            bar.update(len(batch["good"]) + len(batch["skipped"]))
            bar.set_postfix(skipped=bar.n - converted, refresh=False)
    stream.finish()
    return converted


def _finish(out: Path, src: Path, listing: Listing, prior: Prior, stream: ShardStream, num_shards: int, options: ConvertOptions, job: dict) -> dict:
    """Gather shard records, fit PCA, write keys / pca / skipped list and the index (last)."""
    shards, keys, skipped = [], [], list(listing.skipped)
    moments = FeatureMoments.zeros(prior.feature_dim)
    for shard in range(num_shards):
        record = json.loads(stream.record_path(shard).read_text())
        skipped.extend(record["skipped"])
        if record["shard"] is None:
            continue
        if shard not in stream.moments:  # finished by an earlier, interrupted run
            stream.moments[shard] = FeatureMoments.of(read_features(out / record["shard"]["name"])[1])
        moments += stream.moments[shard]
        keys.append(np.asarray(record["keys"], np.int64))
        shards.append({**record["shard"], "first_key": record["keys"][0], "last_key": record["keys"][-1]})
    keys_array = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    num_samples = int(len(keys_array))
    index = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "job": job,
        "storage": "webdataset",
        "num_samples": num_samples,
        "num_skipped": len(skipped),
        "prior": prior.describe(),
        "feature_dim": prior.feature_dim,
        "feature_dtype": "float32",
        "classes": listing.classes,
        "shards": shards,
        "keys_file": "keys.npy",
        "skipped_file": "skipped.jsonl",
        "subset": {"strategy": options.subset, "data_ratio": options.data_ratio, "seed": options.seed},
    }
    write_atomic(out / "skipped.jsonl", "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in skipped).encode())
    if num_samples == 0:
        return index
    buffer = io.BytesIO()
    np.save(buffer, keys_array)
    write_atomic(out / "keys.npy", buffer.getvalue())
    if num_samples >= 2:
        pca_bytes = PCAStatistics.fit(moments).to_bytes()
        write_atomic(out / "pca.npz", pca_bytes)
        index["pca"] = {"file": "pca.npz", "count": moments.count, "sha256": hashlib.sha256(pca_bytes).hexdigest()}
    write_json_atomic(out / INDEX_NAME, index)
    shutil.rmtree(stream.partial)
    return index
