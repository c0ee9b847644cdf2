"""Training that survives: bit-exact resume from any step (SIGKILL, SIGTERM, an adaptive switch within an epoch),
non-finite losses, undecodable samples, shard hashes checked on first read, checkpoint format and loading.
Real converted CIFAR-10 shards (``converted_cifar``: 200 images in 4 shards), tiny ResNet-18 runs at 32 px."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import PROJECT, Killed, copy_dataset, kill_at_step, set_recorded_hash

from rela_convert.checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint
from rela_convert.dataset.converted import ConvertedDataset
from rela_convert.dataset.files import sha256_file
from rela_train.config import TrainConfig
from rela_train.data.plan import worker_schedule
from rela_train.data.stream import TrainStream
from rela_train.methods.byol import BYOL
from rela_train.stopping import TrainingError
from rela_train.trainer import MAX_CONSECUTIVE_SKIPS, Trainer

ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1"}
STEPS = 100 // 16  # per epoch: floor(0.5 x 200 samples) // batch 16


def config(**options) -> TrainConfig:
    """A tiny in-process run: ResNet-18, 32 px, batch 16, half of the 200 images (6 steps per epoch)."""
    options = {"epochs": 1, "data_ratio": 0.5, "workers": 0, "rela": "off", "storage": "webdataset", **options}
    return TrainConfig(arch="resnet18", stem="imagenet", input_size=32, batch_size=16, log_every=1, **options)


def records(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    path = run / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def assert_same_weights(run: Path, expected: dict) -> None:
    final = load_checkpoint(run)["training"]["model"]
    assert final.keys() == expected.keys()
    for name in expected:
        assert torch.equal(final[name], expected[name]), name


def one_line(error: BaseException) -> str:
    message = str(error)
    assert message and "\n" not in message
    return message


# ----------------------------------------------------------------------------------------------------------------
# The stream restarts at any step


def test_worker_schedule_is_the_dataloader_round_robin():
    assert worker_schedule(7, 2).tolist() == [0, 1, 0, 1, 0, 1, 1]  # worker 0 holds 3 batches, worker 1 holds 4
    assert worker_schedule(5, 0).tolist() == [0] * 5
    assert worker_schedule(2, 3).tolist() == [1, 2]  # worker 0 holds none


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_started_at_any_step_yields_the_same_batches(converted_cifar, workers):
    dataset = ConvertedDataset(converted_cifar, "webdataset")
    stream = TrainStream(dataset, 32, BYOL.views(32), data_ratio=0.5, seed=3, batch_size=14, shuffle_buffer=40)

    def batches(start: int) -> list:
        stream.set_epoch(1, start_step=start)
        return list(stream.loader(workers, reports=True))

    whole = batches(0)
    assert len(whole) == 100 // 14 == 7  # with 2 workers: 3 and 4 batches
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    for start in (1, 4, 7):
        resumed = batches(start)
        assert len(resumed) == len(whole) - start
        for got, expected in zip(resumed, whole[start:]):
            assert all(torch.equal(a, b) for a, b in zip(got[:4], expected[:4]))
    assert torch.equal(torch.random.get_rng_state(), before)  # the stream draws nothing from the training's generator
    stream.set_phase(False)  # the method's views: same samples, other augmentations
    method = batches(4)[0]
    assert torch.equal(method.features, whole[4].features) and not torch.equal(method.view_1, whole[4].view_1)


# ----------------------------------------------------------------------------------------------------------------
# Killed runs resume bit-exactly (``rela train`` in a subprocess, 2 loader workers, BYOL: momentum networks)


def train_command(data: Path, run: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cli",
        "train",
        str(data),
        str(run),
        *("--epochs", "2", "--batch-size", "16", "--data-ratio", "0.5", "--workers", "2", "--rela", "static:0.5"),
        *("--stem", "imagenet", "--storage", "webdataset", "--log-every", "1", "--no-tensorboard", "--quiet"),
        *extra,
    ]


def train(data: Path, run: Path, *extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        train_command(data, run, *extra), cwd=PROJECT, env=ENVIRONMENT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def last_step(run: Path) -> int:
    steps = [0]
    for line in (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []:
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:  # a line being written
            pass
    return max(steps)


def stop_after(data: Path, run: Path, step: int, signum: int, *extra: str) -> subprocess.CompletedProcess:
    """Start ``rela train`` and send it ``signum`` once metrics.jsonl shows ``step``."""
    process = subprocess.Popen(
        train_command(data, run, *extra),
        cwd=PROJECT,
        env=ENVIRONMENT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while last_step(run) < step and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, process.communicate()[1][-3000:]
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def uninterrupted(converted_cifar, tmp_path_factory) -> dict:
    """The final model state of the run every killed one must match (2 epochs: ReLA, then BYOL)."""
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(converted_cifar, run)
    assert [record["step"] for record in records(run)] == list(range(1, 2 * STEPS + 1))
    return load_checkpoint(run)["training"]["model"]


def test_sigkill_mid_epoch_then_the_same_command_ends_bit_identical(converted_cifar, tmp_path, uninterrupted):
    run = tmp_path / "run"
    killed = stop_after(converted_cifar, run, 3, signal.SIGKILL, "--save-every", "2")
    assert killed.returncode == -signal.SIGKILL
    saved = load_checkpoint(run)
    assert saved["epoch"] == 0 and saved["step"] == saved["epoch_step"] in (2, 4)  # within the first epoch
    assert last_step(run) >= saved["step"]  # steps logged after the checkpoint are trained (and logged) again
    train(converted_cifar, run, "--save-every", "2")
    assert_same_weights(run, uninterrupted)
    assert [record["step"] for record in records(run)] == list(range(1, 2 * STEPS + 1))


def test_sigkill_right_after_the_rela_hand_over_ends_bit_identical(converted_cifar, tmp_path, uninterrupted):
    run = tmp_path / "run"
    # Step 8 is logged once the checkpoint of step 7, BYOL's first, is complete; the kill may land in a later save.
    killed = stop_after(converted_cifar, run, STEPS + 2, signal.SIGKILL, "--save-every", "1")
    assert killed.returncode == -signal.SIGKILL
    saved = load_checkpoint(run)
    assert saved["epoch"] == 1 and saved["epoch_step"] >= 1 and saved["switch_step"] == STEPS  # in BYOL's epoch
    train(converted_cifar, run)  # --save-every is not part of the run: resuming without it is the same run
    assert_same_weights(run, uninterrupted)
    phases = [(record["epoch"], record["phase"]) for record in records(run)]
    assert phases == [(0, "rela")] * STEPS + [(1, "ssl")] * STEPS


def test_sigterm_saves_and_stops_with_one_line_then_resumes_bit_identical(converted_cifar, tmp_path, uninterrupted):
    run = tmp_path / "run"
    stopped = stop_after(converted_cifar, run, 3, signal.SIGTERM)
    assert stopped.returncode == 128 + signal.SIGTERM
    message = stopped.stderr.strip().splitlines()[-1]
    found = re.search(r"stopped by SIGTERM after step (\d+) of 12; saved (\S+): run the same command again", message)
    assert found, stopped.stderr[-3000:]
    saved = load_checkpoint(run)
    assert saved["step"] == saved["epoch_step"] == int(found[1]) < STEPS  # saved at once, within the epoch
    assert last_step(run) == saved["step"]  # the step it finished, nothing after it
    resumed = train(converted_cifar, run)
    assert_same_weights(run, uninterrupted)
    # The training time counts both calls: the summary's exceeds what the first call saved in its checkpoint.
    first_call = saved["seconds"]
    summary = json.loads((run / "summary.json").read_text())
    assert resumed.returncode == 0 and first_call > 0 and summary["seconds"] > first_call


# ----------------------------------------------------------------------------------------------------------------
# An adaptive switch within an epoch, then a kill after it (in-process, 2 loader workers)


def adaptive_trainer(data: Path, run: Path, kill_at: int | None = None) -> Trainer:
    trainer = Trainer(data, run, config(rela="adaptive", workers=2, save_every=2))
    trainer.state.switch.threshold = 0.375  # rho starts at exp(-1) = 0.368 and rises by about 1% a step
    kill_at_step(trainer, kill_at)
    return trainer


def test_an_adaptive_switch_within_an_epoch_and_a_kill_after_it_resume_bit_identical(converted_cifar, tmp_path):
    whole = adaptive_trainer(converted_cifar, tmp_path / "whole")
    summary = whole.fit(progress=False)
    assert 1 <= summary["switch_step"] <= 3  # within the epoch: the stream restarts with BYOL's views
    run = tmp_path / "run"
    with pytest.raises(Killed):
        adaptive_trainer(converted_cifar, run, kill_at=5).fit(progress=False)
    assert load_checkpoint(run)["step"] == 4 and load_checkpoint(run)["switch_step"] == summary["switch_step"]
    assert adaptive_trainer(converted_cifar, run).fit(progress=False)["switch_step"] == summary["switch_step"]
    assert_same_weights(run, load_checkpoint(tmp_path / "whole")["training"]["model"])


# ----------------------------------------------------------------------------------------------------------------
# Non-finite losses


def nan_at(trainer: Trainer, steps: set[int] | None, attribute: str = "forward") -> None:
    """Make the loss NaN (or infinite) at the given 1-based steps (None: always)."""
    owner = trainer if attribute == "forward" else trainer.model.method
    compute = getattr(owner, attribute)

    def poisoned(*args):
        loss = compute(*args)
        step = trainer.step + 1
        if steps is None or step in steps:
            factor = float("inf") if step % 2 == 0 else float("nan")
            return (
                tuple(part if part is None else part * factor for part in loss)
                if isinstance(loss, tuple)
                else loss * factor
            )
        return loss

    setattr(owner, attribute, poisoned)


def test_a_nan_loss_stops_the_run_naming_step_phase_and_last_good_checkpoint(converted_cifar, tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(converted_cifar, run, config(rela="static:1", save_every=2))
    nan_at(trainer, {3})
    with pytest.raises(TrainingError) as error:
        trainer.fit(progress=False)
    message = one_line(error.value)
    assert message.startswith("step 3 (epoch 1, phase rela): the loss is nan (--nan-policy stop)")
    assert f"the last good checkpoint is {run / 'checkpoint.pt'} (step 2)" in message
    assert load_checkpoint(run)["step"] == 2 and not (run / "summary.json").exists()


def test_skip_policy_skips_the_update_counts_it_and_stops_after_too_many_in_a_row(converted_cifar, tmp_path):
    trainer = Trainer(converted_cifar, tmp_path / "run", config(method="simclr", nan_policy="skip"))
    nan_at(trainer, {2, 5}, attribute="loss")
    summary = trainer.fit(progress=False)
    assert summary["steps"] == STEPS and summary["skipped_steps"] == 2
    lines = records(tmp_path / "run")
    assert [line["loss"] is None for line in lines] == [False, True, False, False, True, False]
    assert [line["skipped_steps"] for line in lines] == [0, 1, 1, 1, 2, 2]
    optimizer = load_checkpoint(tmp_path / "run")["training"]["optimizer"]
    assert {float(state["step"]) for state in optimizer["state"].values()} == {STEPS - 2.0}  # no update when skipped

    always = Trainer(converted_cifar, tmp_path / "always", config(epochs=2, nan_policy="skip"))
    nan_at(always, None)
    with pytest.raises(TrainingError) as error:
        always.fit(progress=False)
    limit = MAX_CONSECUTIVE_SKIPS + 1
    assert one_line(error.value).startswith(
        f"step {limit} (epoch 2, phase ssl): {limit} steps in a row had a non-finite"
    )
    assert "--nan-policy skip" in str(error.value)


# ----------------------------------------------------------------------------------------------------------------
# Damaged samples and shards


def test_undecodable_samples_are_replaced_listed_and_counted(damaged_cifar, tmp_path):
    data, shards = damaged_cifar
    run = tmp_path / "run"
    summary = Trainer(data, run, config(workers=2, max_bad=0.05)).fit(progress=False)
    assert summary["steps"] == STEPS and summary["bad_samples"] == 2  # every step, each batch full
    skipped = sorted(records(run, "skipped.jsonl"), key=lambda record: record["key"])
    assert {(record["key"], record["shard"]) for record in skipped} == set(shards.items())
    reasons = {record["key"]: record["reason"] for record in skipped}
    image_key, feature_key = shards
    assert reasons[image_key].startswith("not a readable image")
    assert reasons[feature_key].startswith("damaged sample record")
    assert all(record["epoch"] == 0 and 1 <= record["step"] <= STEPS for record in skipped)
    assert records(run)[-1]["bad_samples"] == 2
    verified = json.loads((run / "verified_shards.json").read_text())["shards"]  # the fixed hashes were checked
    assert set(shards.values()) <= set(verified)


def test_more_bad_samples_than_max_bad_stop_the_run_with_one_line(damaged_cifar, tmp_path):
    data, shards = damaged_cifar
    with pytest.raises(TrainingError) as error:
        Trainer(data, tmp_path / "run", config(max_bad=0.0)).fit(progress=False)
    message = one_line(error.value)
    assert "could not be used" in message and "--max-bad 0.0" in message and "skipped.jsonl" in message
    assert any(f"key {key} in {shard}" in message for key, shard in shards.items())
    assert len(records(tmp_path / "run", "skipped.jsonl")) == 1  # listed before the stop


def test_a_shard_with_another_hash_stops_the_run_unless_verification_is_off(converted_cifar, tmp_path):
    data = copy_dataset(converted_cifar, tmp_path / "data")
    set_recorded_hash(data, "shard-000000.tar", "0" * 64)
    with pytest.raises(TrainingError) as error:
        Trainer(data, tmp_path / "first", config(workers=2, data_ratio=0.25)).fit(progress=False)
    message = one_line(error.value)
    assert f"shard {data / 'shard-000000.tar'} does not match the SHA-256" in message
    assert f"rela inspect {data} --verify" in message and "convert it again" in message
    summary = Trainer(data, tmp_path / "off", config(data_ratio=0.25, verify_shards="off")).fit(progress=False)
    assert summary["steps"] == 50 // 16


def test_each_shard_is_hashed_once_and_remembered_in_run(converted_cifar, tmp_path, monkeypatch):
    hashed = []

    def counting(path):
        hashed.append(Path(path).name)
        return sha256_file(path)

    monkeypatch.setattr("rela_train.data.shards.sha256_file", counting)
    run = tmp_path / "run"
    # A small shuffle buffer: shards are read (and checked) after the first batches, and reported with later ones.
    options = {"method": "simclr", "data_ratio": 0.25, "shuffle_buffer": 16}
    Trainer(converted_cifar, run, config(epochs=2, **options)).fit(progress=False)
    assert len(hashed) == len(set(hashed)) > 1  # two epochs, each shard hashed once
    assert set(json.loads((run / "verified_shards.json").read_text())["shards"]) == set(hashed)
    other = tmp_path / "other"  # a RUN that already checked them (a resumed run) hashes none again
    other.mkdir()
    shutil.copyfile(run / "verified_shards.json", other / "verified_shards.json")
    hashed.clear()
    Trainer(converted_cifar, other, config(**options)).fit(progress=False)
    assert hashed == []


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: format and loading


def test_a_checkpoint_of_another_format_is_refused_with_one_line(converted_cifar, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"format": "rela-checkpoint-v1", "epoch": 1}, run / "checkpoint.pt")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(run)
    assert "'rela-checkpoint-v1', not 'rela-checkpoint-v2'" in one_line(error.value) and CHECKPOINT_FORMAT in str(
        error.value
    )
    with pytest.raises(TrainingError) as error:
        Trainer(converted_cifar, run, config()).fit(progress=False)
    assert "rela-checkpoint-v1" in one_line(error.value) and "choose another RUN" in str(error.value)


def test_every_torch_load_in_the_project_reads_weights_only():
    sources = [
        path
        for folder in ("rela_convert", "rela_train", "benchmarks", "tests")
        for path in (PROJECT / folder).rglob("*.py")
    ]
    calls = [
        (path.name, call)
        for path in [*sources, PROJECT / "cli.py"]
        for call in re.findall(r"torch\.load\((.*?)\)", path.read_text(), flags=re.S)
    ]
    assert calls
    assert [name for name, call in calls if "weights_only=True" not in call] == []
