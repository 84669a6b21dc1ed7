"""Generator networks of data-free distillation, and the base of synthesisers that train one.

The generator of DAFL (Chen et al., "Data-Free Learning of Student Networks", ICCV 2019; the
authors' code: huawei-noah/Efficient-Computing, ``Data-Efficient-Model-Compression/DAFL/
DAFL_train.py``, class ``Generator``), which DFAD reuses unchanged but for the batch-norm
``eps`` (VainF/Data-Free-Adversarial-Distillation, ``network/gan.py``, ``GeneratorA``, whose
``ngf`` is 64 times this file's ``width``)::

    z (B, latent_dim)
      -> Linear -> (B, 128w, H/4, W/4) -> BatchNorm
      -> upsample x2 (nearest) -> Conv 3x3 128w -> BatchNorm(eps) -> LeakyReLU(0.2)
      -> upsample x2 (nearest) -> Conv 3x3 64w  -> BatchNorm(eps) -> LeakyReLU(0.2)
      -> Conv 3x3 C -> Tanh -> BatchNorm(C, affine=False)          (B, C, H, W)

The last, affine-free batch norm gives every channel zero mean and unit variance over the batch,
like standardised data: the output lives in the models' normalised input space.

* DAFL's code builds the two inner batch norms as ``BatchNorm2d(c, 0.8)``: the second positional
  argument is ``eps``, so they normalise by ``sqrt(var + 0.8)``. DAFL passes ``bn_eps=0.8`` to
  keep that; DFAD and ZSKT use torch's default ``1e-5``.
* ZSKT's generator (Micaelli & Storkey, NeurIPS 2019; polo5/ZeroShotKnowledgeTransfer,
  ``models/generator.py``) is the same stack without the Tanh (``tanh=False``), grown 10 -> 16 -> 32
  (upsampling by 1.6, then 2) where this one grows 8 -> 16 -> 32.

Sizes not divisible by 4 (any ``H``, ``W`` or ``L``): the code grows from ``ceil(S / 4)`` and
centre-crops to ``S`` after the second upsampling, so the full-resolution convolutions and the
batch norms see exactly ``S`` (28 -> 7, 8 -> 2, 32 -> 8 and 40 -> 10 grow exactly, with no crop).

Inputs ``(C, H, W)`` get 2-D convolutions, ``(C, L)`` 1-D ones (``Conv1d``, ``BatchNorm1d``,
1-D nearest upsampling); a flat ``(D,)`` input is made as ``(1, D)`` and flattened.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from darkknowledge.config import OptimizerConfig, SchedulerConfig
from darkknowledge.data.batch import Batch
from darkknowledge.engine.task import Part
from darkknowledge.errors import ShapeError
from darkknowledge.synthesis.base import (
    PREVIEW_KEY,
    Synthesizer,
    SynthesizerParams,
    draw_latent,
)

GENERATOR = "generator"
"""The part name of a synthesiser's generator (checkpoint keys, ``train/generator/<term>`` metrics)."""


def _centre_crop(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Crop the trailing spatial dims of ``x`` ``(B, C, *S')`` to ``size`` (each ``<= S'``), centred."""
    for dim, want in enumerate(size, start=2):
        extra = x.shape[dim] - want
        if extra:
            x = x.narrow(dim, extra // 2, want)
    return x


class ConvGenerator(nn.Module):
    """DAFL's generator (module docstring) for 2-D ``(C, H, W)``, 1-D ``(C, L)`` or flat ``(D,)`` inputs.

    Module paths: ``project`` (Linear), ``bn0``, ``block1``, ``block2``, ``out`` (conv to ``C``,
    Tanh when ``tanh``, affine-free batch norm).

    Args:
        input_shape: One input's shape: ``(C, H, W)``, ``(C, L)`` or ``(D,)``.
        latent_dim: Width of the codes ``z``.
        width: Channel multiplier: the inner convolutions have ``round(128 w)`` and ``round(64 w)``
            channels (at least 1).
        tanh: A Tanh before the last batch norm (DAFL, DFAD; not ZSKT).
        bn_eps: ``eps`` of the two inner batch norms (DAFL's code: 0.8; torch's default 1e-5).

    Raises:
        ShapeError: An input shape of another rank, or a non-positive size.
    """

    def __init__(
        self, input_shape: tuple[int, ...], latent_dim: int, width: float = 1.0, tanh: bool = True, bn_eps: float = 1e-5
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in input_shape)
        if len(shape) not in (1, 2, 3) or min(shape, default=0) < 1:
            raise ShapeError(
                f"generator: input_shape {tuple(input_shape)} is not (C, H, W), (C, L) or (D,) with "
                "positive sizes; a data-free synthesiser makes images, signals or flat vectors"
            )
        self.input_shape = shape
        self.flat = len(shape) == 1
        channels, spatial = (1, shape) if self.flat else (shape[0], shape[1:])
        self.spatial = spatial
        self.init_size = tuple(math.ceil(s / 4) for s in spatial)
        wide, narrow = max(1, round(128 * width)), max(1, round(64 * width))
        conv = nn.Conv2d if len(spatial) == 2 else nn.Conv1d
        norm = nn.BatchNorm2d if len(spatial) == 2 else nn.BatchNorm1d
        self.wide = wide
        self.project = nn.Linear(latent_dim, wide * math.prod(self.init_size))
        self.bn0 = norm(wide)
        self.block1 = nn.Sequential(conv(wide, wide, 3, padding=1), norm(wide, eps=bn_eps), nn.LeakyReLU(0.2))
        self.block2 = nn.Sequential(conv(wide, narrow, 3, padding=1), norm(narrow, eps=bn_eps), nn.LeakyReLU(0.2))
        out: list[nn.Module] = [conv(narrow, channels, 3, padding=1)]
        if tanh:
            out.append(nn.Tanh())
        out.append(norm(channels, affine=False))
        self.out = nn.Sequential(*out)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Map codes ``(B, latent_dim)`` to inputs ``(B, *input_shape)``."""
        h = self.project(z.flatten(1))  # (B, wide * prod(init))
        h = self.bn0(h.view(h.shape[0], self.wide, *self.init_size))  # (B, wide, *S/4)
        h = self.block1(F.interpolate(h, scale_factor=2.0))  # (B, wide, *2 ceil(S/4))
        h = _centre_crop(F.interpolate(h, scale_factor=2.0), self.spatial)  # (B, wide, *S)
        x = self.out(self.block2(h))  # (B, C, *S)
        return x.flatten(1) if self.flat else x  # (B, *input_shape)


def build_generator(
    input_shape: tuple[int, ...], latent_dim: int, width: float = 1.0, tanh: bool = True, bn_eps: float = 1e-5
) -> ConvGenerator:
    """The generator for inputs of ``input_shape`` (see :class:`ConvGenerator` for the arguments)."""
    return ConvGenerator(input_shape, latent_dim, width=width, tanh=tanh, bn_eps=bn_eps)


class GeneratorParams(SynthesizerParams):
    """Parameters of every synthesiser that trains a generator (each method sets its own defaults).

    ``optimizer`` given as a partial mapping (e.g. ``{lr: 0.02}``) keeps the method's other
    defaults (its optimizer's name above all), not those of a stage's ``train.optimizer``.
    """

    latent_dim: int = Field(default=100, ge=1, description="width of the generator's Gaussian codes z")
    width: float = Field(
        default=1.0,
        gt=0.0,
        description="channel multiplier of the generator (1: 128 and 64 channels, as in the papers' code)",
    )
    optimizer: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(name="adam", lr=1e-3), description="the generator's optimizer"
    )
    scheduler: SchedulerConfig | None = Field(
        default=None, description="the generator's LR schedule (None: the stage's train.scheduler)"
    )

    @field_validator("optimizer", mode="before")
    @classmethod
    def _fill_optimizer(cls, value: Any) -> Any:
        """Complete a partial optimizer mapping from this method's default optimizer."""
        if isinstance(value, dict):
            default = cls.model_fields["optimizer"].get_default(call_default_factory=True)
            return {**default.model_dump(), **value}
        return value


