"""DeepInversion: inputs optimised against a frozen teacher until its batch-norm statistics fit.

Yin, Molchanov, Alvarez, Li, Mallya, Hoiem, Jha & Kautz, "Dreaming to Distill: Data-free
Knowledge Transfer via DeepInversion", CVPR 2020. Synthetic inputs ``x̂`` ``(B, *input_shape)``
with target classes ``y`` ``(B,)`` minimise (Eq. 2, with the regularisers of Eq. 3-8)

    L(x̂) = CE(T(x̂), y) + α_tv R_TV(x̂) + α_l2 R_l2(x̂) + α_f R_feature(x̂) [+ α_c R_compete(x̂)]

* ``R_feature`` (Eq. 4): distance of the batch statistics at each BN layer of the teacher to
  its running statistics (:mod:`darkknowledge.synthesis.bn_stats`), the first layer weighted
  ``first_bn_multiplier``.
* ``R_TV`` (Eq. 3), the official ``get_image_prior_losses``: the l2 norms (over the whole
  batch) of the differences of neighbouring pixels along W, along H and along both diagonals,
  summed; for ``(C, L)`` inputs the norm of the differences along L; none for flat inputs.
* ``R_l2`` (Eq. 3): the batch mean of each input's l2 norm (``loss_l2`` of the official
  ``deepinversion.py``, used for ImageNet; the CIFAR-10 script takes the norm of the whole batch,
  with weight 0).
* ``R_compete = 1 - JS(p_T(x̂), p_S(x̂))`` (Adaptive DeepInversion, Eq. 6-8) as the official
  code computes it: ``P = softmax(s/T)``, ``Q = softmax(t/T)``, ``M = (P+Q)/2``, each clamped to
  ``[0.01, 0.99]``, ``JS = ½ KL(M‖P) + ½ KL(M‖Q)`` (``KLDivLoss(batchmean)(log P, M)``: M is the
  reference, the reverse of the paper's Eq. 7), then ``1 - clamp(JS, 0, 1)``; ``T = 3``. The
  student runs in eval mode with its weights detached: only the inputs get its gradient.

Each step jitters the inputs by a random roll of up to ``jitter`` pixels (per spatial axis) and,
for images, flips them along W with probability ½ (``flip``); the priors are taken on the
jittered inputs, as in the official code. Official constants (NVlabs/DeepInversion):
``cifar10/deepinversion_cifar10.py`` and its README's "parameters from the paper": Adam with
torch's default betas, ``lr 0.05``, ``2000`` iterations, ``r_feature 10``, ``TV 2.5e-5``,
``l2 0``, jitter 2, no flip, every BN layer weighted 1, competition 0 (these are the defaults
here); ``imagenet_inversion.py``: ``first_bn_multiplier 10``, ``r_feature 0.01`` (README),
``tv_l2 1e-4``, ``l2 1e-5``, ``lr 0.25`` with Adam betas ``(0.5, 0.9)``, jitter 30, flip; the
README's ``adi_scale 0.2`` for the paper's Adaptive DeepInversion. As in the CIFAR-10 script the
learning rate is constant and the last iterate is kept (its ``best_inputs = inputs.data`` aliases
the optimised tensor); the ImageNet code's cosine schedule, multi-resolution stage and clipping
to the pixel range (which needs the data's mean and std) are not reproduced.

Two modes:

* ``inputs`` (the paper's method): every ``synthesize_every`` student batches, a batch of inputs
  initialised ``N(0, 1)`` is optimised ``iterations`` Adam steps (its own optimizer, no engine
  part) and appended to a :class:`~darkknowledge.synthesis.pool.SamplePool`; the student trains on
  a uniform draw from the pool. Every random draw (initial noise, jitter, flips, pool draws) is
  seeded by the latent batch's content, so the same latent batch gives the same inputs.
* ``generator``: a DAFL-style generator (:mod:`darkknowledge.synthesis.generators`) is trained as
  part ``generator`` on the same loss at ``x̂ = G(z)`` (targets: the latent batch's classes); the
  student trains on a fresh ``G(z)`` (no gradient), a ``replay`` share of it drawn from the pool.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.data.seeds import make_generator
from darkknowledge.engine.checkpoint import state_hash
from darkknowledge.engine.task import Part
from darkknowledge.errors import ConfigError
from darkknowledge.losses.base import logits_of, run_model
from darkknowledge.synthesis.base import Synthesizer, register_synthesizer
from darkknowledge.synthesis.bn_stats import BNStatsHook, find_batchnorms
from darkknowledge.synthesis.generators import (
    GENERATOR,
    GeneratorParams,
    build_generator,
)
from darkknowledge.synthesis.pool import SamplePool
from darkknowledge.taps import unwrap

INIT_STREAM, POOL_STREAM, REPLAY_STREAM = 0, 1, 2
"""Stream tags of the draws seeded by one latent batch."""

_CLAMP = (0.01, 0.99)
"""The official code's clamp of P, Q and M in the competition term."""


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """``R_TV``: the official image prior (l2 norms of neighbour differences over the whole batch).

    Args:
        x: ``(B, C, H, W)``: ``||Δ_W|| + ||Δ_H|| + ||Δ_↘|| + ||Δ_↗||``; ``(B, C, L)``: ``||Δ_L||``;
            other ranks: 0.

    Returns:
        A scalar >= 0; 0 for inputs constant along every axis it reads.
    """
    x = x.float()
    if x.dim() == 4:
        d_w = x[:, :, :, :-1] - x[:, :, :, 1:]  # (B, C, H, W-1)
        d_h = x[:, :, :-1, :] - x[:, :, 1:, :]  # (B, C, H-1, W)
        d_up = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]  # (B, C, H-1, W-1)
        d_down = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]  # (B, C, H-1, W-1)
        return sum(torch.linalg.vector_norm(d) for d in (d_w, d_h, d_up, d_down))
    if x.dim() == 3:
        return torch.linalg.vector_norm(x[:, :, :-1] - x[:, :, 1:])  # (B, C, L-1) -> scalar
    return x.new_zeros(())


