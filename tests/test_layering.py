"""The layers are folders, and the folders keep to their imports.

deploy/app/ is the application (build, bench, CI gate, CLI); every other folder of deploy/, and
backends/ and models/, is the library. The library never imports the application, so it stays
usable without it and a change there cannot ripple down; inside the library each folder imports
only the folders below it in the data flow, as its own docstring says."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"

#: what each folder of deploy/ may import from deploy (besides itself); mirrors the docstrings
ALLOWED = {
    "common": set(),
    "quant": {"common"},
    "rules": {"common", "quant"},
    "frontend": {"common", "quant", "rules"},
    "lint": {"common", "quant", "rules"},
    "engines": {"common", "rules"},
    "export": {"common", "frontend", "rules"},
    "training": {"common", "frontend", "quant", "rules", "verify"},
    "verify": {"common", "engines", "export", "frontend", "quant", "rules", "training"},
    "tune": {"common", "engines", "export", "lint", "rules"},
}


def _folders() -> list[Path]:
    return sorted(p.parent for p in DEPLOY.rglob("__init__.py") if p.parent != DEPLOY)


def _deploy_imports(path: Path) -> set[str]:
    """Dotted names under qat_deploy.deploy that a module imports (modules and their members)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    prefix = "qat_deploy.deploy."
    return {name.removeprefix(prefix) for name in names if name.startswith(prefix)}


def _library_files() -> list[Path]:
    files = [p for folder in ("backends", "models") for p in (REPO / folder).rglob("*.py")]
    files += [p for p in DEPLOY.rglob("*.py") if p.relative_to(DEPLOY).parts[0] != "app"]
    return sorted(p for p in files if p.name != "__main__.py")


@pytest.mark.parametrize("path", _library_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_library_module_imports_no_application_module(path):
    offending = sorted(name for name in _deploy_imports(path) if name.split(".")[0] == "app")
    assert not offending, f"{path.relative_to(REPO)} imports {offending}"


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_library_folder_imports_only_the_folders_below_it(folder):
    offending = set()
    for path in (DEPLOY / folder).rglob("*.py"):
        for name in _deploy_imports(path):
            top = name.split(".")[0]
            if (DEPLOY / top).is_dir() and top != folder and top not in ALLOWED[folder]:
                offending.add(f"{path.relative_to(REPO)} -> {name}")
    assert not offending, sorted(offending)


def test_every_folder_is_in_the_table_and_says_what_it_owns():
    folders = {p.relative_to(DEPLOY).parts[0] for p in _folders()}
    assert folders - {"app"} == set(ALLOWED)
    for path in _folders():
        docstring = ast.get_docstring(ast.parse((path / "__init__.py").read_text()))
        assert docstring and len(docstring.split()) >= 15, f"{path} has no docstring to speak of"


def test_every_package_folder_is_installed():
    """A folder missing from pyproject's packages works in an editable install and is absent
    from a wheel; deploy/tune once was."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    installed = set(config["tool"]["setuptools"]["packages"])
    on_disk = {
        "qat_deploy." + ".".join(p.parent.relative_to(REPO).parts)
        for top in ("deploy", "backends", "models")
        for p in (REPO / top).rglob("__init__.py")
    }
    assert on_disk == installed


def test_tests_mirror_the_package_layout():
    """tests/<folder> exists only for a folder of the code, and a test module at the top of
    tests/ only for a module at the top of deploy/ (or this check)."""
    tests = REPO / "tests"
    test_folders = {p.parent.relative_to(tests) for p in tests.rglob("__init__.py")} - {Path(".")}
    code_folders = {p.relative_to(DEPLOY) for p in _folders()}
    code_folders |= {Path(top) for top in ("backends", "models", "benchmarks")}
    helpers = {Path("fixtures")}  # models and data the tests share
    assert test_folders - helpers <= code_folders, sorted(map(str, test_folders - code_folders))
    top_modules = {p.stem for p in DEPLOY.glob("*.py") if not p.stem.startswith("_")}
    top_tests = {p.stem.removeprefix("test_") for p in tests.glob("test_*.py")}
    assert top_tests - {"layering"} <= top_modules
