"""Search spaces of a run: the losses' declared ranges as dotted config paths, or a suite's own.

A space maps dotted config paths to :class:`~darkknowledge.search_space.Range`::

    {"losses.kd.T": Range(low=1, high=8, log=True), "losses.kd.alpha": Range(low=0.1, high=1.0)}

A key under ``losses.<term>.`` names a parameter of that term's loss, or ``weight``, the term's
weight in the objective (see ``DistillLoss.search_space``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from darkknowledge.config import RunConfig
from darkknowledge.errors import ConfigError
from darkknowledge.losses import LOSSES
from darkknowledge.search_space import Range


def loss_of_term(term: str, raw: Mapping[str, Any] | None) -> str:
    """The registered loss a ``losses:`` term uses: its ``loss`` key, else the term's name."""
    name = (raw or {}).get("loss", term)
    if not isinstance(name, str):
        raise ConfigError(f"losses.{term}.loss: expected a loss name, got {name!r}")
    return name


def space_for(cfg: RunConfig) -> dict[str, Range]:
    """The union of the search spaces of ``cfg``'s loss terms, as dotted config paths.

    A term ``cls: {loss: kd}`` contributes ``losses.cls.T`` and ``losses.cls.alpha``; a loss
    that declares no space (``ce``) contributes nothing.

    Args:
        cfg: A validated run config.

    Returns:
        ``{"losses.<term>.<key>": Range}`` in the order of the terms and of each loss's space.

    Raises:
        RegistryError: A term names an unknown loss.
    """
    space: dict[str, Range] = {}
    for term, raw in cfg.losses.items():
        cls = LOSSES.get(loss_of_term(term, raw))
        for key, rng in cls.search_space.items():
            space[f"losses.{term}.{key}"] = rng
    return space


def suite_space(overrides: Any, where: str = "space") -> dict[str, Range]:
    """Parse a suite's YAML search space into ranges.

    Args:
        overrides: A mapping of dotted config paths to range mappings, e.g.
            ``{"losses.kd.T": {"low": 1, "high": 8, "log": True}, "losses.kd.alpha": {"choices": [0.5, 0.9]}}``.
        where: The suite's key path, shown in errors.

    Returns:
        ``{path: Range}`` in the given order.

    Raises:
        ConfigError: Not a mapping, a key that is not a dotted path, or a bad range (the
            message names the key and what is allowed).
    """
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise ConfigError(
            f"{where}: expected a mapping of config paths to ranges, e.g. "
            f"{{losses.kd.T: {{low: 1, high: 8, log: true}}}}; got {type(overrides).__name__}"
        )
    out: dict[str, Range] = {}
    for key, raw in overrides.items():
        if not isinstance(key, str) or not key.strip() or not all(part.strip() for part in key.split(".")):
            raise ConfigError(f"{where}: {key!r} is not a dotted config path such as losses.kd.T or train.optimizer.lr")
        out[key.strip()] = Range.from_mapping(raw, where=f"{where}.{key.strip()}")
    return out


def space_to_dict(space: Mapping[str, Range]) -> dict[str, dict[str, Any]]:
    """A space as plain data (JSON/YAML); :func:`suite_space` reads it back."""
    return {key: rng.to_dict() for key, rng in space.items()}
