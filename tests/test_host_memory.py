"""Freed host memory stays in the process on glibc (no page faults for re-allocated blocks)."""

from __future__ import annotations

import resource
import sys

import pytest
import torch

from darkknowledge.engine import host_memory
from darkknowledge.engine.host_memory import retain_freed_host_memory

glibc_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")


@glibc_linux
def test_reallocating_freed_blocks_faults_no_pages_once_memory_is_kept():
    """A step's pattern: several large blocks live at once, all freed, allocated again."""
    assert retain_freed_host_memory()
    assert retain_freed_host_memory()  # once per process; later calls report it as set
    size = 8 * 2**20 // 4  # 8 MiB of float32

    def step() -> None:
        blocks = [torch.ones(size) for _ in range(4)]  # 32 MiB live, then freed together
        del blocks

    for _ in range(3):
        step()  # the heap grows to its working size
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    touched = 10 * 4 * size * 4 // resource.getpagesize()  # pages the 10 steps write: 81,920
    # with glibc's defaults the free top of the heap (32 MiB > its 16 MiB trim threshold) goes
    # back to the system each time: 81,600 faults for these 10 steps, measured. Kept, most steps
    # fault none (0 to 6,144 measured: other allocations of the process can still move the top)
    assert faults < touched // 4, (faults, touched)


def test_other_platforms_are_left_alone(monkeypatch):
    monkeypatch.setattr(host_memory, "_applied", None)
    monkeypatch.setattr(host_memory.sys, "platform", "darwin")
    assert retain_freed_host_memory() is False


def test_cpu_training_keeps_host_memory_unless_switched_off(monkeypatch):
    from darkknowledge.config import TrainConfig
    from darkknowledge.data import BatchLoader, TensorData
    from darkknowledge.engine import trainer as trainer_module
    from darkknowledge.models import create_model
    from darkknowledge.runs.build import build_objective
    from darkknowledge.schemes.offline import offline_task

    calls = []
    monkeypatch.setattr(trainer_module, "retain_freed_host_memory", lambda: calls.append(1) or True)
    data = TensorData(torch.randn(32, 5), torch.randint(0, 3, (32,)))
    for keep in (True, False):
        student = create_model("mlp", num_classes=3, input_shape=(5,), hidden=[8])
        cfg = TrainConfig(epochs=1, device="cpu", keep_host_memory=keep)
        trainer_module.Trainer(
            offline_task(student, build_objective({"ce": {}})),
            BatchLoader(data, 16, seed=0),
            BatchLoader(data, 32, shuffle=False),
            cfg,
            torch.device("cpu"),
            progress=False,
        ).fit()
    assert calls == [1]
