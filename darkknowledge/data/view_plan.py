"""The views of a paired dataset and how a batch's views are computed (see :mod:`darkknowledge.data.paired`)."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from darkknowledge.data.views import ViewTransform, view_transform
from darkknowledge.errors import ConfigError


@dataclass(frozen=True)
class DerivedView:
    """A view computed from another view by a registered transform.

    Attributes:
        name: The view's name (what ``student.input`` / ``teacher.input`` say).
        source: The view it is computed from (the base view, a stored view or an earlier derived one).
        transform: Registered transform name (``dk list``-able in :mod:`darkknowledge.data.views`).
        params: The transform's parameters.
    """

    name: str
    source: str
    transform: str
    params: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "transform": self.transform, "params": dict(self.params)}


@dataclass(frozen=True)
class ViewPlan:
    """Every view of a paired dataset: the base one, stored ones and derived ones (in an order
    where each derived view comes after its source), with each view's per-sample shape."""

    base: str
    stored: tuple[str, ...]
    derived: tuple[DerivedView, ...]
    shapes: dict[str, tuple[int, ...]]

    @property
    def names(self) -> tuple[str, ...]:
        return (self.base, *self.stored, *(d.name for d in self.derived))

    def check(self, name: str, where: str) -> None:
        """Raise a clear error when ``name`` is not a view of this dataset."""
        if name not in self.shapes:
            raise ConfigError(
                f"{where}: the data has no view {name!r}; its views: {', '.join(self.names)} "
                "(derive another under data.views: {name: {source, transform, params}})"
            )

    def needs(self, wanted: Collection[str]) -> tuple[list[str], list[DerivedView]]:
        """The stored views and the derived views (in computing order) behind ``wanted``."""
        by_name = {d.name: d for d in self.derived}
        keep: set[str] = set()

        def visit(name: str) -> None:
            if name in keep:
                return
            keep.add(name)
            if name in by_name:
                visit(by_name[name].source)

        for name in wanted:
            visit(name)
        return [s for s in self.stored if s in keep], [d for d in self.derived if d.name in keep]

    def compute(
        self, x: torch.Tensor, stored: Mapping[str, torch.Tensor], wanted: Collection[str]
    ) -> dict[str, torch.Tensor]:
        """The ``wanted`` views of one batch, by name.

        Args:
            x: The base view ``(B, *base_shape)``, scaled, augmented and normalised.
            stored: The stored views the batch needs ``(B, *view_shape)`` each, as float.
            wanted: The names to return.
        """
        _, derived = self.needs(wanted)
        have: dict[str, torch.Tensor] = {self.base: x, **stored}
        for d in derived:
            have[d.name] = _transform(d)(have[d.source])  # (B, *shape of d)
        return {name: have[name] for name in wanted}

    def identity(self, name: str) -> dict[str, Any]:
        """What view ``name`` is, for cache keys: the chain of transforms down to a stored view."""
        by_name = {d.name: d for d in self.derived}
        chain = []
        while name in by_name:
            chain.append(by_name[name].describe())
            name = by_name[name].source
        return {"stored": name, "base": name == self.base, "derived": chain[::-1]}


_TRANSFORMS: dict[str, ViewTransform] = {}
"""Validated transforms by their description (parameters are checked once, not per batch)."""


def _transform(view: DerivedView) -> ViewTransform:
    key = json.dumps([view.transform, view.params], sort_keys=True, default=str)
    if key not in _TRANSFORMS:
        _TRANSFORMS[key] = view_transform(view.transform, view.params)
    return _TRANSFORMS[key]
