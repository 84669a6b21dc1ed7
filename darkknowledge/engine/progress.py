"""Progress display: a tqdm bar and a line per epoch on a terminal; off a terminal one log line
per epoch, with the ETA of the whole run."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

from darkknowledge.engine.eta import format_duration

log = logging.getLogger("darkknowledge")


def is_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class Progress:
    """Wraps one epoch's batches. Shows epoch, loss terms, accuracy and ETA.

    On a terminal: a bar per epoch, and a line above it when the epoch ends. Off a terminal
    (a CI log, a file, a batch job): one ``INFO`` line per epoch of each stage. Disabled (``dk
    --quiet``, ranks other than 0, the bench's cells): the line only at ``DEBUG``.

    Args:
        enabled: Show progress (on rank 0).
        desc: Label, e.g. ``"kd-s0"``.
    """

    def __init__(self, enabled: bool, desc: str) -> None:
        terminal = is_terminal()
        self.enabled = enabled and terminal  # the bar
        self.lines = enabled and not terminal
        self.desc = desc
        self._bar: Any = None

    def epoch(self, batches: Iterable[Any], epoch: int, epochs: int, total: int, initial: int = 0) -> Iterator[Any]:
        if not self.enabled:
            yield from batches
            return
        self._bar = tqdm(
            batches,
            total=total,
            initial=initial,
            desc=f"{self.desc} {epoch + 1}/{epochs}",
            leave=False,
            dynamic_ncols=True,
            file=sys.stderr,
        )
        try:
            yield from self._bar
        finally:
            self._bar.close()
            self._bar = None

    def show(self, values: dict[str, float]) -> None:
        """Update the bar's postfix (call only when values are already on the host)."""
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()})

    def epoch_done(self, epoch: int, epochs: int, values: dict[str, float], eta_s: float, whole_run: bool) -> None:
        """One line per epoch: ``[kd-s0] epoch 3/10 loss=0.52 kd=0.31 acc=71.2 run eta 1m05s``.

        Args:
            eta_s: Seconds left.
            whole_run: ``eta_s`` covers the whole run (``run eta``); else this stage only (``stage eta``).
        """
        text = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        scope = "run" if whole_run else "stage"
        parts = (f"[{self.desc}] epoch {epoch + 1}/{epochs}", text, f"{scope} eta {format_duration(eta_s)}")
        msg = " ".join(p for p in parts if p)
        if self.enabled:
            tqdm.write(msg, file=sys.stderr)
        elif self.lines:
            log.info(msg)
        else:
            log.debug(msg)
