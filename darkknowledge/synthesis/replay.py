"""Replay a sample pool that an earlier run synthesised: distil again without synthesising again.

Synthesis is the expensive half of data-free distillation (DeepInversion optimises every batch
for hundreds of steps). A data-free stage keeps what it made in ``<stage>/pool``
(:class:`~darkknowledge.synthesis.pool.SamplePool`); this synthesiser opens such a pool read-only
and serves uniform draws from its committed samples, so another student, seed or objective can
learn from the same inputs::

    scheme:
      name: data_free
      params:
        synthesizer: {name: replay, params: {path: runs/deepinversion/data_free-s0/pool}}

The pool must have been made with this run's teacher (its weights' hash is checked) and inputs
of this run's shape. Each student batch is drawn from the latent batch's seed, so a resumed run
draws the same samples.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.data.seeds import make_generator
from darkknowledge.engine.checkpoint import state_hash
from darkknowledge.errors import ConfigError
from darkknowledge.synthesis.base import Synthesizer, SynthesizerParams, register_synthesizer
from darkknowledge.synthesis.deepinversion import POOL_STREAM, latent_seed
from darkknowledge.synthesis.pool import SamplePool


class ReplayParams(SynthesizerParams):
    """Parameters of ``replay``."""

    path: str = Field(description="a sample pool directory written by an earlier data-free stage (<stage>/pool)")


@register_synthesizer("replay")
class Replay(Synthesizer):
    """Uniform draws from a committed sample pool of an earlier run (nothing is trained here)."""

    citation = "Reuse of synthesised samples across runs (no paper; the pool of darkknowledge.synthesis.pool)."
    summary = "replays the samples an earlier data-free stage kept in its pool"
    Params = ReplayParams
    example: ClassVar[dict[str, Any]] = {}  # needs a pool directory: tested in tests/test_data_free.py
    params: ReplayParams

    def __init__(
        self, params: ReplayParams, teacher: nn.Module, input_shape: tuple[int, ...], num_classes: int
    ) -> None:
        super().__init__(params, teacher, input_shape, num_classes)
        self.pool = SamplePool.open(params.path, teacher_hash=state_hash(teacher))
        if tuple(self.pool.input_shape) != self.input_shape:
            raise ConfigError(
                f"synthesizer 'replay'.params.path: the pool {params.path!r} holds inputs of shape "
                f"{tuple(self.pool.input_shape)}, this run's are {self.input_shape}"
            )
        if len(self.pool) == 0:
            raise ConfigError(
                f"synthesizer 'replay'.params.path: the pool {params.path!r} holds no committed "
                "samples yet (a stage commits them at each checkpoint)"
            )

    def sample(self, latent: Batch, student: nn.Module | None) -> torch.Tensor:
        """``B`` samples of the pool, drawn from this latent batch's seed, ``(B, *input_shape)``."""
        draw = make_generator(latent_seed(latent), POOL_STREAM)
        return self.pool.sample(len(latent), draw).to(device=latent.y.device, dtype=torch.float32)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "pool": {"path": self.params.path, "samples": len(self.pool)}}
