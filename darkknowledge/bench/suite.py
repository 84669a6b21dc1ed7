"""A benchmark suite: teacher-student pairs x methods x seeds under one training budget.

A suite is a YAML file (or a shipped name: ``darkknowledge/bench/suites/*.yaml``)::

    name: small
    seeds: [0, 1, 2, 3, 4]
    data: {name: mnist1d, val_fraction: 0.1, use_transfer: false}     # every cell's data
    budget:                      # every student cell trains with exactly this (baseline, KD, methods)
      train: {epochs: 30, optimizer: {name: adamw, lr: 0.002}}
      augment: {}                # data.augment of every student cell
    pairs:
      cnn-mlp:
        kind: different families
        teacher: {name: cnn1d, train: {epochs: 30}}         # or {name: cnn1d, checkpoint: path.pt}
        student: {name: mlp, params: {hidden: [100, 100]}}
    methods:
      kd: {recipe: kd}                                     # always run: the reference of every pair
      dkd: {recipe: dkd, overrides: {losses.dkd.beta: 2.0}}
      mutual: {recipe: mutual, pairs: [cnn-mlp]}

A pair may give a method its own values (``overrides: {dkd: {losses.dkd.beta: 2.0}}`` under the
pair), applied after the method's: a paper's per-pair weights stay one method.

Every pair gets, per seed, the student trained alone (``baseline``), ``kd`` and every method
whose ``pairs`` include it (default: all). A method is a shipped recipe (or a recipe file) with
dotted overrides of its losses and scheme; the suite replaces the recipe's data, student,
teacher and training budget, so a method cannot buy itself a longer or different budget:
overriding ``train``, ``data``, ``student`` or the seeds in a method is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from darkknowledge.config import apply_overrides, recipe_names, student_from_teacher
from darkknowledge.errors import ConfigError, did_you_mean
from darkknowledge.validation import format_validation_error
from darkknowledge.yamlio import load_yaml

FORBIDDEN_OVERRIDES = ("train", "data", "student", "teacher", "seed", "seeds", "name")
"""Top-level config keys a method may not override: they are the suite's budget and pair."""

MIXING_OVERRIDES = ("data.augment.mixup", "data.augment.cutmix", "data.augment.mix_prob")
"""The ``data`` keys a method may set: mixing is the distillation's transfer distribution (function
matching), not budget: only stages with a teacher mix, so the baseline never sees a mixed input."""


def forbidden_override(dotted: str) -> bool:
    """Whether a method's override ``dotted`` touches the suite's budget or pair."""
    return dotted.split(".")[0] in FORBIDDEN_OVERRIDES and dotted not in MIXING_OVERRIDES


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Published(_Strict):
    """A published number for one (pair, method) cell and the protocol it was measured with."""

    value: float
    protocol: str = Field(description="e.g. 'CRD Table 1: single run, last epoch'")


class Pair(_Strict):
    """One teacher-student pair."""

    kind: str = Field(default="", description="same family / different families / different kinds of features")
    teacher: dict[str, Any] = Field(
        description="the teacher's model config (name, params, train, seed) or {name, checkpoint}"
    )
    student: dict[str, Any] = Field(description="the student's model config (name, params)")
    data: dict[str, Any] = Field(default_factory=dict, description="merged over the suite's data")
    budget: dict[str, Any] = Field(default_factory=dict, description="merged over the suite's budget")
    published: dict[str, Published] = Field(
        default_factory=dict,
        description="method -> published number ('ce' for the student alone, 'teacher' for the teacher)",
    )
    overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="method -> dotted overrides "
        "for this pair only, applied after the method's own (e.g. a "
        "paper's per-pair loss weight)",
    )

    @pydantic.model_validator(mode="after")
    def _derived_student(self) -> Pair:
        """``student: {from: teacher, ...}`` resolved against the pair's teacher, so that every cell
        (the student alone too, which has no teacher section) builds the same student."""
        self.student = dict(student_from_teacher({"teacher": self.teacher, "student": self.student})["student"])
        return self


class Method(_Strict):
    """One method: a recipe and its dotted overrides."""

    recipe: str = Field(description="shipped recipe name or recipe file (relative to the suite file)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted config path -> value")
    pairs: list[str] | None = Field(default=None, description="the pairs it runs on (default: all)")
    teacher: Literal["pair", "recipe"] = Field(
        default="pair",
        description="pair: the recipe's `teacher:` becomes "
        "the pair's trained teacher; recipe: keep the recipe's own (e.g. "
        "codistill's peer, trained from scratch with the student)",
    )
    tune: dict[str, Any] = Field(
        default_factory=dict,
        description="search ranges replacing the losses' own (dotted path -> {low, high, log} or {choices})",
    )


class Budget(_Strict):
    """What every student cell trains with."""

    train: dict[str, Any] = Field(default_factory=dict, description="the `train:` section of every student cell")
    augment: dict[str, Any] = Field(default_factory=dict, description="data.augment of every student cell")


