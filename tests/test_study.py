"""``rela study`` and the online kNN monitor on real CIFAR-10 images (issue 9, part 3)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import copy_images

from cli import main
from rela_train.config import StudyOptions, TrainConfig
from rela_train.study import report, study_arms
from rela_train.trainer import Trainer


def test_monitor_writes_knn_before_training_every_n_steps_and_at_the_end(converted_cifar, cifar_root, tmp_path):
    memory = copy_images(cifar_root / "train", tmp_path / "memory", per_class=10)
    queries = copy_images(cifar_root / "test", tmp_path / "queries", per_class=5)
    config = TrainConfig(
        epochs=2,
        batch_size=16,
        data_ratio=0.5,
        workers=0,
        log_every=100,
        monitor_train=str(memory),
        monitor_test=str(queries),
        monitor_every=4,
    )
    run = tmp_path / "run"
    summary = Trainer(converted_cifar, run, config).fit(progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    monitored = [record for record in records if "monitor_knn_top1" in record]
    assert summary["steps"] == 12  # 2 epochs x floor(100 / 16)
    assert [record["step"] for record in monitored] == [0, 4, 8, 12]
    assert [record["images_seen"] for record in monitored] == [0, 64, 128, 192]
    assert all(0.0 <= record["monitor_knn_top1"] <= 1.0 for record in monitored)
    assert len({record["monitor_knn_top1"] for record in monitored}) > 1  # the backbone changed between evaluations


def test_study_arms_share_everything_but_ratio_rule_and_seed():
    config = TrainConfig(epochs=7, batch_size=32, stem="imagenet")
    arms = study_arms(
        config, StudyOptions(ratios=(0.2, 0.5), seeds=(0, 1), subsets=("random", "dedup"), transfer_heads=("fixed",))
    )
    assert [arm.name for arm in arms[:5]] == [
        "seed0-baseline",
        "seed0-rela-r0.2",
        "seed0-rela-r0.2-dedup",
        "seed0-rela-r0.5",
        "seed0-rela-r0.5-dedup",
    ]
    assert len(arms) == 10
    baseline = arms[0].config
    assert (baseline.rela, baseline.data_ratio, baseline.subset) == ("off", 1.0, "random")
    for arm in arms:
        assert (arm.config.epochs, arm.config.batch_size, arm.config.stem) == (7, 32, "imagenet")
    assert {arm.config.rela for arm in arms[1:5]} == {"guarded"}


def test_study_rules_train_each_rule_at_each_ratio_and_off_is_the_method_alone_below_ratio_one():
    config = TrainConfig(epochs=7, batch_size=32, stem="imagenet")
    arms = study_arms(config, StudyOptions(ratios=(0.5, 1.0), seeds=(0,), rules=("guarded", "static:1", "off")))
    assert [(arm.name, arm.config.rela, arm.config.data_ratio) for arm in arms] == [
        ("seed0-baseline", "off", 1.0),
        ("seed0-rela-r0.5", "guarded", 0.5),
        ("seed0-static1-r0.5", "static:1", 0.5),
        ("seed0-off-r0.5", "off", 0.5),
        ("seed0-rela-r1", "guarded", 1.0),
        ("seed0-static1-r1", "static:1", 1.0),
    ]
    with pytest.raises(ValueError, match="nothing to compare"):
        study_arms(config, StudyOptions(rules=("off",)))
    with pytest.raises(ValueError, match="--rela must be"):
        study_arms(config, StudyOptions(rules=("guarded", "sometimes")))


def test_report_verdict_and_warning():
    base = {"subset": "random", "transfer_head": "fixed", "images_seen": 100, "seconds": 1.0, "switch_step": None}
    records = [
        {**base, "seed": 0, "ratio": 1.0, "rela": "off", "knn_top1": 0.40},
        {**base, "seed": 1, "ratio": 1.0, "rela": "off", "knn_top1": 0.42},
        {**base, "seed": 0, "ratio": 0.5, "rela": "adaptive", "knn_top1": 0.45, "switch_step": 30},
        {**base, "seed": 1, "ratio": 0.5, "rela": "adaptive", "knn_top1": 0.41},
        {**base, "seed": 0, "ratio": 0.0, "rela": "untrained", "knn_top1": 0.38, "subset": None, "transfer_head": None},
        {**base, "seed": 1, "ratio": 0.0, "rela": "untrained", "knn_top1": 0.30, "subset": None, "transfer_head": None},
    ]
    text = report(records, TrainConfig(input_size=32, stem="cifar"), StudyOptions(ratios=(0.5,), seeds=(0, 1)))
    assert "ReLA (adaptive) at 0.5 matches or beats the baseline at 100%: seed 0 yes, seed 1 no" in text
    assert "| ReLA (adaptive) | 0.5 | 43.00 | 45.00 / 41.00 |" in text
    assert "| untrained | 0 | 34.00 |" in text
    assert "Warning" in text and "+2.0 points" in text and "(seed 0;" in text  # only 2 points above untrained


def test_study_cli_end_to_end_and_resume(converted_cifar, cifar_root, tmp_path, monkeypatch):
    train_dir = copy_images(cifar_root / "train", tmp_path / "train", per_class=10)
    test_dir = copy_images(cifar_root / "test", tmp_path / "test", per_class=5)
    out = tmp_path / "study"
    args = [
        "study",
        str(converted_cifar),
        str(out),
        "--train-dir",
        str(train_dir),
        "--test-dir",
        str(test_dir),
        "--ratios",
        "0.5",
        "--seeds",
        "0",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--workers",
        "0",
        "--eval-workers",
        "0",
        "--stem",
        "imagenet",
        "--monitor-train",
        str(train_dir),
        "--monitor-test",
        str(test_dir),
        "--monitor-every",
        "3",
        "--rela",
        "static:0.5",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "2 runs" in result.output and "estimated" in result.output
    records = json.loads((out / "results.json").read_text())["records"]
    by_name = {record["name"]: record for record in records}
    assert set(by_name) == {"seed0-baseline", "seed0-rela-r0.5", "seed0-untrained"}
    assert by_name["seed0-baseline"]["images_seen"] == 2 * (200 // 16) * 16
    assert by_name["seed0-rela-r0.5"]["images_seen"] == 2 * (100 // 16) * 16
    assert by_name["seed0-rela-r0.5"]["switch_step"] == 100 // 16  # static:0.5 of 2 epochs: ReLA for epoch 0
    for record in records:
        assert 0.0 <= record["knn_top1"] <= 1.0
    text = (out / "results.md").read_text()
    assert "ReLA (static:0.5) at 0.5 matches or beats the baseline at 100%: seed 0 " in text
    assert "| untrained |" in text and "ReLA rules `static:0.5`, hand-over `warm`" in text
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "untrained-seed0.json").read_text())["input_size"] == 32  # the training size, as the runs
    # Resumed from another working folder with the monitor folders spelt relative to it: the same runs
    monkeypatch.chdir(tmp_path)
    args[args.index("--monitor-train") + 1], args[args.index("--monitor-test") + 1] = "train", "test"
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and again.output.count("(already done)") == 2, again.output
    assert json.loads((out / "results.json").read_text())["records"] == records
