"""Fidelity to a teacher and calibration: how closely a student matches its teacher, how honest a model's confidence is.

Stanton et al., "Does Knowledge Distillation Really Work?" (NeurIPS 2021): a student's test
accuracy (generalisation) and its agreement with the teacher (fidelity) diverge, and students
often fail to match their teachers. So a report shows, beside accuracy:

- **top-1 agreement**: the share (%) of samples on which the student's argmax equals the teacher's;
- **KL(teacher ‖ student)** at temperature 1: the mean over samples of
  ``sum_k p_T(k) (log p_T(k) - log p_S(k))`` in nats, the teacher's distribution first (the
  direction of the KD loss: the student is scored on the mass the teacher puts where it does not).

Calibration (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017): the expected
calibration error over ``bins`` equal-width confidence bins ``((m-1)/M, m/M]``,
``sum_m |B_m|/n * |acc(B_m) - conf(B_m)|``, in percent.

The per-batch functions return sums, so that a pass over a sharded split adds them over ranks
before dividing; :func:`measure_fidelity`, :func:`measure_calibration` and :func:`measure_fit`
(accuracy and mean top probability on a training split: has the model memorised it?) are those
passes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from darkknowledge.data.batch import UNLABELED, Batch, input_name, model_input
from darkknowledge.engine.distributed import DistContext
from darkknowledge.engine.fsdp import is_sharded
from darkknowledge.losses.base import run_model

ECE_BINS = 15
"""Guo et al.'s number of equal-width confidence bins."""


def fidelity_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Sums over a batch: ``[samples where the argmaxes agree, sum of KL(teacher ‖ student) at T=1, samples]``.

    Args:
        student_logits: (B, K) class logits of the student.
        teacher_logits: (B, K) class logits of the teacher on the same samples.

    Returns:
        A float tensor of shape (3,).
    """
    s, t = student_logits.float(), teacher_logits.float()  # (B, K) each
    agree = (s.argmax(dim=-1) == t.argmax(dim=-1)).sum().float()
    log_t, log_s = F.log_softmax(t, dim=-1), F.log_softmax(s, dim=-1)  # (B, K)
    kl = (log_t.exp() * (log_t - log_s)).sum()  # sum over samples and classes
    return torch.stack([agree, kl, torch.tensor(float(s.shape[0]), device=s.device)])


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Top-1 agreement (%): the share of samples on which the student's argmax is the teacher's.

    Args:
        student_logits: (B, K) student logits.
        teacher_logits: (B, K) teacher logits.
    """
    sums = fidelity_sums(student_logits, teacher_logits)
    return 100.0 * float(sums[0]) / max(1.0, float(sums[2]))


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Mean over samples of KL(p_teacher ‖ p_student) at temperature 1, in nats.

    Args:
        student_logits: (B, K) student logits.
        teacher_logits: (B, K) teacher logits.
    """
    sums = fidelity_sums(student_logits, teacher_logits)
    return float(sums[1]) / max(1.0, float(sums[2]))


def calibration_sums(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> torch.Tensor:
    """Per-bin sums over a batch: ``[samples, sum of confidences, correct predictions]``.

    Sample ``i`` falls in bin ``m`` (0-based) when its top softmax probability lies in
    ``(m/bins, (m+1)/bins]``.

    Args:
        logits: (B, K) class logits.
        labels: (B,) true classes.
        bins: Number of equal-width confidence bins.

    Returns:
        A float tensor of shape (3, bins).
    """
    conf, pred = F.softmax(logits.float(), dim=-1).max(dim=-1)  # (B,), (B,)
    index = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)  # (B,)
    out = torch.zeros(3, bins, device=logits.device)
    out[0].index_add_(0, index, torch.ones_like(conf))
    out[1].index_add_(0, index, conf)
    out[2].index_add_(0, index, (pred == labels).float())
    return out


def ece_from_sums(sums: torch.Tensor) -> float:
    """Expected calibration error (%) from :func:`calibration_sums` (added over batches and ranks)."""
    count, conf, correct = sums[0], sums[1], sums[2]  # (bins,) each
    n = float(count.sum())
    if n == 0:
        return float("nan")
    gap = (correct - conf).abs()  # |B_m| * |acc(B_m) - conf(B_m)|
    return 100.0 * float(gap.sum()) / n


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error (%) of ``logits`` (B, K) against ``labels`` (B,), ``bins`` equal-width bins."""
    return ece_from_sums(calibration_sums(logits, labels, bins))


