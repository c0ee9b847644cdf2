"""``rela convert --nproc 2`` (two CPU processes, gloo) makes the same dataset as one process."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch
from click.testing import CliRunner
from conftest import PROJECT, RESNET20, copy_images, stored_samples

from cli import main
from rela_convert.dataset.index import DatasetIndex
from rela_convert.dataset.pca import PCAStatistics


def test_two_processes_make_the_same_dataset(cifar_root, tmp_path):
    src = copy_images(cifar_root / "test", tmp_path / "src", per_class=6)  # 60 images
    (src / "cat" / "empty.jpg").write_bytes(b"")  # one skip, in one process's shard
    arguments = [
        "--prior",
        f"cifar-resnet:20:{RESNET20}",
        "--format",
        "both",
        "--shard-size",
        "7",
        "--batch-size",
        "4",
        "--workers",
        "1",
        "--quiet",
    ]
    two = subprocess.run(
        [sys.executable, "-m", "cli", "convert", str(src), str(tmp_path / "two"), *arguments, "--nproc", "2"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("60 converted, 1 skipped") == 1  # one summary, from process 0
    one = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "one"), *arguments])
    assert one.exit_code == 0, one.output

    files = {folder: sorted(path.name for path in (tmp_path / folder).iterdir()) for folder in ("one", "two")}
    assert (
        files["one"] == files["two"] and len([name for name in files["one"] if name.startswith("shard-")]) == 18
    )  # 9 shards x 2 formats
    for name in files["one"]:
        if name not in ("index.json", "pca.npz"):
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name

    # Samples and features are identical; the PCA statistics sum the same moments in
    # another order (an all-reduce of per-process sums), so they agree to float64 rounding.
    index = {folder: DatasetIndex.load(tmp_path / folder) for folder in ("one", "two")}
    for folder in index:
        index[folder].pca.pop("sha256")
    assert index["one"] == index["two"]
    samples = {folder: stored_samples(tmp_path / folder, "hdf5") for folder in ("one", "two")}
    assert len(samples["one"]) == 60
    for a, b in zip(samples["one"], samples["two"], strict=True):
        assert a["key"] == b["key"] and a["relpath"] == b["relpath"] and np.array_equal(a["feature"], b["feature"])
    pca = {folder: PCAStatistics.load(tmp_path / folder / "pca.npz") for folder in ("one", "two")}
    assert np.array_equal(pca["one"].mean, pca["two"].mean) and pca["one"].count == pca["two"].count == 60
    assert np.allclose(pca["one"].eigenvalues, pca["two"].eigenvalues, rtol=1e-9, atol=1e-12)
    # Targets use the components of non-zero eigenvalues only (60 samples span < 64 dimensions).
    features = torch.from_numpy(np.stack([sample["feature"] for sample in samples["one"]]))
    assert torch.allclose(pca["one"].targets(features, 512), pca["two"].targets(features, 512), atol=1e-6)
