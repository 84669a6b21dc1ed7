"""The documentation site (``mkdocs.yml``, ``docs/``): it builds with ``mkdocs build --strict``, every
registered loss, scheme and synthesiser has its generated page, and the Python blocks of the pages run.

Each page's ```` ```python ```` blocks are executed in order in one namespace, in a fresh temporary
working directory, in one separate Python process for all pages (so what a page registers or
sets, a model or a thread count, never reaches the other tests). A block that must not run says so
on the line before it: ``<!-- docs-test: skip (why) -->``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<fence>`{3,})(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)(?P=fence)[ \t]*$", re.M | re.S
)
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\b\s*(?P<why>.*?)-->")
RUNNER = r"""
import json, os, sys, time, traceback
pages = json.load(open(sys.argv[1]))
results = {}
for page, blocks in pages.items():
    cwd = os.path.join(sys.argv[2], page.replace("/", "__"))
    os.makedirs(cwd)
    os.chdir(cwd)
    namespace = {"__name__": "__main__"}
    start, error = time.perf_counter(), None
    for block in blocks:
        if block["skip"] is not None:
            continue
        try:
            exec(compile(block["code"], f"{page}:{block['line']}", "exec"), namespace)
        except BaseException:
            error = f"block at {page}:{block['line']}:\n" + traceback.format_exc()
            break
    results[page] = {"error": error, "seconds": round(time.perf_counter() - start, 2)}
