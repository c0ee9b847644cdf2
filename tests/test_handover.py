"""The hand-over from ReLA to the method (issue 26): warm heads, the guarded rule's trials and rollbacks, the ramp."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import Killed, copy_images, kill_at_step

from rela_convert.checkpoint import load_checkpoint
from rela_train.config import TrainConfig
from rela_train.handover import BACKOFF_INTERVALS, GuardedSwitch, handover_lr_factor
from rela_train.trainer import Trainer

STEPS = 100 // 16  # per epoch: floor(0.5 x 200 samples) // batch 16


def config(**options) -> TrainConfig:
    """A tiny in-process run on the 200 real CIFAR-10 images: ResNet-18, 32 px, batch 16, 6 steps per epoch."""
    options = {"epochs": 1, "data_ratio": 0.5, "workers": 0, "storage": "webdataset", "method": "simclr", **options}
    return TrainConfig(arch="resnet18", stem="imagenet", input_size=32, batch_size=16, log_every=1, **options)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def head_parameters(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The method's trainable parameters outside the backbone (its heads), copied."""
    return {
        name: parameter.detach().clone()
        for name, parameter in trainer.model.method.named_parameters()
        if parameter.requires_grad and not name.startswith("backbone.")
    }


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_warm_heads_train_the_heads_and_leave_the_backbone_exactly_as_rela_alone(converted_cifar, tmp_path, method):
    trained = {}
    for handover in ("reference", "warm"):
        trainer = Trainer(
            converted_cifar, tmp_path / handover, config(method=method, rela="static:1", handover=handover)
        )
        heads_before = head_parameters(trainer)
        trainer.fit(progress=False)
        moved = [not torch.equal(heads_before[name], value) for name, value in head_parameters(trainer).items()]
        trained[handover] = (trainer.model.method.backbone.state_dict(), moved)
        lines = [line for line in records(tmp_path / handover) if "loss" in line]
        assert all(line["phase"] == "rela" for line in lines)
        if handover == "warm":  # the loss optimised adds the heads' loss; the ReLA loss is logged apart
            assert all(line["loss"] != line["rela_loss"] for line in lines)
    reference, warm = trained["reference"], trained["warm"]
    assert not any(reference[1]) and all(warm[1])  # cold heads never moved during ReLA; every warm one did
    assert reference[0].keys() == warm[0].keys()
    assert all(torch.equal(reference[0][key], warm[0][key]) for key in reference[0])


def test_guarded_switch_starts_on_a_plateau_keeps_a_trial_that_gains_and_backs_off_after_a_rejection():
    guard = GuardedSwitch(interval=10)
    assert guard.decide(0, 0.20, plateau=True) is None  # no earlier reading: ReLA's gain is unknown
    assert guard.decide(10, 0.30, plateau=False) is None  # no plateau
    assert guard.decide(20, 0.34, plateau=True) == "start"
    guard.apply("start", 20)
    assert not guard.rela_active and guard.rela_gain == pytest.approx(0.04)
    assert guard.decide(25, 0.50, plateau=True) is None  # the trial lasts one interval
    assert guard.decide(30, 0.37, plateau=True) == "rollback"  # +0.03 < ReLA's +0.04 per interval
    guard.apply("rollback", 30)
    assert guard.rela_active and guard.next_trial == 30 + 10 * BACKOFF_INTERVALS
    assert guard.decide(40, 0.36, plateau=True) is None  # backing off
    assert guard.decide(70, 0.38, plateau=True) == "start"  # ReLA's gain since 40: +0.02 over 3 intervals
    guard.apply("start", 70)
    assert guard.rela_gain == pytest.approx(0.02 / 3)
    assert guard.decide(80, 0.39, plateau=True) == "keep"
    guard.apply("keep", 80)
    assert guard.phase == "method" and guard.decide(90, 0.1, plateau=True) is None  # for good
    assert [trial["kept"] for trial in guard.trials] == [False, True]
    with pytest.raises(ValueError):
        guard.apply("jump", 90)


def test_a_trial_still_running_at_the_end_is_judged_pro_rata_and_a_falling_one_is_rolled_back():
    guard = GuardedSwitch(interval=10, previous=[0, 0.30])
    assert guard.decide(10, 0.30, plateau=True) == "start"  # ReLA gained nothing: the method only must not lose
    guard.apply("start", 10)
    assert guard.decide(14, 0.29, plateau=True, last=True) == "rollback"
    second = GuardedSwitch(interval=10, previous=[0, 0.30])
    assert second.decide(10, 0.30, plateau=True, last=True) is None  # no trial starts at the last step


def test_a_trial_within_the_monitors_noise_of_relas_gain_is_kept():
    for end, action in ((0.305, "keep"), (0.295, "rollback")):
        guard = GuardedSwitch(interval=10, tolerance=0.02, previous=[0, 0.28])
        assert guard.decide(10, 0.30, plateau=True) == "start"  # ReLA gained 0.02 over the interval before
        guard.apply("start", 10)
        assert guard.decide(20, end, plateau=True) == action  # kept from 0.30 + 0.02 - 0.02 on


