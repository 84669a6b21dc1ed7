"""Text for ``dk list``, ``dk explain`` and ``dk pairs``: what is registered and how to use it."""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Sequence
from typing import Any

from darkknowledge.config import recipe_names
from darkknowledge.lm.config import is_lm_recipe
from darkknowledge.losses import LOSSES, DistillLoss
from darkknowledge.recipes import read_recipe
from darkknowledge.validation import signature_fields


def loss_needs(cls: type[DistillLoss]) -> str:
    """A short description of what a loss reads, e.g. ``teacher logits, labels``."""
    from darkknowledge.losses.feature import FeatureLoss

    needs = cls.needs_spec
    parts = []
    if issubclass(cls, FeatureLoss):
        parts.append(f"teacher features ({cls.default_taps})")
        if cls.uses_logits:
            parts.append("teacher logits")
        if cls.uses_labels:
            parts.append("labels")
        if cls.uses_indices:
            parts.append("indices")
    else:
        parts += [
            n
            for n, on in (
                ("teacher logits", needs.teacher_logits),
                ("labels", needs.labels),
                ("indices", needs.indices),
            )
            if on
        ]
    return ", ".join(parts) or "-"


def list_losses_text() -> list[str]:
    """One line per registered loss: name, knowledge type, needs, citation."""
    order = {"label": 0, "response": 1, "feature": 2, "relation": 3}
    rows = sorted(LOSSES.items(), key=lambda kv: (order.get(kv[1].knowledge, 9), kv[0]))
    cells = [(name, cls.knowledge, loss_needs(cls), cls.citation) for name, cls in rows]
    return columns(cells)


def columns(cells: Sequence[tuple[str, ...]], indent: str = "  ") -> list[str]:
    """Rows of text cells aligned in columns as wide as their widest cell (two spaces between;
    the last column is not padded)."""
    if not cells:
        return []
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]) - 1)]
    return [indent + "  ".join([c.ljust(w) for c, w in zip(row, widths)] + [row[-1]]).rstrip() for row in cells]


_BOUNDS = (
    ("gt", ">"),
    ("ge", ">="),
    ("lt", "<"),
    ("le", "<="),
    ("multiple_of", "multiple of"),
    ("min_length", "length >="),
    ("max_length", "length <="),
)


def format_constraint(meta: Any) -> str:
    """A validator constraint as a reader writes it: ``Gt(gt=0.0)`` -> ``> 0.0``, ``Ge(ge=1)`` -> ``>= 1``."""
    for attr, sign in _BOUNDS:
        value = getattr(meta, attr, None)
        if value is not None:
            return f"{sign} {value}"
    return str(meta)


def _format_type(ann: Any) -> str:
    """``Annotated[float, Field(gt=0)]`` -> ``float > 0``; ``X | None`` -> ``X | None``."""
    origin = typing.get_origin(ann)
    if origin is typing.Annotated:
        base, *meta = typing.get_args(ann)
        limits = [format_constraint(m) for f in meta for m in getattr(f, "metadata", [f])]
        return _format_type(base) + (f" {', '.join(limits)}" if limits else "")
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_format_type(a) for a in typing.get_args(ann))
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(ann))
    if ann is type(None):
        return "None"
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")


def _format_default(value: Any) -> str:
    return "required" if value is ... else repr(value)


def explain_loss(name: str) -> str:
    """Docstrings, parameters with defaults, needs and the shipped recipe of loss ``name``."""
    cls = LOSSES.get(name)
    module_doc = inspect.getdoc(inspect.getmodule(cls)) or ""
    class_doc = inspect.getdoc(cls) or ""
    params = signature_fields(cls)
    lines = [f"{name}: {cls.knowledge}-based — {cls.citation}", ""]
    if module_doc:
        lines += [module_doc, ""]
    if class_doc and class_doc not in module_doc:
        lines += [class_doc, ""]
    lines.append("parameters (recipe: losses: {" + name + ": {...}}):")
    for pname, (ann, default) in params.items():
        ann_s = _format_type(ann)
        lines.append(f"  {pname:<16} {_format_default(default):<14} {ann_s}")
    lines.append("  weight, warmup_epochs, warmup_shape, start_epoch, stop_epoch   (every term: weight and schedule)")
    lines.append(f"needs: {loss_needs(cls)}")
    if name in recipe_names():
        lines.append(f"recipe: dk distill {name}")
    else:
        lines += [f"recipe: dk run {r}  (a language-model run; arm {arm})" for r, arm in lm_recipes_using(name)]
    return "\n".join(lines)


def lm_recipes_using(loss: str) -> list[tuple[str, str]]:
    """``(recipe, arm)`` of the shipped language-model recipes whose arms use the loss ``loss``."""
    found = []
    for recipe in recipe_names():
        raw = read_recipe(recipe)
        if not is_lm_recipe(raw):
            continue
        for arm, spec in (raw.get("arms") or {}).items():
            if any((term or {}).get("loss", key) == loss for key, term in (spec.get("losses") or {}).items()):
                found.append((recipe, arm))
                break
    return found


