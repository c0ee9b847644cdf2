"""Evaluating a trained backbone: weighted kNN accuracy and a linear probe (method.md, "Evaluation").

Features are centre-crop features of the frozen backbone on raw image folders
(``DIR/<class>/<images>``, torchvision ``ImageFolder``), L2-normalised.
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
from rela_train.backbones import build_backbone
from rela_train.trainer import CHECKPOINT_FORMAT, CHECKPOINT_NAME
from rela_train.views import eval_view


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated (missing checkpoint, mismatched class folders)."""


def load_backbone(run: str | Path) -> tuple[torch.nn.Module, int]:
    """Rebuild the trained backbone of a run from ``RUN/checkpoint.pt``.

    Returns:
        ``(backbone in eval mode on the CPU, input_size in pixels)``.

    Raises:
        EvaluationError: no checkpoint, or not a rela checkpoint.
    """
    path = Path(run) / CHECKPOINT_NAME
    if not path.is_file():
        raise EvaluationError(f"{path} does not exist: train first with rela train DATA {run}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise EvaluationError(f"{path} is not a rela checkpoint")
    backbone, _ = build_backbone(state["arch"], state["input_size"])
    backbone.load_state_dict(state["backbone"])
    return backbone.eval(), int(state["input_size"])


@torch.inference_mode()
def extract_features(backbone: torch.nn.Module, folder: str | Path, input_size: int, batch_size: int = 256, workers: int = 2, device: str = "auto", progress: bool = True) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """L2-normalised centre-crop features of every image of a class-folder tree.

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
        features.append(torch.nn.functional.normalize(output.float(), dim=1).cpu().numpy())
        labels.append(batch_labels.numpy())
    return np.concatenate(features), np.concatenate(labels).astype(np.int64), images.classes


def knn_accuracy(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray, test_labels: np.ndarray, k: int = 200, temperature: float = 0.1) -> float:
    """Weighted k-nearest-neighbour top-1 accuracy (Wu et al., CVPR 2018; the usual
    self-supervised monitor, k = 200, temperature 0.1): each of the ``k`` most
    cosine-similar training features votes for its class with weight ``exp(s / T)``.

    Args:
        train_features: float32 ``[N, D]``, L2-normalised.
        train_labels: int64 ``[N]``.
        test_features: float32 ``[M, D]``, L2-normalised.
        test_labels: int64 ``[M]``.
        k: neighbours (capped at N).
        temperature: T.

    Returns:
        Top-1 accuracy as a fraction in [0, 1].
    """
    index = faiss.IndexFlatIP(train_features.shape[1])
    index.add(np.ascontiguousarray(train_features, dtype=np.float32))
    similarities, neighbours = index.search(np.ascontiguousarray(test_features, dtype=np.float32), min(k, len(train_features)))
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    votes = np.zeros((len(test_features), num_classes), np.float64)
    rows = np.repeat(np.arange(len(test_features)), neighbours.shape[1])
    np.add.at(votes, (rows, train_labels[neighbours].ravel()), np.exp(similarities.ravel().astype(np.float64) / temperature))
    return float((votes.argmax(axis=1) == test_labels).mean())


def linear_probe(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray, test_labels: np.ndarray, epochs: int = 100, lr: float = 3e-4, batch_size: int = 256, seed: int = 0) -> float:
    """Top-1 accuracy of one linear layer trained on frozen features with Adam
    (the ReLA reference: lr 3e-4, 100 epochs).

    Args:
        train_features, test_features: float32 ``[N, D]`` / ``[M, D]``.
        train_labels, test_labels: int64 ``[N]`` / ``[M]``.

    Returns:
        Top-1 accuracy as a fraction in [0, 1].
    """
    generator = torch.Generator().manual_seed(seed)
    inputs, targets = torch.from_numpy(train_features), torch.from_numpy(train_labels)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    torch.manual_seed(seed)
    layer = torch.nn.Linear(inputs.shape[1], num_classes)
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr)
    for _ in range(epochs):
        for batch in torch.randperm(len(inputs), generator=generator).split(batch_size):
            loss = torch.nn.functional.cross_entropy(layer(inputs[batch]), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        predictions = layer(torch.from_numpy(test_features)).argmax(dim=1).numpy()
    return float((predictions == test_labels).mean())


def evaluate(run: str | Path, train_dir: str | Path, test_dir: str | Path, k: int = 200, temperature: float = 0.1, probe_epochs: int = 0, batch_size: int = 256, workers: int = 2, device: str = "auto", progress: bool = True) -> dict:
    """kNN accuracy (and optionally linear-probe accuracy) of a run's backbone.

    Returns:
        ``{"knn_top1", "num_train", "num_test", "k", "temperature"}`` plus
        ``"linear_top1"`` when ``probe_epochs > 0``; accuracies are fractions in [0, 1].

    Raises:
        EvaluationError: missing checkpoint or different class folders in the two trees.
    """
    backbone, input_size = load_backbone(run)
    train = extract_features(backbone, train_dir, input_size, batch_size, workers, device, progress)
    test = extract_features(backbone, test_dir, input_size, batch_size, workers, device, progress)
    if train[2] != test[2]:
        raise EvaluationError(f"class folders differ between {train_dir} and {test_dir}")
    result = {
        "knn_top1": knn_accuracy(train[0], train[1], test[0], test[1], k, temperature),
        "num_train": len(train[1]), "num_test": len(test[1]), "k": k, "temperature": temperature,
    }
    if probe_epochs > 0:
        result["linear_top1"] = linear_probe(train[0], train[1], test[0], test[1], epochs=probe_epochs)
    return result