def test_handover_lr_factor():
    assert handover_lr_factor(5, None, 4) == handover_lr_factor(5, 6, 4) == handover_lr_factor(9, 6, 0) == 1.0
    assert [handover_lr_factor(step, 6, 4) for step in range(6, 11)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_the_ramp_raises_the_learning_rate_after_the_switch(converted_cifar, tmp_path):
    run = tmp_path / "run"
    Trainer(converted_cifar, run, config(epochs=2, rela="static:0.5", handover_ramp=3)).fit(progress=False)
    rates = [line["lr"] for line in records(run) if "lr" in line]
    assert rates == pytest.approx([1e-3] * STEPS + [1e-3 / 3, 2e-3 / 3] + [1e-3] * (STEPS - 2))


class ScriptedMonitor:
    """Stands in for the online kNN monitor: ReLA gains 0.01 a step; the first trial loses 0.2 over its interval
    (more than the noise tolerated with 20 test images, 0.5 / sqrt(20) = 0.11), every later one gains 0.2 (a
    function of the trainer's state, so a resumed run reads the same values)."""

    skipped: list = []

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def __call__(self, backbone, device) -> float:
        guard, step = self.trainer.state.guard, self.trainer.step
        if guard.phase != "trial":
            return 0.2 + 0.01 * step
        return guard.start_accuracy + (-0.2 if not guard.trials else 0.2)


def guarded_trainer(data: Path, run: Path, folders: tuple[Path, Path], kill_at: int | None = None) -> Trainer:
    options = dict(rela="guarded", epochs=4, monitor_every=2, save_every=1, workers=2)
    trainer = Trainer(data, run, config(**options, monitor_train=str(folders[0]), monitor_test=str(folders[1])))
    trainer.state.switch.threshold = 0.375  # rho starts at exp(-1) = 0.368 and rises by about 1% a step
    trainer.monitor = ScriptedMonitor(trainer)
    snapshots = {}
    guard = trainer._guard

    def watched(accuracy, last=False):  # the model when the first trial starts, and after it is rolled back
        guard(accuracy, last)
        state = trainer.state
        if state.guard.phase == "trial" or (state.guard.trials and not state.guard.trials[-1]["kept"]):
            name = "start" if state.guard.phase == "trial" else "rolled back"
            snapshots.setdefault(name, {key: value.clone() for key, value in trainer.model.state_dict().items()})

    trainer._guard = watched
    trainer.snapshots = snapshots
    kill_at_step(trainer, kill_at)
    return trainer


def test_guarded_trials_roll_back_to_the_copy_switch_when_kept_and_resume_bit_identical(
    converted_cifar, cifar_root, tmp_path
):
    folders = (
        copy_images(cifar_root / "train", tmp_path / "memory", per_class=2),
        copy_images(cifar_root / "test", tmp_path / "queries", per_class=2),
    )
    whole = guarded_trainer(converted_cifar, tmp_path / "whole", folders)
    summary = whole.fit(progress=False)
    assert whole.state.guard.tolerance == pytest.approx(0.5 / 20**0.5)  # 20 monitor test images
    first, second = summary["trials"]
    assert not first["kept"] and second["kept"]
    assert second["start"] >= first["end"] + 2 * BACKOFF_INTERVALS  # backed off after the rejection
    assert summary["switch_step"] == second["start"]  # the kept trial's start is the switch
    start, rolled_back = whole.snapshots["start"], whole.snapshots["rolled back"]
    assert all(torch.equal(start[key], rolled_back[key]) for key in start)  # weights, buffers, optimiser-free state
    phases = {line["step"]: line["phase"] for line in records(tmp_path / "whole") if "phase" in line}
    assert {phases[step] for step in range(first["start"] + 1, first["end"] + 1)} == {"ssl"}  # the trial: the method
    assert {phases[step] for step in range(first["end"] + 1, second["start"] + 1)} == {"rela"}  # rolled back to ReLA
    assert {phases[step] for step in range(second["start"] + 1, summary["steps"] + 1)} == {"ssl"}
    actions = [line["handover"] for line in records(tmp_path / "whole") if "handover" in line]
    assert actions == ["start", "rollback", "start", "keep"]

    # Killed inside the second trial (a checkpoint holds the copy), then resumed: the same weights
    run = tmp_path / "run"
    with pytest.raises(Killed):
        guarded_trainer(converted_cifar, run, folders, kill_at=second["start"] + 1).fit(progress=False)
    checkpoint = load_checkpoint(run)
    assert checkpoint["training"]["guard"]["phase"] == "trial" and checkpoint["training"]["trial_snapshot"]
    assert guarded_trainer(converted_cifar, run, folders).fit(progress=False)["trials"] == summary["trials"]
    final, expected = (
        load_checkpoint(run)["training"]["model"],
        load_checkpoint(tmp_path / "whole")["training"]["model"],
    )
    assert all(torch.equal(final[key], expected[key]) for key in expected)


def test_guarded_c_proposes_a_trial_from_epoch_int_c_epochs_without_a_plateau(converted_cifar, cifar_root, tmp_path):
    memory = copy_images(cifar_root / "train", tmp_path / "memory", per_class=2)
    queries = copy_images(cifar_root / "test", tmp_path / "queries", per_class=2)
    options = dict(rela="guarded:0.5", epochs=4, monitor_every=2, monitor_train=str(memory), monitor_test=str(queries))
    trainer = Trainer(converted_cifar, tmp_path / "run", config(**options))
    trainer.monitor = ScriptedMonitor(trainer)
    summary = trainer.fit(progress=False)
    assert not trainer.state.switch.switched  # the plateau rule did not fire in 24 steps
    assert [trial["start"] for trial in summary["trials"]] == [
        2 * STEPS + 2
    ]  # the first reading of epoch 3 (0-based 2)
    assert summary["switch_step"] is None  # rejected (ScriptedMonitor: the first trial loses)