def list_schemes_text() -> list[str]:
    """Two lines per registered scheme: name and how knowledge flows, then the citation."""
    from darkknowledge.schemes import SCHEMES

    lines = []
    for name, cls in SCHEMES.items():
        lines += [f"  {name:<14} {cls.summary}", f"  {'':<14} {cls.citation}"]
    return lines


def list_synthesizers_text() -> list[str]:
    """Two lines per registered synthesiser: name and what it does, then the citation."""
    from darkknowledge.synthesis import SYNTHESIZERS

    lines = []
    for name, cls in SYNTHESIZERS.items():
        lines += [f"  {name:<14} {cls.summary}", f"  {'':<14} {cls.citation}"]
    return lines


def _documented(cls: type, name: str, kind: str) -> list[str]:
    module_doc = inspect.getdoc(inspect.getmodule(cls)) or ""
    class_doc = inspect.getdoc(cls) or ""
    # schemes and synthesizers have both:
    lines = [f"{name} ({kind}): {cls.summary} — {cls.citation}", ""]  # type: ignore[attr-defined]
    if module_doc:
        lines += [module_doc, ""]
    if class_doc and class_doc not in module_doc:
        lines += [class_doc, ""]
    return lines


def _param_lines(fields: dict[str, Any]) -> list[str]:
    lines = []
    for pname, f in fields.items():
        default = ... if f.is_required() else (f.default_factory() if f.default_factory else f.default)
        limits = [format_constraint(m) for m in f.metadata]
        ann = _format_type(f.annotation) + (f" {', '.join(limits)}" if limits else "")
        lines.append(
            f"  {pname:<16} {_format_default(default):<14} {ann}" + (f"  {f.description}" if f.description else "")
        )
    return lines


def explain_synthesizer(name: str) -> str:
    """Docstrings and parameters (with defaults) of synthesiser ``name``."""
    from darkknowledge.synthesis import SYNTHESIZERS

    cls = SYNTHESIZERS.get(name)
    lines = _documented(cls, name, "synthesizer")
    lines.append(
        "parameters (recipe: scheme: {name: data_free, params: {synthesizer: {name: " + name + ", params: {...}}}}):"
    )
    lines += _param_lines(cls.Params.model_fields)
    if name in recipe_names():
        lines.append(f"recipe: dk run {name}")
    return "\n".join(lines)


def explain_scheme(name: str) -> str:
    """Docstrings and ``scheme.params`` (with defaults) of scheme ``name``."""
    from darkknowledge.schemes import SCHEMES

    cls = SCHEMES.get(name)
    lines = _documented(cls, name, "scheme")
    fields = cls.Params.model_fields
    lines.append("parameters (recipe: scheme: {name: " + name + ", params: {...}}):")
    lines += _param_lines(fields)
    if cls.moved:
        lines.append("moved: " + "; ".join(f"{k}: {v}" for k, v in cls.moved.items()))
    if name in recipe_names():
        lines.append(f"recipe: dk run {name}  (baseline vs the scheme over seeds), dk distill {name}")
    return "\n".join(lines)


def explain(name: str) -> str:
    """``dk explain NAME``: a loss, a scheme or a synthesiser."""
    from darkknowledge.schemes import SCHEMES
    from darkknowledge.synthesis import SYNTHESIZERS

    if name in SCHEMES and name not in LOSSES:
        return explain_scheme(name)
    if name in LOSSES:
        return explain_loss(name)
    if name in SYNTHESIZERS:
        return explain_synthesizer(name)
    from darkknowledge.errors import RegistryError, did_you_mean

    known = sorted({*LOSSES.names(), *SCHEMES.names(), *SYNTHESIZERS.names()})
    raise RegistryError(
        f"unknown loss, scheme or synthesizer {name!r}.{did_you_mean(name, known)} "
        f"Losses: {', '.join(LOSSES.names())}. Schemes: {', '.join(SCHEMES.names())}. "
        f"Synthesizers: {', '.join(SYNTHESIZERS.names())}."
    )


def pairs_text(student: str, teacher: str, data: str) -> str:
    """Proposed tap pairs for two zoo models on a dataset's input shape (``dk pairs``)."""
    import torch

    from darkknowledge.data import load_dataset
    from darkknowledge.models import create_model
    from darkknowledge.pairs import format_pairs, propose_pairs

    info = load_dataset(data).info
    kw = {"num_classes": info.num_classes, "input_shape": tuple(info.input_shape)}
    s, t = create_model(student, **kw), create_model(teacher, **kw)
    sample = torch.zeros(2, *info.input_shape)
    return format_pairs(propose_pairs(s, t, sample))
