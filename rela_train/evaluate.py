"""Evaluating a trained backbone: weighted kNN accuracy and a linear probe (method.md, "Evaluation").

Features are centre-crop features of the frozen backbone on raw image folders
(``DIR/<class>/<images>``). The kNN classifier L2-normalises them; the linear probe
trains on them unnormalised, as the reference.

The folders are read with the conversion's rules (:func:`labelled_folder`): the
files are listed by :func:`rela_convert.tree.scan_tree` (hidden files, non-image
extensions, broken links ... are skipped with their reason) and decoded by
:func:`rela_convert.images.decode_rgb`, as training decodes the stored images; a
file that cannot be decoded is skipped with its reason instead of failing the
evaluation. Every skip is listed (``{"path", "reason"}``, as ``skipped.jsonl`` of a
conversion) and counted in the result.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from rela_convert.devices import resolve_device
from rela_convert.images import ImageDecodeError, decode_rgb
from rela_convert.optional import require
from rela_convert.processes import die_with_parent
from rela_convert.tree import SourceFile, display_path, scan_tree
from rela_train.views import eval_view

#: Linear-probe test accuracy is reported as the mean and standard deviation of this many last epochs
#: (the reference's ``metrics/lineareval.py``).
PROBE_LAST_EPOCHS = 3


#: The skip reason of a file directly in an evaluation folder, outside every class folder.
NOT_IN_A_CLASS = "not in a class folder (evaluation reads DIR/<class>/<images>)"


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated: no class folder, no decodable image, mismatched class folders."""


@dataclass
class LabelledFolder:
    """The image files of a class-folder tree ``DIR/<class>/.../<image>``, listed with the conversion's rules.

    Attributes:
        root: the folder.
        files: the labelled image files (``label`` indexes :attr:`classes`), in sorted path order.
        classes: sorted names of the first-level folders that hold at least one image file.
        skipped: ``{"path", "reason"}`` of every other entry (path: ``root`` joined with the relative path).
    """

    root: Path
    files: list[SourceFile]
    classes: list[str]
    skipped: list[dict]

    def skip_record(self, file: SourceFile, reason: str) -> dict:
        """The ``{"path", "reason"}`` record of one of :attr:`files` that is skipped."""
        return {"path": os.path.join(str(self.root), display_path(file.relpath)), "reason": reason}


def labelled_folder(folder: str | Path) -> LabelledFolder:
    """List a class-folder tree as a conversion lists its source (:func:`rela_convert.tree.scan_tree`): hidden
    files, names without an image extension, entries that are not regular files, broken links and folders
    reached twice are skipped with their reason; so are image files directly in ``folder`` (no class).

    Raises:
        EvaluationError: no first-level folder of ``folder`` holds an image file.
        NotADirectoryError: ``folder`` is not a directory.
    """
    listing = scan_tree(folder)
    result = LabelledFolder(Path(folder), [], listing.classes, [])
    result.skipped = [
        {"path": os.path.join(str(folder), item["path"]), "reason": item["reason"]} for item in listing.skipped
    ]
    for file in listing.files:
        if file.label is None:
            result.skipped.append(result.skip_record(file, NOT_IN_A_CLASS))
        else:
            result.files.append(file)
    if not result.files:
        raise EvaluationError(
            f"{folder} holds no class folder with images: evaluation reads labelled images DIR/<class>/<images>"
        )
    return result


def nothing_decoded(folder: str | Path, undecoded: list[dict]) -> EvaluationError:
    """The error for a folder none of whose image files decoded (``undecoded``: their skip records)."""
    return EvaluationError(
        f"none of the {len(undecoded)} image files of {folder} could be decoded (first: {undecoded[0]['path']}: "
        f"{undecoded[0]['reason']})"
    )


