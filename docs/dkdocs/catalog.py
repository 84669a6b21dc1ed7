"""One page per registered loss, scheme and synthesiser, and the catalog pages that list them.

Everything on a page comes from the code: the registry entry's class attributes (``knowledge``,
``citation``, ``summary``), its module and class docstrings (the paper, the equation, shapes),
its parameters as ``dk explain`` formats them (:mod:`darkknowledge.describe`), the shipped
recipe that uses it (the file as it is, with its comments on how it was tuned and measured) and
its measured results (:mod:`dkdocs.measured`), or the plain statement that there are none yet.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from darkknowledge import describe
from darkknowledge.losses import LOSSES
from darkknowledge.schemes import SCHEMES
from darkknowledge.synthesis import SYNTHESIZERS
from darkknowledge.validation import signature_fields
from dkdocs import measured
from dkdocs.docstrings import Doc, escape, summary_line, to_markdown
from dkdocs.recipes import main_recipe, recipe_text, recipes_using

KINDS = {"loss": ("methods", LOSSES), "scheme": ("schemes", SCHEMES), "synthesizer": ("synthesizers", SYNTHESIZERS)}
"""kind -> (folder of its pages, its registry)."""

KNOWLEDGE_ORDER = {"label": 0, "response": 1, "feature": 2, "relation": 3}
TERM_SCHEDULE = "`weight`, `warmup_epochs`, `warmup_shape`, `start_epoch` and `stop_epoch`"


def names(kind: str) -> list[str]:
    """Registered names of ``kind``, in the order the catalog lists them."""
    registry = KINDS[kind][1]
    if kind == "loss":
        return [n for n, _ in sorted(registry.items(), key=lambda kv: (KNOWLEDGE_ORDER.get(kv[1].knowledge, 9), kv[0]))]
    return registry.names()


def page_path(kind: str, name: str) -> str:
    """The generated page of ``name`` (relative to the docs folder)."""
    return f"{KINDS[kind][0]}/{name}.md"


def _cell(text: Any) -> str:
    """Prose for a table cell or a list item: Markdown markup outside code spans escaped, one line."""
    return escape(str(text)).replace("\n", " ")


def _source(cls: type, root: Path) -> str:
    path = Path(inspect.getsourcefile(cls) or "")
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.name


def _docs(cls: type) -> Doc:
    """The module docstring, then the class docstring where it adds to it, as Markdown."""
    module_doc = inspect.getdoc(inspect.getmodule(cls)) or ""
    class_doc = inspect.getdoc(cls) or ""
    docs = [to_markdown(module_doc)] if module_doc else []
    if class_doc and class_doc not in module_doc:
        cls_doc = to_markdown(class_doc)
        docs.append(Doc(f"The registered class, `{cls.__name__}`: {cls_doc.markdown}", cls_doc.args))
    args: dict[str, str] = {}
    for d in docs:
        args.update(d.args)
    return Doc("\n".join(d.markdown for d in docs), args)


def _loss_params(cls: type, args: dict[str, str]) -> list[tuple[str, str, str, str]]:
    """``(name, default, type and limits, meaning)`` of a loss's parameters, as ``dk explain`` shows them."""
    return [
        (p, describe._format_default(default), describe._format_type(ann), args.get(p, ""))
        for p, (ann, default) in signature_fields(cls).items()
    ]


def _model_params(fields: dict[str, Any], args: dict[str, str]) -> list[tuple[str, str, str, str]]:
    """The same for a scheme's or synthesiser's typed ``Params`` (pydantic fields)."""
    rows = []
    for p, f in fields.items():
        default = ... if f.is_required() else (f.default_factory() if f.default_factory else f.default)
        limits = [describe.format_constraint(m) for m in f.metadata]
        ann = describe._format_type(f.annotation) + (f" {', '.join(limits)}" if limits else "")
        rows.append((p, describe._format_default(default), ann, f.description or args.get(p, "")))
    return rows


def _param_table(rows: list[tuple[str, str, str, str]]) -> list[str]:
    if not rows:
        return ["It has no parameters of its own."]
    out = ["| parameter | default | type and limits | meaning |", "|---|---|---|---|"]
    out += [f"| `{p}` | `{d}` | `{t}` | {_cell(m)} |" for p, d, t, m in rows]  # a code span may hold a |
    return out


