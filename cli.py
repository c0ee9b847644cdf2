"""The ``rela`` command: convert an image tree once, then train and evaluate on it.

ReLA (Sun, Jiang, Lin, "Efficiency for Free: Ideal Data Are Transportable
Representations", NeurIPS 2024).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
import traceback

import click

#: The start of --prior's help; the registered priors (rela_convert.priors.prior_help) follow, read only when
#: the help is shown (:class:`LazyHelpOption`), so that ``rela --help`` imports no torch.
PRIOR_HELP = (
    "Prior model: its kind, then its arguments (a new kind is one builder decorated with "
    "@register_prior, rela_convert/priors.py). Registered kinds: "
)


#: Where the subset strategies are registered (rela_convert.dataset.subset.SUBSET_STRATEGIES, read lazily).
SUBSET_STRATEGIES = "rela_convert.dataset.subset:SUBSET_STRATEGIES"
SUBSET_HELP = (
    "random: a fresh uniform draw of floor(r*N) images each epoch (the paper's rule, method.md step 3). "
    "The others use a selection computed from the stored prior features with faiss (spherical k-means; "
    "rela select explains each and sets its parameters): dedup: uniform from the pool left after SemDeDup "
    "near-duplicate removal; balanced: spread evenly across k-means clusters; prototypical / hard: weighted "
    "towards images close to / far from their cluster centroid. Others: functions decorated with "
    "@register_strategy (rela_convert/dataset/subset.py)."
)


class RegistryChoice(click.ParamType):
    """A choice among the names of a registry (:class:`rela_convert.registry.Registry`), imported only when
    the option is used or its help shown, so that ``rela --help`` imports no torch.

    Args:
        where: ``"module:attribute"`` of the registry, e.g. ``"rela_train.methods.base:METHODS"``.
    """

    name = "choice"

    def __init__(self, where: str) -> None:
        self.where = where

    @property
    def registry(self):
        module, attribute = self.where.split(":")
        return getattr(importlib.import_module(module), attribute)

    def get_metavar(self, param, ctx=None) -> str:
        return "[" + "|".join(self.registry.names()) + "]"

    def convert(self, value, param, ctx):
        names = self.registry.names()
        if value not in names:
            self.fail(f"{value!r} is not one of {', '.join(names)}", param, ctx)
        return value


class RegistryList(RegistryChoice):
    """Comma-separated names of a registry, or an alias of such a list, as a tuple of distinct names in the
    registry's order; the registry is imported only when the option is used or its help shown (see
    :class:`RegistryChoice`).

    Args:
        where: ``"module:attribute"`` of the registry.
        aliases: alias -> the names it stands for (e.g. ``{"both": ("webdataset", "hdf5")}``).
    """

    def __init__(self, where: str, aliases: dict[str, tuple[str, ...]] | None = None) -> None:
        super().__init__(where)
        self.aliases = dict(aliases or {})

    def get_metavar(self, param, ctx=None) -> str:
        return "[" + "|".join([*self.registry.names(), *self.aliases]) + "][,...]"

    def convert(self, value, param, ctx) -> tuple[str, ...]:
        if isinstance(value, tuple):  # already converted (a default, or parameters passed on in-process)
            return value
        names, chosen = self.registry.names(), set()
        for part in str(value).split(","):
            part = part.strip()
            if part in self.aliases:
                chosen.update(self.aliases[part])
            elif part in names:
                chosen.add(part)
            else:
                known = ", ".join([*names, *self.aliases])
                self.fail(f"{part!r} is not one of {known} (or a comma-separated list of them)", param, ctx)
        return tuple(name for name in names if name in chosen)


class LazyHelpOption(click.Option):
    """A click option whose help is its ``help`` followed by the text ``help_from`` (``"module:function"``)
    returns, imported and called only when the help is shown, so that ``rela --help`` imports no torch."""

    def __init__(self, *args, help_from: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.help_from = help_from

    def get_help_record(self, ctx):
        if self.help_from:
            module, function = self.help_from.split(":")
            self.help = (self.help or "") + getattr(importlib.import_module(module), function)()
            self.help_from = None
        return super().get_help_record(ctx)


#: Set (to 1) by ``rela --debug`` while a command runs, or in the environment: failures then print their traceback.
DEBUG_VARIABLE = "RELA_DEBUG"

#: The exception classes (``"module:Class"``) of failures a user causes (bad input, damaged files, a RUN of
#: other options, ...). The commands turn the ones they expect into one ``error:`` line themselves; :class:`RelaGroup`
#: does the same for any of these (and any ``OSError``) that escapes them. Resolved only once their module is
#: imported, so that ``rela --help`` imports no torch.
USER_ERRORS = (
    "rela_convert.dataset.files:DatasetError",
    "rela_convert.convert:ConversionError",
    "rela_convert.priors:PriorSpecError",
    "rela_convert.registry:RegistryError",
    "rela_convert.optional:MissingDependency",
    "rela_convert.dataset.selection_file:SelectionError",
    "rela_convert.distributed:LaunchError",
    "rela_convert.checkpoint:CheckpointError",
    "rela_train.trainer:TrainingError",
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


def _config_value(ctx: click.Context, parameter: click.Option, value):
    """``value`` from a TOML file as the option would take it on the command line (a list becomes the
    comma-separated string that list options such as ``--ratios`` take); raises click.BadParameter when
    the option rejects it or its TOML type does not fit (e.g. a float for an integer option)."""
    kind = parameter.type
    numbers = (click.types.BoolParamType, click.types.IntParamType, click.types.FloatParamType)
    if isinstance(value, list) and not isinstance(kind, numbers):
        value = ",".join(str(item) for item in value)
    if isinstance(kind, click.types.BoolParamType):
        fits, wanted = isinstance(value, bool), "true or false"
    elif isinstance(kind, click.types.IntParamType):
        fits, wanted = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(kind, click.types.FloatParamType):
        fits, wanted = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        fits, wanted = isinstance(value, str), "a string"
    if not fits:
        raise click.BadParameter(f"{value!r} is not {wanted}")
    parameter.process_value(ctx, value)  # the option's own checks: ranges, choices, paths, callbacks
    return value


def _read_config_file(ctx: click.Context, param: click.Parameter, path: str | None) -> None:
    """Eager callback of ``--config``: the file's values become the command's defaults (``ctx.default_map``),
    so options given on the command line override them; exits with a one-line error naming the file and
    key on an unknown key or a bad value."""
    if path is None:
        return
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as file:
            table = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as error:
        fail(f"{path}: cannot read it as TOML ({error})")
    command = ctx.info_name
    values = {key: value for key, value in table.items() if not isinstance(value, dict)}
    for key, value in table.items():
        if isinstance(value, dict) and key not in main.commands:
            fail(f"{path}: unknown table [{key}] (tables are named after rela commands: {', '.join(main.commands)})")
    values.update(table.get(command, {}))
    options = {
        name[2:].replace("-", "_"): parameter
        for parameter in ctx.command.params
        if isinstance(parameter, click.Option) and parameter is not param
        for name in parameter.opts
        if name.startswith("--")
    }
    defaults = {}
    for key, value in values.items():
        parameter = options.get(key.replace("-", "_"))
        if parameter is None:
            fail(f"{path}: unknown key {key!r} (rela {command} has no --{key.replace('_', '-')} option)")
        try:
            defaults[parameter.name] = _config_value(ctx, parameter, value)
        except click.BadParameter as error:
            fail(f"{path}: bad value for {key!r}: {error.message}")
    ctx.default_map = {**(ctx.default_map or {}), **defaults}


def config_file_option(command):
    """Add ``--config FILE.toml`` to a click command: option values from a TOML file, overridden by the
    options given on the command line."""
    return click.option(
        "--config",
        type=click.Path(exists=True, dir_okay=False),
        is_eager=True,
        expose_value=False,
        callback=_read_config_file,
        help=(
            "Read option values from this TOML file; options given on the command line override them. Keys are "
            "option names (batch-size = 128 or batch_size = 128), at the top level or in a table named after the "
            "command ([convert], [train], [study]; tables of the other commands are skipped), so one file can "
            "serve a whole pipeline. Paths are relative to the working directory."
        ),
    )(command)


class DatasetLocation(click.Path):
    """DATA of the commands that read a converted dataset: an existing folder, or a URL (``s3://bucket/prefix``,
    ``https://host/prefix``, ... anything fsspec opens; rela_convert/dataset/remote.py), passed on as it is."""

    def __init__(self) -> None:
        super().__init__(exists=True, file_okay=False)

    def convert(self, value, param, ctx):
        from rela_convert.dataset.remote import is_url  # imports nothing heavy

        if isinstance(value, str) and is_url(value):
            return value
        return super().convert(value, param, ctx)


def _environment_callback(variable: str, parse=None):
    """Callback of an option that sets environment variable ``variable`` (read by rela_convert.dataset.remote in this
    process, its DataLoader workers and the processes --nproc starts) for the rest of the command, checked with
    ``parse`` (a ValueError becomes a usage error); the old value is restored when the command ends."""

    def callback(ctx: click.Context, param: click.Parameter, value):
        if value is None:
            return None
        try:
            if parse is not None:
                parse(value)
        except ValueError as error:
            raise click.BadParameter(str(error)) from None
        old = os.environ.get(variable)
        os.environ[variable] = str(value)
        ctx.call_on_close(lambda: os.environ.pop(variable, None) if old is None else os.environ.update({variable: old}))
        return value

    return callback


def storage_options_option(command):
    """Add ``--storage-options JSON`` (fsspec options of a DATA or destination URL) to a click command."""
    from rela_convert.dataset import remote

    return click.option(
        "--storage-options",
        metavar="JSON",
        default=None,
        envvar=remote.STORAGE_OPTIONS_VARIABLE,
        show_envvar=True,
        expose_value=False,
        callback=_environment_callback(remote.STORAGE_OPTIONS_VARIABLE, remote.parse_storage_options),
        help=(
            "fsspec storage options of a URL, as a JSON object: endpoint, credentials, region, ... e.g. "
            '\'{"endpoint_url": "http://127.0.0.1:9000"}\' for an S3-compatible server. Without it the back-end\'s '
            "own configuration applies (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL, ~/.aws, "
            "GOOGLE_APPLICATION_CREDENTIALS, FSSPEC_S3_ENDPOINT_URL, ...)."
        ),
    )(command)


def remote_options(command):
    """Add ``--storage-options``, ``--cache-dir`` and ``--cache-limit`` (reading DATA from a URL) to a command."""
    from rela_convert.dataset import remote

    command = click.option(
        "--cache-limit",
        metavar="BYTES",
        default=None,
        envvar=remote.CACHE_LIMIT_VARIABLE,
        show_envvar=True,
        expose_value=False,
        callback=_environment_callback(remote.CACHE_LIMIT_VARIABLE, remote.parse_bytes),
        help=(
            "Most bytes --cache-dir keeps (e.g. 50G; K, M, G, T are powers of 1024): above it the least recently "
            "used shards are deleted (shards being read are kept). [default: no limit]"
        ),
    )(command)
    command = click.option(
        "--cache-dir",
        metavar="DIR",
        default=None,
        type=click.Path(file_okay=False),
        envvar=remote.CACHE_DIR_VARIABLE,
        show_envvar=True,
        expose_value=False,
        callback=_environment_callback(remote.CACHE_DIR_VARIABLE),
        help=(
            "DATA at a URL: keep the shards fetched (whole, checked against index.json's SHA-256) in this local "
            "folder, shared by every process and run, so that later epochs and runs read them locally. "
            "[default: none: each shard is fetched into a temporary file, read and deleted, every epoch]"
        ),
    )(command)
    return storage_options_option(command)


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
@config_file_option
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
@click.option(
    "--format",
    "storage",
    default="webdataset",
    show_default=True,
    type=RegistryList("rela_convert.dataset.formats:STORAGE_FORMATS", aliases={"both": ("webdataset", "hdf5")}),
    help=(
        "Shard storage formats, comma-separated: webdataset (WebDataset tar files), hdf5 (HDF5 files, one per "
        "shard), any other format of rela_convert/dataset/formats/, or both (= webdataset,hdf5). Several are written "
        "side by side (same shards, same index); trainers then read the fastest one (HDF5 before WebDataset) "
        "unless told --storage."
    ),
)
@click.option(
    "--hdf5-compression",
    default="none",
    show_default=True,
    type=click.Choice(["none", "gzip", "lzf"]),
    help="Compression of the HDF5 feature dataset (images are stored as they are).",
)
@click.option(
    "--shard-size",
    default=5000,
    show_default=True,
    type=click.IntRange(1),
    help="Source files per shard (a shard holds at most this many samples).",
)
@click.option(
    "--batch-size", default=256, show_default=True, type=click.IntRange(1), help="Images per prior forward pass."
)
@click.option(
    "--workers",
    default=2,
    show_default=True,
    type=click.IntRange(0),
    help="DataLoader worker processes (per process) that read and decode images (0: in the main process).",
)
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
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto (CUDA when available), cpu, cuda or cuda:N. CUDA runs the prior in bf16 autocast, channels-last.",
)
@click.option(
    "--decode",
    default="cpu",
    show_default=True,
    type=click.Choice(["cpu", "device"]),
    help=(
        "Where JPEGs are decoded and resized for the prior: cpu (Pillow in the --workers processes, reduced-DCT "
        "decoding of large JPEGs) or device (batched torchvision decode_jpeg on --device: nvJPEG on a GPU, so the "
        "workers only read files; PNG/WebP/BMP and CMYK JPEGs still decode in the workers). Pixels differ by about "
        "a grey level between the two (more for JPEGs twice the prior's size or larger, which cpu decodes at "
        "reduced DCT scale), so features differ slightly; resuming with the other one is refused."
    ),
)
@click.option(
    "--data-ratio",
    default=0.5,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True),
    help=(
        "Default data ratio r recorded in the index: each training epoch draws floor(r*N) images "
        "(the trainer may override)."
    ),
)
@click.option(
    "--subset",
    default="random",
    show_default=True,
    type=RegistryChoice(SUBSET_STRATEGIES),
    help="Default subset strategy recorded in the index. "
    + SUBSET_HELP
    + (
        " Computed after the PCA fit with rela select's defaults (run rela select later to change them); "
        "running convert again with another --subset only recomputes the selection."
    ),
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=int,
    help="Default seed of the per-epoch subset draws, recorded in the index.",
)
@click.option(
    "--order-seed",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="Seed of the pseudo-random order in which samples are stored (numpy default_rng(seed).permutation of the "
    "sorted listing); keys stay the sorted-listing positions. Mixed shards give training batches that are uniform "
    "random samples (method.md, stage 2, Batches).",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def convert(
    src,
    out,
    prior_spec,
    storage,
    hdf5_compression,
    shard_size,
    batch_size,
    workers,
    nproc,
    device,
    decode,
    data_ratio,
    subset,
    seed,
    order_seed,
    quiet,
):
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

    from rela_convert.convert import ConversionError, ConvertOptions
    from rela_convert.convert import convert as run_convert
    from rela_convert.priors import PriorSpecError

    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        _run_in_processes(nproc)
    options = ConvertOptions(  # the selection (any strategy but random) is computed below, after the PCA fit
        shard_size=shard_size,
        batch_size=batch_size,
        workers=workers,
        device=device,
        data_ratio=data_ratio,
        subset="random",
        seed=seed,
        progress=not quiet,
        formats=storage,
        hdf5_compression=None if hdf5_compression == "none" else hdf5_compression,
        decode=decode,
        order_seed=order_seed,
    )
    try:
        index = run_convert(src, out, prior_spec, options)
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
TRAIN_OPTIONS = [
    click.option(
        "--arch",
        default="resnet18",
        show_default=True,
        help=(
            "Target network: any torchvision classification model, randomly initialised, without its "
            "classifier (resnet18, resnet50, wide_resnet50_2, convnext_tiny, mobilenet_v3_small, efficientnet_b0, "
            "regnet_y_400mf, swin_t, vit_b_16, ...; rela_convert/backbones.py lists the families)."
        ),
    ),
    click.option(
        "--stem",
        default="auto",
        show_default=True,
        type=click.Choice(["auto", "cifar", "cifar-pool", "imagenet"]),
        help=(
            "Stem of --arch. cifar: the stem keeps the input resolution (ResNet: 3x3 stride-1 convolution, no "
            "max-pool, the reference for 32 and 64 px; MobileNet / EfficientNet / RegNet / ShuffleNet: the "
            "first convolution at stride 1; ConvNeXt / Swin: a 3x3 stride-1 convolution instead of the 4x4 "
            "patchify one; ViT, MaxViT, VGG, Inception-v3 have none); cifar-pool: the same, then the stem's "
            "stride-2 max-pool (ResNet, DenseNet, GoogLeNet, ShuffleNet, AlexNet, SqueezeNet; about 4x "
            "cheaper); imagenet: the architecture's own stem (ResNet: 7x7 stride-2 convolution and max-pool, "
            "about 16x cheaper at 32 px); auto: cifar up to 64 px where the architecture has one, else imagenet."
        ),
    ),
    click.option(
        "--method",
        default="byol",
        show_default=True,
        type=RegistryChoice("rela_train.methods.base:METHODS"),
        help=(
            "Training method used after (or, with --rela off, instead of) ReLA, with its own heads, views and "
            "loss (rela_train/methods/, one file each; README: Methods)."
        ),
    ),
    click.option(
        "--rela",
        default="guarded",
        show_default=True,
        metavar="MODE",
        help=(
            "When ReLA hands over to the method. guarded (our default): when the ReLA loss plateaus (the reference "
            "rule), try the method for one --monitor-every interval and keep it only if the online kNN monitor "
            "gained at least as much as under ReLA the interval before, less its noise (0.5/sqrt(monitor test "
            "images)), else roll back to ReLA (no monitor folders: ReLA to the end); guarded:<c>: the same, "
            "proposing from epoch int(c * epochs) on too; adaptive: switch for good when the ReLA loss plateaus "
            "(the reference rule); static:<c>: ReLA while epoch < int(c * epochs); off: the plain method. README: "
            "The hand-over."
        ),
    ),
    click.option(
        "--handover",
        default="warm",
        show_default=True,
        type=click.Choice(["reference", "warm"]),  # rela_train.handover.HANDOVERS (not imported: --help stays light)
        help=(
            "How the method takes over. warm: during ReLA the method's heads are also fitted by its loss on the "
            "backbone's detached features (the backbone trains exactly as ReLA alone); reference: the heads "
            "first train at the switch."
        ),
    ),
    click.option(
        "--handover-ramp",
        default=0,
        show_default=True,
        type=click.IntRange(min=0),
        metavar="STEPS",
        help="Raise the learning rate linearly from 0 over this many optimiser steps after the switch; 0: none.",
    ),
    click.option(
        "--transfer-head",
        default="fixed",
        show_default=True,
        type=click.Choice(["fixed", "trained"]),
        help=(
            "The linear map W from backbone feature to prior target. fixed: W keeps its random initialisation "
            "(the reference); trained: W is optimised with the backbone."
        ),
    ),
    click.option(
        "--epochs",
        default=100,
        show_default=True,
        type=click.IntRange(1),
        help="Epochs; each trains on floor(data_ratio * N) images.",
    ),
    click.option(
        "--batch-size",
        default=128,
        show_default=True,
        type=click.IntRange(2),
        help="Images per optimiser step and process (128 for CIFAR / Tiny-ImageNet, 512 for ImageNet in the paper).",
    ),
    click.option(
        "--lr", default=None, type=float, help="AdamW learning rate. [default: the method's; 0.001 for every built-in]"
    ),
    click.option(
        "--lr-schedule",
        default="constant",
        show_default=True,
        type=click.Choice(["constant", "cosine"]),  # rela_train.trainer.LR_SCHEDULES (not imported: --help stays light)
        help=(
            "constant: --lr throughout (the reference); cosine: --lr decayed per step to 0 at the run's last step "
            "(lr x 0.5 (1 + cos(pi x step / total steps))), over the ReLA and method phases alike."
        ),
    ),
    click.option(
        "--weight-decay",
        default=None,
        type=float,
        help="AdamW weight decay. [default: the method's; 0.01 for every built-in]",
    ),
    click.option(
        "--momentum",
        default=None,
        type=click.FloatRange(0, 1),
        help=(
            "Base momentum of the method's EMA networks (BYOL, MoCo, DINO); ignored by the others. "
            "[default: the method's; 0.99, the reference's]"
        ),
    ),
    click.option(
        "--input-size",
        default=None,
        type=click.IntRange(8),
        help=(
            "Training input size, pixels. [default: the data's: the median shorter side the conversion saw, at "
            "most 224 (32 for CIFAR); never the prior's]"
        ),
    ),
    click.option(
        "--storage",
        default=None,
        type=click.Choice(["webdataset", "hdf5"]),
        help="Which stored format to read when the dataset has both. [default: the dataset's]",
    ),
    click.option(
        "--workers",
        default=2,
        show_default=True,
        type=click.IntRange(0),
        help="DataLoader worker processes per training process (decode + augmentation).",
    ),
    click.option(
        "--augment",
        default="cpu",
        show_default=True,
        type=click.Choice(["cpu", "device"]),
        help=(
            "Where the training views are made. cpu: in the DataLoader workers, image by image (lightly / "
            "torchvision on PIL images). device: the workers only decode (to at most 2x --input-size px on the "
            "longer side); random resized crop, flip, colour jitter, greyscale, blur and solarisation run on the "
            "training device on whole batches, with the same parameters and distributions "
            "(rela_train/device_views.py)."
        ),
    ),
    click.option(
        "--device",
        default="auto",
        show_default=True,
        help="auto (CUDA when available), cpu, cuda or cuda:N. CUDA trains in bf16 autocast.",
    ),
    click.option(
        "--log-every",
        default=10,
        show_default=True,
        type=click.IntRange(1),
        help="Write a metrics.jsonl line every this many steps.",
    ),
    click.option(
        "--monitor-train",
        default=None,
        type=click.Path(exists=True, file_okay=False),
        help=(
            "Online kNN monitor: labelled images DIR/<class>/<images> used as kNN memory (kept decoded in memory:"
            " keep it small, e.g. 100 per class)."
        ),
    ),
    click.option(
        "--monitor-test",
        default=None,
        type=click.Path(exists=True, file_okay=False),
        help=(
            "Online kNN monitor: labelled test images, same class folders as --monitor-train. Files of either folder"
            " that are not images or do not decode are left out and listed in RUN/monitor_skipped.jsonl. Both"
            " folders are recorded as absolute paths: a run resumes from any working folder."
        ),
    ),
    click.option(
        "--monitor-every",
        default=0,
        show_default=True,
        type=click.IntRange(0),
        help=(
            "Evaluate the monitor before the first step, every this many optimiser steps and after the last; "
            "records (step, images_seen, monitor_knn_top1) go to metrics.jsonl. 0: off."
        ),
    ),
]


def training_options(command):
    """Add :data:`TRAIN_OPTIONS` to a click command."""
    for option in reversed(TRAIN_OPTIONS):
        command = option(command)
    return command


def train_config(options: dict, **overrides):
    """A rela_train.trainer.TrainConfig from the shared options' values (click parameter names)."""
    from rela_train.trainer import TrainConfig

    names = {field.name for field in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{name: value for name, value in options.items() if name in names}, **overrides)


@main.command(context_settings={"show_default": True})
@config_file_option
@click.argument("data", type=DatasetLocation())
@click.argument("run", type=click.Path(file_okay=False))
@training_options
@remote_options
@click.option(
    "--data-ratio",
    default=None,
    type=click.FloatRange(0, 1, min_open=True),
    help="Data ratio r: images per epoch = floor(r*N), drawn afresh each epoch. [default: the dataset's]",
)
@click.option(
    "--subset",
    default=None,
    type=RegistryChoice(SUBSET_STRATEGIES),
    help=(
        "Per-epoch subset strategy; every strategy draws floor(r*N) images per epoch, deterministically from "
        "--seed and the epoch (dedup: at most its pool). "
    )
    + SUBSET_HELP
    + " [default: the dataset's]",
)
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
    "--seed", default=0, show_default=True, type=int, help="Seed of initialisation, subset draws and data order."
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
@click.option(
    "--save-every",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help=(
        "Also save RUN/checkpoint.pt every this many steps (0: at the end of every epoch only). A run killed at "
        "any point (even SIGKILL) and started again with the same command resumes at its checkpoint's step and, "
        "on the CPU, ends with bit-identical weights. SIGTERM / SIGINT end the current step, save and stop the "
        "run with a one-line message (exit status 143 / 130); a second signal stops at once."
    ),
)
@click.option(
    "--nan-policy",
    default="stop",
    show_default=True,
    type=click.Choice(["stop", "skip"]),
    help=(
        "A NaN or infinite loss: stop (at once, naming the step, phase and last good checkpoint) or skip (that "
        "step makes no update; counted as skipped_steps in metrics.jsonl and summary.json; more than 10 in a "
        "row stop the run)."
    ),
)
@click.option(
    "--max-bad",
    default=0.001,
    show_default=True,
    type=click.FloatRange(0, 1),
    help=(
        "Samples whose image does not decode or whose feature is malformed are replaced by another sample of "
        "their batch and listed in RUN/skipped.jsonl (step, key, shard, reason); the run stops when more than "
        "this fraction of the samples read (counted over at least one epoch) are bad. 0: stop at the first."
    ),
)
@click.option(
    "--verify-shards",
    default="first",
    show_default=True,
    type=click.Choice(["first", "off"]),
    help=(
        "first: check each shard's SHA-256 against the index the first time the run reads it (in the loader "
        "workers; remembered in RUN/verified_shards.json, also across resumes); a mismatch stops the run. "
        "off: never."
    ),
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(data, run, data_ratio, subset, nproc, seed, tensorboard, quiet, **options):
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
    from rela_train.trainer import Trainer, TrainingError, TrainingInterrupted

    try:  # before any process, worker or network is started
        check_run_dataset(run, data, check_dataset(data, options["storage"]))
    except DatasetError as error:
        fail(str(error))
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        _run_in_processes(nproc)
    try:
        config = train_config(options, data_ratio=data_ratio, subset=subset, seed=seed)
        trainer = Trainer(data, run, config, tensorboard=tensorboard)
        summary = trainer.fit(progress=not quiet)
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
    method = options["method"]
    switch = (
        f"switched from ReLA to {method} at step {summary['switch_step']}"
        if summary["switch_step"]
        else f"no switch (--rela {options['rela']})"
    )
    rejected = [trial for trial in summary.get("trials", []) if not trial["kept"]]
    if rejected:
        steps = ", ".join(str(trial["start"]) for trial in rejected)
        switch += f" after {len(rejected)} rejected trial(s) of {method} from step(s) {steps}, rolled back"
    click.echo(
        f"trained {summary['epochs']} epochs, {summary['steps']} steps, {summary['images_per_s']:.1f} images/s; "
        f"{switch}; checkpoint in {run}/checkpoint.pt"
    )


def _number_list(kind):
    def parse(context, parameter, value):
        try:
            return tuple(kind(item) for item in value.split(",") if item.strip())
        except ValueError:
            raise click.BadParameter(f"expected a comma-separated list of {kind.__name__}s, got {value!r}") from None

    return parse


@main.command(context_settings={"show_default": True})
@config_file_option
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
@click.option(
    "--ratios",
    default="0.1,0.2,0.5",
    show_default=True,
    callback=_number_list(float),
    help="Data ratios of the ReLA arms, comma-separated (fractions of the baseline's images).",
)
@click.option(
    "--seeds",
    default="0,1",
    show_default=True,
    callback=_number_list(int),
    help="Seeds, comma-separated; every arm runs once per seed.",
)
@click.option(
    "--subsets",
    default="random",
    show_default=True,
    type=RegistryList(SUBSET_STRATEGIES),
    help=(
        "Subset strategies of the ReLA arms, comma-separated (random is the paper's rule; "
        "the others need rela select first). "
    )
    + SUBSET_HELP,
)
@click.option(
    "--transfer-heads",
    default="fixed",
    show_default=True,
    help="Transfer heads of the ReLA arms, comma-separated: fixed (the reference), trained.",
)
@click.option(
    "--rules",
    default="",
    help=(
        "Switch rules of the ReLA arms, comma-separated, each trained at every ratio (the spellings of --rela; "
        "off: the method alone at that ratio), e.g. guarded,static:1,off draws the default rule beside ReLA alone "
        "and the method alone. [default: --rela]"
    ),
)
@click.option(
    "--linear-probe-epochs",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help=(
        "Also evaluate every run with a linear probe trained this many epochs (Adam lr 3e-4, batch 128; "
        "mean of the last 3 epochs); 0: kNN only."
    ),
)
@click.option(
    "--eval-workers",
    default=2,
    show_default=True,
    type=click.IntRange(0),
    help="DataLoader workers of the final evaluation.",
)
@training_options
def study(
    data,
    out,
    train_dir,
    test_dir,
    ratios,
    seeds,
    subsets,
    transfer_heads,
    rules,
    linear_probe_epochs,
    eval_workers,
    **options,
):
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
    from rela_train.study import StudyOptions, run_study
    from rela_train.trainer import TrainingError

    heads = tuple(item for item in transfer_heads.split(",") if item)
    if not heads or set(heads) - {"fixed", "trained"}:
        fail(f"--transfer-heads takes a comma-separated list of fixed, trained; got {','.join(heads)!r}")
    try:  # before anything trains: the dataset's files, the runs of an earlier study, the evaluation folders
        index = check_dataset(data, options["storage"])
        for run in sorted(Path(out, "runs").glob("*/")):
            check_run_dataset(run, data, index)
        if labelled_folder(train_dir).classes != labelled_folder(test_dir).classes:
            raise EvaluationError(f"class folders differ between --train-dir {train_dir} and --test-dir {test_dir}")
    except (DatasetError, EvaluationError) as error:
        fail(str(error))
    study_options = StudyOptions(
        ratios=ratios,
        rules=tuple(item for item in rules.split(",") if item),
        seeds=seeds,
        subsets=subsets,
        transfer_heads=heads,
        probe_epochs=linear_probe_epochs,
        eval_workers=eval_workers,
    )
    try:
        run_study(data, out, train_dir, test_dir, train_config(options), study_options, echo=click.echo)
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
    type=RegistryChoice(SUBSET_STRATEGIES),
    help="Strategy to record as the dataset's default. "
    + SUBSET_HELP
    + (
        " Every strategy but random (re)computes the selection, which serves all of them "
        "(rela train --subset can pick any)."
    ),
)
@click.option(
    "--clusters",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="Spherical k-means clusters k; 0: round(sqrt(N)), at most 1,000 (71 for 5,000 images, 1,000 for ImageNet-1K).",
)
@click.option(
    "--dedup-eps",
    default=0.1,
    show_default=True,
    type=click.FloatRange(0, 2, min_open=True, max_open=True),
    help=(
        "Near-duplicates: cosine similarity of centred prior features above 1 - eps, within a cluster. "
        "0.1 suits an ImageNet prior such as efficientnet-lite0 (re-encoded / resized copies >= 0.91, "
        "distinct neighbours <= 0.71 on the ImageNet sample); coarse priors (the 64-d CIFAR ResNets) "
        "need about 0.001 and then find exact copies only."
    ),
)
@click.option(
    "--dim",
    default=512,
    show_default=True,
    type=click.IntRange(0),
    help=(
        "Selection feature dimension: top principal components of pca.npz kept (0: all). "
        "Memory is N x dim x 4 bytes (2.6 GB for ImageNet-1K at 512)."
    ),
)
@click.option(
    "--kmeans-iters", default=20, show_default=True, type=click.IntRange(1), help="k-means (Lloyd) iterations."
)
@click.option(
    "--max-points-per-centroid",
    default=256,
    show_default=True,
    type=click.IntRange(1),
    help="k-means trains on a seeded sample of at most this many points per cluster (all points are then assigned).",
)
@click.option(
    "--kmeans-seed",
    default=0,
    show_default=True,
    type=int,
    help="Seed of the k-means sample and initialisation (the per-epoch draws use the dataset's subset seed).",
)
@click.option(
    "--sharpness",
    default=3.0,
    show_default=True,
    type=click.FloatRange(0),
    help=(
        "prototypical / hard: draw weight exp(sharpness x rank percentile); the favoured extreme is "
        "e^sharpness times as likely to be drawn first (0: uniform)."
    ),
)
@click.option(
    "--storage",
    default=None,
    type=RegistryChoice("rela_convert.dataset.formats:STORAGE_FORMATS"),
    help=(
        "Stored format to read the features from. "
        "[default: the fastest one the dataset holds: hdf5 when present (no image bytes to read past)]"
    ),
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the new subset entry of index.json (plus seconds per stage) as one JSON object.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def select(
    data,
    strategy,
    clusters,
    dedup_eps,
    dim,
    kmeans_iters,
    max_points_per_centroid,
    kmeans_seed,
    sharpness,
    storage,
    as_json,
    quiet,
):
    """Recompute the subset selection of the converted dataset DATA in place.

    Reads the stored prior features shard by shard (the prior is not run, the
    shards are not touched), clusters them with faiss, scores every image by its
    similarity to its centroid, finds near-duplicates, and writes selection.npz
    and index.json atomically. The index's subset entry records the strategy, the
    parameters, the file and its SHA-256, and how many near-duplicates were
    removed. faiss-gpu is used automatically when installed and a GPU is visible.
    """
    from rela_convert.dataset.files import DatasetError
    from rela_convert.selection import SelectionOptions, selection_summary
    from rela_convert.selection import select as run_select
    from rela_train.integrity import check_dataset, describe_os_error

    try:
        check_dataset(data, storage)  # the shards the features are read from, keys.npy, pca.npz
    except DatasetError as error:
        fail(str(error))
    options = SelectionOptions(
        num_clusters=clusters or None,
        eps=dedup_eps,
        dim=dim or None,
        niter=kmeans_iters,
        max_points_per_centroid=max_points_per_centroid,
        seed=kmeans_seed,
        sharpness=sharpness,
        storage=storage,
    )
    try:
        entry = run_select(data, strategy, options, progress=not quiet)
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
