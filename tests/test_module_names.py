"""No module of ``bench/`` or ``tests/`` may share its name with an importable top-level module.

``python bench/<script>.py`` puts ``bench/`` first on ``sys.path`` (and the bench and GPU-check tests
add it), so a file there named like an installed package shadows it for everything that runs in
that process: ``bench/kernels.py`` once hid the pip package ``kernels`` that transformers imports
from ``transformers.activations``, and every model build in those processes failed.
"""

import importlib.metadata
import pkgutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = [ROOT / "bench", ROOT / "tests"]


def _own_modules(folder: Path) -> set[str]:
    names = {p.stem for p in folder.glob("*.py")}
    names |= {p.name for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    return names


def _installed_modules() -> set[str]:
    """Top-level modules importable without the repository's own folders on the path."""
    ours = {str(ROOT.resolve())} | {str(f.resolve()) for f in FOLDERS}
    paths = [p for p in sys.path if p and str(Path(p).resolve()) not in ours]
    names = {m.name for m in pkgutil.iter_modules(paths)}
    names |= set(sys.stdlib_module_names) | set(sys.builtin_module_names)
    names |= set(importlib.metadata.packages_distributions())  # top-level names of every dist
    return names


def test_installed_modules_are_found():
    """The scan sees what is installed (a scan that finds nothing would pass the check below)."""
    names = _installed_modules()
    assert {"torch", "triton", "json", "pytest"} <= names


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda f: f.name)
def test_no_module_shadows_an_installed_one(folder):
    clash = sorted((_own_modules(folder) - {"conftest", "__init__"}) & _installed_modules())
    assert not clash, (f"{folder.name}/ modules named like installed modules: {clash}; rename them "
                       f"(a script's folder comes first on sys.path and would shadow them)")
