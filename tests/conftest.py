"""Shared fixtures: an isolated cache folder and tiny in-memory datasets."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test writes its data/teacher caches into one session-wide temp folder."""
    monkeypatch.setenv("DK_CACHE", str(tmp_path_factory.getbasetemp() / "dk-cache"))


@pytest.fixture()
def toy_tensors() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """A linearly separable 4-class problem in 8 dims: ((x, y), (x_test, y_test))."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=g) * 3

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 4, (n,), generator=g)
        return centers[y] + torch.randn(n, 8, generator=g), y

    return make(256), make(128)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny convolutions run fastest (and steadiest on shared cores) in one thread; a module uses it
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def restore_logging():
    """``dk`` run in this process points logging at the captured stderr; put it back afterwards."""
    root, ours = logging.getLogger(), logging.getLogger("darkknowledge")
    handlers, levels = root.handlers[:], (root.level, ours.level)
    yield
    root.handlers[:] = handlers
    root.setLevel(levels[0])
    ours.setLevel(levels[1])
