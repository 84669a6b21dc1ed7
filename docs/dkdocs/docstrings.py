"""A docstring (Google style with reStructuredText literals) as Markdown for a generated page.

The library's docstrings are written for ``dk explain`` in a terminal: ``::`` literal blocks
and indented equations, ``:class:`~a.b.C``` roles, ``* `` bullets and Google sections. This
turns them into Markdown that renders the same text: indented blocks become fenced code blocks
(YAML where the block is a mapping, plain text otherwise), roles become code spans, ``Args:``
is taken out (the parameter table shows it), and characters that Markdown would read as markup
outside code spans (``*``, ``_``, ``[``, ``|``, ``<``) are escaped.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass, field

import yaml

SECTION = re.compile(r"^(Args|Arguments|Parameters|Attributes|Returns|Raises|Yields|Note|Notes|Example|Examples):\s*$")
ROLE = re.compile(r":(?:class|meth|func|mod|attr|obj|data|exc):`~?([^`]+)`")
HTML_ROLE = re.compile(r":(?:class|meth|func|mod|attr|obj|data|exc):<code>(~?)([^<]+)</code>")
EMPHASIS = re.compile(r"(?<![\w*\\])\*([^\s*](?:[^*]*?[^\s*])?)\*(?![\w*])")
ARG = re.compile(r"^(\*{0,2}[A-Za-z_][\w, ]*?)(?:\s*\([^)]*\))?:\s*(.*)$")


@dataclass
class Doc:
    """A docstring split into Markdown prose and its ``Args:`` entries."""

    markdown: str
    args: dict[str, str] = field(default_factory=dict)


def _role(match: re.Match) -> str:
    target = match.group(1)
    return f"``{target.rsplit('.', 1)[-1]}``" if match.group(0).split("`")[1].startswith("~") else f"``{target}``"


def escape(text: str) -> str:
    """Escape Markdown markup characters outside code spans (backtick runs)."""
    parts = re.split(r"(`+[^`]*?`+)", text)
    out = []
    for i, part in enumerate(parts):
        if i % 2:  # a code span, kept as it is
            out.append(part)
            continue
        pieces = EMPHASIS.split(part)  # rst *emphasis* stays emphasis; other markup characters are escaped
        for j, piece in enumerate(pieces):
            if j % 2:
                out.append(f"*{piece}*")
                continue
            piece = piece.replace("\\", "\\\\").replace("<", "&lt;")
            out.append(re.sub(r"([*_\[\]|])", r"\\\1", piece))
    return "".join(out)


def _bullet(line: str) -> str:
    """An rst bullet (``* item`` or ``- item``) as a Markdown one (``- item``); other lines as they are."""
    bullet = re.match(r"^(\s*)[*-] (.*)$", line)
    return f"{bullet.group(1)}- {bullet.group(2)}" if bullet else line


def _prose(lines: list[str]) -> list[str]:
    """Prose lines escaped together, so that a code span that wraps over lines stays one span."""
    text = escape("\n".join(lines))
    return ["\\" + ln if ln.lstrip().startswith("#") else ln for ln in text.split("\n")]


def _fence(block: list[str]) -> list[str]:
    body = textwrap.dedent("\n".join(block)).strip("\n")
    try:
        lang = "yaml" if isinstance(yaml.safe_load(body), dict) and ":" in body.splitlines()[0] else "text"
    except yaml.YAMLError:
        lang = "text"
    return ["", f"```{lang}", body, "```", ""]


def _args(lines: list[str]) -> dict[str, str]:
    """``name: description`` entries of an ``Args:`` section (continuation lines joined)."""
    found: dict[str, str] = {}
    key = None
    base = min((len(ln) - len(ln.lstrip()) for ln in lines if ln.strip()), default=0)
    for line in lines:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        m = ARG.match(line.strip())
        if indent == base and m:
            names = [n.strip().lstrip("*") for n in m.group(1).split(",")]
            key = names[0]
            for name in names:
                found[name] = m.group(2).strip()
            found["\0" + key] = ",".join(names)
        elif key is not None:
            for name in found["\0" + key].split(","):
                found[name] = f"{found[name]} {line.strip()}".strip()
    return {k: v for k, v in found.items() if not k.startswith("\0")}


def to_markdown(doc: str) -> Doc:
    """Markdown for docstring ``doc`` (already dedented, e.g. by ``inspect.getdoc``)."""
    lines = ROLE.sub(_role, doc).splitlines()
    out: list[str] = []
    prose: list[str] = []  # prose lines not escaped yet (escaped together when a block interrupts them)
    args: dict[str, str] = {}

    def flush() -> None:
        out.extend(_prose(prose))
        prose.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        section = SECTION.match(line)
        if section:  # a Google section: its indented body follows
            j = i + 1
            while j < len(lines) and (not lines[j].strip() or lines[j].startswith((" ", "\t"))):
                j += 1
            body = lines[i + 1 : j]
            flush()
            if section.group(1) in ("Args", "Arguments", "Parameters"):
                args.update(_args(body))
            elif section.group(1) in ("Attributes", "Raises"):  # entries ``name: description``, a list
                out += ["", f"**{section.group(1)}:**", ""]
                out += [f"- `{name}`: {escape(text)}" for name, text in _args(body).items()] + [""]
            else:
                out += ["", f"**{section.group(1)}:**", ""]
                out += _prose([_bullet(b) for b in textwrap.dedent("\n".join(body)).splitlines()])
            i = j
            continue
        indented = line.startswith("    ") and (i == 0 or not lines[i - 1].strip())
        in_list = (
            bool(prose)
            and prose[-1].lstrip().startswith("- ")
            and line.startswith("  ")
            and not line.startswith("    ")
        )
        if indented and not in_list:
            j = i
            while j < len(lines) and (not lines[j].strip() or lines[j].startswith("    ")):
                j += 1
            while j > i and not lines[j - 1].strip():
                j -= 1
            flush()
            out += _fence(lines[i:j])
            i = j
            continue
        if line.strip() == "::":
            i += 1
            continue
        if line.rstrip().endswith("::"):
            line = line.rstrip()[:-1]
        prose.append(_bullet(line))
        i += 1
    flush()
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"
    return Doc(text, args)


def summary_line(doc: str) -> str:
    """The first line of a docstring, without its final full stop."""
    first = (doc or "").strip().splitlines()[0] if (doc or "").strip() else ""
    return first.rstrip(".")


def html_roles(html: str) -> str:
    """Rendered docstrings (mkdocstrings) with reStructuredText roles as plain code:
    ``:class:<code>~a.b.C</code>`` becomes ``<code>C</code>`` (``~``: the last name only)."""
    return HTML_ROLE.sub(lambda m: f"<code>{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}</code>", html)
