"""Base class of feature- and relation-based losses: which taps, paired how.

A feature loss compares student and teacher features at *pairs* of module paths. Paths are
given in a recipe (``student_taps``/``teacher_taps``, any module path of any model), or come
from the models' defaults, picked by the loss's ``default_taps`` kind:

* ``"stages"``: every stage output (``model.feature_taps()``); when the two models have a
  different number of stages, each student stage is paired with the teacher stage at the
  same relative depth (see :func:`darkknowledge.pairs.align_by_depth`).
* ``"last_stage"``: the deepest stage output of each model.
* ``"penultimate"``: the input of the classifier (``"fc:input"`` for zoo models; otherwise
  the input of the last ``nn.Linear``).

Subclasses read ``self.pairs`` (list of ``(student_path, teacher_path)``) and the helpers
:meth:`student_features`/:meth:`teacher_features`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from darkknowledge.errors import ConfigError
from darkknowledge.losses.base import DistillLoss, Needs, Outputs, teacher_outputs
from darkknowledge.models import default_taps
from darkknowledge.pairs import align_by_depth
from darkknowledge.taps import unwrap

TAP_KINDS = ("stages", "last_stage", "penultimate")


def penultimate_tap(model: nn.Module) -> str:
    """The classifier's input: ``"fc:input"`` when the model has an ``fc``, else the last Linear's input."""
    modules = dict(unwrap(model).named_modules())
    if isinstance(modules.get("fc"), nn.Linear):
        return "fc:input"
    linears = [name for name, m in modules.items() if isinstance(m, nn.Linear) and name]
    if not linears:
        raise ConfigError(
            f"{type(unwrap(model)).__name__} has no nn.Linear classifier to take the penultimate feature "
            "from; give the loss explicit student_taps/teacher_taps"
        )
    return f"{linears[-1]}:input"


def default_paths(model: nn.Module, kind: str, role: str) -> list[str]:
    """Default tap paths of ``model`` for a tap ``kind`` (see module docstring)."""
    if kind == "penultimate":
        return [penultimate_tap(model)]
    stages = default_taps(unwrap(model))
    if not stages:
        raise ConfigError(
            f"the {role} ({type(unwrap(model)).__name__}) has no default feature taps (no feature_taps() method); "
            f"give {role}_taps: a list of module paths, e.g. ['layer2', 'layer3']"
        )
    return stages[-1:] if kind == "last_stage" else list(stages)


def pre_activation_tap(model: nn.Module, path: str) -> str:
    """The tap of the value before the final ReLU of the module at ``path``, else ``path`` itself.

    Recognised: a ``nn.ReLU``; a module with a ``relu_out`` ReLU (zoo ResNet blocks); an
    ``nn.Sequential`` whose last child is one of these (searched recursively). An in-place
    ReLU is not used: it overwrites its input, so the hook would see the post-ReLU value.
    Used by the losses that read pre-ReLU features (AB, OFD).
    """
    if ":" in path:
        return path
    modules = dict(unwrap(model).named_modules())
    name = path
    while name in modules:
        module = modules[name]
        if isinstance(module, nn.ReLU):
            return path if module.inplace else f"{name}:input"
        relu_out = getattr(module, "relu_out", None)
        if isinstance(relu_out, nn.ReLU):
            return path if relu_out.inplace else f"{name}.relu_out:input"
        children = list(module.named_children()) if isinstance(module, nn.Sequential) else []
        if not children:
            break
        name = f"{name}.{children[-1][0]}" if name else children[-1][0]
    return path


class FeatureLoss(DistillLoss):
    """A loss over pairs of student/teacher features.

    Args:
        student_taps: Student module paths (default: from ``default_taps``).
        teacher_taps: Teacher module paths, one per student path (default: from ``default_taps``).

    Class attributes:
        default_taps: ``"stages"``, ``"last_stage"`` or ``"penultimate"``.
        uses_logits: The loss also reads both models' logits.
        uses_labels: The loss also reads the labels.
        uses_indices: The loss reads the samples' dataset indices.
    """

    knowledge = "feature"
    default_taps: ClassVar[str] = "stages"
    uses_logits: ClassVar[bool] = False
    uses_labels: ClassVar[bool] = False
    uses_indices: ClassVar[bool] = False
    needs_spec = Needs(teacher=True)

    def __init__(self, student_taps: list[str] | None = None, teacher_taps: list[str] | None = None) -> None:
        super().__init__()
        self.student_taps = list(student_taps) if student_taps else None
        self.teacher_taps = list(teacher_taps) if teacher_taps else None
        self.pairs: list[tuple[str, str]] = []

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> Needs:
        name = getattr(self, "registry_name", type(self).__name__)
        if teacher is None:
            raise ConfigError(f"loss {name!r} reads teacher features, but its teacher has none")
        s = self.student_taps or default_paths(student, self.default_taps, "student")
        t = self.teacher_taps or default_paths(teacher, self.default_taps, "teacher")
        if len(s) != len(t):
            if self.student_taps and self.teacher_taps:
                raise ConfigError(
                    f"losses.{name}: {len(s)} student_taps {s} but {len(t)} teacher_taps {t}; give one teacher "
                    "path per student path"
                )
            s, t = align_by_depth(s, t)
        self.pairs = list(zip(s, t))
        return Needs(
            teacher=True,
            teacher_logits=self.uses_logits,
            labels=self.uses_labels,
            indices=self.uses_indices,
            student_taps=tuple(dict.fromkeys(s)),
            teacher_taps=tuple(dict.fromkeys(t)),
        )

    def student_features(self, out: Outputs) -> list[torch.Tensor]:
        """Student features in pair order."""
        return [out.feature(s) for s, _ in self.pairs]

    def teacher_features(self, out: Outputs | None) -> list[torch.Tensor]:
        """Teacher features in pair order.

        Raises:
            ConfigError: No teacher fed the loss.
        """
        out = teacher_outputs(out, getattr(self, "registry_name", type(self).__name__))
        return [out.feature(t) for _, t in self.pairs]
