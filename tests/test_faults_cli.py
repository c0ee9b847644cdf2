"""Failures a user can cause end in one ``error:`` line naming the fix (the traceback only with ``rela --debug``);
bad files in evaluation folders are skipped with their reason, as conversion skips them.

Real data: the 200 converted CIFAR-10 images of ``converted_cifar`` (copied before damaging), real CIFAR-10
JPEGs for the evaluation folders, one tiny trained run (MobileNet-V3-small, 1 epoch, 6 steps).
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import RESNET20, RESNET56, copy_images
from PIL import Image

from cli import main

#: A tiny training run: 1 epoch of floor(0.5 x 200) images in batches of 16 (6 steps), small network.
TINY = [
    "--epochs", "1", "--batch-size", "16", "--stem", "imagenet", "--input-size", "32", "--workers", "0",
    "--arch", "mobilenet_v3_small", "--quiet",
]  # fmt: skip


def invoke(*args, debug: bool = False):
    """``rela [--debug] ARGS`` in-process; returns click's Result (``output`` holds stdout and stderr)."""
    return CliRunner().invoke(main, (["--debug"] if debug else []) + [str(arg) for arg in args])


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def assert_one_line_error(result, *fragments: str, debug: bool = False) -> str:
    """The command failed with exactly one ``error:`` line holding every fragment, and a traceback only when
    ``debug``; returns the line."""
    assert result.exit_code == 1, result.output
    lines = error_lines(result)
    assert len(lines) == 1, result.output
    assert ("Traceback" in result.output) == debug, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "RELA_DEBUG" not in os.environ  # --debug lasts one command
    return lines[0]


@pytest.fixture(autouse=True)
def no_debug_environment(monkeypatch):
    monkeypatch.delenv("RELA_DEBUG", raising=False)


