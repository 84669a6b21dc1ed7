"""``dk search``: a student architecture found under a latency/size budget, checked at full budget.

A search file names a base recipe (its teacher, data, losses and full training budget), a
student space (:class:`~darkknowledge.bench.candidates.StudentSpace`), limits and a budget::

    name: cnn1d
    recipe: shrink                       # the base recipe; its student is the hand-chosen reference
    space: {model: cnn1d, params: {channels: [4, 8, 16], depth: [2, 3]}, ops: [plain, depthwise]}
    limits: {latency_ms_b1: reference}   # a number, or `reference`: the recipe student's own
    trials: 12
    proxy: {epochs: 5}                   # the short KD run that scores a candidate (validation split)
    final: {count: 3, seeds: [0, 1, 2]}  # front members retrained with the recipe's budget

Each candidate is measured (params, FLOPs, CPU latency: :mod:`darkknowledge.students.profile`)
and, within the limits, scored by a proxy: KD with the recipe's losses for ``proxy.epochs`` on
cached teacher outputs (``cache.enabled``: the teacher runs once for all candidates), judged on
the validation split (never the test split). NSGA-II returns the Pareto front of accuracy against
latency (:func:`~darkknowledge.bench.student_search.search_students`). Then up to
``final.count`` front members and the recipe's own student are trained with the recipe's full
budget over ``final.seeds`` (test split), and Kendall's tau between proxy and full accuracy says
whether the proxy ranked them as full training does. Everything resumes: the trials file, and
each final run's result file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import statistics
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import pydantic
import torch
from pydantic import BaseModel, ConfigDict, Field

from darkknowledge.bench.candidates import Candidate, StudentSpace
from darkknowledge.bench.pareto import proxy_trust
from darkknowledge.bench.student_search import search_students
from darkknowledge.config import (
    ModelConfig,
    RunConfig,
    apply_overrides,
    deep_merge,
    read_recipe,
    validate_config,
)
from darkknowledge.engine.checkpoint import atomic_write_text
from darkknowledge.errors import ConfigError
from darkknowledge.validation import format_validation_error
from darkknowledge.yamlio import load_yaml

log = logging.getLogger(__name__)
REFERENCE = "reference"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ProxyBudget(_Strict):
    epochs: int = Field(default=5, ge=1, description="epochs of a candidate's KD proxy run")


class FinalBudget(_Strict):
    count: int = Field(default=3, ge=1, description="front members retrained with the recipe's budget")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)


class SearchSpec(_Strict):
    """A ``dk search`` file."""

    name: str
    description: str = ""
    recipe: str = Field(description="base recipe: teacher, data, losses, training budget, reference student")
    overrides: list[str] = Field(default_factory=list, description="dotted overrides of the recipe")
    space: dict[str, Any] = Field(description="the student space: {model, params, ops}")
    limits: dict[str, float | str] = Field(
        default_factory=dict,
        description="upper bounds on measured keys (params, flops, latency_ms_b1); `reference` = the recipe student's",
    )
    objectives: list[str] = Field(default_factory=lambda: ["accuracy", "latency_ms_b1"])
    trials: int = Field(default=12, ge=1)
    seed: int = 0
    proxy: ProxyBudget = Field(default_factory=ProxyBudget)
    final: FinalBudget = Field(default_factory=FinalBudget)


def load_search(name_or_path: str) -> SearchSpec:
    """A shipped search (``dk search cnn1d``) or a search YAML file."""
    path = Path(name_or_path)
    if path.is_file():
        text = path.read_text()
    else:
        shipped = resources.files("darkknowledge.bench").joinpath("searches").joinpath(f"{name_or_path}.yaml")
        if not shipped.is_file():
            names = sorted(
                Path(f.name).stem
                for f in resources.files("darkknowledge.bench").joinpath("searches").iterdir()
                if f.name.endswith(".yaml")
            )
            raise ConfigError(f"unknown search {name_or_path!r}; shipped searches: {', '.join(names)}, or a YAML path")
        text = shipped.read_text()
    try:
        return SearchSpec(**(load_yaml(text) or {}))
    except pydantic.ValidationError as exc:
        raise ConfigError(format_validation_error(exc, f"search {name_or_path!r}")) from None


class StudentSearch:
    """One search: the base config, the measuring and the proxy/full runs under ``out``."""

    def __init__(self, spec: SearchSpec, out: Path, progress: bool = False) -> None:
        from darkknowledge.runs.build import build_data

        self.spec, self.out, self.progress = spec, Path(out), progress
        self.raw = apply_overrides(read_recipe(spec.recipe), spec.overrides)
        self.base: RunConfig = validate_config(self.raw)
        if self.base.teacher is None:
            raise ConfigError(f"search {spec.name!r}: recipe {spec.recipe!r} has no teacher to distil from")
        self.space = StudentSpace.from_mapping(spec.space, "search.space")
        self.info = build_data(self.base).info

    # ------------------------------------------------------------------ candidates
    def _model(self, student: ModelConfig) -> torch.nn.Module:
        from darkknowledge.runs.build import build_model

        torch.manual_seed(0)
        return build_model(student, self.info)

    def profile(self, student: ModelConfig) -> dict[str, Any]:
        """``students.profile`` of a student spec, as plain data."""
        from darkknowledge.students.profile import profile_model

        example = torch.randn((1, *self.info.input_shape), generator=torch.Generator().manual_seed(0))
        found = profile_model(
            self._model(student),
            example,
            batch_n=self.base.data.batch_size,
            repeats=max(self.base.profile.repeats, 20),
            warmup=self.base.profile.warmup,
            quant_bits_default=self.base.profile.quant_bits,
        )
        return dataclasses.asdict(found)

    @staticmethod
    def student_of(c: Candidate) -> ModelConfig:
        return ModelConfig.model_validate({"name": c.model, "params": dict(c.params), "ops": c.ops})

    def _run(self, student: ModelConfig, folder: Path, seed: int, proxy: bool) -> float:
        """KD of ``student`` (proxy: short, validation split, cached teacher; else the recipe's budget)."""
        from darkknowledge.commands import distill

        done = folder / "result.json"
        if done.is_file():
            return float(json.loads(done.read_text())["last_acc"])
        over = {"student": student.model_dump(mode="json", exclude_defaults=True), "seed": seed, "seeds": [seed]}
        if proxy:
            over |= {
                "train": {"epochs": self.spec.proxy.epochs},
                "data": {"holdout": "val"},
                "cache": {"enabled": True},
            }
        raw = deep_merge({k: v for k, v in self.base.model_dump(mode="json").items() if k != "student"}, over)
        if proxy and not raw["data"].get("val_fraction"):
            raise ConfigError(
                f"search {self.spec.name!r}: the proxy is judged on a validation split; give recipe "
                f"{self.spec.recipe!r} data.val_fraction > 0"
            )
        if folder.exists():  # a run killed before its result: start it again
            import shutil

            shutil.rmtree(folder)
        out = distill(validate_config(raw), out=folder / "run", progress=False)
        acc = float(out["student"]["last_acc"])
        atomic_write_text(json.dumps({"last_acc": acc}) + "\n", done)
        return acc

    # ------------------------------------------------------------------ the search
    def run(self) -> dict[str, Any]:
        ref = self.base.student
        ref_profile = self.profile(ref)
        limits = {k: (ref_profile[k] if v == REFERENCE else float(v)) for k, v in self.spec.limits.items()}

        def measure(c: Candidate) -> dict[str, Any]:
            return self.profile(self.student_of(c))

        def proxy(c: Candidate) -> float:
            folder = hashlib.sha256(c.key.encode()).hexdigest()[:12]
            return self._run(self.student_of(c), self.out / "proxy" / folder, self.spec.seed, proxy=True)

        result = search_students(
            self.space,
            measure,
            proxy,
            self.spec.trials,
            self.out,
            seed=self.spec.seed,
            limits=limits,
            objectives=tuple(self.spec.objectives),
            progress=self.progress,
        )
        cost = next((o for o in self.spec.objectives if o != "accuracy"), "latency_ms_b1")
        front = sorted(result.front, key=lambda r: r["metrics"][cost])  # cheapest first
        chosen = _spread(front, self.spec.final.count)
        rows = [
            (
                "reference",
                "recipe student",
                ref,
                ref_profile,
                self._run(ref, self.out / "proxy" / "reference", self.spec.seed, proxy=True),
            )
        ]
        rows += [
            (
                f"front-{i}",
                Candidate.from_dict(r["candidate"]).describe(),
                self.student_of(Candidate.from_dict(r["candidate"])),
                r["metrics"],
                r["accuracy"],
            )
            for i, r in enumerate(chosen)
        ]
        final: list[dict[str, Any]] = []
        for tag, label, student, prof, proxy_acc in rows:
            accs = [
                self._run(student, self.out / "final" / tag / f"s{s}", s, proxy=False) for s in self.spec.final.seeds
            ]
            final.append(
                {
                    "tag": tag,
                    "label": label,
                    "student": student.model_dump(mode="json", exclude_defaults=True),
                    "profile": prof,
                    "proxy_acc": proxy_acc,
                    "accs": accs,
                    "mean": statistics.fmean(accs),
                    "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                }
            )
        trust = proxy_trust([f["proxy_acc"] for f in final], [f["mean"] for f in final]) if len(final) > 1 else None
        assert self.base.teacher is not None  # checked in __init__
        teacher = self.profile(self.base.teacher)
        report = self._report(result, final, trust, teacher, limits)
        atomic_write_text(
            json.dumps({"limits": limits, "final": final, "trust": trust}, indent=2, default=str) + "\n",
            self.out / "final.json",
        )
        return {"out": self.out, "result": result, "final": final, "trust": trust, "report": report}

    def _report(
        self,
        result: Any,
        final: list[dict[str, Any]],
        trust: dict[str, Any] | None,
        teacher: dict[str, Any],
        limits: dict[str, float],
    ) -> Path:
        from darkknowledge.students.report import (
            plot_accuracy_latency,
            profile_row,
            student_table,
        )

        assert self.base.teacher is not None  # checked in __init__
        rows = [profile_row("teacher", self.base.teacher.name, teacher, None)]
        rows += [profile_row(f["tag"], f["label"], f["profile"], f["mean"]) for f in final]
        seeds = ",".join(str(s) for s in self.spec.final.seeds)
        setup = (
            f"Base recipe `{self.spec.recipe}`; limits {json.dumps(limits)}; {self.spec.trials} trials, "
            f"NSGA-II seed {self.spec.seed}; proxy: KD for {self.spec.proxy.epochs} epochs on cached teacher "
            "outputs, validation-split accuracy."
        )
        lines = [
            f"# dk search {self.spec.name}",
            "",
            self.spec.description,
            "",
            setup,
            "",
            "## Trials",
            "",
            result.to_markdown().rstrip("\n"),
            "",
            f"## Full budget (seeds {seeds}, last-epoch test accuracy)",
            "",
            "| student | spec | proxy acc (val) | acc mean ± std |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {f['tag']} | {f['label']} | {f['proxy_acc']:.2f} | {f['mean']:.2f} ± {f['std']:.2f} |" for f in final
        ]
        lines += ["", student_table(rows).rstrip("\n"), ""]
        if trust is not None:
            lines.append(
                f"Proxy vs full budget over these {trust.get('n')} students: Kendall tau "
                f"{trust.get('tau', float('nan')):.2f}; {trust.get('verdict', '')}"
            )
        if plot_accuracy_latency(rows, self.out / "search.png") is not None:
            lines += ["", "![accuracy against latency](search.png)"]
        return atomic_write_text("\n".join(lines) + "\n", self.out / "search.md")


def _spread(records: Sequence[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """Up to ``count`` records, evenly spaced through ``records`` (the ends kept)."""
    if len(records) <= count:
        return list(records)
    if count == 1:
        return [records[0]]
    picks = sorted({round(i * (len(records) - 1) / (count - 1)) for i in range(count)})
    return [records[i] for i in picks]


def search_command(
    name: str, out: str | Path | None = None, trials: int | None = None, progress: bool = False
) -> dict[str, Any]:
    """``dk search NAME``: run (or resume) a search; returns the report path and the final rows."""
    spec = load_search(name)
    if trials is not None:
        spec = spec.model_copy(update={"trials": trials})
    return StudentSearch(spec, Path(out) if out else Path("runs") / "search" / spec.name, progress).run()
