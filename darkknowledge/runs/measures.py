"""What a results entry records beside accuracy: fidelity to the run's teacher, a teacher's calibration.

- A ``baseline`` or ``student`` entry gets ``agreement`` (top-1 agreement with the run's teacher,
  %) and ``kl_to_teacher`` (mean KL(teacher ‖ student) at T=1, nats) on the test split
  (:mod:`~darkknowledge.engine.fidelity`), when the run has one pre-trained teacher with class
  logits (``teacher:`` and no ``teachers:`` list). The baseline's agreement is the reference: the
  student's minus it is what distillation added to fidelity. Runs without such a teacher (online
  peers, self-distillation, several teachers) record neither.
- A ``teacher`` entry gets ``ece`` (expected calibration error on the test split, %, 15 bins) and,
  when it was trained in this run, ``train_acc`` (top-1 on the training split, without augmentation)
  and ``train_confidence`` (the mean top softmax probability there: near 1 with ``train_acc`` 100, a
  memorised training set whose soft targets are near one-hot; see runs/diagnosis.py); a teacher loaded
  from a checkpoint or reused from the cache gets its ``ece`` (the cached entry keeps the others).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from darkknowledge.config import RunConfig
from darkknowledge.data import DataBundle
from darkknowledge.data.batch import input_name
from darkknowledge.data.bundle import num_samples
from darkknowledge.data.loader import BatchLoader
from darkknowledge.engine.distributed import DistContext
from darkknowledge.engine.fidelity import measure_calibration, measure_fidelity, measure_fit
from darkknowledge.runs.build import make_loaders


class Measured(Protocol):
    """What the passes read of a run (a :class:`~darkknowledge.runs.session.Session` has it; named by its
    parts, so that the session may import this module)."""

    cfg: RunConfig
    bundle: DataBundle
    device: torch.device
    dist: DistContext
    reference: nn.Module | None


FIDELITY_ROLES = ("baseline", "student")
"""The roles whose entries record their fidelity to the run's teacher."""


def entry_measures(session: Measured, role: str, model: nn.Module, seed: int) -> dict[str, Any]:
    """The fields to add to the entry of ``model`` (role ``role``, evaluated in the order of ``seed``).

    Every rank calls this (the passes add their sums over ranks); the models are left on the CPU.
    """
    if role == "teacher":
        return teacher_measures(session, model, seed)
    teacher = session.reference
    if role not in FIDELITY_ROLES or teacher is None:
        return {}
    home = next((p.device for p in teacher.parameters()), torch.device("cpu"))
    model.to(session.device)
    teacher.to(session.device)
    try:
        _, test_loader, _ = make_loaders(
            session.cfg, session.bundle, seed, session.device, session.dist, train=False, primary=input_name(model)
        )
        found = measure_fidelity(model, teacher, test_loader, session.dist)
    finally:
        model.to("cpu")
        teacher.to(home)
    return found or {}


def teacher_measures(session: Measured, model: nn.Module, seed: int, train_split: bool = True) -> dict[str, Any]:
    """A teacher's ``ece`` on the test split and, with ``train_split``, ``train_acc`` and ``train_confidence``
    on the training split (no augmentation): only for a teacher trained on it (a data-free run's student
    never reads it)."""
    cfg, dist, device = session.cfg, session.dist, session.device
    primary = input_name(model)
    model.to(device)
    out: dict[str, Any] = {}
    try:
        _, test_loader, _ = make_loaders(cfg, session.bundle, seed, device, dist, train=False, primary=primary)
        ece = measure_calibration(model, test_loader, dist)
        if ece is not None:
            out["ece"] = ece
        train = session.bundle.train
        if train_split and train is not None and num_samples(train):
            info = session.bundle.info
            loader = BatchLoader(
                train,
                cfg.data.eval_batch_size,
                shuffle=False,
                rank=dist.rank,
                world_size=dist.world_size,
                normalize=info.normalization,
                device=device,
                device_data_mb=cfg.data.device_data_mb,
                views=info.views,
                inputs=(primary,) if primary else (),
                primary=primary,
            )
            fit = measure_fit(model, loader, dist)
            if fit is not None:
                out["train_acc"], out["train_confidence"] = fit["accuracy"], fit["confidence"]
    finally:
        model.to("cpu")
    return out
