"""``rela push DATA URL``: upload a converted dataset folder to a URL that trainers then read from.

Order: every shard (all formats), ``keys.npy``, ``pca.npz``, ``selection.npz`` and ``skipped.jsonl`` first,
``index.json`` last, so that a reader never sees an index whose files are missing. When the URL already holds
another dataset's ``index.json``, it is deleted before the first file is replaced, so that no reader mixes the
old index with new shards (readers then see no dataset until the push ends).

Idempotent: a file is skipped when the URL already holds it with the same size and its SHA-256 is known to be the
same without reading it back: recorded for it by the ``index.json`` there, or by ``.rela-push.json``, the list of
files (name, bytes, SHA-256) a push has uploaded there, rewritten after each upload so that an interrupted push
resumes where it stopped. A local file is hashed before it is uploaded, and one that differs from its SHA-256 in
the local index stops the push (a damaged dataset is not spread).

Uploads go through fsspec (:meth:`rela_convert.dataset.remote.RemoteFolder.upload`: ``put_file``, multipart on object
stores, retried on transient errors); HTTP URLs are read-only and refused.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from rela_convert.dataset.files import DatasetError, no_space, sha256_file
from rela_convert.dataset.index import INDEX_NAME, DatasetIndex
from rela_convert.dataset.remote import RemoteFolder

#: The push record at the URL: ``{"files": {name: {"bytes", "sha256"}}}``.
MANIFEST_NAME = ".rela-push.json"


@dataclass
class LocalFile:
    """A file of the dataset to push.

    Attributes:
        name: file name in the dataset folder.
        bytes: its size, bytes.
        sha256: its hex SHA-256 as the local index records it (None: not recorded, e.g. ``skipped.jsonl``).
    """

    name: str
    bytes: int
    sha256: str | None


def dataset_files(root: Path, index: DatasetIndex) -> list[LocalFile]:
    """Every file of the dataset but ``index.json``, in upload order: the shards of every format (index order),
    ``keys.npy``, ``pca.npz``, ``selection.npz`` (when recorded) and the skip list.

    Raises:
        DatasetError: a file the index names is missing.
    """
    named: list[tuple[str, str | None]] = [
        (shard["name"], shard["sha256"]) for shards in index.formats.values() for shard in shards
    ]
    named.append((index.keys_file, index.keys_sha256))
    if index.pca:
        named.append((index.pca["file"], index.pca["sha256"]))
    selection = index.subset.get("selection")
    if selection:
        named.append((selection["file"], selection["sha256"]))
    if (root / index.skipped_file).is_file():
        named.append((index.skipped_file, None))
    files = []
    for name, sha256 in named:
        path = root / name
        if not path.is_file():
            raise DatasetError(f"{path} is missing: check the dataset with rela inspect {root} --verify")
        files.append(LocalFile(name, path.stat().st_size, sha256))
    return files


def _remote_hashes(target: RemoteFolder) -> tuple[dict[str, str], dict[str, dict], bytes | None]:
    """``(SHA-256 by name known at the URL, the push manifest's entries, the index.json bytes there or None)``."""
    known: dict[str, str] = {}
    try:
        index_bytes = target.read_bytes(INDEX_NAME)
    except FileNotFoundError:
        index_bytes = None
    if index_bytes is not None:
        try:
            remote = DatasetIndex.from_dict(json.loads(index_bytes))
            for shards in remote.formats.values():
                known.update({shard["name"]: shard["sha256"] for shard in shards})
            known[remote.keys_file] = remote.keys_sha256
            if remote.pca:
                known[remote.pca["file"]] = remote.pca["sha256"]
            if remote.subset.get("selection"):
                known[remote.subset["selection"]["file"]] = remote.subset["selection"]["sha256"]
        except (ValueError, KeyError, TypeError):  # another or a damaged index: nothing known from it
            pass
    manifest: dict[str, dict] = {}
    try:
        manifest = json.loads(target.read_bytes(MANIFEST_NAME)).get("files", {})
    except (FileNotFoundError, ValueError, AttributeError):
        manifest = {}
    return known, manifest, index_bytes


def push_dataset(data: str | Path, url: str | RemoteFolder, progress: bool = True) -> dict:
    """Upload the converted dataset folder ``data`` to ``url`` (see the module docstring).

    Args:
        data: a local converted dataset folder.
        url: the destination (a :class:`RemoteFolder`, or a URL opened with the storage options of the
            environment, :func:`rela_convert.dataset.remote.dataset_root`).
        progress: show a tqdm progress bar of the bytes uploaded.

    Returns:
        ``{"url", "files", "uploaded", "skipped", "bytes" (uploaded, bytes), "seconds", "bytes_per_s"}``.

    Raises:
        DatasetError: ``data`` is not a finished converted dataset, a file it names is missing or differs from
            its recorded SHA-256.
        RemoteError: a read-only URL, a missing back-end, or a server that keeps failing.
        OSError: a local file cannot be read, or the server refuses the upload (permissions, a full disk: the message
            names the destination and the bytes still to upload, :func:`~rela_convert.dataset.files.no_space`).
    """
    from rela_convert.dataset.remote import dataset_root

    root = Path(data)
    index = DatasetIndex.load(root)
    target = url if isinstance(url, RemoteFolder) else dataset_root(url)
    if not isinstance(target, RemoteFolder):  # a local destination folder: through fsspec as well
        target = RemoteFolder(f"file://{Path(target).resolve()}")
    target.check_writable()
    if target.protocol == "file":
        target.fs.makedirs(target.path_of(""), exist_ok=True)
    started = time.perf_counter()
    files = dataset_files(root, index)
    index_bytes = (root / INDEX_NAME).read_bytes()
    known, manifest, remote_index = _remote_hashes(target)
    sizes = target.sizes([file.name for file in files])
    pending, entries = [], {}
    for file in files:
        recorded = manifest.get(file.name, {})
        remote_sha = known.get(file.name) or recorded.get("sha256")
        if file.sha256 is None and recorded.get("bytes") == file.bytes:
            remote_sha = recorded.get("sha256")  # not in any index: trust the manifest, checked below
            file.sha256 = sha256_file(root / file.name)
        same = sizes.get(file.name) == file.bytes and remote_sha is not None and remote_sha == file.sha256
        if same:
            entries[file.name] = {"bytes": file.bytes, "sha256": file.sha256}
        else:
            pending.append(file)
    index_differs = remote_index != index_bytes
    if pending:  # before the old index goes: what it vouched for stays known if the push is interrupted
        target.write_bytes(MANIFEST_NAME, json.dumps({"files": entries}, indent=2, sort_keys=True).encode())
        if remote_index is not None and index_differs:
            target.remove(INDEX_NAME)  # never an old index over new shards
    total = sum(file.bytes for file in pending) + (len(index_bytes) if index_differs else 0)
    uploaded = 0
    with tqdm(total=total, unit="B", unit_scale=True, desc="push", disable=not progress or total == 0) as bar:
        for file in pending:
            path = root / file.name
            digest = sha256_file(path)
            if file.sha256 is not None and digest != file.sha256:
                raise DatasetError(
                    f"{path} does not match the SHA-256 in {root / INDEX_NAME}: the local dataset is damaged; check it "
                    f"with rela inspect {root} --verify (nothing damaged was pushed)"
                )
            try:
                target.upload(path, file.name, bar.update)
            except OSError as error:  # a full disk at a local destination
                folder = target.path_of("").rstrip("/") if target.protocol == "file" else str(target)
                raise no_space(error, folder, total - uploaded) from None
            uploaded += file.bytes
            entries[file.name] = {"bytes": file.bytes, "sha256": digest}
            target.write_bytes(MANIFEST_NAME, json.dumps({"files": entries}, indent=2, sort_keys=True).encode())
        if index_differs:
            target.write_bytes(INDEX_NAME, index_bytes)  # last: the dataset appears whole
            uploaded += len(index_bytes)
            bar.update(len(index_bytes))
    seconds = time.perf_counter() - started
    return {
        "url": str(target),
        "files": len(files) + 1,
        "uploaded": len(pending) + int(index_differs),
        "skipped": len(files) - len(pending) + int(not index_differs),
        "bytes": uploaded,
        "seconds": seconds,
        "bytes_per_s": uploaded / seconds if seconds > 0 else 0.0,
    }
