"""Figures without pyplot: a matplotlib Figure on the Agg canvas, written as PNG atomically.

matplotlib is optional (the ``plots`` extra): it is imported inside :func:`new_figure`, and a
missing one is one :class:`~darkknowledge.errors.ConfigError` saying how to install it. pyplot
and its global backend are never touched; a crash while writing leaves the previous PNG or the
new one, never half a file.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from darkknowledge.atomic import atomic_write
from darkknowledge.errors import ConfigError


def have_matplotlib() -> bool:
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def new_figure(width: float, height: float, what: str = "figures") -> Any:
    """A matplotlib Figure on an Agg canvas; ConfigError naming ``what`` when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ConfigError(
            f"{what} need matplotlib, which is not installed: pip install matplotlib "
            f"(or the plots extra; the tables need nothing more). Import error: {exc}"
        ) from None
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, path: str | Path) -> Path:
    """Render ``fig`` to PNG bytes, then write them to ``path`` atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    data = buf.getvalue()
    return atomic_write(path, lambda f: f.write(data))
