"""The click pieces the ``rela`` command (``cli.py``) is built from.

- :func:`declared_options`: the click options of a dataclass whose fields are declared with
  :func:`rela_convert.options.option` (help, default, type, range, choices: all from the declaration);
- the parameter types those options use: :class:`RegistryChoice` and :class:`RegistryList` (names of a registry,
  read only when needed) and :class:`CommaList` (a comma-separated list);
- :func:`config_file_option`: ``--config FILE.toml``, whose keys are the command's options;
- :class:`DatasetLocation`, :func:`remote_options` and :func:`storage_options_option`: DATA as a folder or a URL;
- :class:`LazyHelpOption`: an option whose help ends with text computed only when the help is shown.

Importing this module imports nothing heavy, so that ``rela --help`` stays fast.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable

import click

from rela_convert.options import Option, choice_names, choice_source, declared, flag


class ConfigFileError(ValueError):
    """A ``--config`` file that cannot be used (not TOML, an unknown table or key, a bad value); the message (one
    line) names the file and the key."""


class RegistryChoice(click.ParamType):
    """A choice among names read only when the option is used or its help shown, so that ``rela --help`` imports
    no torch.

    Args:
        where: ``"module:attribute"`` of a :class:`~rela_convert.registry.Registry` or of a tuple of names, e.g.
            ``"rela_train.methods.base:METHODS"``; or the tuple of names itself.
    """

    name = "choice"

    def __init__(self, where: str | tuple[str, ...]) -> None:
        self.where = where

    @property
    def registry(self):
        """The registry (or tuple of names) the choices come from."""
        return choice_source(self.where)

    def names(self) -> list[str]:
        return choice_names(self.where)

    def get_metavar(self, param, ctx=None) -> str:
        return "[" + "|".join(self.names()) + "]"

    def convert(self, value, param, ctx):
        names = self.names()
        if value not in names:
            self.fail(f"{value!r} is not one of {', '.join(names)}", param, ctx)
        return value


class RegistryList(RegistryChoice):
    """Comma-separated names of a registry, or an alias of such a list, as a tuple of distinct names in the
    registry's order (so that a set of names is always spelt the same); the registry is read only when needed (see
    :class:`RegistryChoice`).

    Args:
        where: ``"module:attribute"`` of the registry (or of a tuple of names), or the tuple of names itself.
        aliases: alias -> the names it stands for (e.g. ``{"both": ("webdataset", "hdf5")}``).
    """

    def __init__(self, where: str | tuple[str, ...], aliases: dict[str, tuple[str, ...]] | None = None) -> None:
        super().__init__(where)
        self.aliases = dict(aliases or {})

    def get_metavar(self, param, ctx=None) -> str:
        return "[" + "|".join([*self.names(), *self.aliases]) + "][,...]"

    def convert(self, value, param, ctx) -> tuple[str, ...]:
        if isinstance(value, tuple):  # already converted (a default, or parameters passed on in-process)
            return value
        names, chosen = self.names(), set()
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


class CommaList(click.ParamType):
    """A comma-separated list of ``kind`` (``int``, ``float``, ``str``) as a tuple, in the order given (empty
    items are dropped)."""

    name = "list"

    def __init__(self, kind: type) -> None:
        self.kind = kind

    def get_metavar(self, param, ctx=None) -> str:
        return f"{self.kind.__name__.upper()}[,...]"

    def convert(self, value, param, ctx) -> tuple:
        if isinstance(value, tuple):  # already converted
            return value
        parts = [part.strip() for part in str(value).split(",") if part.strip()]
        try:
            return tuple(self.kind(part) for part in parts)
        except ValueError:
            self.fail(f"expected a comma-separated list of {self.kind.__name__}s, got {value!r}", param, ctx)


def _scalar(item) -> type:
    """The Python type of a declared field's values (``int`` for ``int | None``, ``float`` for ``tuple[float,
    ...]``), from its annotation."""
    annotation = str(item.type)
    for kind in (int, float):
        if annotation.startswith((kind.__name__, f"tuple[{kind.__name__}")):
            return kind
    return str


def click_type(item, spec: Option) -> click.ParamType:
    """The click parameter type of a declared field: its choices, its range, a folder or a comma-separated list
    (of choices: :class:`RegistryList`)."""
    kind = spec.items or _scalar(item)
    if spec.items is not None:
        return RegistryList(spec.choices, spec.aliases) if spec.choices is not None else CommaList(kind)
    if isinstance(spec.choices, str):
        return RegistryChoice(spec.choices)
    if spec.choices is not None:
        return click.Choice([*([spec.none] if spec.none is not None else []), *spec.choices])
    if spec.folder:
        return click.Path(exists=True, file_okay=False)
    bounded = spec.min is not None or spec.max is not None
    bounds = dict(min=spec.min, max=spec.max, min_open=spec.min_open, max_open=spec.max_open)
    if kind is int:
        return click.IntRange(**bounds) if bounded else click.INT
    if kind is float:
        return click.FloatRange(**bounds) if bounded else click.FLOAT
    return click.STRING


def _none_callback(spec: Option) -> Callable | None:
    """The callback turning the command-line spelling of None (:attr:`Option.none`) into None."""
    if spec.none is None:
        return None
    return lambda ctx, param, value: None if value == spec.none else value


def declared_options(cls: type, command: str) -> Callable:
    """A decorator adding to a click command one option per field of dataclass ``cls`` declared with
    :func:`rela_convert.options.option` and shown by ``command`` (the parameter is named after the field)."""

    def decorate(function):
        for item, spec in reversed(list(declared(cls, command))):
            default = spec.none if item.default is None and spec.none is not None else item.default
            shown = default not in (None, ())
            function = click.option(
                flag(item, spec),
                item.name,
                default=default,
                type=click_type(item, spec),
                metavar=spec.metavar,
                callback=_none_callback(spec),
                show_default=",".join(map(str, default)) if isinstance(default, tuple) and shown else shown,
                help=spec.help,
            )(function)
        return function

    return decorate


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


def _read_config_file(ctx: click.Context, param: click.Parameter, path: str | None, commands: dict) -> None:
    """Eager callback of ``--config``: the file's values become the command's defaults (``ctx.default_map``),
    so options given on the command line override them; ``commands`` (by name) are the tables the file may hold.

    Raises:
        ConfigFileError: the file is not TOML, or has an unknown table, an unknown key or a bad value (the message
            names the file and the key; ``rela`` prints it as one ``error:`` line).
    """
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
        raise ConfigFileError(f"{path}: cannot read it as TOML ({error})") from error
    command = ctx.info_name
    values = {key: value for key, value in table.items() if not isinstance(value, dict)}
    for key, value in table.items():
        if isinstance(value, dict) and key not in commands:
            raise ConfigFileError(
                f"{path}: unknown table [{key}] (tables are named after rela commands: {', '.join(commands)})"
            )
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
            raise ConfigFileError(
                f"{path}: unknown key {key!r} (rela {command} has no --{key.replace('_', '-')} option)"
            )
        try:
            defaults[parameter.name] = _config_value(ctx, parameter, value)
        except click.BadParameter as error:
            raise ConfigFileError(f"{path}: bad value for {key!r}: {error.message}") from error
    ctx.default_map = {**(ctx.default_map or {}), **defaults}


def config_file_option(group: click.Group) -> Callable:
    """A decorator adding ``--config FILE.toml`` to a command of ``group``: option values from a TOML file (its top
    level and the table named after the command; a table named after another command of ``group`` is skipped),
    overridden by the options given on the command line."""
    return click.option(
        "--config",
        type=click.Path(exists=True, dir_okay=False),
        is_eager=True,
        expose_value=False,
        callback=lambda ctx, param, path: _read_config_file(ctx, param, path, group.commands),
        help=(
            "Read option values from this TOML file; options given on the command line override them. Keys are "
            "option names (batch-size = 128 or batch_size = 128), at the top level or in a table named after the "
            "command ([convert], [train], [study]; tables of the other commands are skipped), so one file can "
            "serve a whole pipeline. Paths are relative to the working directory."
        ),
    )


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


class DatasetLocation(click.Path):
    """DATA of the commands that read a converted dataset: an existing folder, or a URL (``s3://bucket/prefix``,
    ``https://host/prefix``, ... anything fsspec opens; :mod:`rela_convert.dataset.remote`), passed on as it is."""

    def __init__(self) -> None:
        super().__init__(exists=True, file_okay=False)

    def convert(self, value, param, ctx):
        from rela_convert.dataset.remote import is_url  # imports nothing heavy

        if isinstance(value, str) and is_url(value):
            return value
        return super().convert(value, param, ctx)


def _environment_option(name: str, variable: str, metavar: str, help: str, parse=None, **kwargs) -> Callable:
    """A click option that sets environment variable ``variable`` (read by :mod:`rela_convert.dataset.remote` in
    this process, its DataLoader workers and the processes ``--nproc`` starts) for the rest of the command, also
    taken from that variable, checked with ``parse`` (a ValueError becomes a usage error); the old value is
    restored when the command ends. ``kwargs`` go to :func:`click.option` (e.g. ``type``)."""

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

    return click.option(
        name,
        metavar=metavar,
        default=None,
        envvar=variable,
        show_envvar=True,
        expose_value=False,
        callback=callback,
        help=help,
        **kwargs,
    )


def storage_options_option(command):
    """Add ``--storage-options JSON`` (fsspec options of a DATA or destination URL) to a click command."""
    from rela_convert.dataset import remote

    return _environment_option(
        "--storage-options",
        remote.STORAGE_OPTIONS_VARIABLE,
        "JSON",
        "fsspec storage options of a URL, as a JSON object: endpoint, credentials, region, ... e.g. "
        '\'{"endpoint_url": "http://127.0.0.1:9000"}\' for an S3-compatible server. Without it the back-end\'s '
        "own configuration applies (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL, ~/.aws, "
        "GOOGLE_APPLICATION_CREDENTIALS, FSSPEC_S3_ENDPOINT_URL, ...).",
        remote.parse_storage_options,
    )(command)


def remote_options(command):
    """Add ``--storage-options``, ``--cache-dir`` and ``--cache-limit`` (reading DATA from a URL) to a command."""
    from rela_convert.dataset import remote

    command = _environment_option(
        "--cache-limit",
        remote.CACHE_LIMIT_VARIABLE,
        "BYTES",
        "Most bytes --cache-dir keeps (e.g. 50G; K, M, G, T are powers of 1024): above it the least recently "
        "used shards are deleted (shards being read are kept). [default: no limit]",
        remote.parse_bytes,
    )(command)
    command = _environment_option(
        "--cache-dir",
        remote.CACHE_DIR_VARIABLE,
        "DIR",
        "DATA at a URL: keep the shards fetched (whole, checked against index.json's SHA-256) in this local "
        "folder, shared by every process and run, so that later epochs and runs read them locally. "
        "[default: none: each shard is fetched into a temporary file, read and deleted, every epoch]",
        type=click.Path(file_okay=False),
    )(command)
    return storage_options_option(command)
