"""The ``rela`` command: convert an image tree once, then train and evaluate on it.

ReLA (Sun, Jiang, Lin, "Efficiency for Free: Ideal Data Are Transportable
Representations", NeurIPS 2024).

A thin shell: each command's options of the work are declared once, as the fields of its options dataclass
(:class:`rela_convert.config.ConvertOptions`, :class:`rela_convert.config.SelectionOptions`,
:class:`rela_train.config.TrainConfig`, :class:`rela_train.config.StudyOptions`), and become click options, help
and ``--config`` keys here (:func:`rela_convert.click_options.declared_options`); this module adds the options of
the shell (``--nproc``, ``--quiet``, ``--json``, ...), calls the work and turns what a user can cause into one
``error:`` line. Heavy modules are imported inside the commands, so that ``rela --help`` imports no torch.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import click

from rela_convert.click_options import (
    DatasetLocation,
    LazyHelpOption,
    RegistryChoice,
    config_file_option,
    declared_options,
    remote_options,
    storage_options_option,
)
from rela_convert.config import SUBSET_CHOICES, SUBSET_HELP, ConvertOptions, SelectionOptions
from rela_convert.options import values
from rela_train.config import StudyOptions, TrainConfig

#: The start of --prior's help; the registered priors (rela_convert.priors.prior_help) follow, read only when
#: the help is shown (:class:`LazyHelpOption`), so that ``rela --help`` imports no torch.
PRIOR_HELP = (
    "Prior model: its kind, then its arguments (a new kind is one builder decorated with "
    "@register_prior, rela_convert/priors.py). Registered kinds: "
)

#: Set (to 1) by ``rela --debug`` while a command runs, or in the environment: failures then print their traceback.
DEBUG_VARIABLE = "RELA_DEBUG"

#: The exception classes (``"module:Class"``) of failures a user causes (bad input, damaged files, a RUN of
#: other options, ...). The commands turn the ones they expect into one ``error:`` line themselves; :class:`RelaGroup`
#: does the same for any of these (and any ``OSError``) that escapes them. Resolved only once their module is
#: imported, so that ``rela --help`` imports no torch.
USER_ERRORS = (
    "rela_convert.dataset.files:DatasetError",
    "rela_convert.click_options:ConfigFileError",
    "rela_convert.convert:ConversionError",
    "rela_convert.priors:PriorSpecError",
    "rela_convert.registry:RegistryError",
    "rela_convert.optional:MissingDependency",
    "rela_convert.dataset.selection_file:SelectionError",
    "rela_convert.distributed:LaunchError",
    "rela_convert.checkpoint:CheckpointError",
    "rela_train.stopping:TrainingError",
    "rela_train.evaluate:EvaluationError",
)


def debug_enabled() -> bool:
    """Whether failures print their traceback: ``rela --debug``, or ``RELA_DEBUG`` set to anything but 0."""
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def fail(message: str, status: int = 1) -> None:
    """Print a one-line error and exit with ``status``; under ``rela --debug``, when called while an exception
    is handled, print that exception's traceback first."""
    if debug_enabled() and sys.exc_info()[0] is not None:
        traceback.print_exc()
    click.echo(f"error: {message}", err=True)
    sys.exit(status)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _is_user_error(error: BaseException) -> bool:
    for where in USER_ERRORS:
        module, name = where.split(":")
        if module in sys.modules and isinstance(error, getattr(sys.modules[module], name)):
            return True
    return False


