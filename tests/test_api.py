"""The public API (``rela_train``): the README's plain-PyTorch example runs as written on real converted CIFAR-10,
and its ReLA phase trains the backbone exactly as ``rela train`` does."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import copy_images

import rela_train
from rela_convert.checkpoint import load_backbone
from rela_train.config import TrainConfig
from rela_train.trainer import Trainer

README = Path(__file__).resolve().parents[1] / "README.md"
EPOCHS, BATCH = 2, 32


def readme_example() -> str:
    """The first ``python`` block of the README's "Use ReLA in your own code" section."""
    section = README.read_text().split("## Use ReLA in your own code", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def knn_folders(cifar_root, small_cifar_tree, tmp_path_factory) -> tuple[Path, Path]:
    """kNN memory: the 200 training images; classified: 10 real CIFAR-10 test images per class."""
    return small_cifar_tree, copy_images(cifar_root / "test", tmp_path_factory.mktemp("knn-test"), per_class=10)


@pytest.fixture(scope="module")
def example(converted_cifar, knn_folders) -> dict:
    """The README example executed verbatim (2 epochs, batch 32, in-process loading): its namespace and output."""
    environment = {
        "RELA_DATA": str(converted_cifar),
        "RELA_KNN_TRAIN": str(knn_folders[0]),
        "RELA_KNN_TEST": str(knn_folders[1]),
        "RELA_EPOCHS": str(EPOCHS),
        "RELA_BATCH": str(BATCH),
        "RELA_WORKERS": "0",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        namespace = {"__name__": "readme_example", "print": lambda *args: namespace["printed"].append(args)}
        namespace["printed"] = []
        exec(compile(readme_example(), str(README), "exec"), namespace)
    return namespace


def test_readme_example_runs_and_reports_knn(example):
    assert example["switch"].switched is False  # a few steps: ReLA throughout
    assert example["switch"].rho is not None and 0 < example["switch"].rho < 0.995
    (line,) = example["printed"]
    accuracy = float(re.fullmatch(r"kNN top-1: (\d\.\d{3})", line[0]).group(1))
    assert 0.1 < accuracy <= 1.0  # 10 classes; the exact value is compared with rela train's below


def test_plain_loop_trains_bit_identically_to_rela_train(example, converted_cifar, knn_folders, tmp_path):
    config = TrainConfig(
        method="byol",
        arch="resnet18",
        stem="imagenet",
        input_size=32,
        batch_size=BATCH,
        epochs=EPOCHS,
        workers=0,
        rela="adaptive",
        handover="reference",
        seed=0,
    )
    summary = Trainer(converted_cifar, tmp_path / "run", config, tensorboard=False).fit(progress=False)
    assert summary["switch_step"] is None and summary["steps"] > 2
    trained, _ = load_backbone(tmp_path / "run")
    mine = example["backbone"].state_dict()
    assert set(mine) == set(trained.state_dict())
    assert all(torch.equal(mine[name], value) for name, value in trained.state_dict().items())
    accuracies = [
        rela_train.knn_accuracy(backbone, *knn_folders, input_size=32, workers=0)
        for backbone in (example["backbone"], trained)
    ]
    print(
        f"kNN top-1 on {len(list(knn_folders[1].rglob('*.jpg')))} test images: plain loop {accuracies[0]:.3f}, "
        f"rela train {accuracies[1]:.3f} (pytest -s shows this line)"
    )
    assert accuracies[0] == accuracies[1]
    assert example["printed"][0][0] == f"kNN top-1: {accuracies[0]:.3f}"


def test_rela_loader_batches(converted_cifar):
    dataset = rela_train.ConvertedDataset(converted_cifar)
    loader = rela_train.rela_loader(dataset, batch_size=16, seed=3, epoch=1, workers=0, target_dim=32)
    batches = list(loader)
    ratio = float(dataset.index.subset["data_ratio"])
    assert len(batches) == len(loader) == int(ratio * dataset.num_samples) // 16
    batch = batches[0]
    assert batch["view1"].shape == batch["view2"].shape == (16, 3, 32, 32) and batch["view1"].dtype == torch.float32
    assert batch["target"].shape == (16, 32) and batch["target"].dtype == torch.float32
    assert batch["key"].dtype == torch.int64 and batch["key"].shape == (16,)
    keys = torch.cat([batch["key"] for batch in batches]).numpy()
    assert len(np.unique(keys)) == len(keys) and np.isin(keys, dataset.keys).all()
    assert not torch.equal(batch["view1"], batch["view2"])  # two random views
    # The same call gives the same batches; another epoch another subset.
    again = next(iter(rela_train.rela_loader(dataset, batch_size=16, seed=3, epoch=1, workers=0, target_dim=32)))
    assert all(torch.equal(batch[name], again[name]) for name in batch)
    other = next(iter(rela_train.rela_loader(dataset, batch_size=16, seed=3, epoch=2, workers=0, target_dim=32)))
    assert not torch.equal(batch["key"], other["key"])
    # The targets are the standardised PCA projection of the stored features (d = min(512, D_prior) by default).
    full = next(iter(rela_train.rela_loader(dataset, batch_size=16, seed=3, epoch=1, workers=0)))
    assert full["target"].shape[1] == dataset.pca.feature_dim
    assert torch.allclose(full["target"][:, :32], batch["target"], atol=1e-5)
    method_views = next(iter(rela_train.rela_loader(dataset, batch_size=16, seed=3, epoch=1, workers=0, views="byol")))
    assert torch.equal(method_views["key"], batch["key"]) and not torch.equal(method_views["view1"], batch["view1"])


def test_rela_loader_bad_input(converted_cifar):
    with pytest.raises(ValueError, match="views is 'rela' or a method name"):
        rela_train.rela_loader(converted_cifar, batch_size=16, views="mae")
    with pytest.raises(ValueError, match="data_ratio must be in"):
        rela_train.rela_loader(converted_cifar, batch_size=16, data_ratio=1.5)
    with pytest.raises(ValueError, match="less than one step"):
        rela_train.rela_loader(converted_cifar, batch_size=1000)
    with pytest.raises(ValueError, match="cache_dir is for a dataset given as a URL"):
        rela_train.rela_loader(converted_cifar, batch_size=16, cache_dir="cache")


def test_rela_objective():
    torch.manual_seed(1)
    objective = rela_train.ReLAObjective(8, 4, seed=5)
    torch.manual_seed(2)  # the head's initialisation ignores the global generator
    assert torch.equal(rela_train.ReLAObjective(8, 4, seed=5).weight, objective.weight)
    assert not torch.equal(rela_train.ReLAObjective(8, 4, seed=6).weight, objective.weight)
    assert not any(p.requires_grad for p in objective.parameters())  # fixed, as the reference
    assert all(p.requires_grad for p in rela_train.ReLAObjective(8, 4, "trained").parameters())
    features = torch.randn(6, 8, requires_grad=True)
    targets = objective.project(features).detach()
    loss = objective(features, features, targets)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert objective(features, features, -targets).item() == pytest.approx(2.0, abs=1e-6)
    objective(features, torch.randn(6, 8), targets).backward()
    assert features.grad is not None
    with pytest.raises(ValueError, match="unknown transfer head"):
        rela_train.ReLAObjective(8, 4, "learned")
    with pytest.raises(ValueError, match="got features of size 7"):
        objective(torch.randn(2, 7), torch.randn(2, 7), torch.randn(2, 4))


def test_switches():
    switch = rela_train.AdaptiveSwitch()
    steps = 0
    while not switch.update(0.3):
        steps += 1
    assert switch.rho >= 0.995 and steps > 100
    restored = rela_train.AdaptiveSwitch()
    restored.load_state_dict(switch.state_dict())
    assert restored == switch
    with pytest.raises(ValueError, match="finite loss"):
        restored.update(float("nan"))
    static = rela_train.StaticSwitch(0.5, 5)
    assert [static.update(epoch) for epoch in range(4)] == [False, False, True, True]
    with pytest.raises(ValueError, match="0 <= c <= 1"):
        rela_train.StaticSwitch(1.5, 5)
    assert set(rela_train.__all__) <= set(dir(rela_train))
    with pytest.raises(AttributeError):
        rela_train.Trainer  # noqa: B018  not a public name
