"""Online kNN monitor: the backbone's kNN accuracy on small labelled folders while it trains.

``rela train --monitor-train DIR --monitor-test DIR --monitor-every N`` evaluates the backbone before
the first step, every ``N`` optimiser steps and after the last one, and appends one record per
evaluation to ``RUN/metrics.jsonl``; ``rela study`` plots these against images seen. The images are
decoded once (centre crop at the training size, uint8) and kept in memory, so a monitor call costs
only the forward passes: keep the folders small (e.g. 100 train and 50 test images per class).

The folders are read with the same rules as ``rela eval`` (:func:`rela_train.evaluate.labelled_folder`,
the conversion's): a file that cannot be decoded, or is not an image file, is skipped with its reason,
listed in :attr:`KNNMonitor.skipped` and counted in one warning line (logger ``rela_train.monitor``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from lightly.transforms.utils import IMAGENET_NORMALIZE
from torch import nn

from rela_train.evaluate import FolderImages, knn_top1, labelled_folder, nothing_decoded

LOGGER = logging.getLogger(__name__)


def _load_folder(folder: str | Path, input_size: int) -> tuple[torch.Tensor, np.ndarray, list[str], list[dict]]:
    """uint8 ``[N, 3, S, S]`` centre crops, int64 ``[N]`` labels, class names and skipped ``{"path", "reason"}``
    of a class-folder tree.

    Raises:
        EvaluationError: no class folder with images, or no image that decodes.
    """
    listed = labelled_folder(folder)
    images = FolderImages(listed, T.Compose([T.Resize(input_size), T.CenterCrop(input_size), T.PILToTensor()]))
    items = [images[position] for position in range(len(images))]
    good = [item for item in items if "pixels" in item]
    undecoded = [
        listed.skip_record(listed.files[item["position"]], item["reason"]) for item in items if "reason" in item
    ]
    if not good:
        raise nothing_decoded(folder, undecoded)
    skipped = sorted(listed.skipped + undecoded, key=lambda item: item["path"])
    labels = np.asarray([item["label"] for item in good], np.int64)
    return torch.stack([item["pixels"] for item in good]), labels, listed.classes, skipped


class KNNMonitor:
    """Weighted kNN top-1 (k = 200, T = 0.1) of a backbone on two labelled class-folder trees.

    Args:
        train_dir: ``DIR/<class>/<images>``: the kNN memory.
        test_dir: same class folders: the images classified.
        input_size: training input size S, pixels (images are resized and centre-cropped to it).
        batch_size: images per forward pass.

    Attributes:
        skipped: ``{"path", "reason"}`` of every file of the two trees left out (not an image file, not in a
            class folder, cannot be decoded; see :func:`rela_train.evaluate.labelled_folder`), sorted by path.

    Raises:
        ValueError: the two trees have different class folders, or one holds no class folder with images or
            no image that decodes (:class:`~rela_train.evaluate.EvaluationError`).
    """

    def __init__(self, train_dir: str | Path, test_dir: str | Path, input_size: int, batch_size: int = 256) -> None:
        self.train_pixels, self.train_labels, classes, train_skipped = _load_folder(train_dir, input_size)
        self.test_pixels, self.test_labels, test_classes, test_skipped = _load_folder(test_dir, input_size)
        if classes != test_classes:
            raise ValueError(f"--monitor-train {train_dir} and --monitor-test {test_dir} have different class folders")
        self.skipped = train_skipped + test_skipped
        if self.skipped:
            first = self.skipped[0]
            LOGGER.warning(
                "online kNN monitor: %d files of %s and %s skipped (first: %s: %s)",
                len(self.skipped),
                train_dir,
                test_dir,
                first["path"],
                first["reason"],
            )
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
        return knn_top1(train, self.train_labels, test, self.test_labels)