def l2_prior(x: torch.Tensor) -> torch.Tensor:
    """``R_l2``: the batch mean of each input's l2 norm, ``x`` ``(B, ...)`` -> scalar."""
    return torch.linalg.vector_norm(x.float().flatten(1), dim=1).mean()


def competition_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, T: float = 3.0) -> torch.Tensor:
    """``R_compete = 1 - JS(p_T, p_S)`` with the official code's clamps (module docstring).

    Args:
        teacher_logits: ``(B, K)``.
        student_logits: ``(B, K)``.
        T: Softmax temperature (official: 3).

    Returns:
        A scalar in ``[0, 1]``: 1 when the two agree, lower as they disagree.
    """
    p = F.softmax(student_logits.float() / T, dim=1)  # (B, K)
    q = F.softmax(teacher_logits.float() / T, dim=1)  # (B, K)
    m = (0.5 * (p + q)).clamp(*_CLAMP)  # (B, K)
    p, q = p.clamp(*_CLAMP), q.clamp(*_CLAMP)
    b = teacher_logits.shape[0]
    kl_mp = (m * (m.log() - p.log())).sum() / b  # KLDivLoss(batchmean)(log P, M)
    kl_mq = (m * (m.log() - q.log())).sum() / b
    return 1.0 - (0.5 * kl_mp + 0.5 * kl_mq).clamp(0.0, 1.0)


