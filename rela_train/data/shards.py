"""Reading one DataLoader worker's shards: the samples of its keys, each shard checked against the SHA-256 the
index records the first time the run reads it (``--verify-shards first``), from the dataset folder or fetched from
its URL (:mod:`rela_convert.dataset.remote`: the next shard downloads while one is read).

A shard that fails its check or cannot be read raises :class:`StreamError` (one line naming the shard and the fix);
a damaged sample record comes as ``{"key", "error"}`` (:meth:`~rela_convert.dataset.formats.StorageFormat.
iter_samples_tolerant`) and the stream replaces it within its batch.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from rela_convert.dataset.converted import ConvertedDataset
from rela_convert.dataset.files import sha256_file
from rela_convert.dataset.remote import ContentMismatchError, RemoteError, RemoteFolder
from rela_train.integrity import describe_os_error


class StreamError(RuntimeError):
    """The training data cannot be read on (a damaged or replaced shard, or a batch without a usable
    sample); the message (one line) names the shard and the fix."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its class name when it has none): what a one-line report quotes."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class ShardReader:
    """Reads the shards of a converted dataset for the training stream, checking them as ``verify_shards`` says.

    Args:
        dataset: the converted dataset (its format's shard records and reader).
        verify_shards: ``first``: check each shard's SHA-256 against the index before first reading it (unless its
            name is in :attr:`verified`); ``off``: never.

    Attributes:
        verified: names of the shards already checked (the trainer fills it from the workers' reports).

    Raises:
        ValueError: ``verify_shards`` is neither ``first`` nor ``off``.
    """

    def __init__(self, dataset: ConvertedDataset, verify_shards: str = "off") -> None:
        if verify_shards not in ("first", "off"):
            raise ValueError(f"verify_shards is first or off, not {verify_shards!r}")
        self.root, self.format = dataset.root, dataset.format
        self.shard_names = [shard["name"] for shard in dataset.shards]
        self.shard_hashes = [shard["sha256"] for shard in dataset.shards]
        self.shard_bytes = [int(shard["bytes"]) for shard in dataset.shards]
        self.verify_shards = verify_shards
        self.verified: set[str] = set()

    def read(self, shards: list[int], mine: np.ndarray, verified: dict) -> Iterator[dict]:
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
                    raise StreamError(f"shard {path} cannot be read ({first_line(error)}): {fix}") from None
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
            for sample in self.format.iter_samples_tolerant(path):
                if mine[sample["key"]]:
                    sample["shard"] = name
                    yield sample
        except Exception as error:  # a damaged tar or HDF5 file raises many kinds of errors
            raise StreamError(f"shard {where} cannot be read ({first_line(error)}): {fix}") from None

    def _read_remote(self, shards: list[int], mine: np.ndarray, verified: dict) -> Iterator[dict]:
        """:meth:`read` for a dataset at a URL: each shard is fetched whole just before it is read, the next one while
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
                    what = (
                        first_line(error) if isinstance(error, RemoteError) else f"{url} ({describe_os_error(error)})"
                    )
                    raise StreamError(f"shard {what}; once fixed, run the same command again (it resumes)") from None
                if digest is not None and check:
                    self.verified.add(name)
                    verified[name] = digest
                yield from self._own_samples(
                    path, name, mine, url, f"check the dataset with rela inspect {folder} --verify"
                )
        finally:
            fetched.close()
