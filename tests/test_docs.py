"""The documentation's code runs as written, and every public name has a docstring to render.

The site itself is built by ``.ci/run`` with warnings as errors (a broken cross-reference or a page
missing from a toctree fails it) and checked by ``docs/check_build.py``; these tests keep what can
be checked without a build fast and close to the code.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

import matplotlib
import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
sys.path.insert(0, str(DOCS))
from check_build import PACKAGES  # noqa: E402 - the packages the API reference documents

PAGES = sorted(
    p for p in DOCS.rglob("*.md") if "_build" not in p.parts and "tutorials" not in p.parts
)
BLOCKS = [
    (page, index, code)
    for page in PAGES
    for index, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))
]


def test_the_docs_have_pages_and_code() -> None:
    assert len(PAGES) >= 10 and BLOCKS, "the user guide lost its pages or its examples"


@pytest.mark.parametrize(
    ("page", "index", "code"), BLOCKS, ids=[f"{p.parent.name}/{p.stem}-{i}" for p, i, _ in BLOCKS]
)
def test_docs_code_block_runs(page, index, code, tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{page.name} example {index}", "exec"), {"__name__": "docs"})


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_function_and_class_has_a_docstring(package):
    module = importlib.import_module(package)
    missing = [
        name
        for name in module.__all__
        if (inspect.isclass(getattr(module, name)) or inspect.isfunction(getattr(module, name)))
        and not inspect.getdoc(getattr(module, name))
    ]
    assert not missing, f"{package}: public names without a docstring: {missing}"


def test_every_page_is_in_a_toctree():
    """Sphinx warns of an orphan page; this names it before a build."""
    listed = set()
    for page in [*PAGES, *DOCS.rglob("*.rst")]:
        for block in re.findall(r"```\{toctree\}(.*?)```", page.read_text(), flags=re.S):
            for line in block.splitlines():
                entry = line.strip()
                if entry and not entry.startswith(":"):
                    listed.add((page.parent / entry).resolve())
    pages = {p.with_suffix("").resolve() for p in [*PAGES, *DOCS.glob("api/*.rst")]}
    orphans = sorted(str(p.relative_to(DOCS)) for p in pages - listed if p.name != "index")
    assert not orphans, f"pages in no toctree: {orphans}"
