"""Sphinx configuration of rela's documentation site (docs/*.md through MyST; the API and CLI references generated
from the docstrings and the click commands). Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html``
(what ``scripts/test.sh`` runs); nothing needs the network."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document this checkout's code (cli.py is a top-level module)

project = "rela"
author = "the rela authors"
copyright = "the rela authors, Apache-2.0"  # noqa: A001 (Sphinx's name)
version = release = "0.1.0"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx_click",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3  # [text](page.md#a-heading) links to headings

# The API reference: Google-style docstrings ("Args:", "Returns:", "Raises:"), members in source order.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields: autodoc documents the annotated attributes themselves
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": True}

html_theme = "alabaster"
html_title = "rela"
html_static_path: list[str] = []
