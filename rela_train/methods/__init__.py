"""Training methods, one file each, found by name through :data:`METHODS` (see :mod:`.base`).

Importing this package registers the built-in methods; ``METHODS.names()`` lists them.
"""

from rela_train.methods import byol  # noqa: F401  (registers the built-in methods)
from rela_train.methods.base import METHODS, Method, MethodSettings, register_method

__all__ = ["METHODS", "Method", "MethodSettings", "register_method"]
