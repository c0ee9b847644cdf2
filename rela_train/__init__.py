"""Stage 2 of ReLA (ReLA-F): stream converted shards and train a target network
with a self-supervised method, accelerated by the ReLA loss until it plateaus
(Sun, Jiang, Lin, NeurIPS 2024, Sec. 4.2).

The public API, for a training loop of one's own (README, "Use ReLA in your own code"; docs/api.md):

- :class:`ConvertedDataset`: a converted dataset (folder or URL) opened for reading;
- :func:`rela_loader`: a DataLoader over one epoch's distilled subset, dicts of two views, standardised targets
  and keys, the batches ``rela train`` trains on;
- :class:`ReLAObjective`: the ReLA loss through the (fixed, random) transfer head, an ``nn.Module``;
- :class:`AdaptiveSwitch` and :class:`StaticSwitch`: when the ReLA phase ends (the reference's rules);
- :class:`GuardedSwitch`, :func:`handover_lr_factor`: this project's guarded hand-over and learning-rate ramp;
- :func:`knn_accuracy` and :func:`linear_probe`: a frozen backbone evaluated on labelled class folders, as
  ``rela eval``;
- :mod:`rela_train.lightning` (needs pytorch-lightning): a ``LightningDataModule`` and a callback that adds the
  ReLA phase to an existing ``LightningModule``.

The names are imported on first use, so ``import rela_train`` (and ``rela --help``) stays light.
"""

from __future__ import annotations

import importlib

#: Public name -> the module that defines it.
PUBLIC = {
    "ConvertedDataset": "rela_convert.dataset.converted",
    "rela_loader": "rela_train.loader",
    "ReLAObjective": "rela_train.rela",
    "AdaptiveSwitch": "rela_train.rela",
    "StaticSwitch": "rela_train.rela",
    "GuardedSwitch": "rela_train.handover",
    "handover_lr_factor": "rela_train.handover",
    "knn_accuracy": "rela_train.evaluate",
    "linear_probe": "rela_train.evaluate",
}

__all__ = sorted(PUBLIC)


def __getattr__(name: str):
    """The public name ``name``, imported from its module on first use.

    Raises:
        AttributeError: not a public name of ``rela_train``.
    """
    if name not in PUBLIC:
        raise AttributeError(f"module 'rela_train' has no attribute {name!r}")
    value = getattr(importlib.import_module(PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(PUBLIC))
