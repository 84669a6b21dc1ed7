"""Progress display: a tqdm bar and a line per epoch on terminals; quiet otherwise."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger("darkknowledge")


def is_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class Progress:
    """Wraps one epoch's batches. Shows epoch, loss terms, accuracy and ETA on a terminal.

    Args:
        enabled: Draw a bar (on rank 0, when stderr is a terminal).
        desc: Label, e.g. ``"kd s0"``.
    """

    def __init__(self, enabled: bool, desc: str) -> None:
        self.enabled = enabled and is_terminal()
        self.desc = desc
        self._bar: Any = None

    def epoch(self, batches: Iterable[Any], epoch: int, epochs: int, total: int, initial: int = 0) -> Iterator[Any]:
        if not self.enabled:
            yield from batches
            return
        self._bar = tqdm(
            batches, total=total, initial=initial, desc=f"{self.desc} {epoch + 1}/{epochs}",
            leave=False, dynamic_ncols=True, file=sys.stderr,
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

    def epoch_done(self, epoch: int, epochs: int, values: dict[str, float], eta_s: float) -> None:
        """One line per epoch: on the terminal above the bar; otherwise only at DEBUG level
        (``dk --verbose``), so logs stay quiet and ``metrics.jsonl`` holds every epoch."""
        text = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        msg = f"[{self.desc}] epoch {epoch + 1}/{epochs} {text} eta {eta_s:.0f}s"
        if self.enabled:
            tqdm.write(msg, file=sys.stderr)
        else:
            log.debug(msg)