def read_rgb(path: str | Path) -> Image.Image:
    """Read and decode an image file as training decodes stored images (:func:`rela_convert.images.decode_rgb`).

    Returns:
        ``PIL.Image.Image`` in mode ``"RGB"`` (uint8), full resolution.

    Raises:
        ImageDecodeError: the file cannot be read or decoded; the message is the skip reason, worded as a
            conversion's ``skipped.jsonl`` words it.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise ImageDecodeError(f"unreadable file: {error.strerror or error}") from None
    return decode_rgb(data)


class FolderImages(Dataset):
    """Map-style dataset over the files of a :class:`LabelledFolder`; item ``p`` is a dict with ``position``
    (``p``) and either ``pixels`` (``transform`` of the decoded RGB image) and ``label`` (int), or ``reason``
    (why the file is skipped: :func:`read_rgb`).

    Args:
        folder: the listed folder.
        transform: RGB PIL image -> tensor (e.g. :func:`rela_train.views.eval_view`).
    """

    def __init__(self, folder: LabelledFolder, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.folder, self.transform = folder, transform

    def __len__(self) -> int:
        return len(self.folder.files)

    def __getitem__(self, position: int) -> dict:
        file = self.folder.files[position]
        try:
            image = read_rgb(file.path)
        except ImageDecodeError as error:
            return {"position": position, "reason": str(error)}
        return {"position": position, "pixels": self.transform(image), "label": file.label}


def collate_images(items: list[dict]) -> dict:
    """Batch :class:`FolderImages` items: ``pixels`` (the decoded ones stacked, ``[B, ...]``; None when none
    decoded), ``labels`` (int64 ``[B]``) and ``skipped`` (``(position, reason)`` pairs)."""
    good = [item for item in items if "pixels" in item]
    return {
        "pixels": torch.stack([item["pixels"] for item in good]) if good else None,
        "labels": torch.tensor([item["label"] for item in good], dtype=torch.int64),
        "skipped": [(item["position"], item["reason"]) for item in items if "reason" in item],
    }


class FolderFeatures(NamedTuple):
    """What :func:`extract_features` returns (the first three fields are its former 3-tuple).

    Attributes:
        features: float32 ``[N, D]``, unnormalised, of the N images that decoded.
        labels: int64 ``[N]``, indices into :attr:`classes`.
        classes: sorted class folder names.
        skipped: ``{"path", "reason"}`` of every file of the folder not evaluated, sorted by path.
    """

    features: np.ndarray
    labels: np.ndarray
    classes: list[str]
    skipped: list[dict]


@torch.inference_mode()
def extract_features(
    backbone: torch.nn.Module,
    folder: str | Path,
    input_size: int,
    batch_size: int = 256,
    workers: int = 2,
    device: str = "auto",
    progress: bool = True,
) -> FolderFeatures:
    """Centre-crop features (unnormalised) of every image of a class-folder tree that decodes; the others are
    skipped with their reason (see the module docstring).

    Args:
        backbone: maps float ``[B, 3, S, S]`` to ``[B, D]``.
        folder: ``DIR/<class>/<images>``.
        input_size: S, pixels.

    Returns:
        :class:`FolderFeatures` ``(features float32 [N, D], labels int64 [N], class names, skipped)``.

    Raises:
        EvaluationError: no class folder with images, or no image that decodes.
        ValueError: CUDA asked for but not available.
    """
    target = resolve_device(device)
    listed = labelled_folder(folder)
    loader = DataLoader(
        FolderImages(listed, eval_view(input_size)),
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=target.type == "cuda",
        collate_fn=collate_images,
        worker_init_fn=die_with_parent,  # a killed evaluation leaves no worker behind
    )
    backbone = backbone.to(target)
    features, labels, undecoded = [], [], []
    for batch in tqdm(loader, desc=f"features {Path(folder).name}", unit="batch", disable=not progress):
        undecoded += [listed.skip_record(listed.files[position], reason) for position, reason in batch["skipped"]]
        if batch["pixels"] is None:
            continue
        with torch.autocast(target.type, dtype=torch.bfloat16, enabled=target.type == "cuda"):
            output = backbone(batch["pixels"].to(target, non_blocking=True))
        features.append(output.float().cpu().numpy())
        labels.append(batch["labels"].numpy())
    if not features:
        raise nothing_decoded(folder, undecoded)
    skipped = sorted(listed.skipped + undecoded, key=lambda item: item["path"])
    return FolderFeatures(np.concatenate(features), np.concatenate(labels).astype(np.int64), listed.classes, skipped)


def knn_top1(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    k: int = 200,
    temperature: float = 0.1,
) -> float:
    """Weighted k-nearest-neighbour top-1 accuracy (Wu et al., CVPR 2018; the usual
    self-supervised monitor, k = 200, temperature 0.1): each of the ``k`` most
    cosine-similar training features votes for its class with weight ``exp(s / T)``.

    Args:
        train_features: float32 ``[N, D]`` (L2-normalised here).
        train_labels: int64 ``[N]``.
        test_features: float32 ``[M, D]`` (L2-normalised here).
        test_labels: int64 ``[M]``.
        k: neighbours (capped at N).
        temperature: T.

    Returns:
        Top-1 accuracy as a fraction in [0, 1].
    """
    train_features, test_features = np.array(train_features, np.float32), np.array(test_features, np.float32)  # copies
    faiss = require("faiss", "kNN accuracy")
    faiss.normalize_L2(train_features)
    faiss.normalize_L2(test_features)
    index = faiss.IndexFlatIP(train_features.shape[1])
    index.add(train_features)
    similarities, neighbours = index.search(test_features, min(k, len(train_features)))
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    votes = np.zeros((len(test_features), num_classes), np.float64)
    rows = np.repeat(np.arange(len(test_features)), neighbours.shape[1])
    np.add.at(
        votes, (rows, train_labels[neighbours].ravel()), np.exp(similarities.ravel().astype(np.float64) / temperature)
    )
    return float((votes.argmax(axis=1) == test_labels).mean())


def linear_probe_top1(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    epochs: int = 100,
    lr: float = 3e-4,
    batch_size: int = 128,
    seed: int = 0,
) -> tuple[float, float]:
    """Test accuracy of one linear layer trained on frozen, unnormalised features with Adam, as the
    ReLA reference (``metrics/lineareval.py``: lr 3e-4, 100 epochs, batch 128 on CIFAR; the test
    accuracy after each epoch, reported as the mean and standard deviation of the last 3).

    Args:
        train_features, test_features: float32 ``[N, D]`` / ``[M, D]``.
        train_labels, test_labels: int64 ``[N]`` / ``[M]``.
        epochs: passes over the training features.

    Returns:
        ``(mean, sample standard deviation)`` of the last ``min(3, epochs)`` epochs' top-1
        accuracies, fractions in [0, 1] (std 0.0 for a single epoch).
    """
    generator = torch.Generator().manual_seed(seed)
    inputs, targets = torch.from_numpy(train_features), torch.from_numpy(train_labels)
    test_inputs = torch.from_numpy(test_features)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    torch.manual_seed(seed)
    layer = torch.nn.Linear(inputs.shape[1], num_classes)
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr)
    accuracies = []
    for _ in range(epochs):
        for batch in torch.randperm(len(inputs), generator=generator).split(batch_size):
            loss = torch.nn.functional.cross_entropy(layer(inputs[batch]), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            accuracies.append(float((layer(test_inputs).argmax(dim=1).numpy() == test_labels).mean()))
    last = np.array(accuracies[-PROBE_LAST_EPOCHS:])
    return float(last.mean()), float(last.std(ddof=1)) if len(last) > 1 else 0.0


def folder_features(
    backbone: torch.nn.Module,
    train_dir: str | Path,
    test_dir: str | Path,
    input_size: int,
    batch_size: int = 256,
    workers: int = 2,
    device: str = "auto",
    progress: bool = True,
) -> tuple[FolderFeatures, FolderFeatures]:
    """:func:`extract_features` of the frozen ``backbone`` (in eval mode meanwhile; its mode is restored after) on a
    train and a test class-folder tree.

    Raises:
        EvaluationError: see :func:`extract_features`, or different class folders in the two trees.
    """
    training = backbone.training
    try:
        backbone.eval()
        train = extract_features(backbone, train_dir, input_size, batch_size, workers, device, progress)
        test = extract_features(backbone, test_dir, input_size, batch_size, workers, device, progress)
    finally:
        backbone.train(training)
    if train.classes != test.classes:
        raise EvaluationError(f"class folders differ between {train_dir} and {test_dir}")
    return train, test


def knn_accuracy(
    backbone: torch.nn.Module,
    train_dir: str | Path,
    test_dir: str | Path,
    input_size: int,
    k: int = 200,
    temperature: float = 0.1,
    batch_size: int = 256,
    workers: int = 2,
    device: str = "auto",
    progress: bool = False,
) -> float:
    """Weighted kNN top-1 accuracy (k = 200, T = 0.1; :func:`knn_top1`) of a frozen backbone, as ``rela eval``
    measures it: centre-crop features of ``test_dir``'s images classified by their neighbours in ``train_dir``.

    Args:
        backbone: maps float ``[B, 3, S, S]`` (ImageNet-normalised) to ``[B, D]``; evaluated in eval mode, its mode
            restored after (it is moved to ``device``).
        train_dir, test_dir: ``DIR/<class>/<images>`` trees with the same class folders.
        input_size: S, pixels (images are resized and centre-cropped to it).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.

    Returns:
        Top-1 accuracy, a fraction in [0, 1].

    Raises:
        EvaluationError: a tree without class folders or decodable images, or different class folders.
        rela_convert.optional.MissingDependency: faiss is not installed.
    """
    train, test = folder_features(backbone, train_dir, test_dir, input_size, batch_size, workers, device, progress)
    return knn_top1(train.features, train.labels, test.features, test.labels, k, temperature)


def linear_probe(
    backbone: torch.nn.Module,
    train_dir: str | Path,
    test_dir: str | Path,
    input_size: int,
    epochs: int = 100,
    lr: float = 3e-4,
    batch_size: int = 256,
    workers: int = 2,
    device: str = "auto",
    progress: bool = False,
) -> tuple[float, float]:
    """Linear-probe test accuracy of a frozen backbone, as the reference and ``rela eval --probe-epochs``: one
    linear layer trained with Adam (``lr``, batch 128) on ``train_dir``'s unnormalised centre-crop features for
    ``epochs`` epochs (:func:`linear_probe_top1`).

    Args: as :func:`knn_accuracy`; ``batch_size`` is that of the feature extraction.

    Returns:
        ``(mean, standard deviation)`` of the last 3 epochs' top-1 test accuracy, fractions in [0, 1].

    Raises:
        EvaluationError: as :func:`knn_accuracy`; ValueError: ``epochs`` below 1.
    """
    if epochs < 1:
        raise ValueError(f"the linear probe needs at least 1 epoch, got {epochs}")
    train, test = folder_features(backbone, train_dir, test_dir, input_size, batch_size, workers, device, progress)
    return linear_probe_top1(train.features, train.labels, test.features, test.labels, epochs=epochs, lr=lr)


def evaluate(
    backbone: torch.nn.Module,
    input_size: int,
    train_dir: str | Path,
    test_dir: str | Path,
    k: int = 200,
    temperature: float = 0.1,
    probe_epochs: int = 0,
    batch_size: int = 256,
    workers: int = 2,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """kNN accuracy (and optionally linear-probe accuracy) of a frozen backbone; a run's trained one
    comes from :func:`rela_convert.checkpoint.load_backbone` (``evaluate(*load_backbone(run), ...)``).

    Args:
        backbone: maps float ``[B, 3, S, S]`` to ``[B, D]``; evaluated in eval mode.
        input_size: S, pixels.

    Returns:
        ``{"knn_top1", "input_size", "num_train", "num_test", "k", "temperature", "num_skipped", "skipped"}`` plus
        ``"linear_top1"`` and ``"linear_top1_std"`` when ``probe_epochs > 0``; accuracies are fractions in [0, 1];
        ``num_train`` / ``num_test`` count the images evaluated, ``skipped`` lists ``{"path", "reason"}`` of every
        file of the two folders that was not (``num_skipped`` of them; see :func:`extract_features`).

    Raises:
        EvaluationError: no class folder with images or no decodable image in a tree, or different class folders
            in the two trees.
        ValueError: CUDA asked for but not available.
    """
    train, test = folder_features(backbone, train_dir, test_dir, input_size, batch_size, workers, device, progress)
    result = {
        "knn_top1": knn_top1(train[0], train[1], test[0], test[1], k, temperature),
        "input_size": input_size,
        "num_train": len(train[1]),
        "num_test": len(test[1]),
        "k": k,
        "temperature": temperature,
        "num_skipped": len(train.skipped) + len(test.skipped),
        "skipped": train.skipped + test.skipped,
    }
    if probe_epochs > 0:
        result["linear_top1"], result["linear_top1_std"] = linear_probe_top1(
            train[0], train[1], test[0], test[1], epochs=probe_epochs
        )
    return result
