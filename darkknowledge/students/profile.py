"""What deploying a student costs: parameters, size on disk, FLOPs and CPU latency.

The survey frames a student by these numbers (Gou et al., "Knowledge Distillation: A Survey",
IJCV 2021, Sec. 6 "Teacher-Student Architecture": the student should cut model size and
inference time for a small loss of accuracy); :func:`profile_model` measures them for one
model on one example batch:

- ``params``: the number of distinct parameters (shared parameters counted once),
  ``sum(p.numel() for p in model.parameters())``.
- ``size_fp32_bytes``: the length of the ``safetensors`` file of the state dict with every
  floating tensor in float32 (integer buffers as they are; tied tensors stored once). About
  ``4 * (params + float buffers)`` plus a small JSON header.
- ``size_quant_bytes``: the ``safetensors`` length of
  :func:`darkknowledge.students.quant.pack.packed_state_dict` (the integer-packed weights and
  their scales). For a float model that is the size it would have after ``quant_bits_default``
  -bit post-training quantization (``ptq_bits`` says which); for a quantized model it is its
  own packed size (``quant_bits``).
- ``flops``: per sample, what ``torch.utils.flop_counter.FlopCounterMode`` counts for one
  forward pass at batch 1: ``2 x`` multiply-accumulates of matrix products and convolutions
  (``mm``, ``addmm``, ``bmm``, ``convolution``, attention); element-wise operations
  (activations, normalisation, bias of ``addmm``, pooling) count 0.
- ``latency_ms_b1`` / ``latency_ms_bN``: the median wall time (``time.perf_counter``) of
  ``repeats`` forward calls at batch 1 / batch ``batch_n`` (the whole batch, not per sample),
  in eval mode under ``torch.inference_mode`` on the CPU with ``threads`` intra-op threads,
  after ``warmup`` untimed calls.

Shapes: ``example`` is ``(B, *input_shape)`` with ``B >= 1``; the batch-1 input is
``example[:1]`` ``(1, *input_shape)``, the batch-N input repeats the example's samples
cyclically to ``(batch_n, *input_shape)``.

The model is left as it was: every submodule gets its train/eval mode back, and a model that
is not on the CPU is measured on a CPU copy (it never moves).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from torch import nn

from darkknowledge.errors import ConfigError, ShapeError
from darkknowledge.models import count_params

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelProfile:
    """Size, cost and speed of one model (see the module docstring for each measure).

    Attributes:
        params: Distinct parameters.
        size_fp32_bytes: safetensors size of the state dict in float32.
        size_quant_bytes: safetensors size of the packed quantized state dict.
        quant_bits: The model's own weight bits when it is quantized; None for a float model
            (then ``size_quant_bytes`` is its ``ptq_bits``-bit post-training size).
        flops: Forward FLOPs per sample (2 x MACs), at batch 1.
        latency_ms_b1: Median CPU latency of one forward call at batch 1, milliseconds.
        latency_ms_bN: Median CPU latency of one forward call at batch ``batch_n``, milliseconds.
        batch_n: The batch of ``latency_ms_bN``.
        threads: ``torch.get_num_threads()`` during the measurement.
        repeats: Timed calls per latency.
        ptq_bits: Bits of the post-training estimate behind ``size_quant_bytes`` for a float
            model; None for a quantized model.
    """

    params: int
    size_fp32_bytes: int
    size_quant_bytes: int
    quant_bits: int | None
    flops: int
    latency_ms_b1: float
    latency_ms_bN: float
    batch_n: int
    threads: int
    repeats: int
    ptq_bits: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (inverse: :meth:`from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelProfile:
        """Rebuild a profile from :meth:`to_dict`'s output; ConfigError on unknown or missing fields."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"model profile: unknown field(s) {unknown}; valid fields: {', '.join(names)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"model profile: {exc}; fields: {', '.join(names)}") from None


def _distinct(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the entries that view the same memory as an earlier one (tied weights)."""
    seen: set[tuple[Any, ...]] = set()
    out = {}
    for name, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def safetensors_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """The bytes of a safetensors file holding ``state`` (CPU, contiguous, unshared copies)."""
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()})


def fp32_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with floating tensors in float32, other tensors as they are, tied ones once."""
    state = _distinct({k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)})
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _on_cpu(model: nn.Module) -> bool:
    return all(t.device.type == "cpu" for t in chain(model.parameters(), model.buffers()))