def deepinversion_loss(
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    x: torch.Tensor,
    r_feature: torch.Tensor,
    bn: float,
    tv: float,
    l2: float,
    student_logits: torch.Tensor | None = None,
    competition: float = 0.0,
    T: float = 3.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``CE(T(x̂), y) + α_tv R_TV + α_l2 R_l2 + α_f R_feature [+ α_c R_compete]`` (Eq. 2-8).

    Args:
        teacher_logits: ``(B, K)`` on ``x``.
        targets: ``(B,)`` target classes.
        x: The (jittered) inputs ``(B, *input_shape)`` the teacher saw.
        r_feature: ``R_feature`` of that forward (a scalar).
        bn: ``α_f``.
        tv: ``α_tv``.
        l2: ``α_l2``.
        student_logits: ``(B, K)`` on ``x`` (needed when ``competition > 0``).
        competition: ``α_c`` (0: plain DeepInversion).
        T: Temperature of the competition term.

    Returns:
        ``(total, {term: unweighted value, detached})``.
    """
    ce = F.cross_entropy(teacher_logits.float(), targets)
    r_tv, r_l2 = total_variation(x), l2_prior(x)
    total = ce + bn * r_feature + tv * r_tv + l2 * r_l2
    terms = {"ce": ce.detach(), "bn": r_feature.detach(), "tv": r_tv.detach(), "l2": r_l2.detach()}
    if competition > 0:
        if student_logits is None:
            raise ConfigError("deepinversion_loss: competition > 0 needs the student's logits")
        r_c = competition_loss(teacher_logits, student_logits, T)
        total = total + competition * r_c
        terms["competition"] = r_c.detach()
    return total, terms


def latent_seed(latent: Batch) -> int:
    """A 63-bit seed from the latent batch's content (codes and targets): same batch, same seed."""
    h = hashlib.blake2b(digest_size=8)
    h.update(latent.x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    h.update(latent.y.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


class DeepInversionParams(GeneratorParams):
    """DeepInversion's parameters (defaults: the official CIFAR-10 "parameters from the paper")."""

    mode: Literal["inputs", "generator"] = Field(
        default="inputs",
        description="inputs: optimise input batches (the paper); generator: train a generator on the same loss",
    )
    iterations: int = Field(default=2000, ge=1, description="Adam steps per input batch (CIFAR code: 2000)")
    input_lr: float = Field(default=0.05, gt=0.0, description="Adam lr of the inputs (CIFAR README: 0.05)")
    input_betas: tuple[float, float] = Field(
        default=(0.9, 0.999),
        description="Adam betas of the inputs (CIFAR code: torch's defaults; ImageNet code: (0.5, 0.9))",
    )
    bn: float = Field(default=10.0, ge=0.0, description="α_f, weight of R_feature (CIFAR README: 10; ImageNet: 0.01)")
    first_bn_multiplier: float = Field(
        default=1.0, ge=0.0, description="extra weight of the first BN layer (CIFAR code: none; ImageNet code: 10)"
    )
    tv: float = Field(default=2.5e-5, ge=0.0, description="α_tv, weight of the l2 total variation (CIFAR: 2.5e-5)")
    l2: float = Field(default=0.0, ge=0.0, description="α_l2, weight of the inputs' l2 norm (CIFAR: 0)")
    competition: float = Field(default=0.0, ge=0.0, description="α_c of Adaptive DeepInversion (0: off; paper 0.2)")
    competition_T: float = Field(default=3.0, gt=0.0, description="temperature of the competition term (code: 3)")
    jitter: int = Field(
        default=2, ge=0, description="random roll of up to this many pixels per step (CIFAR: 2; ImageNet: 30; 0: off)"
    )
    flip: bool = Field(default=False, description="random horizontal flips of images per step (ImageNet code)")
    bn_layers: list[str] | None = Field(default=None, description="the teacher's BN layer paths (None: all)")
    pool_size: int = Field(default=4096, ge=1, description="synthetic samples kept for the student's draws")
    synthesize_every: int = Field(
        default=1,
        ge=1,
        description="a new batch (inputs) or a generator step (generator) every this many student batches",
    )
    replay: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="generator mode: share of the student's batch drawn from the pool of earlier generated batches",
    )


@register_synthesizer("deepinversion")
class DeepInversion(Synthesizer):
    """DeepInversion (Yin et al., CVPR 2020); see the module docstring for the loss and the modes.

    Shapes: latent ``x`` ``(B, latent_dim)`` (``generator``: the codes; ``inputs``: only a seed),
    ``y`` ``(B,)`` the targets; inputs ``(B, *input_shape)`` with ``input_shape`` ``(C, H, W)``,
    ``(C, L)`` or ``(D,)``.

    Attributes:
        pool: The sample pool (its ``count`` buffer is checkpointed with this module).
        batches: 0-d long buffer: student batches served in training (the ``synthesize_every`` clock).
        generator: The generator (``generator`` mode only).
    """

    citation = (
        "Yin, Molchanov, Alvarez, Li, Mallya, Hoiem, Jha, Kautz. Dreaming to Distill: Data-free Knowledge "
        "Transfer via DeepInversion. CVPR 2020 (arXiv:1912.08795)."
    )
    summary = "inputs optimised so the teacher predicts the target class with its BN statistics matched"
    Params = DeepInversionParams
    example: ClassVar[dict[str, Any]] = {"mode": "inputs", "iterations": 3, "pool_size": 1024, "latent_dim": 4}
    batches: torch.Tensor  # a buffer
    params: DeepInversionParams

    def __init__(
        self, params: DeepInversionParams, teacher: nn.Module, input_shape: tuple[int, ...], num_classes: int
    ) -> None:
        super().__init__(params, teacher, input_shape, num_classes)
        self.latent_dim = params.latent_dim
        self.bn_layers = find_batchnorms(unwrap(teacher), params.bn_layers)
        self.spatial = len(self.input_shape) - 1 if len(self.input_shape) in (2, 3) else 0  # 1-D, 2-D, or none
        explicit = params.model_fields_set
        if self.spatial == 0:
            for key in ("tv", "jitter"):
                if key in explicit and getattr(params, key) > 0:
                    raise ConfigError(
                        f"synthesizer 'deepinversion'.params.{key}: inputs of shape {self.input_shape} "
                        "have no spatial axis to smooth or roll; valid: (C, L) or (C, H, W) inputs, or "
                        f"{key}: 0"
                    )
        if params.flip and self.spatial != 2:
            raise ConfigError(
                f"synthesizer 'deepinversion'.params.flip: flips are for images (C, H, W); inputs "
                f"have shape {self.input_shape}"
            )
        self.pool = SamplePool(params.pool_size, self.input_shape)
        self.register_buffer("batches", torch.zeros((), dtype=torch.long))
        self.generator: nn.Module | None = None
        if params.mode == "generator":
            self.generator = build_generator(self.input_shape, params.latent_dim, params.width)

    # ------------------------------------------------------------------ storage

    def use_directory(self, path: Path | None) -> None:
        """Keep the pool in ``path`` (None: in memory), refused there if made for another teacher."""
        if path is not None:
            self.pool.bind(path, state_hash(self.teacher))

    def saved(self) -> None:
        """After a checkpoint write: drop the pool chunks no resume can read any more."""
        self.pool.commit()

    # ------------------------------------------------------------------ the objective

    def _augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Random roll (``jitter``) and horizontal flip (``flip``) of ``x`` ``(B, *input_shape)``."""
        p: DeepInversionParams = self.params
        if p.jitter > 0 and self.spatial:
            shifts = torch.randint(-p.jitter, p.jitter + 1, (self.spatial,), generator=g).tolist()
            x = torch.roll(x, shifts=shifts, dims=tuple(range(2, 2 + self.spatial)))
        if p.flip and bool(torch.rand((), generator=g) < 0.5):
            x = torch.flip(x, dims=(3,))
        return x

    def _student_logits(self, student: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The student's logits on ``x`` in eval mode, gradients to ``x`` only (weights detached)."""
        student = unwrap(student)
        weights = {name: w.detach() for name, w in student.named_parameters()}
        was = student.training
        student.eval()
        try:
            return logits_of(torch.func.functional_call(student, weights, (x,)))  # (B, K)
        finally:
            student.train(was)

    def objective(
        self, x: torch.Tensor, targets: torch.Tensor, student: nn.Module | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of inputs ``x`` ``(B, *input_shape)`` (already jittered) for ``targets`` ``(B,)``."""
        p: DeepInversionParams = self.params
        with BNStatsHook(self.bn_layers, p.first_bn_multiplier) as hook:
            logits = run_model(self.teacher, x)  # (B, K), gradients to x
            r_feature = hook.loss()
        use_student = p.competition > 0 and student is not None
        s_logits = self._student_logits(student, x) if student is not None and use_student else None
        return deepinversion_loss(
            logits,
            targets,
            x,
            r_feature,
            p.bn,
            p.tv,
            p.l2,
            s_logits,
            p.competition if use_student else 0.0,
            p.competition_T,
        )

    def invert(self, latent: Batch, student: nn.Module | None) -> torch.Tensor:
        """A batch of inputs optimised from noise for ``latent.y``, ``(B, *input_shape)``, detached."""
        p: DeepInversionParams = self.params
        self.to_device_of(latent)
        device = latent.y.device
        g = make_generator(latent_seed(latent), INIT_STREAM)
        x = torch.randn((len(latent), *self.input_shape), generator=g).to(device).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=p.input_lr, betas=p.input_betas)
        with torch.enable_grad():
            for _ in range(p.iterations):
                loss, _ = self.objective(self._augment(x, g), latent.y, student)
                grad = torch.autograd.grad(loss, [x])[0]  # to the inputs only: no weight gets a .grad
                x.grad = grad
                opt.step()
        return x.detach()

    # ------------------------------------------------------------------ the synthesiser protocol

    def parts(self) -> list[Part]:
        """``generator`` mode: the generator; ``inputs`` mode: none (inputs have their own Adam)."""
        if self.generator is None:
            return []
        p: DeepInversionParams = self.params
        return [Part(GENERATOR, self.generator, optimizer=p.optimizer, scheduler=p.scheduler, every=p.synthesize_every)]

    def part_loss(self, part: str, latent: Batch, student: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The generator's loss: the DeepInversion objective at ``G(z)`` for the targets ``latent.y``."""
        if part != GENERATOR or self.generator is None:
            return super().part_loss(part, latent, student)
        self.to_device_of(latent)
        x = self._generate(latent)  # (B, *input_shape), gradients to G
        g = make_generator(latent_seed(latent), INIT_STREAM)
        return self.objective(self._augment(x, g), latent.y, student)

    def _generate(self, latent: Batch) -> torch.Tensor:
        z = latent.x  # (B, latent_dim)
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ConfigError(
                f"synthesizer 'deepinversion': latent codes of shape {tuple(z.shape)}; expected "
                f"(B, {self.latent_dim}) (its latent_dim)"
            )
        assert self.generator is not None  # mode: generator
        return self.generator(z)

    def sample(self, latent: Batch, student: nn.Module | None) -> torch.Tensor:
        """The student's inputs ``(B, *input_shape)``, no gradient (module docstring)."""
        if self.generator is not None:
            return self._sample_generator(latent, student)
        device = latent.y.device
        pool_draw = make_generator(latent_seed(latent), POOL_STREAM)
        if student is None or not self.training:  # a preview: the pool as it is, or a fresh batch
            if len(self.pool) > 0:
                return self.pool.sample(len(latent), pool_draw).to(device=device, dtype=torch.float32)
            return self.invert(latent, None)
        p: DeepInversionParams = self.params
        served = int(self.batches)
        self.batches.fill_(served + 1)
        if served % p.synthesize_every == 0 or len(self.pool) == 0:
            self.pool.add(self.invert(latent, student))
        return self.pool.sample(len(latent), pool_draw).to(device=device, dtype=torch.float32)

    def _sample_generator(self, latent: Batch, student: nn.Module | None) -> torch.Tensor:
        p: DeepInversionParams = self.params
        with torch.no_grad():
            x = self._generate(latent).float()  # (B, *input_shape)
        if p.replay <= 0 or student is None or not self.training:
            return x
        self.pool.add(x)
        n_old = round(p.replay * len(latent))
        if n_old == 0:
            return x
        old = self.pool.sample(n_old, make_generator(latent_seed(latent), REPLAY_STREAM)).to(x.device, x.dtype)
        return torch.cat([x[: len(latent) - n_old], old])  # (B, *input_shape)

    def describe(self) -> dict[str, Any]:
        """Mode, BN layers, pool and generator facts for the report."""
        p: DeepInversionParams = self.params
        out: dict[str, Any] = {
            **super().describe(),
            "mode": p.mode,
            "bn_layers": list(self.bn_layers),
            "pool": {
                "capacity": p.pool_size,
                "samples": len(self.pool),
                "directory": None if self.pool.directory is None else str(self.pool.directory),
            },
        }
        if self.generator is not None:
            out["generator"] = {
                "parameters": sum(q.numel() for q in self.generator.parameters()),
                "latent_dim": p.latent_dim,
                "width": p.width,
                "every": p.synthesize_every,
                "optimizer": p.optimizer.model_dump(),
            }
        return out
