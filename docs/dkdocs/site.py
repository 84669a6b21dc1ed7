"""What the build adds to the hand-written pages: the generated pages and their places in the nav."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dkdocs import bench, catalog

SECTIONS = {"methods/index.md": "loss", "schemes/index.md": "scheme", "synthesizers/index.md": "synthesizer"}
"""The nav section whose index page is the key lists every registered entry of the value's kind."""


def generated(root: Path) -> dict[str, str | Path]:
    """Every generated page (Markdown text) and file (a path to copy), by path under ``docs/``."""
    return {**catalog.pages(root), **bench.pages(root)}


def _entries(index: str, root: Path) -> list[dict[str, str]]:
    if index in SECTIONS:
        kind = SECTIONS[index]
        return [{name: catalog.page_path(kind, name)} for name in catalog.names(kind)]
    if index == "benchmarks/index.md":
        return [{f"Suite {s}": f"benchmarks/{s}.md"} for s in bench.suite_names(root)] + [
            {"Runs": "benchmarks/runs.md"}
        ]
    return []


def extend_nav(nav: list[Any], root: Path) -> list[Any]:
    """Append the generated pages to the nav sections that start with a generated index page.

    A section is written in ``mkdocs.yml`` as ``- Methods: [methods/index.md]``; each of its
    generated pages is added after the index, so the nav lists every registered entry.
    """
    for item in nav:
        if not isinstance(item, dict):
            continue
        for value in item.values():
            if isinstance(value, list):
                first = value[0] if value else None
                if isinstance(first, str):
                    value.extend(e for e in _entries(first, root) if e not in value)
                extend_nav(value, root)
    return nav
