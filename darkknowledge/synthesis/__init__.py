"""Synthesisers: input batches for distillation made from a teacher, without its training data.

One file per method; each registers itself in ``SYNTHESIZERS`` (``dk list synthesizers``).
"""

from __future__ import annotations

from darkknowledge.discovery import import_modules
from darkknowledge.synthesis.base import (
    SYNTHESIZERS,
    Synthesizer,
    SynthesizerParams,
    draw_latent,
    register_synthesizer,
    resolve_synthesizer,
)

import_modules(__name__, __path__)

__all__ = [
    "SYNTHESIZERS",
    "Synthesizer",
    "SynthesizerParams",
    "draw_latent",
    "register_synthesizer",
    "resolve_synthesizer",
]
