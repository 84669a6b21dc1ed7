"""README's runnable examples, shown on the pages that name them (one copy, tested where it lives).

README's "Bring your own loop" examples are executed by ``tests/test_distiller.py``. A page shows
one with the line ``<!-- readme-example: NAME -->``; the build replaces that line with the
Python block that follows README's ``<!-- example: NAME -->`` marker, so the page and the
tested example cannot drift apart.
"""

from __future__ import annotations

import re
from pathlib import Path

EXAMPLE = re.compile(r"<!-- example: (\w+) -->\s*```python\n(.*?)```", re.S)
INCLUDE = re.compile(r"^<!-- readme-example: (\w+) -->[ \t]*$", re.M)


def examples(root: Path) -> dict[str, str]:
    """README's examples by name."""
    return dict(EXAMPLE.findall((root / "README.md").read_text(encoding="utf-8")))


def include(markdown: str, root: Path) -> str:
    """``markdown`` with every ``<!-- readme-example: NAME -->`` line replaced by that example."""
    if not INCLUDE.search(markdown):
        return markdown
    found = examples(root)

    def block(m: re.Match) -> str:
        name = m.group(1)
        if name not in found:
            raise KeyError(
                f"README has no example {name!r} (it has {sorted(found)}); "
                "a page includes it with <!-- readme-example: NAME -->"
            )
        return f"```python\n{found[name]}```"

    return INCLUDE.sub(block, markdown)
