"""What training one model returns: the model, its results entry, its per-epoch metrics, the run folder.

``dk.train`` and ``dk.distill`` return a :class:`TrainResult`; ``dk train`` and ``dk distill``
print :func:`summary_lines`, which is also what ``str(result)`` shows, so a notebook and a
terminal read the same lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from darkknowledge.runs.diagnosis import is_memorised, memorised_warnings
from darkknowledge.runs.report import group_rows, table_lines, verdict
from darkknowledge.schemes.keep_better import ALONE, kept_line


def summary_lines(
    entry: dict[str, Any],
    teacher: dict[str, Any] | None = None,
    members: Sequence[dict[str, Any]] = (),
    run_dir: Path | str | None = None,
    exported: Path | str | None = None,
    what: str = "student",
) -> list[str]:
    """The lines ``dk distill`` / ``dk train`` print for a trained model.

    Args:
        entry: The model's results entry (``name``, ``last_acc``, ``best_acc``, ``best_epoch``,
            ``train_seconds``; ``agreement`` and ``kl_to_teacher`` when measured: a line of their own;
            ``ece``, ``train_acc`` and ``train_confidence`` of a model measured as a teacher: another, and a
            warning when it memorised its training set).
        teacher: The teacher's entry, when the run trained or evaluated one (its ``ece`` shown when recorded,
            and a warning when it memorised its training set).
        members: Further evaluated models of the stage (peers, heads), each with ``role`` and ``last_acc``.
        run_dir: The run folder, when one was written.
        exported: Where the model was exported.
        what: How the exported file is named in the last line (``student`` or ``model``).
    """
    best = f"best {entry['best_acc']:.2f}"
    if entry.get("best_epoch") is not None:
        best += f" @ epoch {entry['best_epoch']}"
    line = f"{entry['name']}: test acc {entry['last_acc']:.2f} ({best}), {entry['train_seconds']:.1f}s"
    if teacher is not None:
        line += f"; teacher {teacher.get('last_acc', float('nan')):.2f}"
        if teacher.get("ece") is not None:
            line += f" (ECE {teacher['ece']:.2f}%)"
    lines = [line]
    if entry.get("agreement") is not None:
        fidelity = f"  fidelity: agrees with the teacher on {entry['agreement']:.2f}% of test samples"
        if entry.get("kl_to_teacher") is not None:
            fidelity += f", KL(teacher‖model) {entry['kl_to_teacher']:.4f}"
        lines.append(fidelity)
    if (fit := _fit_line(entry)) is not None:
        lines.append(fit)
    lines += [f"  {m['role']}: test acc {m['last_acc']:.2f}" for m in members]
    if entry.get("selection"):  # keep_better: which of the distilled student and the student alone this is
        lines.append(f"  {kept_line(entry['selection'])}")
    for model in (entry, teacher):
        if model is not None and is_memorised(model):
            lines += [f"  {line}" for line in memorised_warnings([{**model, "role": "teacher"}])]
    if run_dir is not None:
        lines.append(f"run folder: {run_dir}" + (f"  {what}: {exported}" if exported is not None else ""))
    return lines


def _fit_line(entry: dict[str, Any]) -> str | None:
    """The model's calibration and training-split fit, when its entry records them (a teacher, ``dk.train``)."""
    parts = []
    if entry.get("ece") is not None:
        parts.append(f"ECE {entry['ece']:.2f}% on the test split")
    if entry.get("train_acc") is not None:
        fit = f"training split: accuracy {entry['train_acc']:.2f}%"
        if entry.get("train_confidence") is not None:
            fit += f", mean top probability {entry['train_confidence']:.3f}"
        parts.append(fit)
    return "  calibration: " + "; ".join(parts) if parts else None