def _recipe_section(kind: str, name: str) -> list[str]:
    recipe = main_recipe(kind, name)
    using = recipes_using(kind, name)
    out = ["## Recipe", ""]
    if recipe is not None:
        if kind == "loss" and recipe != name:
            out.append(f"It is an arm of the language-model recipe `{recipe}` (`dk run {recipe}`).")
        else:
            out.append(
                f"`dk run {recipe}` trains, per seed, the student alone and with this {kind}, from the same "
                f"initialisation, and prints the comparison; `dk distill {recipe}` trains one distilled "
                "student. The recipe as shipped, with its notes on how its values were chosen:"
            )
        out += ["", f'```yaml title="darkknowledge/recipes/{recipe}.yaml"', recipe_text(recipe).rstrip("\n"), "```", ""]
    else:
        out += [f"No shipped recipe is named after `{name}`.", ""]
    others = [r for r in using if r != recipe]
    if others:
        out.append(
            ("Other shipped recipes" if recipe else "Shipped recipes")
            + " that use it: "
            + ", ".join(f"`{r}`" for r in others)
            + "."
        )
    elif recipe is None:
        out.append("No shipped recipe uses it yet; `dk list recipes` lists the recipes.")
    return out + [""]


def _measured_section(kind: str, name: str, root: Path) -> list[str]:
    out = ["## Measured result", ""]
    found = False
    if kind == "loss" and name == "ce":
        out += [
            "`ce` alone is the *student alone* row of every benchmark table: the same student, trained with "
            "the same budget and initialisation, that each method is compared with "
            "([Benchmarks](../benchmarks/index.md)).",
            "",
        ]
        found = True
    if kind == "scheme" and name == "offline":
        out += [
            "`offline` is the default scheme (a recipe without `scheme:`): every loss row of the "
            "[benchmark tables](../benchmarks/index.md) and each loss's page measures a student trained "
            "with it.",
            "",
        ]
        found = True
    for suite, rows in measured.suite_rows(root, kind, name).items():
        out += [
            f"### Suite `{suite}`",
            "",
            f"From [the `{suite}` suite's tables](../benchmarks/{suite}.md) (`dk bench`, committed results):",
            "",
            measured.suite_table(rows),
        ]
        found = True
    report = measured.run_report(root, main_recipe(kind, name))
    if report and main_recipe(kind, name) != "lm":
        out += [f"### `dk run {main_recipe(kind, name)}`", "", report]
        found = True
    lm = measured.lm_table(root, name) if kind == "loss" else None
    if lm:
        out += [
            "### `dk run lm`",
            "",
            "From the committed language-model run "
            "([Benchmarks: language models](../benchmarks/runs.md#language-models)):",
            "",
            lm,
        ]
        found = True
    if not found:
        out += [
            f"**Not measured yet.** No committed benchmark suite or run report has a row for `{name}`; "
            f"{'`dk run ' + main_recipe(kind, name) + '`' if main_recipe(kind, name) else 'a recipe that uses it'} "
            "would measure it.",
            "",
        ]
    return out


def _header(kind: str, name: str, cls: type, root: Path) -> list[str]:
    summary = getattr(cls, "summary", "") or summary_line(inspect.getdoc(inspect.getmodule(cls)) or "")
    out = [f"# `{name}`", "", f"*{escape(summary)}*", ""]
    facts = []
    if kind == "loss":
        facts += [
            ("Knowledge", f"{cls.knowledge} ([the kinds](../concepts/knowledge.md))"),
            ("Reads", describe.loss_needs(cls)),
        ]
    facts += [
        ("Paper", escape(cls.citation) if cls.citation else "—"),
        ("Source", f"`{_source(cls, root)}`"),
        ("In a terminal", f"`dk explain {name}`"),
    ]
    out += [f"- **{k}:** {v}" for k, v in facts] + [""]
    return out


def loss_page(name: str, root: Path) -> str:
    cls = LOSSES.get(name)
    doc = _docs(cls)
    out = _header("loss", name, cls, root)
    out += [
        "## Paper and equation",
        "",
        doc.markdown,
        "## Parameters",
        "",
        f'In a recipe: `losses: {{{name}: {{...}}}}`; in Python: `losses={{"{name}": {{...}}}}`.',
        "",
    ]
    out += _param_table(_loss_params(cls, doc.args))
    out += [
        "",
        f"Every term also takes {TERM_SCHEDULE} ([one objective, many terms]"
        "(../concepts/knowledge.md#one-objective-many-terms)). A second term of the same loss takes "
        f"another key and names the loss: `hint2: {{loss: {name}, ...}}`.",
        "",
    ]
    out += _recipe_section("loss", name) + _measured_section("loss", name, root)
    return "\n".join(out).rstrip() + "\n"


