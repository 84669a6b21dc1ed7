"""The repository's lint, format and type checks, as configured in ``pyproject.toml``.

``ruff check`` (lint) and ``ruff format --check`` over the package, the tests, the benchmarks and
the scripts; ``mypy`` over the package. Each runs the tool of this interpreter's environment and
is skipped, with the reason, where the tool is not installed (the ``test`` extra installs them).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCOPES = ("darkknowledge", "tests", "benchmarks", "scripts", "docs")


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m <tool> <args>`` at the repository root (where ``pyproject.toml`` configures it)."""
    if importlib.util.find_spec(tool) is None:
        pytest.skip(f"{tool} is not installed (pip install -e '.[test]' installs it)")
    return subprocess.run([sys.executable, "-m", tool, *args], cwd=ROOT, capture_output=True, text=True, check=False)


def _report(result: subprocess.CompletedProcess[str], limit: int = 6000) -> str:
    """The tool's output for an assertion message (its end, where the summary is)."""
    text = (result.stdout + result.stderr).strip()
    return text if len(text) <= limit else "...\n" + text[-limit:]


def test_ruff_check_is_clean():
    result = _run("ruff", "check", "--no-cache", *SCOPES)
    assert result.returncode == 0, _report(result)


def test_ruff_format_leaves_nothing_to_change():
    result = _run("ruff", "format", "--check", "--output-format", "concise", "--no-cache", *SCOPES)
    assert result.returncode == 0, "run `ruff format` to fix:\n" + _report(result)


@pytest.mark.slow
def test_mypy_is_clean():
    result = _run("mypy")  # packages and settings from pyproject.toml
    assert result.returncode == 0, _report(result)