json.dump(results, open(sys.argv[3], "w"))
"""


@dataclass(frozen=True)
class Block:
    """One fenced Python block of a page: where it starts, its code, and why it is skipped (or None)."""

    line: int
    code: str
    skip: str | None


def python_blocks(text: str) -> list[Block]:
    """The ```` ```python ```` blocks of a Markdown text, in order."""
    blocks = []
    for m in FENCE.finditer(text):
        info = m.group("info").strip().split()
        if not info or info[0] not in ("python", "py"):
            continue
        before = text[: m.start()].rstrip().splitlines()
        mark = SKIP.search(before[-1]) if before else None
        line = text.count("\n", 0, m.start()) + 1
        body = "\n".join(ln[len(m.group("indent")) :] for ln in m.group("body").splitlines())
        blocks.append(Block(line, body, (mark.group("why").strip() or "marked skip") if mark else None))
    return blocks


def source_pages() -> dict[str, str]:
    """The hand-written pages: ``{path under docs/: text}``."""
    return {p.relative_to(DOCS).as_posix(): p.read_text(encoding="utf-8") for p in sorted(DOCS.rglob("*.md"))}


def _generator() -> tuple[ModuleType, ModuleType]:
    """The docs' generator package (``docs/dkdocs``, not installed): its ``catalog`` and ``site`` modules."""
    if str(DOCS) not in sys.path:
        sys.path.insert(0, str(DOCS))
    from dkdocs import catalog, site

    return catalog, site


@pytest.fixture(scope="module")
def generated() -> dict[str, str | Path]:
    return _generator()[1].generated(ROOT)


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory, generated: dict[str, str | Path]) -> dict[str, dict]:
    """Run every page's Python blocks (hand-written and generated pages) in one child process."""
    pages = {**source_pages(), **{p: t for p, t in generated.items() if isinstance(t, str)}}
    todo = {page: [asdict(b) for b in python_blocks(text)] for page, text in pages.items()}
    todo = {page: blocks for page, blocks in todo.items() if blocks}
    work = tmp_path_factory.mktemp("docs-run")
    (work / "pages.json").write_text(json.dumps(todo))
    (work / "runner.py").write_text(RUNNER)
    env = {
        **os.environ,
        "DK_CACHE": str(tmp_path_factory.getbasetemp() / "dk-cache"),
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.run(
        [
            sys.executable,
            str(work / "runner.py"),
            str(work / "pages.json"),
            str(work / "cwd"),
            str(work / "results.json"),
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, f"the runner failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads((work / "results.json").read_text())


PAGES_WITH_CODE = [page for page, text in source_pages().items() if python_blocks(text)]


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES_WITH_CODE)
def test_page_python_blocks_run(page: str, executed: dict[str, dict]) -> None:
    assert page in executed
    assert executed[page]["error"] is None, executed[page]["error"]


@pytest.mark.slow
def test_generated_pages_python_blocks_run(generated: dict[str, str | Path], executed: dict[str, dict]) -> None:
    pages = [p for p, t in generated.items() if isinstance(t, str) and python_blocks(t)]
    failed = {p: executed[p]["error"] for p in pages if executed[p]["error"] is not None}
    assert not failed, failed


def test_most_python_blocks_run() -> None:
    blocks = [b for text in source_pages().values() for b in python_blocks(text)]
    skipped = [b for b in blocks if b.skip is not None]
    assert len(blocks) >= 20, "the how-to and concept pages show working Python"
    assert len(skipped) * 5 <= len(blocks), f"{len(skipped)} of {len(blocks)} Python blocks are skipped"
    assert all(b.skip for b in skipped), "a skipped block says why"


def test_block_extraction_reads_fences_and_skip_marks() -> None:
    text = (
        "intro\n\n```python\nx = 1\n```\n\n<!-- docs-test: skip (needs 2 GPUs) -->\n```python\nboom()\n```\n\n"
        "```bash\nls\n```\n\n- item\n\n    ```python\n    y = x + 1\n    ```\n"
    )
    blocks = python_blocks(text)
    assert [b.code for b in blocks] == ["x = 1", "boom()", "y = x + 1"]
    assert [b.skip for b in blocks] == [None, "(needs 2 GPUs)", None]
    assert blocks[0].line == 3


def test_docstrings_become_markdown() -> None:
    """A Google/reST docstring as a generated page shows it: equations fenced, roles as code, Args
    taken out for the parameter table, markup outside code spans escaped."""
    _generator()
    from dkdocs.docstrings import to_markdown

    doc = to_markdown(
        "Title: ``a*b_c`` and *emphasis* with x_i [0, 1] <stage>.\n\nThe loss::\n\n"
        "    L = a * KL(p || q)\n\nSee :class:`~darkknowledge.teachers.peers.Peer`.\n\n"
        "* a bullet with ``code\n  that wraps``\n\nArgs:\n    T: Temperature,\n"
        "        the softening.\n    a, b: Two weights.\n"
    )
    assert "``a*b_c``" in doc.markdown and "*emphasis*" in doc.markdown
    assert "x\\_i \\[0, 1\\] &lt;stage>" in doc.markdown
    assert "The loss:\n\n```text\nL = a * KL(p || q)\n```" in doc.markdown
    assert "``Peer``" in doc.markdown and ":class:" not in doc.markdown
    assert "- a bullet with ``code\n  that wraps``" in doc.markdown
    assert "Args" not in doc.markdown and "Temperature" not in doc.markdown
    assert doc.args == {"T": "Temperature, the softening.", "a": "Two weights.", "b": "Two weights."}


def test_readme_examples_are_included_as_they_are() -> None:
    _generator()
    from dkdocs import readme

    examples = readme.examples(ROOT)
    assert examples, "README has <!-- example: NAME --> blocks"
    page = (DOCS / "how-to" / "own-loop.md").read_text(encoding="utf-8")
    names = re.findall(r"<!-- readme-example: (\w+) -->", page)
    assert names and set(names) <= set(examples)
    shown = readme.include(page, ROOT)
    assert "readme-example" not in shown and all(examples[n] in shown for n in names)
    with pytest.raises(KeyError, match="no example 'nope'"):
        readme.include("<!-- readme-example: nope -->\n", ROOT)


def test_every_registered_entry_has_its_page_in_the_nav(generated: dict[str, str | Path]) -> None:
    catalog, site = _generator()
    from darkknowledge.losses import LOSSES
    from darkknowledge.schemes import SCHEMES
    from darkknowledge.synthesis import SYNTHESIZERS

    config = yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    nav = site.extend_nav(config["nav"], ROOT)
    listed = set(re.findall(r"'([\w./-]+\.md)'", repr(nav)))
    for kind, registry in (("loss", LOSSES), ("scheme", SCHEMES), ("synthesizer", SYNTHESIZERS)):
        assert registry.names()
        for name in registry.names():
            path = catalog.page_path(kind, name)
            assert path in generated, f"no generated page for {kind} {name!r}"
            assert path in listed, f"{path} is not in the nav"
            assert f"# `{name}`" in generated[path]
            assert registry.get(name).citation.split(".")[0] in generated[path]
    for page in source_pages():
        assert page in listed, f"docs/{page} is not in mkdocs.yml's nav"


def test_measured_results_come_from_the_committed_tables(generated: dict[str, str | Path]) -> None:
    """A method with a row in a committed suite shows that row's numbers; one without says so plainly."""
    catalog, _ = _generator()
    from darkknowledge.losses import LOSSES

    rows = json.loads((ROOT / "benchmarks/results/cpu/tables/cpu.json").read_text(encoding="utf-8"))
    measured = {r["method"]: r for r in rows if r["kind"] == "method" and r["last_mean"] is not None}
    assert measured
    for name in LOSSES.names():
        page = generated[catalog.page_path("loss", name)]
        assert "## Measured result" in page
        if name in measured:
            r = measured[name]
            assert f"{r['last_mean']:.2f} ± {r['last_std']:.2f}" in page, f"{name}: the cpu suite's row is missing"
            assert "Not measured yet" not in page
    unmeasured = [p for p, t in generated.items() if isinstance(t, str) and "**Not measured yet.**" in t]
    for path in unmeasured:
        section = generated[path].split("## Measured result", 1)[1]
        assert "| pair |" not in section and "| student |" not in section


def test_bench_pages_are_the_committed_tables(generated: dict[str, str | Path]) -> None:
    from darkknowledge.bench.markdown import to_markdown_compact

    for tables in sorted((ROOT / "benchmarks/results").glob("*/tables")):
        suite = tables.parent.name
        rows = json.loads((tables / f"{suite}.json").read_text(encoding="utf-8"))
        assert to_markdown_compact(rows) in generated["benchmarks/index.md"]
        full = (tables / f"{suite}.md").read_text(encoding="utf-8")
        table_lines = [ln for ln in full.splitlines() if ln.startswith("| ")]
        assert table_lines and all(ln in generated[f"benchmarks/{suite}.md"] for ln in table_lines)
        for png in tables.glob("*.png"):
            assert generated[f"benchmarks/{png.name}"] == png


def _mkdocs_missing() -> str | None:
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        try:
            if importlib.util.find_spec(module) is None:
                return module
        except ModuleNotFoundError:
            return module
    return None


@pytest.mark.slow
@pytest.mark.skipif(
    _mkdocs_missing() is not None,
    reason=f"{_mkdocs_missing()} is not installed (pip install -e '.[docs]' for the docs build)",
)
def test_site_builds_strict(tmp_path: Path) -> None:
    from darkknowledge.losses import LOSSES
    from darkknowledge.schemes import SCHEMES

    site = tmp_path / "site"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(site),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-5000:]
    for name in LOSSES.names():
        html = (site / "methods" / name / "index.html").read_text(encoding="utf-8")
        assert "Measured result" in html and "Parameters" in html
    for name in SCHEMES.names():
        assert (site / "schemes" / name / "index.html").is_file()
    api = (site / "reference" / "distiller" / "index.html").read_text(encoding="utf-8")
    assert "Distiller" in api and "example" in api  # mkdocstrings rendered the docstring's arguments
    assert not list(site.rglob("hooks.py")) and not (site / "dkdocs").exists()
