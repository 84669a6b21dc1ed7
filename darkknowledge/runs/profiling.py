"""Each trained model's deployment numbers (params, size, FLOPs, CPU latency), once per architecture.

A run profiles the model a stage exports right after the stage trains (on the CPU, where the
stage leaves it), and records the numbers in the stage's results entry (``profile``), so the
report's student table (:mod:`darkknowledge.runs.student_report`) is written from the results
alone, also after a resume. Latency depends on the architecture, not the seed: the profile of
an architecture measured once is reused for its other seeds within the session.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import torch
from torch import nn

from darkknowledge.config import ProfileConfig
from darkknowledge.data import DatasetInfo
from darkknowledge.data.batch import input_name

log = logging.getLogger(__name__)


class Profiler:
    """Profiles models of one run: ``profiler(model) -> dict`` (or None when disabled).

    Args:
        cfg: The run's ``profile`` settings.
        info: The dataset (each model's input shape: its view's).
        batch_n: The training batch size (the second latency).
        token_ids: The inputs are int64 token ids (the example input is token 0, not gaussian values).
    """

    def __init__(self, cfg: ProfileConfig, info: DatasetInfo, batch_n: int, token_ids: bool = False) -> None:
        self.cfg, self.info, self.batch_n, self.token_ids = cfg, info, batch_n, token_ids
        self._seen: dict[str, dict[str, Any]] = {}

    def __call__(self, model: nn.Module, spec: dict[str, Any]) -> dict[str, Any] | None:
        """The profile of ``model`` (built from ``spec``, its export spec), as plain data."""
        if not self.cfg.enabled:
            return None
        from darkknowledge.students.profile import profile_model

        shape = tuple(self.info.input_shape_of(input_name(model), "model input"))
        key = json.dumps({"spec": spec, "shape": shape}, sort_keys=True, default=str)
        if key not in self._seen:
            generator = torch.Generator().manual_seed(0)
            if self.token_ids:
                example = torch.zeros((1, *shape), dtype=torch.int64)  # (1, L): token 0, a valid id of any vocabulary
            else:
                example = torch.randn((1, *shape), generator=generator)  # (1, *input_shape): latency needs no real data
            try:
                found = profile_model(
                    model,
                    example,
                    batch_n=self.batch_n,
                    repeats=self.cfg.repeats,
                    warmup=self.cfg.warmup,
                    quant_bits_default=self.cfg.quant_bits,
                )
            except (RuntimeError, ValueError, TypeError) as exc:  # a custom model the profiler cannot run
                log.warning("profile of %s skipped: %s", spec.get("name"), " ".join(str(exc).split())[:200])
                return None
            self._seen[key] = dataclasses.asdict(found)
        return dict(self._seen[key])
