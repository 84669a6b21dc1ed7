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

    Module paths: ``flatten``, ``blocks.0`` ... ``blocks.{n-1}`` (one per hidden width),
    ``fc`` (the classifier). ``"fc:input"`` is the penultimate feature (output of the
    last hidden block, or the flattened input when ``hidden`` is empty). With
    ``block_layers = k`` each block repeats (Linear, activation, Dropout) ``k`` times at its
    width (``blocks.i.0``, ``.1``, ... in order), so the blocks (the stages) stay the taps.

    Args:
        in_features: Flattened size of one sample.
        num_classes: Number of output logits.
        hidden: Width of each hidden layer, shallow to deep.
        dropout: Dropout after each hidden activation (0 disables it).
        activation: Activation name, see ``ActivationName``.
        block_layers: Linear layers in each block (1: one per hidden width).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (100, 100),
        dropout: float = 0.0,
        activation: str = "relu",
        block_layers: int = 1,
    ) -> None:
        super().__init__()
        where = "model 'mlp'"
        self.flatten = nn.Flatten()
        blocks: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers: list[nn.Module] = []
            for _ in range(block_layers):
                layers += [nn.Linear(width, h), make_activation(activation, where)]
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
                width = h
            blocks.append(nn.Sequential(*layers))
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
    block_layers: Annotated[int, Field(ge=1)] = 1,
) -> MLP:
    """Build an MLP that flattens its input.

    Args:
        num_classes: Number of output logits.
        input_shape: Per-sample input shape (any rank; it is flattened).
        hidden: Width of each hidden layer; ``()`` gives a linear classifier.
        dropout: Dropout probability after each hidden activation.
        activation: Hidden activation: relu, gelu, silu, tanh, elu, leaky_relu or sigmoid.
        block_layers: Linear layers per hidden block, all at the block's width (the depth of a
            stage; ``darkknowledge.students.shrink`` scales it).

    Returns:
        The model; taps ``blocks.0`` ... , penultimate feature ``fc:input``.
    """
    where = "model 'mlp'"
    check_positive(where, num_classes=num_classes, hidden=hidden, block_layers=block_layers)
    check_dropout(where, dropout)
    return MLP(flat_features(where, input_shape), num_classes, tuple(hidden), dropout, activation, block_layers)