class GeneratorSynthesizer(Synthesizer):
    """Base of synthesisers that train a :class:`ConvGenerator` as their one part, ``generator``.

    Subclasses set ``tanh``/``bn_eps`` (the paper's architecture), implement ``part_loss`` and
    ``sample``, and ``generator_every()`` (the part's step ratio).

    Attributes:
        generator: The generator (a submodule: trained and checkpointed with the task).
    """

    tanh: bool = True
    bn_eps: float = 1e-5
    params: GeneratorParams

    def __init__(
        self, params: GeneratorParams, teacher: nn.Module, input_shape: tuple[int, ...], num_classes: int
    ) -> None:
        super().__init__(params, teacher, input_shape, num_classes)
        self.latent_dim = params.latent_dim
        self.generator = build_generator(self.input_shape, params.latent_dim, params.width, self.tanh, self.bn_eps)

    def generator_every(self) -> int:
        """The generator steps on every this-many-th batch."""
        return 1

    def parts(self) -> list[Part]:
        """One part: the generator, with its own optimizer, schedule and step ratio."""
        p: GeneratorParams = self.params
        return [
            Part(GENERATOR, self.generator, optimizer=p.optimizer, scheduler=p.scheduler, every=self.generator_every())
        ]

    def codes(self, latent: Batch) -> torch.Tensor:
        """The latent batch's codes ``z`` ``(B, latent_dim)``, their shape checked."""
        z = latent.x  # (B, latent_dim)
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ShapeError(
                f"synthesizer {self.registry_name!r}: latent codes of shape {tuple(z.shape)}; "
                f"expected (B, {self.latent_dim}) (its latent_dim)"
            )
        return z

    def generate(self, latent: Batch) -> torch.Tensor:
        """``G(z)`` for the latent batch's codes, ``(B, *input_shape)``, with gradients to ``G``."""
        return self.generator(self.codes(latent))

    def preview(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` samples ``G(z)`` of the preview codes on the CPU, as the student sees them: a copy of
        the generator in train mode (batch statistics, as in training; the generator's running
        statistics and whatever batch a method keeps for its student are left alone)."""
        device = next(self.generator.parameters()).device
        latent = draw_latent(seed, (PREVIEW_KEY, 0), n, self.latent_dim, self.num_classes, device)
        generator = copy.deepcopy(self.generator).train()
        with torch.no_grad():
            return generator(self.codes(latent)).cpu()  # (n, *input_shape)

    def describe(self) -> dict[str, Any]:
        """The generator's size and settings for the report."""
        p: GeneratorParams = self.params
        return {
            **super().describe(),
            "generator": {
                "parameters": sum(q.numel() for q in self.generator.parameters()),
                "latent_dim": p.latent_dim,
                "width": p.width,
                "output_shape": list(self.input_shape),
                "every": self.generator_every(),
                "optimizer": p.optimizer.model_dump(mode="json"),
                "scheduler": None if p.scheduler is None else p.scheduler.model_dump(mode="json"),
            },
        }
