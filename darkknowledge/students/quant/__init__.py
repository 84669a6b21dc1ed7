"""Quantized students: fake-quantized conv/linear layers for quantization-aware training, and
their real low-bit storage.

Design decision (issue 15): the fake-quantization core is our own, not a library's.
``torch.ao.quantization`` is deprecated (its PT2E flow moved to ``torchao``); ``torchao``'s QAT
covers linear and embedding layers only; Brevitas is a heavy dependency. Here a quantized layer
is a subclass of its float layer (:mod:`.layers`) with a weight quantizer and an optional input
quantizer (:mod:`.quantizers`: LSQ, Esser et al., ICLR 2020; min-max, Polino et al., ICLR 2018;
math in :mod:`.fake_quant`), swapped in by :func:`quantize_model` from a :class:`QuantSpec`.
Real low-bit storage is our own dense packing of the integer codes (:mod:`.pack`), which also
gives a model's deployed size in bytes.

Example:
    >>> spec = QuantSpec(bits=4, act_bits=4)
    >>> quantize_model(model, spec)                  # ['blocks.1.0', 'blocks.2.0'] (first/last kept)
    >>> quantized_nbytes(model)                      # bytes of the packed safetensors file
"""

from __future__ import annotations

from darkknowledge.students.quant.fake_quant import (
    Quantized,
    dequantize,
    lsq_fake_quant,
    lsq_grad_scale,
    lsq_init_step,
    lsq_quantize,
    minmax_fake_quant,
    minmax_quantize,
    qrange,
)
from darkknowledge.students.quant.layers import (
    QUANT_LAYERS,
    QuantConv1d,
    QuantConv2d,
    QuantLayer,
    QuantLinear,
)
from darkknowledge.students.quant.pack import (
    IntegerWeights,
    integer_weights,
    pack_codes,
    packed_state_dict,
    quantized_nbytes,
    unpack_codes,
    unpack_state_dict,
)
from darkknowledge.students.quant.quantizers import (
    QUANTIZERS,
    LsqQuantizer,
    MinMaxQuantizer,
    make_quantizer,
)
from darkknowledge.students.quant.spec import QUANTIZABLE_TYPES, QuantSpec
from darkknowledge.students.quant.wrap import (
    is_quantized,
    quant_summary,
    quantizable_paths,
    quantize_model,
    select_paths,
)

__all__ = [
    "QUANTIZABLE_TYPES",
    "QUANTIZERS",
    "QUANT_LAYERS",
    "IntegerWeights",
    "LsqQuantizer",
    "MinMaxQuantizer",
    "QuantConv1d",
    "QuantConv2d",
    "QuantLayer",
    "QuantLinear",
    "QuantSpec",
    "Quantized",
    "dequantize",
    "integer_weights",
    "is_quantized",
    "lsq_fake_quant",
    "lsq_grad_scale",
    "lsq_init_step",
    "lsq_quantize",
    "make_quantizer",
    "minmax_fake_quant",
    "minmax_quantize",
    "pack_codes",
    "packed_state_dict",
    "qrange",
    "quant_summary",
    "quantizable_paths",
    "quantize_model",
    "quantized_nbytes",
    "select_paths",
    "unpack_codes",
    "unpack_state_dict",
]
