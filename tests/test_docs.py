"""The documentation site (``docs/``): every ```` ```python ```` block of its pages runs, and the README's links into it
resolve.

The Python blocks of one page run in order in one namespace (a later block may use what an earlier one defined, as a
reader would), with ``RELA_DATA`` naming a real converted dataset (the ``converted_cifar`` fixture: 200 CIFAR-10
images, CIFAR ResNet-20 prior) and ``RELA_IMAGES`` its class-folder source (``small_cifar_tree``), in a temporary
working directory; what the blocks register in rela's registries is unregistered afterwards. A block that cannot run
in seconds on such data would be marked by a first line ``# not run: <why>``; none is so marked today. Code shown in
another way is not a Python block and is not run here: the ```` ```bash ```` command lines, and the README's
plain-PyTorch example, which ``docs/api.md`` shows through ``literalinclude`` and ``tests/test_api.py`` runs.

The site itself is built by ``scripts/test.sh`` (``sphinx-build -W``: warnings, broken cross-references included,
are errors).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
NOT_RUN = "# not run:"


def python_blocks(page: Path) -> list[str]:
    """The ```` ```python ```` blocks of ``page`` that run (not marked ``# not run: ...``), in order."""
    return [block for block in BLOCK.findall(page.read_text()) if not block.startswith(NOT_RUN)]


PAGES = sorted(page for page in DOCS.glob("*.md") if python_blocks(page))


def test_the_pages_with_examples_are_found():
    assert {page.name for page in PAGES} >= {"extending.md", "converting.md"}


@pytest.fixture
def registries():
    """rela's registries as they were before the test (the examples register a method, a prior, a strategy and a
    storage format)."""
    from rela_convert.dataset.formats import STORAGE_FORMATS
    from rela_convert.dataset.subset import SUBSET_STRATEGIES
    from rela_convert.priors import PRIORS
    from rela_train.methods import METHODS

    saved = {}
    for registry in (METHODS, PRIORS, SUBSET_STRATEGIES, STORAGE_FORMATS):
        registry.names()  # the built-ins first
        saved[registry] = dict(registry._entries)
    yield
    for registry, entries in saved.items():
        registry._entries.clear()
        registry._entries.update(entries)


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_the_python_blocks_of_a_page_run(page, converted_cifar, small_cifar_tree, tmp_path, registries, monkeypatch):
    monkeypatch.setenv("RELA_DATA", str(converted_cifar))
    monkeypatch.setenv("RELA_IMAGES", str(small_cifar_tree))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    namespace = {"__name__": f"docs_{page.stem}"}
    for number, block in enumerate(python_blocks(page), 1):
        exec(compile(block, f"{page.relative_to(ROOT)} (python block {number})", "exec"), namespace)


def test_the_readme_links_into_the_docs_resolve():
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(((?:docs|experiments)/[^)#]+)(?:#[^)]*)?\)", readme)
    assert len(targets) > 15
    assert [target for target in targets if not (ROOT / target).is_file()] == []
    linked = {Path(target).name for target in targets if target.startswith("docs/")}
    pages = {page.name for page in DOCS.glob("*.md")} - {"index.md"}
    assert pages - linked == set()  # the README's table lists every page
