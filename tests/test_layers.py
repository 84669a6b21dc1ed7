"""The package's layers, kept by a test: no import cycle, no import that runs up the layers.

The layer list lives in one place, README's architecture section; this test reads it there.
Imports are parsed with ``ast`` (lazy imports inside functions and ``TYPE_CHECKING`` blocks
included: a cycle held open by a lazy import is still a cycle of the design).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "darkknowledge"
README = ROOT / "README.md"


def layers() -> list[tuple[str, list[str]]]:
    """``[(layer, [top-level modules])]`` from README's numbered list after the ``layers`` marker."""
    text = README.read_text()
    start = text.index("<!-- layers")
    out = []
    for line in text[start:].splitlines()[1:]:
        m = re.match(r"\d+\. \*\*(.+?)\*\*: (.+)", line.strip())
        if not m:
            if out:
                break
            continue
        out.append((m.group(1), re.findall(r"`([\w]+)`", m.group(2))))
    return out


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package is its ``__init__``)."""
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that module ``name`` imports (anywhere in the file)."""
    found: set[str] = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join(parent + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t.startswith("darkknowledge") and t != name:
                found.add(t)
    return found


def component(name: str) -> str:
    """``darkknowledge.engine.trainer`` -> ``engine``; the package itself -> ``__init__``."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
    known = modules()
    out = {}
    for name, path in known.items():
        deps = imports(name, path, known)
        if path.name == "__init__.py":  # a package importing its own children is how it re-exports them
            deps = {d for d in deps if not d.startswith(name + ".")}
        out[name] = deps
    return out


def test_the_readme_lists_every_part_of_the_package_once():
    listed = [m for _, ms in layers() for m in ms]
    assert len(layers()) >= 9 and len(listed) == len(set(listed)), layers()
    parts = {component(n) for n in modules()}
    assert parts - set(listed) == set(), "modules missing from README's layer list"
    assert set(listed) - parts == set(), "README lists modules that do not exist"


def test_no_import_runs_up_the_layers():
    rank = {m: i for i, (_, ms) in enumerate(layers()) for m in ms}
    upward = sorted(
        (src, dst) for src, deps in graph().items() for dst in deps if rank[component(dst)] > rank[component(src)]
    )
    assert upward == [], "imports into a higher layer: " + ", ".join(f"{a} -> {b}" for a, b in upward)


def test_the_engine_imports_nothing_from_schemes_runs_or_teachers():
    engine = {src: deps for src, deps in graph().items() if component(src) == "engine"}
    bad = sorted(
        (s, d)
        for s, deps in engine.items()
        for d in deps
        if component(d) in ("schemes", "runs", "teachers", "commands", "api")
    )
    assert engine and bad == []


def strongly_connected(g: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in g:
        if root in index:
            continue
        work = [(root, iter(sorted(g[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(g.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycle():
    assert strongly_connected(graph()) == []


@pytest.mark.parametrize(
    "g,cycles",
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"b"}, "b": set(), "c": {"b"}}, []),
    ],
)
def test_the_cycle_finder_finds_cycles(g, cycles):
    assert strongly_connected(g) == cycles  # the check above cannot pass by finding nothing


DIVERGENCES = ("kl_div", "log_softmax", "cross_entropy", "mse_loss", "l1_loss", "kd_soft_loss", "kd_loss")


@pytest.mark.parametrize("path", sorted((PACKAGE / "schemes").glob("*.py")), ids=lambda p: p.name)
def test_no_scheme_computes_a_loss_itself(path):
    """Schemes are plans: the math is in losses/ (a grep-level check of every scheme file)."""
    found = [word for word in DIVERGENCES if word in path.read_text()]
    assert not found, f"{path.name} mentions {found}: a scheme wires losses, it does not compute them"