@pytest.fixture(scope="module")
def trained_run(converted_cifar, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("faults") / "run"
    result = invoke("train", converted_cifar, run, *TINY, "--data-ratio", "0.5")
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture(scope="module")
def eval_dirs(cifar_root, tmp_path_factory) -> tuple[Path, Path]:
    """Real labelled CIFAR-10 folders: 3 train and 2 test images per class."""
    root = tmp_path_factory.mktemp("eval-dirs")
    return copy_images(cifar_root / "train", root / "train", 3), copy_images(cifar_root / "test", root / "test", 2)


@pytest.fixture
def damaged(converted_cifar, tmp_path) -> Path:
    """A copy of ``converted_cifar`` whose second shard is gone in both formats."""
    data = Path(shutil.copytree(converted_cifar, tmp_path / "data"))
    for name in ("shard-000001.h5", "shard-000001.tar"):
        (data / name).unlink()
    return data


def test_missing_shard_is_one_line_before_any_work(damaged, eval_dirs, tmp_path):
    train_dir, test_dir = eval_dirs
    commands = {
        "train": ["train", damaged, tmp_path / "run", *TINY],
        "select": ["select", damaged, "--subset", "balanced", "--quiet"],
        "study": ["study", damaged, tmp_path / "study", "--train-dir", train_dir, "--test-dir", test_dir, *TINY[:-1]],
    }
    for name, args in commands.items():
        line = assert_one_line_error(invoke(*args), "shard-000001.h5 is missing", "--verify", "rela convert")
        assert "--prior cifar-resnet:20:" in line, name  # the command that converts it again, from the index
    assert not (tmp_path / "run").exists() and not (tmp_path / "study").exists()  # nothing started
    assert_one_line_error(invoke(*commands["train"], debug=True), "shard-000001.h5", debug=True)
    (damaged / "keys.npy").unlink()
    assert_one_line_error(invoke(*commands["select"]), "(and 1 more bad files)")


def test_truncated_shard_and_missing_pca(converted_cifar, tmp_path):
    data = Path(shutil.copytree(converted_cifar, tmp_path / "data"))
    with open(data / "shard-000002.h5", "r+b") as handle:
        handle.truncate(1000)
    assert_one_line_error(invoke("train", data, tmp_path / "run", *TINY), "shard-000002.h5 has 1000 bytes")
    assert invoke("select", data, "--storage", "webdataset", "--subset", "balanced", "--quiet").exit_code == 0
    (data / "pca.npz").unlink()
    assert_one_line_error(invoke("select", data, "--storage", "webdataset", "--subset", "balanced"), "pca.npz")


def bad_test_dir(test_dir: Path, target: Path) -> Path:
    """``test_dir`` plus a truncated PNG (half of a real image's PNG bytes) and a text file."""
    shutil.copytree(test_dir, target)
    first = sorted((target / "cat").iterdir())[0]
    encoded = io.BytesIO()
    Image.open(first).save(encoded, "PNG")
    (target / "cat" / "truncated.png").write_bytes(encoded.getvalue()[: len(encoded.getvalue()) // 2])
    (target / "dog" / "notes.txt").write_text("not an image\n")
    return target


def test_eval_skips_undecodable_and_non_image_files(trained_run, eval_dirs, tmp_path):
    train_dir, test_dir = eval_dirs
    bad = bad_test_dir(test_dir, tmp_path / "test")
    result = invoke("eval", trained_run, "--train-dir", train_dir, "--test-dir", bad, "--workers", "0", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["num_skipped"] == 2 and report["num_test"] == 20 and report["num_train"] == 30
    reasons = {Path(item["path"]).name: item["reason"] for item in report["skipped"]}
    assert reasons["truncated.png"].startswith("corrupt or truncated image data")
    assert reasons["notes.txt"].startswith("not an image file extension")
    listed = [json.loads(line) for line in Path(report["skipped_file"]).read_text().splitlines()]
    assert listed == report["skipped"]
    text = invoke("eval", trained_run, "--train-dir", train_dir, "--test-dir", bad, "--workers", "0", "--quiet")
    assert text.exit_code == 0 and "2 files skipped (reasons in" in text.output, text.output


def test_monitor_skips_undecodable_files_and_lists_them_in_run(converted_cifar, eval_dirs, tmp_path):
    train_dir, test_dir = eval_dirs
    bad = bad_test_dir(test_dir, tmp_path / "test")
    run = tmp_path / "run"
    monitor = ["--monitor-train", train_dir, "--monitor-test", bad, "--monitor-every", "3"]
    result = invoke("train", converted_cifar, run, *TINY, "--data-ratio", "0.5", *monitor)
    assert result.exit_code == 0, result.output
    listed = [json.loads(line) for line in (run / "monitor_skipped.jsonl").read_text().splitlines()]
    assert sorted(Path(item["path"]).name for item in listed) == ["notes.txt", "truncated.png"]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    accuracies = [line["monitor_knn_top1"] for line in lines if "monitor_knn_top1" in line]
    assert len(accuracies) == 3 and all(0.0 <= value <= 1.0 for value in accuracies)  # steps 0, 3 and 6


def test_disk_full_while_saving_the_checkpoint(converted_cifar, tmp_path, monkeypatch):
    import rela_convert.checkpoint

    write = rela_convert.checkpoint.write_atomic

    def full_disk(path, data):
        if Path(path).name.startswith("checkpoint"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        write(path, data)

    monkeypatch.setattr(rela_convert.checkpoint, "write_atomic", full_disk)
    for debug in (False, True):
        result = invoke("train", converted_cifar, tmp_path / f"run{debug}", *TINY, "--data-ratio", "0.5", debug=debug)
        assert_one_line_error(result, "No space left on device", "run the same command again", debug=debug)


def test_disk_full_while_converting_then_resume(small_cifar_tree, tmp_path, monkeypatch):
    import rela_convert.convert

    write = rela_convert.convert.write_atomic

    def full_disk(path, data):
        if Path(path).name == "keys.npy":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        write(path, data)

    args = ["convert", small_cifar_tree, tmp_path / "data", "--prior", "rand:resnet18@32", "--workers", "0", "--quiet"]
    monkeypatch.setattr(rela_convert.convert, "write_atomic", full_disk)
    assert_one_line_error(invoke(*args), "keys.npy: No space left on device", "run the same command again")
    monkeypatch.setattr(rela_convert.convert, "write_atomic", write)
    resumed = invoke(*args)
    assert resumed.exit_code == 0 and "200 converted" in resumed.output, resumed.output


@pytest.fixture(scope="module")
def other_prior_dataset(small_cifar_tree, tmp_path_factory) -> Path:
    """``small_cifar_tree`` converted with a random ResNet-18 prior (512-d features, not 64-d)."""
    out = tmp_path_factory.mktemp("data512") / "data"
    result = invoke(
        "convert", small_cifar_tree, out, "--prior", "rand:resnet18@32", "--format", "hdf5", "--workers", "0", "--quiet"
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def other_datasets(small_cifar_tree, eval_dirs, tmp_path_factory) -> dict[str, Path]:
    """Two 64-d datasets a run on ``converted_cifar`` (CIFAR ResNet-20 prior) must not resume on: the same
    images with the CIFAR ResNet-56 prior (``resnet56``), other images with the ResNet-20 prior (``images``); HDF5
    as ``converted_cifar`` reads by default (the storage format is one of a run's options)."""
    root = tmp_path_factory.mktemp("other-datasets")
    jobs = {
        "resnet56": (small_cifar_tree, f"cifar-resnet:56:{RESNET56}"),
        "images": (eval_dirs[0], f"cifar-resnet:20:{RESNET20}"),
    }
    for name, (tree, prior) in jobs.items():
        result = invoke("convert", tree, root / name, "--prior", prior, "--format", "hdf5", "--workers", "0", "--quiet")
        assert result.exit_code == 0, result.output
    return {name: root / name for name in jobs}


def garbage_checkpoint(run: Path) -> Path:
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint" * 100)
    return run


def foreign_checkpoint(run: Path) -> Path:
    run.mkdir()
    torch.save({"weights": torch.zeros(3)}, run / "checkpoint.pt")
    return run


def one_class(folder: Path, target: Path) -> Path:
    """A copy of the first class folder of ``folder`` alone."""
    first = sorted(folder.iterdir())[0]
    shutil.copytree(first, target / first.name)
    return target


def undecodable(folder: Path) -> Path:
    """A class-folder tree whose one image file is not an image."""
    (folder / "cat").mkdir(parents=True)
    (folder / "cat" / "0000.jpg").write_bytes(b"not a JPEG")
    return folder


def bad_toml(path: Path) -> Path:
    path.write_text("epochs = [\n")
    return path


#: User-caused failures: name -> (arguments given the fixtures, fragment of the error line).
FAULTS = {
    "data-not-converted": (lambda f: ["train", f["tmp"], f["tmp"] / "run", *TINY], "no index.json"),
    "inspect-not-converted": (lambda f: ["inspect", f["tmp"]], "no index.json"),
    "eval-run-without-checkpoint": (
        lambda f: ["eval", f["tmp"], "--train-dir", f["train"], "--test-dir", f["test"]],
        "train first",
    ),
    "eval-corrupt-checkpoint": (
        lambda f: ["eval", garbage_checkpoint(f["tmp"] / "run"), "--train-dir", f["train"], "--test-dir", f["test"]],
        "cannot be read as a rela checkpoint",
    ),
    "train-resumes-unknown-checkpoint": (
        lambda f: ["train", f["data"], foreign_checkpoint(f["tmp"] / "run"), *TINY],
        "not 'rela-checkpoint-v2'",
    ),
    "eval-train-dir-without-class-folders": (
        lambda f: ["eval", f["run"], "--train-dir", f["tmp"], "--test-dir", f["test"]],
        "no class folder with images",
    ),
    "eval-test-dir-of-loose-images": (
        lambda f: ["eval", f["run"], "--train-dir", f["train"], "--test-dir", f["train"] / "cat"],
        "no class folder with images",
    ),
    "eval-test-dir-without-decodable-image": (
        lambda f: ["eval", f["run"], "--train-dir", f["train"], "--test-dir", undecodable(f["tmp"] / "broken")],
        "none of the 1 image files",
    ),
    "eval-class-folders-differ": (
        lambda f: ["eval", f["run"], "--train-dir", f["train"], "--test-dir", one_class(f["test"], f["tmp"] / "one")],
        "class folders differ",
    ),
    "study-class-folders-differ-before-training": (
        lambda f: [
            "study",
            f["data"],
            f["tmp"] / "study",
            "--train-dir",
            f["train"],
            "--test-dir",
            one_class(f["test"], f["tmp"] / "one"),
            *TINY[:-1],
        ],
        "class folders differ",
    ),
    "run-with-other-options": (
        lambda f: ["train", f["data"], f["run"], *TINY, "--data-ratio", "0.5", "--rela", "off"],
        "other options",
    ),
    "run-on-dataset-of-another-prior-dimension": (
        lambda f: ["train", f["data512"], f["run"], *TINY, "--data-ratio", "0.5"],
        "64-d prior targets",
    ),
    "run-on-other-images": (
        lambda f: ["train", f["other"]["images"], f["run"], *TINY, "--data-ratio", "0.5"],
        "holds other samples",
    ),
    "run-on-the-same-images-with-another-prior": (
        lambda f: ["train", f["other"]["resnet56"], f["run"], *TINY, "--data-ratio", "0.5"],
        "holds other prior features (prior cifar-resnet:56",
    ),
    "bad-toml-config": (
        lambda f: ["train", f["data"], f["tmp"] / "run", "--config", bad_toml(f["tmp"] / "c.toml")],
        "TOML",
    ),
}


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_user_failure_is_one_line(
    fault, debug, converted_cifar, other_prior_dataset, other_datasets, trained_run, eval_dirs, tmp_path
):
    arguments, fragment = FAULTS[fault]
    fixtures = {
        "tmp": tmp_path,
        "data": converted_cifar,
        "data512": other_prior_dataset,
        "other": other_datasets,
        "run": trained_run,
        "train": eval_dirs[0],
        "test": eval_dirs[1],
    }
    line = assert_one_line_error(invoke(*arguments(fixtures), debug=debug), fragment, debug=debug)
    if fault == "run-on-dataset-of-another-prior-dimension":
        assert "512-d" in line and "another RUN" in line


def test_a_baseline_run_is_shared_by_datasets_of_the_same_images_with_other_priors(
    converted_cifar, other_datasets, other_prior_dataset, tmp_path
):
    run = tmp_path / "baseline"
    trained = invoke("train", converted_cifar, run, *TINY, "--rela", "off")
    assert trained.exit_code == 0, trained.output
    for shared in (other_datasets["resnet56"], other_prior_dataset):  # 64-d and 512-d prior features
        again = invoke("train", shared, run, *TINY, "--rela", "off")
        assert again.exit_code == 0 and "nothing to do" in again.output, again.output
    refused = invoke("train", other_datasets["images"], run, *TINY, "--rela", "off")
    assert refused.exit_code != 0 and "holds other samples" in refused.output


def test_a_bug_prints_its_traceback(converted_cifar, monkeypatch):
    from rela_convert.dataset.index import DatasetIndex

    def broken(self):
        raise TypeError("a bug")

    monkeypatch.setattr(DatasetIndex, "summary", broken)
    result = invoke("inspect", converted_cifar)
    assert result.exit_code == 1 and "Traceback" in result.output
    assert error_lines(result) == [
        "error: unexpected TypeError: a bug (a bug in rela: please report it with the traceback above)"
    ]
