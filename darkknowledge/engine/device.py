"""Device selection and mixed precision."""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from darkknowledge.errors import ConfigError

log = logging.getLogger(__name__)


def select_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """Resolve ``auto``/``cpu``/``cuda``/``cuda:N``/``mps`` to an available device.

    Args:
        name: Requested device; ``auto`` takes CUDA, then MPS, then CPU.
        local_rank: Under ``torchrun``, the process's GPU index (for ``auto``/``cuda``).
    """
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device: unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device: {name!r} requested but CUDA is not available; use auto or cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank if local_rank is not None else torch.cuda.current_device())
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device: 'mps' requested but MPS is not available; use auto or cpu")
    return device


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``mode`` on ``device`` (None = full precision).

    ``auto`` picks bf16 on CUDA devices that support it, else off (CPU autocast is slower
    than fp32 for small models on most CPUs, so it is only used when asked for).
    """
    if mode == "off":
        return None
    if mode == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        if device.type == "cpu":
            raise ConfigError("train.amp: fp16 autocast needs a GPU; use bf16 or off on CPU")
        return torch.float16
    raise ConfigError(f"train.amp: unknown mode {mode!r}; use off, auto, bf16 or fp16")


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for the device, or a no-op when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16 on CUDA; None otherwise (bf16 needs none)."""
    if dtype == torch.float16 and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def set_deterministic(enabled: bool) -> None:
    """Switch PyTorch's deterministic algorithms on or off (cuBLAS needs a workspace setting)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=False)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled
