"""Which shipped recipes use a loss, a scheme or a synthesiser (read from the recipe files)."""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from darkknowledge.config import recipe_names
from darkknowledge.lm.config import is_lm_recipe
from darkknowledge.recipes import read_recipe


@cache
def recipe(name: str) -> dict[str, Any]:
    """The shipped recipe ``name`` as read by ``dk`` (read once per build: YAML parsing is slow)."""
    return read_recipe(name)


def lm_recipes_using(loss: str) -> list[str]:
    """The language-model recipes whose arms use ``loss`` (what ``describe.lm_recipes_using`` finds,
    on the recipes read once)."""
    found = []
    for name in recipe_names():
        raw = recipe(name)
        if is_lm_recipe(raw) and any(loss in losses_of(arm or {}) for arm in (raw.get("arms") or {}).values()):
            found.append(name)
    return found


def recipe_text(name: str) -> str:
    """The shipped recipe file ``darkknowledge/recipes/NAME.yaml`` as it is (comments included)."""
    return resources.files("darkknowledge.recipes").joinpath(f"{name}.yaml").read_text(encoding="utf-8")


def scheme_of(raw: dict[str, Any]) -> str:
    """The scheme a recipe trains (``offline`` when it names none)."""
    scheme = raw.get("scheme") or "offline"
    return scheme if isinstance(scheme, str) else scheme.get("name", "offline")


def synthesizer_of(raw: dict[str, Any]) -> str | None:
    """The synthesiser of a data-free recipe (``scheme.params.synthesizer.name``), if any."""
    scheme = raw.get("scheme")
    synth = ((scheme.get("params") or {}).get("synthesizer") if isinstance(scheme, dict) else None) or {}
    return synth if isinstance(synth, str) else synth.get("name")


def losses_of(raw: dict[str, Any]) -> set[str]:
    """The registered losses a recipe's terms use (a term named ``hint`` with ``loss: fitnet`` is ``fitnet``)."""
    return {(term or {}).get("loss", key) for key, term in (raw.get("losses") or {}).items()}


def recipes_using(kind: str, name: str) -> list[str]:
    """Shipped recipes that use loss, scheme or synthesizer ``name`` (``kind``), sorted.

    A loss counts when one of the recipe's terms is that loss, or, for a language-model recipe,
    one of its arms' terms (``describe.lm_recipes_using``, what ``dk explain`` reports).
    """
    found = []
    for name_ in recipe_names():
        raw = recipe(name_)
        if (
            (kind == "loss" and name in losses_of(raw))
            or (kind == "scheme" and scheme_of(raw) == name)
            or (kind == "synthesizer" and synthesizer_of(raw) == name)
        ):
            found.append(name_)
    if kind == "loss":
        found += [r for r in lm_recipes_using(name) if r not in found]
    return sorted(found)


def main_recipe(kind: str, name: str) -> str | None:
    """The recipe that shows a method: the shipped recipe of its name, else (a token-level loss)
    the language-model recipe whose arms use it; None for a method without a recipe of its own."""
    if name in recipe_names():
        return name
    if kind == "loss":
        lm = lm_recipes_using(name)
        return lm[0] if lm else None
    return None
