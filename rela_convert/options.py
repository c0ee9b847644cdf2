"""Options declared once: a command's options are the fields of a frozen dataclass, each made with :func:`option`.

A field's :class:`Option` (its ``metadata["option"]``) holds what the command line needs besides the default: the
help text (with units), the flag, the metavar, the allowed values (a range, or choices) and which commands show it.
Everything else is derived from that one declaration:

- the click options, ``--help`` and the ``--config`` TOML keys of the commands (:mod:`rela_convert.click_options`);
- the checks of values given in Python (:func:`check`: the same ranges and choices as on the command line);
- what a run records (``TrainConfig.identity``: every option that changes what a run computes, less those at
  their :attr:`Option.old_value`) and what ``rela study`` forwards to ``rela train`` (:func:`values`).

Choices may name where they are defined as ``"module:attribute"`` (a :class:`~rela_convert.registry.Registry`, or a
tuple of names): that module is imported only when the choices are needed (the option used, its help shown), so that
``rela --help`` imports no torch. Importing this module imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Iterator

#: :attr:`Option.old_value` of an option that always existed.
ALWAYS_EXISTED = object()


@dataclass(frozen=True)
class Option:
    """How one dataclass field is given on the command line (see the module docstring).

    Attributes:
        help: the help text, with the units of the value.
        flag: the command-line name; None: ``--`` and the field name with dashes.
        metavar: the value's name in ``--help`` (``STEPS``, ``DIR``, ...); None: click's.
        min, max: the allowed range of a number (None: unbounded); ``min_open`` / ``max_open`` exclude the bound.
        choices: the allowed values: a tuple of names, or ``"module:attribute"`` of a
            :class:`~rela_convert.registry.Registry` or of a tuple (read only when needed).
        aliases: names that stand for several choices of a list (``{"both": ("webdataset", "hdf5")}``).
        items: the type of the items of a tuple value (``int``, ``float``, ``str``), given comma-separated; None:
            one value.
        folder: the value names an existing folder.
        none: the command-line spelling of None (e.g. ``"none"``); None: None has no spelling (the option's
            default only).
        commands: the commands that show the option; None: every command built from the dataclass.
        runtime: the option changes how a run goes, not what it computes: a run may resume with another value.
        old_value: the value that runs saved before the option existed had (a run's identity leaves the option out at
            that value, so that those runs still resume); :data:`ALWAYS_EXISTED`: the option always existed.
    """

    help: str
    flag: str | None = None
    metavar: str | None = None
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False
    choices: tuple[str, ...] | str | None = None
    aliases: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    items: type | None = None
    folder: bool = False
    none: str | None = None
    commands: tuple[str, ...] | None = None
    runtime: bool = False
    old_value: Any = ALWAYS_EXISTED


def option(default: Any, help: str, **spec: Any) -> Any:
    """A dataclass field that is a command-line option: ``default`` and its :class:`Option` (``help`` and ``spec``,
    the other attributes of :class:`Option`)."""
    return dataclasses.field(default=default, metadata={"option": Option(help, **spec)})


def declared(cls: type, command: str | None = None) -> Iterator[tuple[dataclasses.Field, Option]]:
    """The fields of dataclass ``cls`` declared with :func:`option`, with their :class:`Option`, in declaration
    order; with ``command``, only those that command shows."""
    for item in dataclasses.fields(cls):
        spec = item.metadata.get("option")
        if spec is not None and (command is None or spec.commands is None or command in spec.commands):
            yield item, spec


def flag(item: dataclasses.Field, spec: Option) -> str:
    """The command-line name of a declared field (``--batch-size`` for ``batch_size``)."""
    return spec.flag or "--" + item.name.replace("_", "-")


def choice_source(choices: tuple[str, ...] | str) -> Any:
    """What :attr:`Option.choices` names: the registry or tuple at a ``"module:attribute"`` (imported now), or the
    tuple itself.

    Raises:
        ImportError, AttributeError: a ``"module:attribute"`` that does not exist (a bug in a declaration).
    """
    if not isinstance(choices, str):
        return choices
    module, attribute = choices.split(":")
    return getattr(importlib.import_module(module), attribute)


def choice_names(choices: tuple[str, ...] | str) -> list[str]:
    """The names ``choices`` allows (see :attr:`Option.choices`); a registry is loaded (built-ins first).

    Raises:
        ImportError, AttributeError: see :func:`choice_source`.
    """
    source = choice_source(choices)
    return source.names() if hasattr(source, "names") else list(source)


def _problem(value: Any, spec: Option) -> str | None:
    """Why ``value`` is not allowed by ``spec`` (one item of a list option), or None."""
    if spec.choices is not None:
        names = choice_names(spec.choices)
        return None if value in names else f"is one of {', '.join(names)}, not {value!r}"
    if spec.min is not None and (value <= spec.min if spec.min_open else value < spec.min):
        return f"must be {'>' if spec.min_open else '>='} {spec.min:g}, not {value}"
    if spec.max is not None and (value >= spec.max if spec.max_open else value > spec.max):
        return f"must be {'<' if spec.max_open else '<='} {spec.max:g}, not {value}"
    return None


def check(values: Any) -> None:
    """Check every declared option of the dataclass instance ``values`` against its range and choices, as the
    command line does (None passes: an option left to its derived default).

    Raises:
        ValueError: the first value out of range or not among the choices; the message names the option's flag.
    """
    for item, spec in declared(type(values)):
        value = getattr(values, item.name)
        if value is None:
            continue
        for part in value if spec.items is not None else (value,):
            problem = _problem(part, spec)
            if problem is not None:
                raise ValueError(f"{flag(item, spec)} {problem}")


def values(cls: type, given: dict[str, Any], **overrides: Any) -> Any:
    """An instance of dataclass ``cls`` from ``given`` (e.g. the parsed parameters of a command, keyed by field
    name), taking the fields it declares and leaving the others to their defaults; ``overrides`` win."""
    names = {item.name for item in dataclasses.fields(cls)}
    return cls(**{**{name: value for name, value in given.items() if name in names}, **overrides})
