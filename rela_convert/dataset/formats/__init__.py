"""Storage formats of converted shards, one file each, found by name through :data:`STORAGE_FORMATS`
(see :mod:`.base`: what a format declares).

Importing this package imports every module in it, so adding a format is one new file here: a
:class:`StorageFormat` subclass decorated with ``@register_format("<name>")``. The built-ins register
first, ``webdataset`` then ``hdf5`` (the order of ``STORAGE_FORMATS.names()``), then any other module
in name order. Formats defined elsewhere register when their module is imported (or through the
``rela.storage_formats`` entry-point group, :mod:`rela_convert.registry`).
"""

import importlib
import pkgutil

from rela_convert.dataset.formats.base import (
    STORAGE_FORMATS,
    Sample,
    ShardWriter,
    StorageFormat,
    finish_shard,
    preferred_format,
    register_format,
)

BUILTINS = ("webdataset", "hdf5")
for _module in (*BUILTINS, *sorted({info.name for info in pkgutil.iter_modules(__path__)} - {*BUILTINS, "base"})):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = [
    "STORAGE_FORMATS",
    "Sample",
    "ShardWriter",
    "StorageFormat",
    "finish_shard",
    "preferred_format",
    "register_format",
]
