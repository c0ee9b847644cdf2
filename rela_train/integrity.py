"""Cheap checks that a command's inputs are whole before it starts work, and one-line descriptions of OS errors.

``rela train``, ``study`` and ``select`` call :func:`check_dataset` before they build anything (no worker
is started, no network built): it only ``stat``\\ s the files the index names, so a deleted or truncated
shard, a missing ``keys.npy`` or ``pca.npz`` is reported in one line with the fix instead of a
``FileNotFoundError`` from a DataLoader worker minutes later. The full proof (hashes, sample counts, keys)
stays ``rela inspect DATA --verify`` (:func:`rela_convert.dataset.verify.verify_dataset`).

:func:`check_run_dataset` refuses to resume a RUN on another dataset than the one it was trained on (other
samples, or other prior features: its transfer head would not fit, or its targets would change).
:func:`describe_os_error` turns an ``OSError`` (also one re-raised by a DataLoader worker, whose message is a
whole traceback) into one line.

Importing this module imports nothing heavy (no numpy, no torch).
"""

from __future__ import annotations

import errno
import os
import shlex
from pathlib import Path

from rela_convert.checkpoint import CHECKPOINT_NAME, run_finished
from rela_convert.dataset.files import DatasetError
from rela_convert.dataset.index import DatasetIndex


class IncompleteDatasetError(DatasetError):
    """A converted dataset whose index names files that are missing or have another size than recorded;
    the message (one line) names the first bad file, how many there are, and the fix."""


class RunMismatchError(DatasetError):
    """A RUN that cannot go on with the given dataset (its prior features have another dimension)."""


def convert_command(index: DatasetIndex, out: str = "NEW_FOLDER") -> str:
    """The ``rela convert`` command that makes the dataset described by ``index`` again, into ``out``.

    Args:
        index: the dataset's index (its :attr:`~rela_convert.dataset.index.DatasetIndex.job` records the source folder,
            prior, shard size, formats, HDF5 compression, decoder and storage-order seed).
        out: the output folder to name in the command.

    Returns:
        A shell command line (arguments quoted with :func:`shlex.quote`).
    """
    job = index.job
    words = [
        "rela",
        "convert",
        str(job.get("source", "SRC")),
        out,
        "--prior",
        str(job.get("prior", index.prior["spec"])),
    ]
    words += ["--format", ",".join(job.get("formats", index.formats)), "--shard-size", str(job.get("shard_size", ""))]
    if job.get("hdf5_compression"):
        words += ["--hdf5-compression", job["hdf5_compression"]]
    if job.get("decode", "cpu") != "cpu":
        words += ["--decode", job["decode"]]
    if job.get("order_seed", 0):
        words += ["--order-seed", str(job["order_seed"])]
    return " ".join(shlex.quote(word) for word in words if word != "")


def check_dataset(root: str | Path, storage: str | None = None) -> DatasetIndex:
    """Check, by ``stat`` only, that the converted dataset at ``root`` holds every file a reader needs; at a URL
    (:mod:`rela_convert.dataset.remote`) by the size the server tells (fsspec ``info``: one request per file).

    Checks that every shard of the ``storage`` format listed in ``index.json`` exists with the byte size the
    index records (a missing or truncated shard), and that ``keys.npy`` and, when the index records one,
    ``pca.npz`` exist. Shards of the dataset's other formats are not read by the command, so not checked.
    Content (SHA-256, samples, keys) is not checked: ``rela inspect DATA --verify`` does that.

    Args:
        root: converted dataset folder, or its URL.
        storage: the storage format the command reads; None: the index's default
            (:attr:`~rela_convert.dataset.index.DatasetIndex.storage`, what ``rela train`` and ``rela select`` read).

    Returns:
        The dataset's :class:`~rela_convert.dataset.index.DatasetIndex`.

    Raises:
        rela_convert.dataset.files.DatasetError: no usable ``index.json`` (see :meth:`DatasetIndex.load`), or no
            ``storage`` shards in it.
        IncompleteDatasetError: a file is missing or has another size than recorded; the message names the
            first, counts the others and says how to fix it (``rela inspect DATA --verify`` to list every bad
            file, then convert again into a new folder: a finished conversion is not redone in place; or push a
            remote dataset again).
        rela_convert.dataset.remote.RemoteError: (URL) the server keeps failing (after the retries).
    """
    from rela_convert.dataset.remote import RemoteFolder, dataset_root

    root = dataset_root(root)
    index = DatasetIndex.load(root)
    storage = storage or index.storage
    try:
        shards = index.shards(storage)
    except ValueError as error:
        raise DatasetError(f"{root}: {error}; choose one of them with --storage") from None
    problems = []
    others = [index.keys_file] + ([index.pca["file"]] if index.pca else [])
    remote = isinstance(root, RemoteFolder)
    # At a URL: one metadata request per file (HEAD), in parallel, retried; missing files are left out.
    sizes = root.sizes([shard["name"] for shard in shards] + others) if remote else {}
    for shard in shards:
        try:
            size = sizes[shard["name"]] if remote else os.stat(root / shard["name"]).st_size
        except (FileNotFoundError, KeyError):
            problems.append(f"shard {shard['name']} is missing")
            continue
        except OSError as error:
            problems.append(f"shard {shard['name']} cannot be read ({error.strerror})")
            continue
        if size is not None and size != shard["bytes"]:  # None: a server that does not tell sizes
            problems.append(f"shard {shard['name']} has {size} bytes, the index says {shard['bytes']}")
    for name in others:
        if not (name in sizes if remote else (root / name).is_file()):
            problems.append(f"{name} is missing")
    if problems:
        more = f" (and {len(problems) - 1} more bad files)" if len(problems) > 1 else ""
        fix = (
            "then push it again from its local copy (rela push DATA URL)"
            if remote
            else f"then convert it again into a new folder: {convert_command(index)}"
        )
        raise IncompleteDatasetError(
            f"{root} is damaged: {problems[0]}{more}; run rela inspect {shlex.quote(str(root))} --verify to list every "
            f"bad file, {fix}"
        )
    return index


