"""One discovery rule for every registry: each package imports all its public modules, so a new
loss, scheme, model or dataset source is one new file, with no list to edit."""

from __future__ import annotations

import ast
import importlib
import sys
import textwrap
from pathlib import Path

import pytest

from darkknowledge.discovery import import_modules

ROOT = Path(__file__).resolve().parents[1] / "darkknowledge"
PACKAGES = ["darkknowledge.losses", "darkknowledge.schemes", "darkknowledge.models", "darkknowledge.data.sources"]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_module_is_imported_by_the_rule(package):
    module = importlib.import_module(package)
    folder = Path(module.__file__).parent
    public = sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))
    assert public and all(f"{package}.{name}" in sys.modules for name in public)
    calls = [
        n
        for n in ast.walk(ast.parse((folder / "__init__.py").read_text()))
        if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "import_modules"
    ]
    assert len(calls) == 1, f"{package}/__init__.py should discover its modules with import_modules"
    listed = [
        n
        for n in ast.walk(ast.parse((folder / "__init__.py").read_text()))
        if isinstance(n, ast.ImportFrom) and n.module == package
    ]
    assert not listed, f"{package}/__init__.py keeps a hand-written list of its modules"


def test_a_new_file_is_registered_without_editing_anything(tmp_path, monkeypatch):
    pkg = tmp_path / "plugins"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from darkknowledge.discovery import import_modules\nFOUND = []\nimport_modules(__name__, __path__)\n"
    )
    (pkg / "first.py").write_text("from plugins import FOUND\nFOUND.append('first')\n")
    (pkg / "_private.py").write_text("raise RuntimeError('private helpers are not imported by the rule')\n")
    (pkg / "second.py").write_text(
        textwrap.dedent("""
        from darkknowledge.losses import LOSSES, register_loss
        from darkknowledge.losses.base import DistillLoss
        from plugins import FOUND

        @register_loss("test_discovered")
        class Discovered(DistillLoss):
            pass

        FOUND.append('second')
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        plugins = importlib.import_module("plugins")
        assert plugins.FOUND == ["first", "second"]
        from darkknowledge.losses import LOSSES

        assert "test_discovered" in LOSSES
    finally:
        from darkknowledge.losses import LOSSES

        LOSSES._items.pop("test_discovered", None)
        for name in [m for m in sys.modules if m == "plugins" or m.startswith("plugins.")]:
            del sys.modules[name]
    assert import_modules("json", [str(Path(importlib.import_module("json").__file__).parent)]) == [
        "decoder",
        "encoder",
        "scanner",
        "tool",
    ]
