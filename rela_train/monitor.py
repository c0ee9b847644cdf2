"""Online kNN monitor: the backbone's kNN accuracy on small labelled folders while it trains.

``rela train --monitor-train DIR --monitor-test DIR --monitor-every N`` evaluates the backbone before
the first step, every ``N`` optimiser steps and after the last one, and appends one record per
evaluation to ``RUN/metrics.jsonl``; ``rela study`` plots these against images seen. The images are
decoded once (centre crop at the training size, uint8) and kept in memory, so a monitor call costs
only the forward passes: keep the folders small (e.g. 100 train and 50 test images per class).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from lightly.transforms.utils import IMAGENET_NORMALIZE
from torch import nn
from torchvision.datasets import ImageFolder

from rela_train.evaluate import knn_accuracy


def _load_folder(folder: str | Path, input_size: int) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    images = ImageFolder(
        str(folder), transform=T.Compose([T.Resize(input_size), T.CenterCrop(input_size), T.PILToTensor()])
    )
    pixels = (
        torch.stack([image for image, _ in images])
        if len(images)
        else torch.zeros(0, 3, input_size, input_size, dtype=torch.uint8)
    )
    return pixels, np.asarray(images.targets, np.int64), images.classes


class KNNMonitor:
    """Weighted kNN top-1 (k = 200, T = 0.1) of a backbone on two labelled class-folder trees.

    Args:
        train_dir: ``DIR/<class>/<images>``: the kNN memory.
        test_dir: same class folders: the images classified.
        input_size: training input size S, pixels (images are resized and centre-cropped to it).
        batch_size: images per forward pass.

    Raises:
        ValueError: the two trees have different class folders, or one holds no image.
    """

    def __init__(self, train_dir: str | Path, test_dir: str | Path, input_size: int, batch_size: int = 256) -> None:
        self.train_pixels, self.train_labels, classes = _load_folder(train_dir, input_size)
        self.test_pixels, self.test_labels, test_classes = _load_folder(test_dir, input_size)
        if classes != test_classes:
            raise ValueError(f"--monitor-train {train_dir} and --monitor-test {test_dir} have different class folders")
        self.batch_size = batch_size
        self.mean = torch.tensor(IMAGENET_NORMALIZE["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_NORMALIZE["std"]).view(1, 3, 1, 1)

    @torch.no_grad()
    def _features(self, backbone: nn.Module, pixels: torch.Tensor, device: torch.device) -> np.ndarray:
        parts = []
        for batch in pixels.split(self.batch_size):
            images = ((batch.float() / 255 - self.mean) / self.std).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                parts.append(nn.functional.normalize(backbone(images).float(), dim=1).cpu())
        return torch.cat(parts).numpy()

    def __call__(self, backbone: nn.Module, device: torch.device) -> float:
        """kNN top-1 of ``backbone`` (evaluated in eval mode, then put back in its previous mode),
        as a fraction in [0, 1]."""
        was_training = backbone.training
        backbone.eval()
        try:
            train = self._features(backbone, self.train_pixels, device)
            test = self._features(backbone, self.test_pixels, device)
        finally:
            backbone.train(was_training)
        return knn_accuracy(train, self.train_labels, test, self.test_labels)
