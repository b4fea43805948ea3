"""The house keeps its shape: imports run down the floors, no part reaches sideways, no giant modules.

Floors, from the ground up: ``common`` (site data, models, training, settings; no Flower but for
the record glue in ``common/records.py``), then ``client`` and ``server`` side by side (neither
imports the other), then ``simulation`` (synthetic hospitals and the main job), then
``benchmarks``. The phantom and the DICOM writer of ``simulation`` import nothing from Flower,
``client`` or ``server``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "client", "server", "simulation", "benchmarks")
# What each top-level package may import from the project (itself always).
ALLOWED = {
    "common": set(),
    "client": {"common"},
    "server": {"common"},
    "simulation": {"common", "client", "server"},
    "benchmarks": {"common", "client", "server", "simulation"},
}
FLOWER_GLUE = {Path("common/records.py")}  # the one module of common/ that speaks Flower records
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def _sources() -> list[Path]:
    return sorted(p.relative_to(ROOT) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every absolute module name ``path`` imports, with its line (relative imports resolved)."""
    tree = ast.parse((ROOT / path).read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = list(path.with_suffix("").parts[: -node.level])
                module = ".".join(base + ([module] if module else []))
            names.append((node.lineno, module))
    return names


SOURCES = _sources()


def test_the_tree_has_sources() -> None:
    assert len(SOURCES) > 50, SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=str)
def test_imports_run_down_the_floors(path: Path) -> None:
    package = path.parts[0]
    wrong = [
        f"{path}:{line} imports {name}"
        for line, name in _imports(path)
        if name.split(".")[0] in PACKAGES
        and name.split(".")[0] != package
        and name.split(".")[0] not in ALLOWED[package]
    ]
    assert not wrong, "an import from a higher floor or sideways:\n" + "\n".join(wrong)


@pytest.mark.parametrize("path", [p for p in SOURCES if p.parts[0] == "common"], ids=str)
def test_common_speaks_no_flower(path: Path) -> None:
    if path in FLOWER_GLUE:
        return
    flower = [
        f"{path}:{line} imports {name}" for line, name in _imports(path) if name.split(".")[0] == "flwr"
    ]
    assert not flower, "common/ is Flower-free (record glue lives in common/records.py):\n" + "\n".join(
        flower
    )


@pytest.mark.parametrize(
    "path",
    [p for p in SOURCES if p.parts[:2] in (("simulation", "phantom"), ("simulation", "synth"))],
    ids=str,
)
def test_the_phantom_knows_nothing_of_the_federation(path: Path) -> None:
    wrong = [
        f"{path}:{line} imports {name}"
        for line, name in _imports(path)
        if name.split(".")[0] in ("flwr", "client", "server", "ray")
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("path", SOURCES, ids=str)
def test_modules_and_functions_stay_small(path: Path) -> None:
    text = (ROOT / path).read_text()
    lines = text.count("\n")
    assert lines <= MAX_MODULE_LINES, (
        f"{path} has {lines} lines (at most {MAX_MODULE_LINES}): split it by concept"
    )
    long = [
        f"{path}:{node.lineno} {node.name} has {node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


@pytest.mark.parametrize("path", SOURCES, ids=str)
def test_every_module_says_what_it_is(path: Path) -> None:
    tree = ast.parse((ROOT / path).read_text())
    if path.name == "__init__.py" and not tree.body:
        return
    doc = ast.get_docstring(tree)
    assert doc and doc.strip(), f"{path} opens with no docstring: add one line saying what it is"


def test_the_client_app_loads_without_torch():
    """Flower starts a ClientApp process per message; the secure-aggregation steps, most of a round's
    messages, must not pay for importing torch and MONAI."""
    import subprocess
    import sys

    code = "import sys, client.client_app; print(sorted({'torch', 'monai'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
