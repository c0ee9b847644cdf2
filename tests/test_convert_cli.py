"""``rela convert`` and ``rela inspect`` end to end through the command line."""

from __future__ import annotations

import json

from click.testing import CliRunner
from conftest import RESNET20, copy_images

from cli import main


def test_convert_then_inspect(cifar_root, tmp_path):
    src = copy_images(cifar_root / "test", tmp_path / "src", per_class=6, classes=5)
    out = tmp_path / "out"
    runner = CliRunner()
    args = [
        "convert",
        str(src),
        str(out),
        "--prior",
        f"cifar-resnet:20:{RESNET20}",
        "--shard-size",
        "8",
        "--batch-size",
        "5",
        "--workers",
        "1",
        "--quiet",
    ]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "30 converted, 0 skipped" in result.output

    result = runner.invoke(main, ["inspect", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["num_samples"] == 30 and summary["num_shards"] == 4 and summary["feature_dim"] == 64
    assert summary["prior"] == f"cifar-resnet:20:{RESNET20}"
    assert summary["classes"] == sorted(folder.name for folder in src.iterdir())
    assert summary["bytes"] == sum(path.stat().st_size for path in out.glob("shard-*.tar"))
    assert summary["image_sizes"] == {"shorter_side_min": 32, "shorter_side_median": 32, "shorter_side_max": 32}
    assert summary["default_train_size"] == 32 and summary["order_seed"] == 0

    text = runner.invoke(main, ["inspect", str(out)])
    assert text.exit_code == 0 and "30 samples (webdataset 4 shards" in text.output
    assert "image sizes: shorter side min 32, median 32, max 32 px; default training size 32 px" in text.output
    order = "storage order: seeded pseudo-random, seed 0 (numpy.random.default_rng(seed).permutation(num_files))"
    assert order in text.output

    again = runner.invoke(main, args)
    assert again.exit_code == 0 and "already holds this conversion" in again.output
    reordered = runner.invoke(main, args + ["--order-seed", "3"])
    assert reordered.exit_code == 1 and "order_seed: 0 there, 3 now" in reordered.output


def test_bad_prior_fails_before_any_work(cifar_root, tmp_path):
    src = copy_images(cifar_root / "test", tmp_path / "src", per_class=1, classes=2)
    result = CliRunner().invoke(
        main, ["convert", str(src), str(tmp_path / "out"), "--prior", f"cifar-resnet:20:{tmp_path / 'nope.th'}"]
    )
    assert result.exit_code == 1
    assert (
        result.output.count("\n") == 1
        and result.output.startswith("error: prior")
        and "does not exist" in result.output
    )
    assert not (tmp_path / "out").exists()


def test_inspect_refuses_what_is_not_a_converted_dataset(tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 1 and "has no index.json" in result.output
