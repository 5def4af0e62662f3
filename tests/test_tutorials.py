"""The tutorial notebooks execute from top to bottom without error (outputs are not kept in git).

The executed copies go to ``docs/tutorials/`` (ignored by git), where the documentation build renders
them with their figures instead of executing the notebooks a second time (``docs/conf.py``).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "tutorials"
EXECUTED = ROOT / "docs" / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))


def test_the_tutorials_are_there() -> None:
    assert len(NOTEBOOKS) == 6


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs(path: Path, tmp_path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        assert cell.get("outputs", []) == [], f"{path.name}: outputs must be cleared in git"
        assert "_" + "cli" not in cell.source and "captum_normgrad._" not in cell.source
    # The notebooks run in a scratch folder so nothing they might write lands in the repository.
    client = NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    drawn = [
        output
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert drawn, f"{path.name} drew no figure"
    EXECUTED.mkdir(exist_ok=True)
    notebook.metadata["mystnb"] = {"execution_mode": "off"}  # already executed: render as it is
    nbformat.write(notebook, EXECUTED / path.name)
