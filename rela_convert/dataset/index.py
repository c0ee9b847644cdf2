"""``index.json``: the description of a converted dataset (:class:`DatasetIndex`).

Fields of ``index.json`` (written last, by :func:`rela_convert.convert.convert`; one
attribute of :class:`DatasetIndex` each, except the first three):

- ``format`` (``"rela-converted"``), ``format_version`` (2: samples stored in a seeded
  pseudo-random order; version 1 stored them in key order).
- ``shards``: a copy of ``formats[storage]``, for readers of this format version that
  predate ``formats``; written from ``formats``, ignored when read.
- ``num_samples``, ``num_skipped`` (entries of ``skipped_file``), ``classes``
  (first-level folder names; a sample's label indexes this list).
- ``formats``: ``{format: [{name, num_samples, bytes, sha256}]}`` (:class:`ShardRecord`)
  for every storage format written (:data:`rela_convert.dataset.formats.STORAGE_FORMATS`), each
  list in stored order: the shards are consecutive slices of ``keys_file``, the same
  samples in the same order in every format.
- ``storage``: the format trainers read by default, the most preferred one written
  (:func:`rela_convert.dataset.formats.preferred_format`: ``hdf5`` before ``webdataset``).
- ``order``: ``{seed, rule}``: stored position ``p`` of the sorted listing's ``num_files``
  files holds key ``numpy.random.default_rng(seed).permutation(num_files)[p]`` (skipped
  files leave gaps), so keys inside a shard are not sorted.
- ``feature_dim``, ``feature_dtype`` (``float32``); ``prior``: spec, input size,
  normalisation, weights file and its SHA-256, seed, resize rule.
- ``keys_file`` (``keys.npy``, int64 keys in stored (shard) order) and ``keys_sha256``;
  a key is the sample's position in the sorted source listing.
- ``pca``: ``{file, count, sha256}`` of the PCA statistics (absent below 2 samples).
- ``image_sizes``: ``{shorter_side_min, shorter_side_median, shorter_side_max}``, ints in
  pixels, over the source images of all samples (the median is the lower median);
  :attr:`DatasetIndex.train_size` derives the training input size from it.
- ``skipped_file`` (``skipped.jsonl``: one ``{"path", "reason"}`` per file not converted).
- ``subset``: default ``strategy``, ``data_ratio`` and ``seed`` of the per-epoch draws, and
  ``selection`` and ``sharpness`` once :func:`rela_convert.selection.select` computed one.
- ``job``: what a re-run must match to resume or reuse the output (source folder,
  listing hash, prior and weights hash, shard size, formats, HDF5 compression, decoder,
  order seed).

Importing this module imports nothing heavy (no numpy, no torch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypedDict

from rela_convert.dataset.files import DatasetError, json_bytes, write_atomic
from rela_convert.dataset.remote import dataset_root, is_url, write_file

INDEX_NAME = "index.json"
FORMAT_NAME = "rela-converted"
FORMAT_VERSION = 2
#: The usual ImageNet training crop, pixels: the largest default training input size.
MAX_DEFAULT_TRAIN_SIZE = 224


class ShardRecord(TypedDict):
    """One shard file of one storage format, as ``index.json`` lists it (a plain dict).

    Keys:
        name: file name relative to the dataset folder (``shard-000007.h5``).
        num_samples: samples in the file.
        bytes: file size, bytes.
        sha256: hex SHA-256 of the file.
    """

    name: str
    num_samples: int
    bytes: int
    sha256: str


#: Stored fields that are not attributes: constants checked on load, and ``shards`` (derived).
_HEADER = ("format", "format_version", "shards")


@dataclass
class DatasetIndex:
    """A converted dataset's ``index.json`` (fields: see the module docstring).

    Attributes:
        num_samples: samples stored (in every format).
        num_skipped: source files not converted (lines of ``skipped_file``).
        classes: class folder names; a sample's label indexes this list (empty: flat tree).
        storage: name of the storage format read by default (a key of ``formats``).
        formats: storage format name -> its :class:`ShardRecord` list, in stored order.
        order: ``{"seed": int, "rule": str}`` of the stored order.
        feature_dim: D, length of a prior feature.
        feature_dtype: ``"float32"``.
        prior: the prior's description (:meth:`rela_convert.priors.Prior.describe`); ``input_size`` in pixels.
        keys_file: name of the int64 ``[num_samples]`` key file (``keys.npy``), keys in stored order.
        keys_sha256: its hex SHA-256.
        image_sizes: ``{"shorter_side_min", "shorter_side_median", "shorter_side_max"}``, pixels.
        skipped_file: name of the skip list (``skipped.jsonl``).
        subset: ``{"strategy", "data_ratio", "seed"}`` and, after ``rela select``, ``"selection"`` and
            ``"sharpness"``.
        job: the conversion's arguments a re-run must match (see :func:`rela_convert.convert.convert`).
        pca: ``{"file", "count", "sha256"}`` of ``pca.npz``; None below 2 samples.
        run: figures of the :func:`~rela_convert.convert.convert` call that returned this index
            (``converted``, ``skipped``, ``seconds``, ``images_per_s``, ``already_done``); None when
            loaded; never stored.
    """

    num_samples: int
    num_skipped: int
    classes: list[str]
    storage: str
    formats: dict[str, list[ShardRecord]]
    order: dict[str, Any]
    feature_dim: int
    feature_dtype: str
    prior: dict[str, Any]
    keys_file: str
    keys_sha256: str
    image_sizes: dict[str, int]
    skipped_file: str
    subset: dict[str, Any]
    job: dict[str, Any]
    pca: dict[str, Any] | None = None
    run: dict[str, Any] | None = field(default=None, compare=False)

    @classmethod
    def load(cls, root: str | Path | Any) -> DatasetIndex:
        """Read ``root/index.json``; ``root`` is a folder, or a URL or
        :class:`~rela_convert.dataset.remote.RemoteFolder` (read through fsspec, :mod:`rela_convert.dataset.remote`).

        Raises:
            DatasetError: no index (not a converted dataset, an unfinished conversion or push), not a JSON
                object, an unsupported format version, or fields missing or unknown to this rela.
            OSError: the index cannot be read (:class:`~rela_convert.dataset.remote.RemoteError` at a URL: transient
                errors that outlasted the retries, or a missing fsspec back-end).
        """
        if is_url(root):
            folder = dataset_root(root)
            try:
                text = folder.read_bytes(INDEX_NAME)
            except FileNotFoundError:
                raise DatasetError(
                    f"{folder} has no {INDEX_NAME}: not a converted dataset, or its upload has not finished (run rela "
                    "push again to finish it)"
                ) from None
            try:
                data = json.loads(text)
            except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
                raise DatasetError(f"{folder / INDEX_NAME} is not valid JSON ({error}): push it again") from None
            return cls.from_dict(data, folder / INDEX_NAME)
        path = Path(root) / INDEX_NAME
        if not path.is_file():
            raise DatasetError(
                f"{root} has no {INDEX_NAME}: not a converted dataset, or its conversion has not finished (run rela "
                "convert again to resume)"
            )
        try:
            data = json.loads(path.read_text())
        except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
            raise DatasetError(f"{path} is not valid JSON ({error}): convert it again") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = INDEX_NAME) -> DatasetIndex:
        """The index held by ``data``, the parsed JSON of an ``index.json`` (``source`` names it in errors).

        Raises:
            DatasetError: not a dict, another format or format version, or fields missing or unknown.
        """
        if not isinstance(data, dict):
            raise DatasetError(f"{source} holds a JSON {type(data).__name__}, not an index object: convert it again")
        if data.get("format") != FORMAT_NAME or data.get("format_version") != FORMAT_VERSION:
            raise DatasetError(
                f"{source} is format {data.get('format')!r} v{data.get('format_version')}; "
                f"this rela reads {FORMAT_NAME!r} v{FORMAT_VERSION}: convert it again with this rela"
            )
        stored = [item.name for item in fields(cls) if item.name != "run"]
        missing = [name for name in stored if name not in data and name != "pca"]
        unknown = sorted(set(data) - set(stored) - set(_HEADER))
        if missing or unknown:
            raise DatasetError(
                f"{source} is not a complete {FORMAT_NAME!r} v{FORMAT_VERSION} index (missing: "
                f"{', '.join(missing) or 'none'}; unknown: {', '.join(unknown) or 'none'}): convert it again"
            )
        return cls(**{name: data[name] for name in stored if name in data})

    def to_dict(self) -> dict[str, Any]:
        """The JSON content of ``index.json`` (without :attr:`run`; ``pca`` only when not None).

        Raises:
            ValueError: :attr:`storage` is not a key of :attr:`formats`.
        """
        data: dict[str, Any] = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "shards": self.shards()}
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name != "run" and not (item.name == "pca" and value is None):
                data[item.name] = value
        return data

    def save(self, root: str | Path | Any) -> None:
        """Write ``root/index.json`` atomically (:func:`write_atomic`) as deterministic JSON
        (:func:`json_bytes`): an index loaded and saved again keeps its bytes. At a URL
        (:mod:`rela_convert.dataset.remote`), in one PUT.

        Raises:
            ValueError: :attr:`storage` is not a key of :attr:`formats`.
            OSError: the file cannot be written.
        """
        if is_url(root):
            write_file(dataset_root(root), INDEX_NAME, json_bytes(self.to_dict()))
            return
        write_atomic(Path(root) / INDEX_NAME, json_bytes(self.to_dict()))

    def shards(self, format: str | None = None) -> list[ShardRecord]:
        """The shard records of storage format ``format`` (None: :attr:`storage`), in stored order.

        Raises:
            ValueError: the dataset holds no ``format`` shards (the message names the formats it holds).
        """
        format = format or self.storage
        if format not in self.formats:
            raise ValueError(f"the dataset holds {', '.join(self.formats)} shards, not {format}")
        return self.formats[format]

    @property
    def train_size(self) -> int:
        """The default training input size S, pixels: ``min(224, median shorter side of the
        source images)`` (:attr:`image_sizes`).

        The training input size is the data's: 32 for CIFAR, 64 for Tiny-ImageNet, 224 for
        ImageNet (method.md, stage 2), never the prior's input size, which only sets the view
        the prior sees at conversion. 224 is the usual ImageNet training crop, so larger
        images are trained at 224.
        """
        return min(MAX_DEFAULT_TRAIN_SIZE, int(self.image_sizes["shorter_side_median"]))

    def identity(self) -> dict[str, Any]:
        """What a training run records of the dataset it trains on, to refuse resuming it on another one:
        ``keys_sha256`` (the samples and their stored order), ``pca_sha256`` (the prior features' statistics:
        another prior gives another PCA; None below 2 samples) and the prior's ``spec`` (named in messages).
        A moved, copied or pushed copy of the dataset has the same identity."""
        pca_sha256 = self.pca["sha256"] if self.pca else None
        return {
            "keys_sha256": self.keys_sha256,
            "pca_sha256": pca_sha256,
            "prior": self.prior.get("spec"),
        }

    def summary(self) -> dict[str, Any]:
        """What ``rela inspect --json`` prints (JSON-ready).

        Returns:
            ``num_samples``, ``num_skipped``, ``num_shards`` and ``bytes`` (of the :attr:`storage`
            format's shards; bytes), ``storage``, ``formats`` (``{format: {"num_shards", "bytes"}}``),
            ``prior`` (spec), ``prior_input_size`` (pixels), ``feature_dim``, ``feature_dtype``,
            ``classes``, ``subset``, ``image_sizes`` (pixels), ``default_train_size`` (pixels,
            :attr:`train_size`) and ``order_seed``.
        """
        shards = self.shards()
        return {
            "num_samples": self.num_samples,
            "num_skipped": self.num_skipped,
            "num_shards": len(shards),
            "bytes": sum(shard["bytes"] for shard in shards),
            "storage": self.storage,
            "formats": {
                name: {"num_shards": len(records), "bytes": sum(shard["bytes"] for shard in records)}
                for name, records in self.formats.items()
            },
            "prior": self.prior["spec"],
            "prior_input_size": self.prior["input_size"],
            "feature_dim": self.feature_dim,
            "feature_dtype": self.feature_dtype,
            "classes": self.classes,
            "subset": self.subset,
            "image_sizes": self.image_sizes,
            "default_train_size": self.train_size,
            "order_seed": self.order["seed"],
        }