@contextlib.contextmanager
def cpu_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Yield ``model`` in eval mode on the CPU; afterwards every submodule has its mode back.

    A model with a tensor off the CPU is deep-copied to the CPU (the caller's model never moves).
    """
    modes = [(m, m.training) for m in model.modules()]
    target = model if _on_cpu(model) else copy.deepcopy(model).to("cpu")
    target.eval()
    try:
        yield target
    finally:
        for m, mode in modes:
            m.train(mode)


def check_example(example: Any, where: str = "example") -> torch.Tensor:
    """``example`` as a CPU tensor ``(B, *input_shape)`` with ``B >= 1``; ShapeError otherwise."""
    if not isinstance(example, torch.Tensor):
        raise ShapeError(f"{where} must be a tensor of shape (batch, *input_shape), got {type(example).__name__}")
    if example.dim() < 1 or example.shape[0] < 1:
        raise ShapeError(f"{where} must have shape (batch >= 1, *input_shape), got {tuple(example.shape)}")
    return example.detach().to("cpu")


def repeat_batch(example: torch.Tensor, n: int) -> torch.Tensor:
    """The example's samples repeated cyclically to a batch of ``n``: ``(B, ...) -> (n, ...)``."""
    index = torch.arange(n) % example.shape[0]  # (n,)
    return example[index].contiguous()  # (n, *input_shape)


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward call of ``model`` on ``x`` as FlopCounterMode counts them (2 x MACs)."""
    from torch.utils.flop_counter import FlopCounterMode

    # no_grad, not inference_mode: the counter's module tracker hooks the autograd graph of a
    # module's tensor inputs (a fake-quantized layer passes its weight Parameter to its quantizer)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())


def median_latency_ms(model: nn.Module, x: torch.Tensor, repeats: int, warmup: int) -> float:
    """Median wall time in ms of ``repeats`` calls ``model(x)`` after ``warmup`` untimed ones."""
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def quantized_size(model: nn.Module, default_bits: int) -> tuple[int, int | None, int | None]:
    """``(bytes, quant_bits, ptq_bits)`` of the packed quantized state dict of ``model``.

    ``quant_bits`` is the model's own bits when it is quantized (None otherwise), ``ptq_bits``
    the post-training bits of a float model's estimate (None for a quantized model).
    """
    # imported here: profiling a float model needs none of quant's machinery until this point
    from darkknowledge.students.quant import pack

    packed = pack.packed_state_dict(model, default_bits=default_bits)
    size = len(safetensors_bytes(packed))
    if pack.is_quantized(model):
        return size, model_bits(model), None
    return size, None, default_bits


def model_bits(model: nn.Module) -> int | None:
    """The weight bits of a quantized model (the widest of its quantized layers); None when it has none."""
    from darkknowledge.students.quant.wrap import quant_summary

    bits = [layer["bits"] for layer in quant_summary(model).values()]
    return max(bits) if bits else None


def profile_model(
    model: nn.Module,
    example: torch.Tensor,
    batch_n: int,
    repeats: int = 20,
    warmup: int = 3,
    quant_bits_default: int = 8,
) -> ModelProfile:
    """Measure ``model``'s parameters, sizes, FLOPs and CPU latency at batch 1 and ``batch_n``.

    Args:
        model: Any module mapping ``(B, *input_shape)`` to outputs; left in its mode and place.
        example: ``(B, *input_shape)`` inputs (B >= 1); only their shape and values matter.
        batch_n: The larger batch to time (``>= 1``).
        repeats: Timed calls per latency (``>= 1``); the median is reported.
        warmup: Untimed calls before timing (``>= 0``).
        quant_bits_default: Bits of the post-training size estimate of a float model.

    Returns:
        The :class:`ModelProfile`.

    Raises:
        ConfigError: ``batch_n``, ``repeats`` or ``warmup`` is not a valid integer.
        ShapeError: ``example`` is not a batch tensor, or the model does not run on it.
    """
    x = check_example(example)
    _check_int(batch_n, "batch_n", 1)
    _check_int(repeats, "repeats", 1)
    _check_int(warmup, "warmup", 0)
    x1 = x[:1].contiguous()  # (1, *input_shape)
    xn = repeat_batch(x, batch_n)  # (batch_n, *input_shape)
    with cpu_eval(model) as net:
        try:
            flops = count_flops(net, x1)
        except (RuntimeError, ValueError, TypeError) as exc:
            first = " ".join(str(exc).split())[:200]
            raise ShapeError(
                f"the model does not run on an example of shape {tuple(x1.shape)} "
                f"({type(exc).__name__}: {first}); pass inputs of the shape it was built for"
            ) from None
        latency_1 = median_latency_ms(net, x1, repeats, warmup)
        latency_n = median_latency_ms(net, xn, repeats, warmup)
        size_fp32 = len(safetensors_bytes(fp32_state(net)))
        size_q, quant_bits, ptq_bits = quantized_size(net, quant_bits_default)
        params = count_params(net)
    profile = ModelProfile(
        params=params,
        size_fp32_bytes=size_fp32,
        size_quant_bytes=size_q,
        quant_bits=quant_bits,
        flops=flops,
        latency_ms_b1=latency_1,
        latency_ms_bN=latency_n,
        batch_n=batch_n,
        threads=torch.get_num_threads(),
        repeats=repeats,
        ptq_bits=ptq_bits,
    )
    log.debug("profile of %s: %s", type(model).__name__, profile)
    return profile