class RelaGroup(click.Group):
    """The ``rela`` command group: what its commands let escape becomes one ``error:`` line (exit status 1)
    when a user can cause it (an ``OSError``: missing or unreadable file, full disk, permissions; or one of
    :data:`USER_ERRORS`), with the traceback before it only under ``rela --debug``. Any other exception is a
    bug in rela: its traceback is always printed, followed by one ``error:`` line asking to report it."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except OSError as error:
            from rela_train.integrity import describe_os_error

            fail(describe_os_error(error))
        except Exception as error:
            if _is_user_error(error):
                fail(_first_line(error))
            traceback.print_exc()
            click.echo(
                f"error: unexpected {type(error).__name__}: {_first_line(error)} (a bug in rela: please report it "
                "with the traceback above)",
                err=True,
            )
            sys.exit(1)


def _in_process(name: str, params: dict) -> None:
    """What each process that ``--nproc`` starts runs: the work of ``rela NAME`` with the parsed
    ``params`` (the launcher has set ``RANK``, ``WORLD_SIZE``, ..., so the command joins the others)."""
    command = main.commands[name]
    with click.Context(command, info_name=name):
        command.callback(**params)


def _run_in_processes(nproc: int) -> None:
    """Run the current command's work in ``nproc`` processes (:func:`rela_convert.distributed.launch`),
    then exit: status 0, or 1 with a one-line error when a process failed."""
    from rela_convert.distributed import LaunchError, launch

    context = click.get_current_context()
    try:
        launch(nproc, _in_process, context.info_name, context.params)
    except LaunchError as error:
        fail(str(error))
    sys.exit(0)


@click.group(cls=RelaGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--debug",
    is_flag=True,
    help=(
        "Print the Python traceback of a failure. Without it, failures a user can cause (wrong paths, damaged or "
        "mismatched data, a full disk, ...) print one 'error:' line saying what to do; unexpected errors (bugs) "
        "always print their traceback. RELA_DEBUG=1 in the environment does the same."
    ),
)
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """ReLA: label images once with a prior model, then train self-supervised networks faster.

    Sun, Jiang, Lin, "Efficiency for Free: Ideal Data Are Transportable Representations", NeurIPS 2024.
    """
    if debug and not debug_enabled():  # seen by fail() and by the processes --nproc starts; unset afterwards
        os.environ[DEBUG_VARIABLE] = "1"
        ctx.call_on_close(lambda: os.environ.pop(DEBUG_VARIABLE, None))


@main.command()
@config_file_option(main)
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--prior",
    "prior_spec",
    required=True,
    metavar="SPEC",
    cls=LazyHelpOption,
    help=PRIOR_HELP,
    help_from="rela_convert.priors:prior_help",
)
@declared_options(ConvertOptions, "convert")
@click.option(
    "--nproc",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help=(
        "Conversion processes on this machine, started with torch.distributed's launcher (one per GPU on a GPU node); "
        "process r converts shards r, r+N, ... Under torchrun, leave it at 1."
    ),
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def convert(src, out, prior_spec, nproc, quiet, **options):
    """Run the PRIOR once over the image tree SRC and write shards to OUT.

    SRC is SRC/<folder>/<images> (first-level folder names become labels, used
    only for evaluation) or a flat folder of images. OUT receives the shards
    (original image bytes + prior feature per sample), pca.npz, keys.npy,
    skipped.jsonl and index.json. Every file under SRC is either converted or
    listed in skipped.jsonl with its reason (hidden, not a regular file, not a
    JPEG/PNG/WebP/BMP, empty, damaged, above 178,956,970 px, unreadable, broken
    link, folder reached twice through links). An interrupted conversion resumes
    where it stopped when run again with the same arguments; a finished one is
    left as it is. Exit status 0 when at least one image was converted, 1 when
    none could be or OUT cannot be written.
    """

    from rela_convert.convert import ConversionError
    from rela_convert.convert import convert as run_convert
    from rela_convert.priors import PriorSpecError

    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        _run_in_processes(nproc)
    subset = options["subset"]  # any strategy but random is computed below, after the PCA fit
    try:
        index = run_convert(src, out, prior_spec, values(ConvertOptions, options, subset="random", progress=not quiet))
    except (PriorSpecError, ConversionError, ValueError) as error:
        fail(str(error))
    except OSError as error:
        from rela_train.integrity import describe_os_error

        fail(
            f"cannot write the output: {describe_os_error(error)}; once fixed, run the same command again: it "
            "resumes with the shards not finished yet"
        )
    if os.environ.get("RANK", "0") != "0":
        return
    run = index.run
    selected = subset == "random" or (index.subset["strategy"] == subset and "selection" in index.subset)
    if run["already_done"]:
        then = "nothing to do" if selected else f"computing the {subset} selection"
        click.echo(
            f"{out} already holds this conversion ({index.num_samples} converted, {index.num_skipped} skipped); {then}"
        )
    else:
        reasons = f" (reasons in {out}/skipped.jsonl)" if index.num_skipped else ""
        click.echo(
            f"{index.num_samples} converted, {index.num_skipped} skipped{reasons}; "
            f"{len(index.shards())} shards ({' + '.join(index.formats)}) in {out}; "
            f"this run: {run['converted']} images at {run['images_per_s']:.1f} images/s ({run['seconds']:.1f} s)"
        )
    if not selected:
        from rela_convert.selection import select as run_select
        from rela_convert.selection import selection_summary

        try:
            entry = run_select(out, subset, progress=not quiet)
        except ValueError as error:
            fail(f"converted, but the {subset} selection failed: {error}")
        click.echo(f"{selection_summary(entry)} ({entry['seconds']['total']:.1f} s)")


@main.command()
@click.argument("data", type=DatasetLocation())
@storage_options_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option(
    "--verify",
    is_flag=True,
    help=(
        "Also re-hash and re-read every shard (all formats), keys.npy and pca.npz against the index; "
        "name each bad file and exit with status 1 when anything is wrong."
    ),
)
def inspect(data, as_json, verify):
    """Show what the converted dataset DATA holds (from its index.json)."""
    from rela_convert.dataset.files import DatasetError
    from rela_convert.dataset.index import DatasetIndex
    from rela_convert.dataset.verify import verify_dataset

    try:
        index = DatasetIndex.load(data)
        checked, problems = verify_dataset(data) if verify else (0, [])
    except DatasetError as error:
        fail(str(error))
    summary = index.summary()
    if verify:
        summary["verify"] = {"files_checked": checked, "ok": not problems, "problems": problems}
    if as_json:
        click.echo(json.dumps(summary))
    else:
        sizes = summary["image_sizes"]
        formats = ", ".join(
            f"{name} {value['num_shards']} shards {value['bytes'] / 1e6:.1f} MB"
            for name, value in summary["formats"].items()
        )
        click.echo(
            f"{data}: {summary['num_samples']} samples ({formats}), {summary['num_skipped']} skipped\n"
            f"prior: {summary['prior']} ({summary['prior_input_size']} px, "
            f"{summary['feature_dim']}-d {summary['feature_dtype']})\n"
            f"classes ({len(summary['classes'])}): {', '.join(summary['classes'][:20])}"
            f"{' ...' if len(summary['classes']) > 20 else ''}\n"
            f"default subset: {summary['subset']['strategy']}, data ratio {summary['subset']['data_ratio']}, "
            f"seed {summary['subset']['seed']}\n"
            f"image sizes: shorter side min {sizes['shorter_side_min']}, median {sizes['shorter_side_median']}, "
            f"max {sizes['shorter_side_max']} px; default training size {summary['default_train_size']} px\n"
            f"storage order: seeded pseudo-random, seed {summary['order_seed']} ({index.order['rule']})"
        )
        if verify:
            click.echo("\n".join(f"BAD {problem}" for problem in problems) or f"verified: {checked} files intact")
    if problems:
        sys.exit(1)


#: The options rela train and rela study share (click.option decorators).


@main.command(context_settings={"show_default": True})
@config_file_option(main)
@click.argument("data", type=DatasetLocation())
@click.argument("run", type=click.Path(file_okay=False))
@declared_options(TrainConfig, "train")
@remote_options
@click.option(
    "--nproc",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help=(
        "Training processes on this machine (DistributedDataParallel with synchronised batch norm, started "
        "with torch.distributed's launcher; one per GPU, gloo on CPU). --batch-size is per process. "
        "Under torchrun, leave it at 1."
    ),
)
@click.option(
    "--tensorboard/--no-tensorboard",
    default=None,
    show_default=False,
    help=(
        "Also log metrics.jsonl's numbers as TensorBoard scalars in RUN/tensorboard (tensorboard --logdir RUN). "
        "[default: on when the tensorboard package is installed]"
    ),
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(data, run, nproc, tensorboard, quiet, **options):
    """Train a target network on the converted dataset DATA; write results to RUN.

    RUN receives config.json, metrics.jsonl (epoch, step, images seen, phase
    rela/ssl, loss, ReLA loss, rho, learning rate, images/s; and the online kNN
    monitor's records), summary.json (with the step of the switch from ReLA to
    the method), checkpoint.pt (saved after every epoch and every --save-every
    steps, and on SIGTERM/SIGINT, which then exit with status 143/130; run the
    same command again to resume, bit-exactly on the CPU), skipped.jsonl (bad
    samples replaced in their batch) and, with TensorBoard, tensorboard/.
    """
    from rela_convert.dataset.files import DatasetError
    from rela_train.integrity import check_dataset, check_run_dataset, describe_os_error
    from rela_train.stopping import TrainingError, TrainingInterrupted
    from rela_train.trainer import Trainer

    config = values(TrainConfig, options)
    try:  # before any process, worker or network is started
        check_run_dataset(run, data, check_dataset(data, config.storage))
    except DatasetError as error:
        fail(str(error))
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        _run_in_processes(nproc)
    try:
        summary = Trainer(data, run, config, tensorboard=tensorboard).fit(progress=not quiet)
    except TrainingInterrupted as error:
        fail(str(error), error.exit_status)
    except (DatasetError, TrainingError, ValueError) as error:
        fail(str(error))
    except OSError as error:
        fail(
            f"training stopped: {describe_os_error(error)}; once fixed, run the same command again: it resumes "
            f"from {run}/checkpoint.pt (the last saved step) when there is one"
        )
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if summary.get("already_done"):
        click.echo(f"{run} already holds this finished run ({summary['epochs']} epochs); nothing to do")
        return
    switch = (
        f"switched from ReLA to {config.method} at step {summary['switch_step']}"
        if summary["switch_step"]
        else f"no switch (--rela {config.rela})"
    )
    rejected = [trial for trial in summary.get("trials", []) if not trial["kept"]]
    if rejected:
        steps = ", ".join(str(trial["start"]) for trial in rejected)
        switch += f" after {len(rejected)} rejected trial(s) of {config.method} from step(s) {steps}, rolled back"
    click.echo(
        f"trained {summary['epochs']} epochs, {summary['steps']} steps, {summary['images_per_s']:.1f} images/s; "
        f"{switch}; checkpoint in {run}/checkpoint.pt"
    )


@main.command(context_settings={"show_default": True})
@config_file_option(main)
@click.argument("data", type=DatasetLocation())
@click.argument("out", type=click.Path(file_okay=False))
@remote_options
@click.option(
    "--train-dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Labelled images DIR/<class>/<images> of the final evaluation (kNN memory / probe training set).",
)
@click.option(
    "--test-dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Labelled test images, same class folders.",
)
@declared_options(StudyOptions, "study")
@declared_options(TrainConfig, "study")
def study(data, out, train_dir, test_dir, **options):
    """Does ReLA pay off on DATA? Train the baseline (the method alone, --rela off,
    data ratio 1.0) and ReLA at each of --ratios, for each seed, evaluate all, and
    write OUT/results.json, OUT/results.md (table, verdict per seed, untrained row)
    and OUT/curve.png (online kNN against images seen; give --monitor-* for it).
    Every run is a RUN folder under OUT/runs: a killed study resumes when run again.
    """
    from pathlib import Path

    from rela_convert.dataset.files import DatasetError
    from rela_train.evaluate import EvaluationError, labelled_folder
    from rela_train.integrity import check_dataset, check_run_dataset, describe_os_error
    from rela_train.stopping import TrainingError
    from rela_train.study import run_study

    config = values(TrainConfig, options)
    try:  # before anything trains: the dataset's files, the runs of an earlier study, the evaluation folders
        index = check_dataset(data, config.storage)
        for run in sorted(Path(out, "runs").glob("*/")):
            check_run_dataset(run, data, index)
        if labelled_folder(train_dir).classes != labelled_folder(test_dir).classes:
            raise EvaluationError(f"class folders differ between --train-dir {train_dir} and --test-dir {test_dir}")
    except (DatasetError, EvaluationError) as error:
        fail(str(error))
    try:
        run_study(data, out, train_dir, test_dir, config, values(StudyOptions, options), echo=click.echo)
    except (DatasetError, TrainingError, ValueError) as error:
        fail(str(error))
    except OSError as error:
        fail(f"study stopped: {describe_os_error(error)}; once fixed, run the same command again: it resumes")


@main.command()
@click.argument("data", type=DatasetLocation())
@remote_options
@click.option(
    "--subset",
    "strategy",
    required=True,
    type=RegistryChoice(SUBSET_CHOICES),
    help="Strategy to record as the dataset's default. "
    + SUBSET_HELP
    + (
        " Every strategy but random (re)computes the selection, which serves all of them "
        "(rela train --subset can pick any)."
    ),
)
@declared_options(SelectionOptions, "select")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the new subset entry of index.json (plus seconds per stage) as one JSON object.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def select(data, strategy, as_json, quiet, **options):
    """Recompute the subset selection of the converted dataset DATA in place.

    Reads the stored prior features shard by shard (the prior is not run, the
    shards are not touched), clusters them with faiss, scores every image by its
    similarity to its centroid, finds near-duplicates, and writes selection.npz
    and index.json atomically. The index's subset entry records the strategy, the
    parameters, the file and its SHA-256, and how many near-duplicates were
    removed. faiss-gpu is used automatically when installed and a GPU is visible.
    """
    from rela_convert.dataset.files import DatasetError
    from rela_convert.selection import select as run_select
    from rela_convert.selection import selection_summary
    from rela_train.integrity import check_dataset, describe_os_error

    selection = values(SelectionOptions, options)
    try:
        check_dataset(data, selection.storage)  # the shards the features are read from, keys.npy, pca.npz
    except DatasetError as error:
        fail(str(error))
    try:
        entry = run_select(data, strategy, selection, progress=not quiet)
    except (DatasetError, ValueError) as error:
        fail(str(error))
    except OSError as error:
        fail(f"cannot read or write {data}: {describe_os_error(error)}")
    if as_json:
        click.echo(json.dumps(entry))
    else:
        click.echo(f"{data}: {selection_summary(entry)} ({entry['seconds']['total']:.1f} s)")


@main.command()
@click.argument("data", type=click.Path(exists=True, file_okay=False))
@click.argument("url")
@storage_options_option
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object (url, files, uploaded, skipped, bytes, seconds, bytes_per_s).",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def push(data, url, as_json, quiet):
    """Upload the converted dataset DATA to URL (s3://bucket/prefix, gs://..., or a folder), for rela train,
    inspect, select and study to read from there.

    The shards (all formats), keys.npy, pca.npz, selection.npz and skipped.jsonl
    go first and index.json last, so that a reader never sees an index whose files
    are missing (an older index at URL is deleted before its files are replaced).
    Each file is hashed before it is sent (a damaged local dataset is not pushed).
    Running it again uploads only what is not there yet with the same size and
    SHA-256 (an interrupted push resumes). HTTP URLs are read-only.
    """
    from rela_convert.dataset.files import DatasetError
    from rela_convert.push import push_dataset
    from rela_train.integrity import describe_os_error

    try:
        summary = push_dataset(data, url, progress=not quiet)
    except DatasetError as error:
        fail(str(error))
    except OSError as error:
        fail(
            f"push stopped: {describe_os_error(error)}; once fixed, run the same command again: it skips the files "
            "already uploaded"
        )
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(
        f"pushed {data} to {summary['url']}: {summary['uploaded']} of {summary['files']} files uploaded "
        f"({summary['bytes'] / 1e6:.1f} MB in {summary['seconds']:.1f} s, {summary['bytes_per_s'] / 1e6:.1f} MB/s), "
        f"{summary['skipped']} already there"
    )


@main.command(name="eval")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--train-dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Labelled reference images, DIR/<class>/<images> (the kNN memory / probe training set).",
)
@click.option(
    "--test-dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Labelled test images, DIR/<class>/<images>, same class folders.",
)
@click.option(
    "--knn-k", default=200, show_default=True, type=click.IntRange(1), help="Neighbours of the weighted kNN classifier."
)
@click.option(
    "--knn-temperature",
    default=0.1,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Temperature T of the kNN vote weights exp(similarity / T).",
)
@click.option(
    "--linear-probe-epochs",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help=(
        "Also train a linear probe (Adam, lr 3e-4, batch 128, unnormalised features) for this many epochs on "
        "frozen features and report the mean and std of the last 3 epochs' test accuracy, as the reference; "
        "0: skip (the reference uses 100)."
    ),
)
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(1), help="Images per forward pass.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(0), help="DataLoader worker processes.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help=(
        "Print one JSON object (knn_top1 and linear_top1 / linear_top1_std as fractions 0..1, num_train, num_test, k, "
        "num_skipped, skipped: the {path, reason} of every file not evaluated, skipped_file)."
    ),
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def evaluate(
    run, train_dir, test_dir, knn_k, knn_temperature, linear_probe_epochs, batch_size, workers, device, as_json, quiet
):
    """Accuracy of RUN's frozen backbone: weighted kNN (and optionally a linear probe)
    on centre-crop features, labels from the class folder names.

    The folders are read as rela convert reads its source: files that are not images
    (hidden, other extensions, not in a class folder, ...) or cannot be decoded
    (damaged, truncated, ...) are skipped; their paths and reasons are written to
    RUN/eval_skipped.jsonl (one JSON object per line) and counted in the output.
    """
    from pathlib import Path

    from rela_convert.checkpoint import CheckpointError, load_backbone
    from rela_convert.dataset.files import write_jsonl_atomic
    from rela_train.evaluate import EvaluationError
    from rela_train.evaluate import evaluate as run_evaluate
    from rela_train.integrity import describe_os_error

    try:
        result = run_evaluate(
            *load_backbone(run),
            train_dir,
            test_dir,
            knn_k,
            knn_temperature,
            linear_probe_epochs,
            batch_size,
            workers,
            device,
            progress=not quiet,
        )
    except (CheckpointError, EvaluationError, ValueError) as error:
        fail(str(error))
    except OSError as error:
        fail(f"evaluation stopped: {describe_os_error(error)}")
    skipped_file = Path(run) / "eval_skipped.jsonl"
    try:  # the accuracy is printed even when the list cannot be written
        write_jsonl_atomic(skipped_file, result["skipped"])
        result["skipped_file"], listed = str(skipped_file), f"reasons in {skipped_file}"
    except OSError as error:
        result["skipped_file"], listed = None, f"not listed: {describe_os_error(error)}"
        click.echo(f"warning: cannot write {skipped_file}: {describe_os_error(error)}", err=True)
    if as_json:
        click.echo(json.dumps(result))
        return
    probe = (
        f", linear probe top-1 {100 * result['linear_top1']:.2f} +- {100 * result['linear_top1_std']:.2f}%"
        " (last 3 epochs)"
        if "linear_top1" in result
        else ""
    )
    click.echo(
        f"kNN top-1 {100 * result['knn_top1']:.2f}% (k={knn_k}, {result['num_train']} train / "
        f"{result['num_test']} test images){probe}; "
        + (f"{result['num_skipped']} files skipped ({listed})" if result["num_skipped"] else "no file skipped")
    )


if __name__ == "__main__":
    main()
