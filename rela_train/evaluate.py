"""Evaluating a trained backbone: weighted kNN accuracy and a linear probe (method.md, "Evaluation").

Features are centre-crop features of the frozen backbone on raw image folders
(``DIR/<class>/<images>``, torchvision ``ImageFolder``). The kNN classifier
L2-normalises them; the linear probe trains on them unnormalised, as the reference.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from rela_convert.devices import resolve_device
from rela_train.views import eval_view

#: Linear-probe test accuracy is reported as the mean and standard deviation of this many last epochs
#: (the reference's ``metrics/lineareval.py``).
PROBE_LAST_EPOCHS = 3


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated (mismatched class folders)."""


@torch.inference_mode()
def extract_features(
    backbone: torch.nn.Module,
    folder: str | Path,
    input_size: int,
    batch_size: int = 256,
    workers: int = 2,
    device: str = "auto",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Centre-crop features (unnormalised) of every image of a class-folder tree.

    Returns:
        ``(features float32 [N, D], labels int64 [N], class names)``.
    """
    target = resolve_device(device)
    images = ImageFolder(str(folder), transform=eval_view(input_size))
    loader = DataLoader(images, batch_size=batch_size, num_workers=workers, pin_memory=target.type == "cuda")
    backbone = backbone.to(target)
    features, labels = [], []
    for batch, batch_labels in tqdm(loader, desc=f"features {Path(folder).name}", unit="batch", disable=not progress):
        with torch.autocast(target.type, dtype=torch.bfloat16, enabled=target.type == "cuda"):
            output = backbone(batch.to(target, non_blocking=True))
        features.append(output.float().cpu().numpy())
        labels.append(batch_labels.numpy())
    return np.concatenate(features), np.concatenate(labels).astype(np.int64), images.classes


def knn_accuracy(
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


def linear_probe(
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
    comes from :func:`rela_train.checkpoint.load_backbone` (``evaluate(*load_backbone(run), ...)``).

    Args:
        backbone: maps float ``[B, 3, S, S]`` to ``[B, D]``; evaluated in eval mode.
        input_size: S, pixels.

    Returns:
        ``{"knn_top1", "input_size", "num_train", "num_test", "k", "temperature"}`` plus ``"linear_top1"`` and
        ``"linear_top1_std"`` when ``probe_epochs > 0``; accuracies are fractions in [0, 1].

    Raises:
        EvaluationError: different class folders in the two trees.
    """
    backbone = backbone.eval()
    train = extract_features(backbone, train_dir, input_size, batch_size, workers, device, progress)
    test = extract_features(backbone, test_dir, input_size, batch_size, workers, device, progress)
    if train[2] != test[2]:
        raise EvaluationError(f"class folders differ between {train_dir} and {test_dir}")
    result = {
        "knn_top1": knn_accuracy(train[0], train[1], test[0], test[1], k, temperature),
        "input_size": input_size,
        "num_train": len(train[1]),
        "num_test": len(test[1]),
        "k": k,
        "temperature": temperature,
    }
    if probe_epochs > 0:
        result["linear_top1"], result["linear_top1_std"] = linear_probe(
            train[0], train[1], test[0], test[1], epochs=probe_epochs
        )
    return result
