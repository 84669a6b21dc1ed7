"""Multi-layer perceptron on flattened inputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from darkknowledge.models._common import (
    ActivationName,
    check_dropout,
    check_positive,
    flat_features,
    make_activation,
)
from darkknowledge.models._registry import register_model


class MLP(nn.Module):
    """Flatten -> ``len(hidden)`` blocks of (Linear, activation, Dropout) -> Linear.

    Module paths: ``flatten``, ``blocks.0`` ... ``blocks.{n-1}`` (one per hidden layer),
    ``fc`` (the classifier). ``"fc:input"`` is the penultimate feature (output of the
    last hidden block, or the flattened input when ``hidden`` is empty).

    Args:
        in_features: Flattened size of one sample.
        num_classes: Number of output logits.
        hidden: Width of each hidden layer, shallow to deep.
        dropout: Dropout after each hidden activation (0 disables it).
        activation: Activation name, see ``ActivationName``.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (100, 100),
        dropout: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        where = "model 'mlp'"
        self.flatten = nn.Flatten()
        blocks: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers: list[nn.Module] = [nn.Linear(width, h), make_activation(activation, where)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            blocks.append(nn.Sequential(*layers))
            width = h
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(width, num_classes)

    def feature_taps(self) -> list[str]:
        """Paths of the hidden-block outputs, shallow to deep (``fc:input`` is the last one)."""
        return [f"blocks.{i}" for i in range(len(self.blocks))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, *input_shape)`` inputs to ``(B, num_classes)`` logits."""
        h = self.flatten(x)  # (B, D)
        h = self.blocks(h)  # (B, hidden[-1])
        return self.fc(h)  # (B, num_classes)


@register_model("mlp")
def mlp(
    num_classes: Annotated[int, Field(ge=1)] = 10,
    input_shape: tuple[int, ...] = (40,),
    hidden: tuple[int, ...] = (100, 100),
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0,
    activation: ActivationName = "relu",
) -> MLP:
    """Build an MLP that flattens its input.

    Args:
        num_classes: Number of output logits.
        input_shape: Per-sample input shape (any rank; it is flattened).
        hidden: Width of each hidden layer; ``()`` gives a linear classifier.
        dropout: Dropout probability after each hidden activation.
        activation: Hidden activation: relu, gelu, silu, tanh, elu, leaky_relu or sigmoid.

    Returns:
        The model; taps ``blocks.0`` ... , penultimate feature ``fc:input``.
    """
    where = "model 'mlp'"
    check_positive(where, num_classes=num_classes, hidden=hidden)
    check_dropout(where, dropout)
    return MLP(flat_features(where, input_shape), num_classes, tuple(hidden), dropout, activation)
