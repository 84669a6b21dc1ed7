"""``QuantSpec``: what a quantized student quantizes, validated before any model is built.

A recipe's ``student: {name: ..., quantize: {bits: 4, act_bits: 4}}`` is read into this model;
:func:`darkknowledge.students.quant.wrap.quantize_model` applies it. By default the first and last
quantizable layers stay in full precision, the usual choice of low-bit training (LSQ, Esser et al.,
ICLR 2020, Sec. 3, keeps them at 8 bits instead), and weights are quantized per output channel.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from darkknowledge.students.quant.fake_quant import MAX_BITS, MIN_BITS

QuantizableType = Literal["Conv1d", "Conv2d", "Linear"]
QUANTIZABLE_TYPES: tuple[QuantizableType, ...] = ("Conv1d", "Conv2d", "Linear")
"""Type names of the layers that have a quantized twin (``torch.nn`` classes, exactly these)."""

Bits = Annotated[StrictInt, Field(ge=MIN_BITS, le=MAX_BITS)]


class QuantSpec(BaseModel):
    """Fake-quantization of a model's conv/linear layers (weights, optionally input activations)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    bits: Bits = Field(description=f"weight bit width, {MIN_BITS}..{MAX_BITS}")
    act_bits: Bits | None = Field(
        default=None,
        description="bit width of each quantized layer's input activations; null keeps activations in full precision",
    )
    method: Literal["lsq", "minmax"] = Field(
        default="lsq",
        description="lsq: learned step size (Esser et al., "
        "ICLR 2020); minmax: min-max uniform levels with straight-through "
        "gradients (Polino et al., ICLR 2018)",
    )
    per_channel: StrictBool = Field(
        default=True,
        description="one weight step (range) per output channel; "
        "false: one per layer. Activations are always per tensor",
    )
    modules: list[QuantizableType] = Field(
        default_factory=lambda: list(QUANTIZABLE_TYPES),
        min_length=1,
        description="layer types to quantize (torch.nn class names)",
    )
    paths: list[StrictStr] | None = Field(
        default=None,
        description="module paths to quantize; when given, "
        "exactly these (modules, keep_first and keep_last are not applied)",
    )
    keep_first: StrictBool = Field(
        default=True, description="leave the first quantizable layer in full precision (weights and input)"
    )
    keep_last: StrictBool = Field(default=True, description="leave the last quantizable layer in full precision")
