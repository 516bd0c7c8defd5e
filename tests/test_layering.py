"""The library does not import the application: quantization, capture, export, lint, engines
and verification (deploy/*, backends/, models/) stay usable without the pipeline, benchmark,
CI gate and command line built on them, and a change there cannot ripple down."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: deploy's application modules: they run the library for a user (build, bench, gate, CLI)
APPLICATION = ("pipeline", "bench", "gate", "cli", "entry", "__main__", "selfcheck")


def _library_files() -> list[Path]:
    files = [p for folder in ("backends", "models") for p in (REPO / folder).rglob("*.py")]
    for path in (REPO / "deploy").rglob("*.py"):
        top = path.relative_to(REPO / "deploy").parts[0].removesuffix(".py")
        if top not in APPLICATION:
            files.append(path)
    return sorted(files)


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", _library_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_library_module_imports_no_application_module(path):
    application = tuple(f"qat_deploy.deploy.{name}" for name in APPLICATION)
    offending = sorted(name for name in _imported(path) if name.startswith(application))
    assert not offending, f"{path.relative_to(REPO)} imports {offending}"


def test_the_check_sees_the_library():
    files = {str(p.relative_to(REPO)) for p in _library_files()}
    assert {"deploy/prepare.py", "deploy/export.py", "backends/openvino/adapter.py"} <= files
    assert not any(f.startswith(("deploy/pipeline", "deploy/cli/")) for f in files)
