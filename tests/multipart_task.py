"""A two-optimizer test task for the engine: a critic stepped before the student, every other batch.

The student learns cross-entropy plus a term scored by the critic; the critic learns to score
the student's (detached) predictions. The student's loss also reaches the critic's weights:
the engine must drop those gradients (a part's step sees its own loss only). Used by
``tests/test_multi_part.py`` in process and, through ``main``, under ``torchrun``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from darkknowledge.config import OptimizerConfig, SchedulerConfig, TrainConfig
from darkknowledge.data import BatchLoader, TensorData
from darkknowledge.data.batch import Batch
from darkknowledge.engine.task import Part, Task


class Critic(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.fc = nn.Linear(k, 1)

    def forward(self, probs: torch.Tensor) -> torch.Tensor:  # (B, K) -> (B,)
        return self.fc(probs).squeeze(-1)


class Duel(nn.Module):
    """Everything trainable in one module; ``forward(batch, progress, part)`` is that part's loss."""

    def __init__(self, student: nn.Module, critic: nn.Module, weight: float = 0.5) -> None:
        super().__init__()
        self.student, self.critic, self.weight = student, critic, weight

    def forward(self, batch: Batch, epoch_progress: float, part: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.student(batch.x)  # (B, K)
        if part == "critic":  # score the student's predictions (detached) towards the labels' confidence
            score = self.critic(F.softmax(logits.detach(), -1))  # (B,)
            target = F.one_hot(batch.y, logits.shape[-1]).float().mul(F.softmax(logits.detach(), -1)).sum(-1)
            loss = F.mse_loss(score, target)
            return loss, {"mse": loss.detach()}
        ce = F.cross_entropy(logits, batch.y)
        critic = self.critic(F.softmax(logits, -1)).mean()  # its gradient reaches the critic: dropped by the engine
        return ce - self.weight * critic, {"ce": ce.detach(), "critic": critic.detach()}


class DuelTask(Task):
    """Two parts: ``critic`` (SGD, constant LR, every 2nd batch, stepped first) and ``student``."""

    def __init__(self, student: nn.Module, critic: nn.Module) -> None:
        self._module = Duel(student, critic)
        self.steps = {"critic": 0, "student": 0}

    @property
    def module(self) -> nn.Module:
        return self._module

    def parts(self) -> list[Part]:
        return [
            Part(
                "critic",
                self._module.critic,
                optimizer=OptimizerConfig(name="sgd", lr=0.1, momentum=0.0),
                scheduler=SchedulerConfig(name="constant"),
                every=2,
            ),
            Part("student", self._module.student),
        ]

    def training_step(self, model: nn.Module, batch: Batch, epoch_progress: float, part: str = "student"):
        return model(batch, epoch_progress, part)

    def after_step(self, part: str = "student") -> None:
        self.steps[part] += 1

    def eval_models(self) -> dict[str, nn.Module]:
        return {"student": self._module.student}


def make(seed: int = 0) -> tuple[DuelTask, TensorData]:
    torch.manual_seed(seed)
    student = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    critic = Critic(4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 8, generator=g)
    data = TensorData(x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long())
    return DuelTask(student, critic), data


def config(epochs: int = 2, **changes: object) -> TrainConfig:
    return TrainConfig(
        **{
            "epochs": epochs,
            "device": "cpu",
            "deterministic": True,
            "optimizer": {"name": "adamw", "lr": 0.01},
            "scheduler": {"name": "cosine"},
            **changes,
        }
    )


def main(out: str) -> None:
    """Train under the current process group (``torchrun``) and save the weights (rank 0)."""
    from darkknowledge.engine.distributed import init_distributed, shutdown_distributed
    from darkknowledge.engine.trainer import Trainer

    dist = init_distributed("cpu")
    task, data = make()
    loader = BatchLoader(data, 16, seed=0, rank=dist.rank, world_size=dist.world_size)
    evals = BatchLoader(data, 96, shuffle=False, rank=dist.rank, world_size=dist.world_size)
    Trainer(task, loader, evals, config(), torch.device("cpu"), dist=dist, progress=False).fit()
    if dist.is_main:
        torch.save(task.module.state_dict(), Path(out))
    shutdown_distributed(wait=True)  # every rank leaves together (a rank torn down early could abort)


if __name__ == "__main__":
    main(sys.argv[1])