def check_run_dataset(run: str | Path, data: str | Path, index: DatasetIndex) -> None:
    """Refuse to resume RUN on another dataset than the one it was trained on.

    Reads ``RUN/checkpoint.pt`` memory-mapped (``torch.load(mmap=True, weights_only=True)``: no tensor data is read)
    when RUN has one; does nothing when it has none or when it cannot be read (the trainer then reports that).
    Refused: prior features that do not fit the run's transfer head (its output size d, from
    ``training.model["transfer.weight"]``, float ``[d, D_target]``, must be ``min(D_target, index.feature_dim)``);
    other samples or another stored order (the checkpoint's ``dataset``, the dataset's
    :meth:`~rela_convert.dataset.index.DatasetIndex.identity`, has another ``keys_sha256``); other prior features of the
    same size (another ``pca_sha256``) unless the run trains without ReLA (``--rela off`` reads no prior targets: a
    baseline can be shared by studies of several priors; once finished, whatever the priors' sizes). A moved, copied
    or pushed copy of the dataset is accepted; checkpoints written before ``dataset`` was recorded are checked on
    the transfer head only.

    Args:
        run: the run folder.
        data: the dataset folder or URL (named in the message).
        index: the dataset's index.

    Raises:
        RunMismatchError: another dataset; the message names both datasets, what differs, and the fix.
    """
    path = Path(run) / CHECKPOINT_NAME
    if not path.is_file():
        return
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        head_dim = int(state["training"]["model"]["transfer.weight"].shape[0])
        fitting_dim = min(int(state["feature_dim"]), index.feature_dim)
        recorded = state.get("dataset") or {}
        uses_prior = state["config"].get("rela") != "off"
        finished = run_finished(run, int(state["epoch"]), int(state["config"]["epochs"]))
    except Exception:  # unreadable, another format or layout: the trainer's own checks report it
        return
    mine = index.identity()
    if head_dim != fitting_dim and (uses_prior or not finished):
        differs = (
            f"{index.feature_dim}-d prior features (prior {mine['prior']}), which do not fit its transfer head "
            f"({head_dim}-d prior targets)"
        )
    elif recorded.get("keys_sha256", mine["keys_sha256"]) != mine["keys_sha256"]:
        differs = "other samples (its keys.npy differs: other images, or another stored order)"
    elif uses_prior and recorded.get("pca_sha256", mine["pca_sha256"]) != mine["pca_sha256"]:
        differs = f"other prior features (prior {mine['prior']}; its pca.npz differs)"
    else:
        return
    prior = f" (prior {recorded['prior']})" if recorded.get("prior") else ""
    raise RunMismatchError(
        f"{run} was trained on {state.get('data', 'another dataset')}{prior}, but {data} holds {differs}: resume it "
        "with the dataset it was trained on, or give another RUN"
    )


def describe_os_error(error: OSError) -> str:
    """One line for an ``OSError``: ``"PATH: reason"`` (or just the reason without a file name), followed by
    what to do for the common causes (disk full or quota, permissions, read-only file system).

    An error re-raised from a DataLoader worker carries the worker's whole traceback as its message; its last
    line (the original ``Type: message``) is kept.

    Returns:
        A single line without a trailing newline.
    """
    if error.strerror:
        reason = f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    else:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = lines[-1] if lines else type(error).__name__
    hint = OS_ERROR_HINTS.get(error.errno)
    return f"{reason} ({hint})" if hint else reason


#: What to do about the common causes of an ``OSError``, by ``errno``.
OS_ERROR_HINTS = {
    errno.ENOSPC: "the disk is full: free space or write elsewhere",
    errno.EDQUOT: "disk quota exceeded: free space or write elsewhere",
    errno.EACCES: "check the file's permissions",
    errno.EPERM: "check the file's permissions",
    errno.EROFS: "the file system is read-only: write elsewhere",
}