class Suite(_Strict):
    """A whole suite (see the module docstring)."""

    name: str
    description: str = ""
    seeds: list[int] = Field(min_length=1)
    data: dict[str, Any] = Field(default_factory=dict)
    budget: Budget = Field(default_factory=Budget)
    pairs: dict[str, Pair] = Field(min_length=1)
    methods: dict[str, Method] = Field(default_factory=dict)
    hp: Literal["default", "tuned"] = Field(
        default="default",
        description="tuned: use `dk tune`'s recipes where they exist (the table marks each cell default or tuned)",
    )
    trials: int = Field(default=20, ge=1, description="dk tune's trials per (pair, method), the same for all")
    protocol: str = Field(default="", description="how the suite's cells mirror a paper's protocol, if they do")
    source: str = Field(default="", exclude=True, description="the file the suite was read from")

    def method_names(self) -> list[str]:
        """``kd`` first (every suite's reference), then the other methods in file order."""
        return ["kd"] + [m for m in self.methods if m != "kd"]

    def method(self, name: str) -> Method:
        """The method ``name``; ``kd`` defaults to the shipped ``kd`` recipe."""
        if name == "kd" and "kd" not in self.methods:
            return Method(recipe="kd")
        return self.methods[name]

    def pairs_of(self, method: str) -> list[str]:
        """The pairs ``method`` runs on."""
        chosen = self.method(method).pairs
        return list(self.pairs) if chosen is None else list(chosen)

    def recipe_path(self, method: str) -> str:
        """The method's recipe as ``read_recipe`` takes it (files relative to the suite file)."""
        recipe = self.method(method).recipe
        if recipe.endswith((".yaml", ".yml")) and self.source and not Path(recipe).is_absolute():
            return str(Path(self.source).parent / recipe)
        return recipe


def suite_names() -> list[str]:
    """The shipped suites (``darkknowledge/bench/suites/*.yaml``)."""
    files = resources.files("darkknowledge.bench").joinpath("suites").iterdir()
    return sorted(Path(f.name).stem for f in files if f.name.endswith(".yaml"))


def load_suite(name_or_path: str, overrides: Sequence[str] = ()) -> Suite:
    """Read and check a suite: a shipped name (``cpu``) or a YAML file, with dotted ``key=value``
    overrides of the suite's own keys (``seeds=[0,1]``, ``budget.train.epochs=2``).

    Raises:
        ConfigError: Unknown name, unreadable file, bad YAML, unknown keys, a method naming an
            unknown pair or overriding the budget, a name that is not a path component.
    """
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"suite file {str(path)!r} does not exist")
        text, source = path.read_text(encoding="utf-8"), str(path.resolve())
    else:
        names = suite_names()
        if name_or_path not in names:
            raise ConfigError(
                f"unknown suite {name_or_path!r}.{did_you_mean(name_or_path, names)} Shipped suites: "
                f"{', '.join(names)}; or give a path to a .yaml file."
            )
        res = resources.files("darkknowledge.bench").joinpath("suites").joinpath(f"{name_or_path}.yaml")
        text, source = res.read_text(encoding="utf-8"), str(res)
    try:
        raw = load_yaml(text) or {}
    except Exception as exc:  # noqa: BLE001 - yamlio raises one error type per problem; name the file
        raise ConfigError(f"suite {name_or_path!r} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"suite {name_or_path!r} must be a mapping of keys")
    raw = apply_overrides(raw, list(overrides))
    try:
        suite = Suite(**raw, source=source)
    except pydantic.ValidationError as exc:
        raise ConfigError(f"suite {name_or_path!r}: " + format_validation_error(exc, "suite")) from None
    check_suite(suite)
    return suite


def check_suite(suite: Suite) -> None:
    """The checks pydantic cannot make: names usable as folder names, known pairs, no budget overrides."""
    names = recipe_names()
    for kind, keys in (("suite", [suite.name]), ("pair", list(suite.pairs)), ("method", list(suite.methods))):
        for key in keys:
            if not key or not all(c.isalnum() or c in "-_." for c in key) or key.startswith("."):
                raise ConfigError(
                    f"{kind} name {key!r}: use letters, digits, '-', '_' and '.' only (it names a folder)"
                )
    for name in suite.method_names():
        method = suite.method(name)
        for pair in method.pairs or ():
            if pair not in suite.pairs:
                raise ConfigError(
                    f"methods.{name}.pairs: unknown pair {pair!r}.{did_you_mean(pair, list(suite.pairs))}"
                    f" Pairs: {', '.join(suite.pairs)}"
                )
        for key in method.overrides:
            if forbidden_override(key):
                raise ConfigError(
                    f"methods.{name}.overrides.{key}: a method cannot change "
                    f"{key.split('.')[0]!r}, the suite's budget and pair are the same for every "
                    "method (set it in `budget:`, `data:` or the pair; a method may set only its mixing, "
                    f"{', '.join(MIXING_OVERRIDES)})"
                )
        for pair, p in suite.pairs.items():
            for key in p.overrides.get(name, {}):
                if forbidden_override(key):
                    raise ConfigError(
                        f"pairs.{pair}.overrides.{name}.{key}: a method cannot change "
                        f"{key.split('.')[0]!r} (set it in the pair's `budget:`, `data:`, student or "
                        "teacher)"
                    )
        recipe = suite.recipe_path(name)
        if not recipe.endswith((".yaml", ".yml")) and recipe not in names:
            raise ConfigError(
                f"methods.{name}.recipe: unknown recipe {recipe!r}.{did_you_mean(recipe, names)} "
                f"Shipped recipes: {', '.join(names)}; or a .yaml file next to the suite"
            )
    for pair, p in suite.pairs.items():
        for name in p.overrides:
            if name not in suite.method_names() or pair not in suite.pairs_of(name):
                raise ConfigError(
                    f"pairs.{pair}.overrides.{name}: no method {name!r} runs on pair {pair!r}; "
                    f"methods here: {', '.join(m for m in suite.method_names() if pair in suite.pairs_of(m))}"
                )
    if "ce" in suite.methods:
        raise ConfigError(
            "methods.ce: the student alone (cross-entropy) is every suite's baseline already; remove it from `methods`"
        )
