"""TensorBoard event files of a run's metrics (``log.tensorboard``; the ``tensorboard`` extra).

Written with ``torch.utils.tensorboard.SummaryWriter``, which needs the ``tensorboard`` package;
imported only when this logger is asked for. A resumed run adds a new event file to the same
folder (TensorBoard reads them all). View with ``tensorboard --logdir runs/NAME/tensorboard``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


class TensorBoardSink:
    """Scalars to the event files of ``folder``, flushed at each record (one per epoch and evaluation).

    Args:
        folder: The event folder (created when missing).
    """

    name = "tensorboard"

    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self._writer = SummaryWriter(log_dir=str(folder))

    def write(self, step: int, values: Mapping[str, float]) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()

    def close(self, status: str) -> None:
        self._writer.close()
