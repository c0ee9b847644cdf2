"""Decorator registries: the one place each kind of extension (prior, storage format, subset
strategy, method) is looked up by name (timm's model-registry convention).

Adding an extension is one file: define it, decorate it with its registry's ``register(name)``,
and make sure the file is imported, either because it lives in the package that holds the
built-ins (the registry imports that package on first use) or because an installed package
declares it under the registry's entry-point group (``[options.entry_points] rela.methods =
mine = my_package.my_method``), or simply by importing it before use (tests do this).

Importing this module imports nothing heavy, so the CLI can build its options from the
registries lazily and ``rela --help`` stays fast.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Callable, Generic, Iterator, TypeVar

Entry = TypeVar("Entry")


class RegistryError(ValueError):
    """An unknown or twice-registered name; the one-line message lists the known names."""


class Registry(Generic[Entry]):
    """Names -> extensions (classes or builder functions) of one kind.

    Args:
        kind: what the entries are, for messages and the CLI (``"method"``, ``"prior"``, ...).
        builtins: module whose import registers the built-in entries (imported on first look-up).
        group: entry-point group whose entries are imported on first look-up (``rela.<kind>s``).
    """

    def __init__(self, kind: str, builtins: str, group: str | None = None) -> None:
        self.kind = kind
        self.builtins = builtins
        self.group = group or f"rela.{kind.replace(' ', '_')}s"
        self._entries: dict[str, Entry] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[Entry], Entry]:
        """Decorator registering a class or function under ``name``; sets ``entry.registered_name``.

        Raises:
            RegistryError: ``name`` is already registered to another object.
        """

        def decorate(entry: Entry) -> Entry:
            known = self._entries.get(name)
            if known is not None and known is not entry and _qualified(known) != _qualified(entry):
                raise RegistryError(f"{self.kind} {name!r} is already registered ({_qualified(known)})")
            entry.registered_name = name
            self._entries[name] = entry
            return entry

        return decorate

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        importlib.import_module(self.builtins)
        for point in entry_points(group=self.group):
            point.load()

    def names(self) -> list[str]:
        """Registered names, built-ins first in their registration order."""
        self._load()
        return list(self._entries)

    def get(self, name: str) -> Entry:
        """The entry registered as ``name``.

        Raises:
            RegistryError: unknown name (the message lists the known ones).
        """
        self._load()
        if name not in self._entries:
            raise RegistryError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self._entries)}")
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def describe(self) -> str:
        """``"name: first docstring line; ..."`` of every entry, for ``--help``."""
        return "; ".join(f"{name}: {_summary(self._entries[name])}" for name in self.names())


def _qualified(entry: object) -> str:
    return f"{getattr(entry, '__module__', '?')}.{getattr(entry, '__qualname__', repr(entry))}"


def _summary(entry: object) -> str:
    doc = (getattr(entry, "__doc__", None) or "").strip()
    return doc.split("\n\n")[0].replace("\n", " ").rstrip(".") if doc else ""
