"""TensorBoard logging (``rela train --tensorboard``): the same numbers as metrics.jsonl, as scalars."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cli import main
from rela_train.metrics import MetricsLog

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """``tag -> [(step, value)]`` of the TensorBoard event files in ``folder``."""
    accumulator = event_accumulator.EventAccumulator(str(folder))
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]
    }


def test_a_short_run_logs_the_metrics_as_tensorboard_scalars(converted_cifar, tmp_path):
    run = tmp_path / "run"
    args = ["train", str(converted_cifar), str(run), "--epochs", "2", "--batch-size", "16", "--stem", "imagenet"]
    args += ["--input-size", "32", "--workers", "0", "--data-ratio", "0.5", "--rela", "static:0.5"]
    result = CliRunner().invoke(main, args + ["--log-every", "2", "--tensorboard", "--quiet"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [2, 4, 6, 8, 10, 12]
    logged = scalars(run / "tensorboard")
    assert [step for step, _ in logged["loss"]] == [record["step"] for record in records]
    assert [value for _, value in logged["loss"]] == pytest.approx([record["loss"] for record in records], rel=1e-6)
    # None (rela_loss and rho after the switch, rho under the static rule) is not a number: no scalar.
    assert [step for step, _ in logged["rela_loss"]] == [2, 4, 6]
    assert "rho" not in logged and "phase" not in logged and "step" not in logged
    assert {"lr", "images_per_s", "images_seen", "epoch"} <= set(logged)


def test_resumed_logs_hide_the_steps_after_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=True)
    for step in range(1, 6):
        log.write({"step": step, "loss": float(step), "rho": None})
    log.close()
    log = MetricsLog(tmp_path, tensorboard=True)  # the run resumes from its checkpoint at step 3
    log.truncate_after(3)
    for step in (4, 5):
        log.write({"step": step, "loss": 10.0 * step, "rho": None})
    log.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(line["step"], line["loss"]) for line in lines] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    assert scalars(tmp_path / "tensorboard")["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]


def test_without_the_package_tensorboard_is_off_by_default_and_refused_on_request(
    converted_cifar, tmp_path, monkeypatch
):
    from rela_train.config import TrainConfig
    from rela_train.trainer import Trainer

    monkeypatch.setattr("rela_train.trainer.tensorboard_available", lambda: False)
    assert Trainer(converted_cifar, tmp_path / "run", TrainConfig(batch_size=16, workers=0)).tensorboard is False
    result = CliRunner().invoke(main, ["train", str(converted_cifar), str(tmp_path / "run"), "--tensorboard"])
    assert result.exit_code == 1
    assert result.output.strip() == "error: --tensorboard needs the tensorboard package: pip install tensorboard"


def test_a_killed_run_resumes_with_one_record_and_one_scalar_per_step(converted_cifar, tmp_path):
    from rela_train.config import TrainConfig
    from rela_train.trainer import Trainer

    config = TrainConfig(epochs=2, batch_size=16, data_ratio=0.5, workers=0, log_every=1, stem="imagenet")
    killed = Trainer(converted_cifar, tmp_path, config, tensorboard=True)
    train_step = killed.train_step

    def dies_in_the_second_epoch(*args):
        if killed.step == 8:  # epoch 0 has 6 steps and its checkpoint; steps 7 and 8 are logged, then a kill
            raise KeyboardInterrupt
        return train_step(*args)

    killed.train_step = dies_in_the_second_epoch
    with pytest.raises(KeyboardInterrupt):
        killed.fit(progress=False)
    before = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in before] == list(range(1, 9))
    assert Trainer(converted_cifar, tmp_path, config, tensorboard=True).fit(progress=False)["steps"] == 12
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == list(range(1, 13))
    assert records[:6] == before[:6]  # the checkpointed epoch is kept; steps 7 and 8 were trained again
    logged = scalars(tmp_path / "tensorboard")["loss"]  # the killed run's steps 7 and 8 are purged
    assert logged == [(record["step"], pytest.approx(record["loss"], rel=1e-6)) for record in records]
