"""``--config FILE.toml``: option values from a TOML file, overridden by the command line."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import PROJECT

from cli import main
from rela_convert.config import ConvertOptions, SelectionOptions
from rela_convert.options import check, declared, flag, values
from rela_train.config import StudyOptions, TrainConfig


def parsed(command: str, args: list[str]) -> dict:
    """The parameters ``rela COMMAND ARGS`` resolves to, without running it."""
    return main.commands[command].make_context(command, args).params


def test_config_file_sets_train_options_and_flags_override_them(converted_cifar, tmp_path):
    config = tmp_path / "train.toml"
    config.write_text(
        "epochs = 1\n"
        "batch-size = 8  # overridden on the command line\n"
        'stem = "imagenet"\n'
        "input_size = 32\n"
        "workers = 0\n"
        "[train]\n"
        "data-ratio = 0.5\n"
        "log-every = 1\n"
        'rela = "static:1"\n'
        "[convert]  # another command's table: skipped\n"
        'prior = "efficientnet-lite0"\n'
    )
    run = tmp_path / "run"
    args = ["train", "--config", str(config), str(converted_cifar), str(run), "--batch-size", "16", "--quiet"]
    result = CliRunner().invoke(main, args + ["--no-tensorboard"])
    assert result.exit_code == 0, result.output
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["epochs"] == 1 and recorded["batch_size"] == 16  # the flag wins over the file
    assert (recorded["stem"], recorded["input_size"], recorded["workers"]) == ("imagenet", 32, 0)
    assert (recorded["data_ratio"], recorded["log_every"], recorded["rela"]) == (0.5, 1, "static:1")
    assert recorded["lr"] == 0.001  # resolved from the method, as without a file
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 100 // 16 + 1))
    assert not (run / "tensorboard").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("epoch = 1\n", "unknown key 'epoch' (rela train has no --epoch option)"),
        ("[train]\nbatch_sise = 1\n", "unknown key 'batch_sise'"),
        ("[trian]\nepochs = 1\n", "unknown table [trian]"),
        ("epochs = 1.5\n", "bad value for 'epochs': 1.5 is not an integer"),
        ("epochs = 0\n", "bad value for 'epochs'"),
        ('stem = "tiny"\n', "bad value for 'stem'"),
        ('quiet = "yes"\n', "bad value for 'quiet'"),
        ("epochs = \n", "cannot read it as TOML"),
    ],
)
def test_an_unknown_key_or_bad_value_is_a_one_line_error(tmp_path, text, message):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    result = CliRunner().invoke(main, ["train", "--config", str(config), str(tmp_path), str(tmp_path / "run")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {config}: ") and message in lines[0], result.output
    assert not (tmp_path / "run").exists()


def test_convert_and_study_read_their_tables(tmp_path):
    config = tmp_path / "pipeline.toml"
    config.write_text(
        '[convert]\nprior = "efficientnet-lite0"\nshard_size = 500\nquiet = true\n'
        "[study]\nratios = [0.2, 0.5]\nseeds = [0, 1]\nepochs = 3\n"
        "[train]\nepochs = 9\n"
    )
    convert = parsed("convert", ["--config", str(config), str(tmp_path), str(tmp_path / "out"), "--shard-size", "7"])
    assert (convert["prior_spec"], convert["shard_size"], convert["quiet"]) == ("efficientnet-lite0", 7, True)
    study_args = ["--config", str(config), str(tmp_path), str(tmp_path / "out")]
    study = parsed("study", study_args + ["--train-dir", str(tmp_path), "--test-dir", str(tmp_path)])
    assert (study["ratios"], study["seeds"], study["epochs"]) == ((0.2, 0.5), (0, 1), 3)
    # A required option may come from the file; without the file it is still required.
    with pytest.raises(Exception, match="prior"):
        parsed("convert", [str(tmp_path), str(tmp_path / "out")])


@pytest.mark.parametrize(
    "name, command, method, epochs",
    [("cifar10", "train", "byol", 100), ("imagenet1k", "train", "byol", 100), ("cifar10-demo", "study", "simclr", 16)],
)
def test_pipeline_presets_are_valid_for_their_commands(name, command, method, epochs, tmp_path):
    config = str(PROJECT / "pipelines" / f"{name}.toml")
    assert parsed("convert", ["--config", config, str(tmp_path), str(tmp_path / "data")])["prior_spec"] == (
        "efficientnet-lite0"
    )
    folders = ["--train-dir", str(tmp_path), "--test-dir", str(tmp_path)] if command == "study" else []
    params = parsed(command, ["--config", config, str(tmp_path), str(tmp_path / "run"), *folders])
    assert params["method"] == method and params["epochs"] == epochs


def test_every_declared_option_is_an_option_of_its_commands_with_the_declared_default(tmp_path):
    """The click options of convert, select, train and study come from the option declarations: every declared
    field is an option of the commands that show it, and a command given no option parses to the declared
    defaults (what rela study passes on to its runs included)."""
    commands = {
        "convert": (ConvertOptions,),
        "select": (SelectionOptions,),
        "train": (TrainConfig,),
        "study": (StudyOptions, TrainConfig),
    }
    for command, classes in commands.items():
        params = {param.name: param for param in main.commands[command].params}
        for cls in classes:
            for item, spec in declared(cls, command):
                assert flag(item, spec) in params[item.name].opts, (command, item.name)
    assert "seed" not in {param.name for param in main.commands["study"].params}  # --seeds sweeps it
    folders = ["--train-dir", str(tmp_path), "--test-dir", str(tmp_path)]
    assert values(ConvertOptions, parsed("convert", [str(tmp_path), str(tmp_path / "o"), "--prior", "x"])) == (
        ConvertOptions()
    )
    assert values(SelectionOptions, parsed("select", [str(tmp_path), "--subset", "random"])) == SelectionOptions()
    assert values(TrainConfig, parsed("train", [str(tmp_path), str(tmp_path / "run")])) == TrainConfig()
    study = parsed("study", [str(tmp_path), str(tmp_path / "out"), *folders])
    assert values(TrainConfig, study) == TrainConfig() and values(StudyOptions, study) == StudyOptions()
    given = parsed("train", [str(tmp_path), str(tmp_path / "run"), "--handover-ramp", "5", "--lr", "0.01"])
    assert values(TrainConfig, given) == TrainConfig(handover_ramp=5, lr=0.01)
    compressed = parsed("convert", [str(tmp_path), str(tmp_path / "o"), "--prior", "x", "--hdf5-compression", "gzip"])
    assert values(ConvertOptions, compressed).hdf5_compression == "gzip"


def test_a_config_given_in_python_is_checked_against_the_declarations():
    with pytest.raises(ValueError, match="--handover-ramp must be >= 0, not -1"):
        TrainConfig(handover_ramp=-1).check()
    with pytest.raises(ValueError, match="--nan-policy is one of stop, skip, not 'ignore'"):
        TrainConfig(nan_policy="ignore").check()
    with pytest.raises(ValueError, match="--momentum must be <= 1, not 1.5"):
        TrainConfig(momentum=1.5).check()
    TrainConfig(lr=None, momentum=None).check()  # None: the method's default
    with pytest.raises(ValueError, match="--dedup-eps must be > 0"):
        check(SelectionOptions(eps=0.0))


def test_the_run_identity_leaves_out_runtime_options_and_options_at_the_value_older_runs_had():
    identity = TrainConfig(augment="cpu").identity()  # --augment auto records what a run used (dali or cpu)
    assert not {"save_every", "nan_policy", "max_bad", "verify_shards"} & set(identity)
    assert not {"augment", "lr_schedule", "handover_ramp"} & set(identity)  # at the values runs had before them
    assert identity["handover"] == "warm" and TrainConfig(handover="reference").identity().get("handover") is None
    assert TrainConfig(handover_ramp=3).identity()["handover_ramp"] == 3
    assert identity["shuffle_buffer"] == 2000 and identity["arch"] == "resnet18"