def measure_fidelity(
    student: nn.Module, teacher: nn.Module, batches: Iterable[Batch], dist: DistContext
) -> dict[str, float] | None:
    """Top-1 agreement (%) and mean KL(teacher ‖ student) at T=1 over ``batches``, summed over ranks.

    Each model reads its own view of a batch (a paired dataset). Both run in eval mode in inference
    mode; their train/eval modes are restored.

    Returns:
        ``{"agreement": %, "kl_to_teacher": nats}``, or None when the two models' outputs are not
        class logits of the same size or the split lacks the view one of them reads.
    """
    sums = torch.zeros(3)
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    matched = True
    try:
        with torch.inference_mode():  # as the engine's evaluation: a teacher never runs with autograd
            for batch in batches:
                if len(batch) == 0:
                    _keep_in_step(batch, student, teacher)
                    continue
                if not (_holds(batch, student) and _holds(batch, teacher)):
                    matched = False  # a modality the split lacks (a paired dataset): not measured
                    continue
                s = run_model(student, model_input(batch, student))  # (B, K)
                t = run_model(teacher, model_input(batch, teacher))  # (B, K)
                if s.dim() != 2 or s.shape != t.shape:
                    matched = False  # every rank sees the same shapes: none breaks off alone
                    continue
                sums = sums.to(s.device) + fidelity_sums(s, t)
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    dev = next((p.device for p in student.parameters()), sums.device)
    sums = dist.all_reduce_sum(sums.to(dev)).cpu()
    if not matched or float(sums[2]) == 0:
        return None
    n = float(sums[2])
    return {"agreement": 100.0 * float(sums[0]) / n, "kl_to_teacher": float(sums[1]) / n}


def measure_calibration(
    model: nn.Module, batches: Iterable[Batch], dist: DistContext, bins: int = ECE_BINS
) -> float | None:
    """Expected calibration error (%) of ``model`` over the labeled samples of ``batches``, summed over ranks.

    Returns:
        The ECE, or None when there is no labeled sample, the outputs are not (B, K) logits, or the
        split lacks the view the model reads.
    """
    sums = calibration_totals(model, batches, dist, bins)
    return None if sums is None else ece_from_sums(sums)


def measure_fit(model: nn.Module, batches: Iterable[Batch], dist: DistContext) -> dict[str, float] | None:
    """How closely ``model`` fits the labeled samples of ``batches`` (a training split), summed over ranks.

    Returns:
        ``{"accuracy": top-1 %, "confidence": mean top softmax probability (0-1)}``: a model that
        memorised its training set has accuracy 100 and confidence near 1 there, its soft targets
        near one-hot. None as for :func:`measure_calibration`.
    """
    sums = calibration_totals(model, batches, dist, bins=1)
    if sums is None:
        return None
    n = float(sums[0].sum())
    return {"accuracy": 100.0 * float(sums[2].sum()) / n, "confidence": float(sums[1].sum()) / n}


def calibration_totals(
    model: nn.Module, batches: Iterable[Batch], dist: DistContext, bins: int = ECE_BINS
) -> torch.Tensor | None:
    """:func:`calibration_sums` of ``model`` added over the labeled samples of ``batches`` and over ranks.

    ``model`` runs in eval mode without gradients; its train/eval mode is restored.

    Returns:
        A (3, bins) tensor, or None when there is no labeled sample, the outputs are not (B, K)
        logits, or the split lacks the view the model reads (every rank sees the same, so none
        breaks off alone).
    """
    sums = torch.zeros(3, bins)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():  # as the engine's evaluation: a teacher never runs with autograd
            for batch in batches:
                if len(batch) == 0:
                    _keep_in_step(batch, model)
                    continue
                if not _holds(batch, model):
                    return None  # a modality the split lacks
                logits = run_model(model, model_input(batch, model))  # (B, K)
                if logits.dim() != 2:
                    return None
                keep = batch.y != UNLABELED
                sums = sums.to(logits.device) + calibration_sums(logits[keep], batch.y[keep], bins)
    finally:
        model.train(was_training)
    dev = next((p.device for p in model.parameters()), sums.device)
    sums = dist.all_reduce_sum(sums.to(dev)).cpu()
    return None if float(sums[0].sum()) == 0 else sums


def _holds(batch: Batch, model: nn.Module) -> bool:
    """Whether ``batch`` holds the view ``model`` reads."""
    name = input_name(model)
    return name is None or (batch.inputs is not None and name in batch.inputs)


def _keep_in_step(batch: Batch, *models: nn.Module) -> None:
    """On a rank whose share of the last batch is empty, run each FSDP2-sharded model once all the
    same: its forward gathers weights with every rank."""
    for model in models:
        if is_sharded(model):
            x = model_input(batch, model)
            run_model(model, torch.zeros((1, *x.shape[1:]), dtype=x.dtype, device=x.device))