def scheme_page(name: str, root: Path) -> str:
    cls = SCHEMES.get(name)
    doc = _docs(cls)
    out = _header("scheme", name, cls, root)
    out += [
        "## Paper and plan",
        "",
        doc.markdown,
        "## Parameters",
        "",
        f"In a recipe: `scheme: {{name: {name}, params: {{...}}}}`.",
        "",
    ]
    out += _param_table(_model_params(cls.Params.model_fields, doc.args))
    if cls.moved:
        out += ["", "Parameters that moved to the losses (a recipe that still sets them is told where):", ""]
        out += [f"- `{k}`: {_cell(v)}" for k, v in cls.moved.items()]
    out += [""] + _recipe_section("scheme", name) + _measured_section("scheme", name, root)
    return "\n".join(out).rstrip() + "\n"


def synthesizer_page(name: str, root: Path) -> str:
    cls = SYNTHESIZERS.get(name)
    doc = _docs(cls)
    out = _header("synthesizer", name, cls, root)
    out += [
        "## Paper and method",
        "",
        doc.markdown,
        "## Parameters",
        "",
        f"In a recipe: `scheme: {{name: data_free, params: {{synthesizer: {{name: {name}, params: {{...}}}}}}}}`.",
        "",
    ]
    out += _param_table(_model_params(cls.Params.model_fields, doc.args))
    out += [""] + _recipe_section("synthesizer", name) + _measured_section("synthesizer", name, root)
    return "\n".join(out).rstrip() + "\n"


PAGES = {"loss": loss_page, "scheme": scheme_page, "synthesizer": synthesizer_page}


def _measured_where(kind: str, name: str, root: Path) -> str:
    where = list(measured.suite_rows(root, kind, name))
    recipe = main_recipe(kind, name)
    if recipe and recipe != "lm" and measured.run_report(root, recipe):
        where.append(f"`dk run {recipe}`")
    if kind == "loss" and measured.lm_table(root, name):
        where.append("`dk run lm`")
    if kind == "loss" and name == "ce":
        where.insert(0, "every suite (the student alone)")
    if kind == "scheme" and name == "offline":
        where.insert(0, "every loss row (the default scheme)")
    return ", ".join(w if w.startswith(("`", "every")) else f"`{w}`" for w in where) or "not measured yet"


def index_page(kind: str, root: Path) -> str:
    """The catalog of ``kind``: one row per registered entry, linking to its page."""
    registry = KINDS[kind][1]
    intro = {
        "loss": [
            "# Methods",
            "",
            "Every registered loss: *what* is matched between teacher and student. Each is one "
            "file in `darkknowledge/losses/` with the paper's equation in its docstring; the pages below are "
            "generated from the registry when the site is built. See [Knowledge](../concepts/knowledge.md) for "
            "the kinds, and [Schemes](../schemes/index.md) for *who* teaches *whom*.",
        ],
        "scheme": [
            "# Schemes",
            "",
            "Every registered scheme: which models train, which teacher feeds each of them "
            "and how stages follow one another. Any loss of the [catalog](../methods/index.md) works in any "
            "scheme that can feed it ([Schemes, the concept](../concepts/schemes.md)).",
        ],
        "synthesizer": [
            "# Synthesizers",
            "",
            "Data-free distillation: inputs made from a frozen teacher, without "
            "its training data, for `scheme: data_free` (and `synthetic_transfer`).",
        ],
    }[kind]
    out = intro + [""]
    if kind == "loss":
        out += ["| loss | knowledge | reads | paper | measured in |", "|---|---|---|---|---|"]
        for n in names(kind):
            cls = registry.get(n)
            out.append(
                f"| [`{n}`]({n}.md) | {cls.knowledge} | {_cell(describe.loss_needs(cls))} | "
                f"{_cell(cls.citation)} | {_measured_where(kind, n, root)} |"
            )
    else:
        out += ["| name | what it does | paper | measured in |", "|---|---|---|---|"]
        for n in names(kind):
            cls = registry.get(n)
            out.append(
                f"| [`{n}`]({n}.md) | {_cell(cls.summary)} | {_cell(cls.citation or '—')} | "
                f"{_measured_where(kind, n, root)} |"
            )
    return "\n".join(out) + "\n"


def pages(root: Path) -> dict[str, str]:
    """Every generated catalog page: ``{path relative to docs/: Markdown}``."""
    out = {}
    for kind, (folder, _) in KINDS.items():
        out[f"{folder}/index.md"] = index_page(kind, root)
        for n in names(kind):
            out[page_path(kind, n)] = PAGES[kind](n, root)
    return out