def epoch_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per epoch from a stage's metric records: the train record's loss terms and learning
    rate (``train/<term>`` -> ``<term>``) and, where the epoch was evaluated, ``test_acc``
    (and ``val_acc``) of the primary model."""
    rows: dict[int, dict[str, Any]] = {}
    for r in records:
        epoch = r.get("epoch")
        if epoch is None:
            continue
        row = rows.setdefault(int(epoch), {"epoch": int(epoch)})
        if r.get("kind") == "train":
            row.update({k.removeprefix("train/"): v for k, v in r.items() if k.startswith("train/")})
            if "lr" in r:
                row["lr"] = r["lr"]
        elif r.get("kind") == "eval":
            for split in ("test", "val"):
                models = r.get(split) or {}
                first = next(iter(models.values()), None) if isinstance(models, dict) else None
                if isinstance(first, dict) and "top1" in first:
                    row[f"{split}_acc"] = first["top1"]
    return [rows[e] for e in sorted(rows)]


@dataclass
class TrainResult:
    """A trained model with its numbers (``dk.train``, ``dk.distill``).

    Attributes:
        model: The trained model (the module given, trained in place, or the one built from a name).
        entry: Its results entry, as ``results.json`` holds it (accuracies, time, size, profile).
        spec: Its spec (how to rebuild it: ``dk.load`` / ``dk eval``).
        epochs: One row per epoch: the loss terms, learning rate and, where evaluated, ``test_acc``.
        teacher: The teacher's results entry when ``dk.distill`` trained it, or evaluated a given module
            for ``baseline=True`` or the default objective's choice (else None; None for ``dk.train``).
        run_dir: The run folder (None when nothing was written).
        baseline: ``dk.distill(..., baseline=True)``: the same student trained alone (cross-entropy) from
            the same initialisation with the same budget, as a result of its own (None otherwise).
        selection: With ``keep_better`` (``dk.distill``'s default objective): which of the two was kept
            and their validation accuracies (:func:`~darkknowledge.schemes.keep_better.selection`).
        distilled: The distilled student's result when the student alone was kept (this result is
            then the student alone's); None otherwise.

    With a baseline, :attr:`verdict` and ``print(result)`` compare the two as ``dk run`` does: the
    table of teacher, baseline and student, and the verdict with its measured causes.
    """

    model: nn.Module
    entry: dict[str, Any]
    spec: dict[str, Any]
    epochs: list[dict[str, Any]] = field(default_factory=list)
    teacher: dict[str, Any] | None = None
    run_dir: Path | None = None
    baseline: TrainResult | None = None
    selection: dict[str, Any] | None = None
    distilled: TrainResult | None = None

    @property
    def kept(self) -> str | None:
        """``"distilled"`` or ``"alone"``: which student this result is, when the better was kept."""
        return None if self.selection is None else str(self.selection["kept"])

    def keeping(self, choice: dict[str, Any]) -> TrainResult:
        """The result of the student ``choice`` keeps: this (distilled) one, or its baseline (the
        student alone) with this one as :attr:`distilled`."""
        if choice["kept"] != ALONE or self.baseline is None:
            return replace(self, selection=choice)
        alone = self.baseline
        return replace(alone, teacher=self.teacher, baseline=alone, selection=choice, distilled=self)

    @property
    def accuracy(self) -> float:
        """Test accuracy (%) after the last epoch."""
        return float(self.entry["last_acc"])

    @property
    def best_accuracy(self) -> float:
        """Best test (or validation-selected) accuracy (%) over the evaluated epochs."""
        return float(self.entry["best_acc"])

    @property
    def teacher_accuracy(self) -> float | None:
        """The trained teacher's test accuracy (%), when there is one."""
        return None if self.teacher is None else float(self.teacher["last_acc"])

    @property
    def agreement(self) -> float | None:
        """Top-1 agreement (%) with the run's teacher on the test split (None: not measured)."""
        value = self.entry.get("agreement")
        return None if value is None else float(value)

    @property
    def kl_to_teacher(self) -> float | None:
        """Mean KL(teacher ‖ model) at temperature 1 on the test split, nats (None: not measured)."""
        value = self.entry.get("kl_to_teacher")
        return None if value is None else float(value)

    @property
    def results(self) -> Path | None:
        """``results.json`` of the run folder (None without one)."""
        return None if self.run_dir is None else self.run_dir / "results.json"

    def rows(self) -> list[dict[str, Any]]:
        """The report's rows (:func:`~darkknowledge.runs.report.group_rows`) of the teacher, the baseline
        and this model; empty without a baseline."""
        if self.baseline is None:
            return []
        teacher = [self.teacher] if self.teacher is not None and self.teacher.get("last_acc") is not None else []
        student = self.distilled.entry if self.distilled is not None else self.entry
        return group_rows([*teacher, self.baseline.entry, student])

    @property
    def verdict(self) -> str | None:
        """The verdict ``dk run`` prints, for the distilled student against its baseline (None without one)."""
        return verdict(self.rows()) if self.baseline is not None else None

    def lines(self) -> list[str]:
        """What ``dk train`` / ``dk distill`` print for this model; with a baseline, then the table and
        verdict ``dk run`` prints."""
        lines = summary_lines(self.entry, self.teacher, run_dir=self.run_dir)
        if self.baseline is None:
            return lines
        return [*lines, "", *table_lines(self.rows()), "", str(self.verdict)]

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def _repr_markdown_(self) -> str:  # notebooks: one paragraph per line, the table's lines together
        text = "\n\n".join(summary_lines(self.entry, self.teacher, run_dir=self.run_dir))
        if self.baseline is None:
            return text
        return "\n\n".join([text, "\n".join(table_lines(self.rows())), str(self.verdict)])
