"""Training methods, one file each, found by name through :data:`METHODS` (see :mod:`.base`).

Importing this package registers the built-in methods; ``METHODS.names()`` lists them.
"""

import rela_train.methods.barlowtwins  # noqa: F401  (registers the method)
import rela_train.methods.byol  # noqa: F401  (registers the method)
import rela_train.methods.dino  # noqa: F401  (registers the method)
import rela_train.methods.moco  # noqa: F401  (registers the method)
import rela_train.methods.simclr  # noqa: F401  (registers the method)
import rela_train.methods.simsiam  # noqa: F401  (registers the method)
import rela_train.methods.supervised  # noqa: F401  (registers the method)
import rela_train.methods.vicreg  # noqa: F401  (registers the method)
from rela_train.methods.base import METHODS, Method, MethodSettings, register_method

__all__ = ["METHODS", "Method", "MethodSettings", "register_method"]
