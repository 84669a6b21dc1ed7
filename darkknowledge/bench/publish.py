"""A suite's tables and figures, written from its result files only.

``<results>/tables/<suite>.md`` (per pair: the teacher, the protocol, every method with its
paired intervals and costs), ``.csv`` and ``.json`` (the same rows, full precision, per-seed
values), ``<suite>-bars.png`` and ``<suite>-cost.png`` (with matplotlib). A README holds a
suite's compact table between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``: ``dk bench
NAME --tables --readme README.md`` rewrites that block from the results, so it is never typed
by hand (a test checks the shipped README against the committed results).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from darkknowledge.atomic import atomic_write
from darkknowledge.bench import markdown, tables
from darkknowledge.errors import ConfigError

log = logging.getLogger(__name__)


def published_of(suite: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """``(pair, method) -> {"value", "protocol"}`` from the suite's pairs."""
    return {(pair, method): pub.model_dump() for pair, p in suite.pairs.items() for method, pub in p.published.items()}


def rows_of(bench: Any) -> list[dict[str, Any]]:
    """The summarized rows of the bench's finished, current cells."""
    results = bench.finished_results()
    if not results:
        raise ConfigError(
            f"suite {bench.suite.name!r}: no finished cell in {bench.results}; run `dk bench "
            f"{bench.suite.name}` first (with the same --results)"
        )
    return tables.summarize(results, published_of(bench.suite))


def status_notes(bench: Any) -> list[str]:
    """What the tables leave out: cells not run yet, stale cells."""
    st = bench.status()
    notes = []
    if st.todo or st.waiting:
        notes.append(f"{len(st.todo) + len(st.waiting)} cell(s) not run yet: the tables show the finished ones only.")
    if st.stale:
        notes.append(
            f"{len(st.stale)} stale cell(s) (their config changed since they ran) are left out: "
            + ", ".join(c.id for c in st.stale[:10])
            + (" ..." if len(st.stale) > 10 else "")
        )
    return notes


def write_tables(bench: Any, readme: Path | None = None, figures: bool = True) -> dict[str, Path]:
    """Write the suite's tables (and figures, and the README block); returns the written paths."""
    suite = bench.suite
    rows = rows_of(bench)
    folder = Path(bench.results) / "tables"
    head = [f"# Suite `{suite.name}`", "", suite.description] if suite.description else [f"# Suite `{suite.name}`"]
    if suite.protocol:
        head += ["", f"Mirrors: {suite.protocol}"]
    notes = status_notes(bench)
    body = "\n".join(head + [""] + [f"> {n}" for n in notes] + ([""] if notes else [])) + "\n"
    written = {
        "md": atomic_write(
            folder / f"{suite.name}.md", lambda f: f.write(body + markdown.to_markdown(rows)), binary=False
        ),
        "csv": atomic_write(folder / f"{suite.name}.csv", lambda f: f.write(tables.to_csv(rows)), binary=False),
        "json": atomic_write(folder / f"{suite.name}.json", lambda f: f.write(tables.to_json(rows)), binary=False),
    }
    if figures:
        try:
            from darkknowledge.bench import figures as figs

            written["bars"] = figs.bar_chart(rows, folder / f"{suite.name}-bars.png")
            written["cost"] = figs.cost_plot(rows, folder / f"{suite.name}-cost.png")
        except ConfigError as exc:  # matplotlib missing: the tables are written all the same
            log.warning("figures skipped: %s", exc)
    if readme is not None:
        written["readme"] = update_readme(Path(readme), suite.name, readme_block(rows, notes))
    return written


def readme_block(rows: list[dict[str, Any]], notes: Sequence[str] = ()) -> str:
    """The compact table a README shows for a suite."""
    return markdown.to_markdown_compact(rows) + "".join(f"\n> {n}\n" for n in notes)


def _markers(name: str, kind: str = "bench") -> tuple[str, str]:
    return f"<!-- {kind}:{name} -->", f"<!-- /{kind}:{name} -->"


def readme_section(text: str, name: str, kind: str = "bench") -> str:
    """The current block of suite ``name`` (``kind`` run: of ``dk run``'s recipe ``name``) in a README's text."""
    begin, end = _markers(name, kind)
    m = re.search(re.escape(begin) + r"\n(.*?)" + re.escape(end), text, flags=re.S)
    if m is None:
        raise ConfigError(
            f"the README has no block for {kind} {name!r}: add the lines {begin} and {end} where the table should go"
        )
    return m.group(1)


def update_readme(path: Path, name: str, block: str, kind: str = "bench") -> Path:
    """Replace suite ``name``'s block (``kind`` run: recipe ``name``'s) in the README at ``path`` (atomically)."""
    text = path.read_text(encoding="utf-8")
    old = readme_section(text, name, kind)
    begin, end = _markers(name, kind)
    new = text.replace(f"{begin}\n{old}{end}", f"{begin}\n{block}{end}", 1)
    return atomic_write(path, lambda f: f.write(new), binary=False)
