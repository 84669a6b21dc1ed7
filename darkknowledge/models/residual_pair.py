"""Student + residual assistant as one deployable model (the ``residual`` scheme's export).

Gao, Shen, Li & Loy, "Residual Knowledge Distillation", arXiv:2002.09168, 2020: at inference
the student's feature (mapped into the teacher's feature space) and the assistant's predicted
residual are summed and classified::

    logits = fc(connector(f_S(x)) + A(x))

``fc`` has the teacher's feature width; the ``residual`` scheme initialises it from the
teacher's classifier and keeps it frozen. Rebuilt from its spec like any zoo model.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import Field
from torch import nn

from darkknowledge.errors import ConfigError
from darkknowledge.models._registry import register_model


class ResidualPair(nn.Module):
    """``fc(connector(trunk(x)) + assistant(x))``.

    Module paths: ``student`` (the student zoo model with its classifier replaced by
    ``nn.Identity``, so it returns its penultimate feature ``(B, d)``), ``connector`` (Linear,
    student feature -> teacher feature width), ``assistant`` (a zoo model whose
    ``num_classes`` outputs are the feature residual), ``fc`` (the classifier). Every parameter
    feeds the logits; the student's own head is not part of the pair.

    Args:
        student: The student zoo model (must have a Linear ``fc``; it is replaced by Identity).
        assistant: The assistant zoo model, built with ``num_classes = feature_dim``.
        feature_dim: Width of the teacher's penultimate feature.
        num_classes: Classes.
    """

    def __init__(self, student: nn.Module, assistant: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        fc = getattr(student, "fc", None)
        if not isinstance(fc, nn.Linear):
            raise ConfigError(
                f"model 'residual_pair': the student {getattr(student, 'dk_name', '?')!r} has no Linear "
                "`fc` classifier whose input is its penultimate feature"
            )
        self.student_features = int(fc.in_features)
        student.fc = nn.Identity()  # zoo models end with fc(h): the trunk now returns h
        self.student = student
        self.connector = nn.Linear(self.student_features, feature_dim)
        self.assistant = assistant
        self.fc = nn.Linear(feature_dim, num_classes)

    def feature_taps(self) -> list[str]:
        """The two summands: the student's feature in the teacher's space and the assistant's residual."""
        return ["connector", "assistant"]

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Student penultimate feature ``(B, d)``, it in the teacher's space ``(B, D)``, residual ``(B, D)``."""
        h = self.student(x).flatten(1)  # (B, d)
        f_s = self.connector(h)  # (B, D)
        f_a = self.assistant(x).flatten(1)  # (B, D)
        return h, f_s, f_a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K)`` of the student feature plus the assistant's residual."""
        _, f_s, f_a = self.parts(x)
        return self.fc(f_s + f_a)  # (B, K)


@register_model("residual_pair")
def residual_pair(
    num_classes: Annotated[int, Field(ge=1)] = 10,
    input_shape: tuple[int, ...] = (40,),
    student: dict[str, Any] | None = None,
    assistant: dict[str, Any] | None = None,
    feature_dim: Annotated[int, Field(ge=1)] = 64,
) -> ResidualPair:
    """Build a student + residual-assistant pair.

    Args:
        num_classes: Number of output logits.
        input_shape: Per-sample input shape.
        student: Zoo spec ``{name, params}`` of the student (default: ``mlp``).
        assistant: Zoo spec ``{name, params}`` of the assistant (default: ``mlp`` hidden [64]).
        feature_dim: Width of the teacher's penultimate feature (the residual's width).

    Returns:
        The pair; ``pair.student`` is the student's trunk (its head is trained beside the pair).
    """
    from darkknowledge.models import create_model

    student = dict(student or {"name": "mlp"})
    assistant = dict(assistant or {"name": "mlp", "params": {"hidden": [64]}})
    for key, spec in (("student", student), ("assistant", assistant)):
        if "name" not in spec or set(spec) - {"name", "params"}:
            raise ConfigError(f"model 'residual_pair'.{key}: expected {{name, params}}, got {spec!r}")
    s = create_model(
        student["name"], **{**student.get("params", {}), "num_classes": num_classes, "input_shape": input_shape}
    )
    a = create_model(
        assistant["name"], **{**assistant.get("params", {}), "num_classes": feature_dim, "input_shape": input_shape}
    )
    return ResidualPair(s, a, feature_dim, num_classes)
