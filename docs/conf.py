"""Sphinx configuration: ``python -m sphinx -W --keep-going -n -b html docs docs/_build/html``.

Offline: no intersphinx inventories are fetched, so references to torch, Captum or the standard
library stay plain text (``nitpick_ignore_regex`` below); references to this package's own public
names must resolve, or the build fails. The tutorials are copied from ``../tutorials`` and executed
by myst-nb, so their pages carry the maps the code draws.
"""

from __future__ import annotations

import shutil
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent

project = "captum-normgrad"
author = "the captum-normgrad developers"
copyright = "2026, the captum-normgrad developers"  # noqa: A001 - Sphinx's name

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "myst_nb"]
html_theme = "furo"
html_title = "captum-normgrad"
exclude_patterns = ["_build", "jupyter_execute", "**.ipynb_checkpoints"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
# Aliases shown by name, not expanded into their unions.
autodoc_type_aliases = {
    "LossSpec": "captum_normgrad.losses.LossSpec",
    "TargetType": "TargetType",
    "ReshapeTransform": "ReshapeTransform",
}
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

nitpicky = True
nitpick_ignore_regex = [
    # Other projects' names: no inventory is fetched (the build is offline).
    (
        r"py:.*",
        r"(torch|captum|numpy|np|matplotlib|PIL|os|pathlib|collections|typing|types)(\..*)?",
    ),
    (r"py:.*", r"(Tensor|nn\..*|Path|Callable|Sequence|Iterable|Iterator|Mapping|Literal)"),
    # Private aliases in signatures: ReshapeTransform is Callable[[Tensor], Tensor] (documented with
    # the argument), the rest live under the private _core tree.
    # Captum's TargetType: None, an int, a tuple, a list of them or a tensor (as the argument says).
    (r"py:class", r"ReshapeTransform|TargetType|captum_normgrad\._.*"),
]

myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3
nb_execution_mode = "force"  # except the tests' executed copies, marked execution_mode "off"
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_merge_streams = True
nb_output_stderr = "remove"  # warnings printed by third-party progress bars are not content


def _copy_tutorials(app: object) -> None:
    """The notebooks live in ``tutorials/``; the docs render copies in ``docs/tutorials/``. The test
    suite leaves executed copies there (tests/test_tutorials.py): one newer than its source is
    rendered as it is, with its outputs; otherwise the source is copied and myst-nb executes it."""
    target = DOCS / "tutorials"
    target.mkdir(exist_ok=True)
    for notebook in sorted((ROOT / "tutorials").glob("*.ipynb")):
        copy = target / notebook.name
        if not copy.exists() or copy.stat().st_mtime < notebook.stat().st_mtime:
            shutil.copy2(notebook, copy)
    figures = ROOT / "tutorials" / "figures"
    if figures.is_dir():
        shutil.copytree(figures, DOCS / "_static" / "figures", dirs_exist_ok=True)


def setup(app: object) -> None:
    app.connect("builder-inited", _copy_tutorials)
