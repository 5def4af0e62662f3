"""Every third-party module the project imports is declared in ``pyproject.toml`` by the
distribution that provides it, so a fresh ``pip install -e ".[dev]"`` has it.

A module installed here only by hand (hypothesis, once) or only as a dependency of a dependency
(PIL through torchvision) passes on this machine and fails on a fresh one, or on the day the other
package drops it. The scan reads every ``import`` in the package, the tests, the benchmarks, the
docs and the notebooks' code cells, and maps each top-level module to its distribution with
``importlib.metadata``.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

# The standard library reads TOML from Python 3.11 on (the package itself supports 3.10).
tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
OWN = {"captum_normgrad"}


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement(spec: str) -> tuple[str, list[str]]:
    """``"captum-normgrad[examples,coco]>=1"`` -> ``("captum-normgrad", ["examples", "coco"])``."""
    match = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[([^\]]*)\])?", spec)
    assert match, f"cannot read the requirement {spec!r}"
    extras = [extra.strip() for extra in (match.group(2) or "").split(",") if extra.strip()]
    return _normalised(match.group(1)), extras


def _declared(extras: list[str]) -> set[str]:
    """The distributions named by the core dependencies and the given extras, following the
    project's references to its own extras (``captum-normgrad[examples]`` inside ``dev``)."""
    project = PYPROJECT["project"]
    own_name = _normalised(project["name"])
    optional = project.get("optional-dependencies", {})
    names, todo, seen = set(), list(extras), set()
    specs = list(project.get("dependencies", []))
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        assert extra in optional, f"pyproject.toml has no extra {extra!r}"
        specs += optional[extra]
    for spec in specs:
        name, referenced = _requirement(spec)
        if name == own_name:
            todo += referenced
            specs += [s for extra in referenced for s in optional.get(extra, [])]
        else:
            names.add(name)
    return names


def _imports(source: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def _notebook_code(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    lines = [
        line
        for cell in cells
        if cell["cell_type"] == "code"
        for line in "".join(cell["source"]).splitlines()
        if not line.lstrip().startswith(("%", "!"))  # IPython magics and shell lines
    ]
    return "\n".join(lines)


def _sources() -> dict[Path, str]:
    sources = {}
    for folder in ("captum_normgrad", "tests", "benchmarks", "docs"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            sources[path] = path.read_text()
    for path in sorted((ROOT / "tutorials").glob("*.ipynb")):
        sources[path] = _notebook_code(path)
    return sources


def _local_modules() -> set[str]:
    """The tests' and benchmarks' own helper modules, imported by plain name, and docs' conf."""
    return {
        path.stem
        for folder in ("tests", "benchmarks", "docs")
        for path in (ROOT / folder).glob("*.py")
    }


def test_every_import_is_declared_by_its_distribution() -> None:
    declared = _declared(["dev"])
    providers = metadata.packages_distributions()
    local = OWN | _local_modules() | set(sys.stdlib_module_names) | {"__future__"}
    problems = []
    for path, source in _sources().items():
        for module in sorted(_imports(source) - local):
            distributions = {_normalised(name) for name in providers.get(module, [])}
            where = path.relative_to(ROOT)
            if not distributions:
                problems.append(
                    f"{where}: imports {module}, which no installed distribution provides"
                )
            elif not distributions & declared:
                problems.append(
                    f"{where}: imports {module} from {' / '.join(sorted(distributions))}, which "
                    "pyproject.toml does not declare (core dependencies or the dev extra)"
                )
    assert not problems, "\n".join(problems)


def test_the_scan_sees_what_it_must() -> None:
    """The scan is not vacuous: it finds torch in the package and hypothesis in the tests, and a
    transitive-only module counts as undeclared."""
    sources = _sources()
    assert "torch" in _imports(sources[ROOT / "captum_normgrad" / "normgrad.py"])
    assert any("hypothesis" in _imports(source) for source in sources.values())
    assert "pillow" in _declared(["dev"]) and "hypothesis" in _declared(["dev"])
    assert "hypothesis" not in _declared([])  # a test tool, not a run-time dependency
    assert "efficientnet-lite-pytorch" in _declared(["examples"])  # extras are followed
    assert "filelock" not in _declared(["dev"])  # torch's dependency, not ours
