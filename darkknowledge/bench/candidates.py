"""Student candidates: the space they come from.

**The space.** Student architecture search (Gou et al., "Knowledge Distillation: A Survey",
IJCV 2021, Sec. 6: "a network found by architecture search" as one teacher-student relation)
picks the builder parameters of a zoo model (``channels``, ``depth``, ``kernel_size``, ...)
and, optionally, the kind of convolution (``ops``: ``plain`` as the builder makes it, or
``depthwise``: depthwise-separable, Howard et al., "MobileNets", arXiv 2017, Sec. 3.1). What
``depthwise`` does to a model is the caller's (``measure``/``proxy`` build the candidate); the
space only names it. As plain data (the YAML of ``dk search``)::

    model: cnn1d
    params:
      channels: [8, 16, 32]                 # a list: the choices
      depth: {kind: int, low: 1, high: 4}   # a Range mapping (search_space.Range)
      batch_norm: false                     # a scalar: fixed
    ops: [plain, depthwise]                 # optional

A :class:`Candidate` is one point: ``Candidate("cnn1d", {"channels": 16, "depth": 2}, "plain")``;
optuna names its parameters ``params.<key>`` and ``ops``. How candidates compare (the Pareto
front, Kendall's tau): :mod:`darkknowledge.bench.pareto`.
"""

from __future__ import annotations

import itertools
import json
import math
import numbers
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import numpy as np

from darkknowledge.errors import ConfigError, RegistryError, did_you_mean
from darkknowledge.search_space import Range
from darkknowledge.validation import (
    accepts_var_kwargs,
    signature_fields,
    validate_kwargs,
)

OPS: tuple[str, ...] = ("plain", "depthwise")
"""Operation kinds a space may choose between."""
SPACE_KEYS: tuple[str, ...] = ("model", "params", "ops")
DATA_PARAMS: tuple[str, ...] = ("num_classes", "input_shape")
"""Builder parameters the data fills; a space may not search them."""


def is_number(v: Any) -> TypeGuard[float]:
    """A finite real number (numpy scalars included), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and math.isfinite(v)


@dataclass(frozen=True)
class Candidate:
    """One student of a space: a model name, its builder parameters and its operation kind.

    Attributes:
        model: Registered model name (``darkknowledge.models``).
        params: Builder keyword parameters (without ``num_classes``/``input_shape``).
        ops: ``plain`` or ``depthwise``.
    """

    model: str
    params: dict[str, Any] = field(default_factory=dict)
    ops: str = "plain"

    def __hash__(self) -> int:  # params is a dict: hash the canonical key instead
        return hash(self.key)

    @property
    def key(self) -> str:
        """A canonical string: two candidates are the same student when their keys are equal."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON): ``{"model", "params", "ops"}``."""
        return {"model": self.model, "params": dict(self.params), "ops": self.ops}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Candidate:
        """Read :meth:`to_dict`'s output back."""
        return cls(model=str(raw["model"]), params=dict(raw.get("params", {})), ops=str(raw.get("ops", "plain")))

    def describe(self) -> str:
        """``channels=16, depth=2, ops=depthwise`` (the ops only when not ``plain``)."""
        parts = [
            f"{k}={json.dumps(v) if isinstance(v, (str, bool)) or v is None else f'{v:g}'}"
            for k, v in self.params.items()
        ]
        return ", ".join(parts + ([f"ops={self.ops}"] if self.ops != "plain" else [])) or "(defaults)"


def _as_range(raw: Any, where: str) -> Range:
    """A list is a choice, a scalar is fixed, a mapping is read by :meth:`Range.from_mapping`."""
    if isinstance(raw, Range):
        return raw
    if isinstance(raw, (list, tuple)):
        return Range.from_mapping({"choices": list(raw)}, where=where)
    if isinstance(raw, Mapping):
        return Range.from_mapping(raw, where=where)
    return Range.from_mapping({"choices": [raw]}, where=where)


def _builder(model: str) -> Any:
    """The model's registered builder, or None for ``torchvision:``/``timm:`` names (unchecked)."""
    if ":" in model:
        return None
    from darkknowledge.models import MODELS

    try:
        return MODELS.get(model)
    except RegistryError as exc:
        raise ConfigError(f"student space model {model!r}: {exc}") from None


@dataclass(frozen=True)
class StudentSpace:
    """The students a search may try: one model family, ranges over its builder parameters.

    Attributes:
        model: Registered model name, e.g. ``cnn1d``.
        params: ``{builder parameter: Range}``; a list or scalar is read as choices/fixed.
        ops: Operation kinds to choose between (a subset of :data:`OPS`); empty: ``plain`` only,
            not searched.

    Raises:
        ConfigError: An unknown model, parameter (all unknown ones listed, with the valid
            ones) or operation, a range the builder refuses at a bound or choice, or a
            parameter the data sets (``num_classes``, ``input_shape``).

    Example:
        >>> space = StudentSpace("cnn1d", {"channels": [8, 16], "depth": {"kind": "int", "low": 1, "high": 3}})
        >>> space.size()
        6
    """

    model: str
    params: Mapping[str, Any] = field(default_factory=dict)
    ops: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"student space model: expected a model name such as 'cnn1d', got {self.model!r}")
        if not isinstance(self.params, Mapping):
            raise ConfigError(
                f"student space params: expected a mapping of builder parameters to choices or "
                f"ranges, got {type(self.params).__name__}"
            )
        where = f"student space {self.model}.params"
        ranges = {str(k): _as_range(v, f"{where}.{k}") for k, v in self.params.items()}
        object.__setattr__(self, "params", ranges)
        ops = (self.ops,) if isinstance(self.ops, str) else tuple(self.ops or ())
        bad = [o for o in ops if o not in OPS]
        if bad or len(set(ops)) != len(ops):
            raise ConfigError(
                f"student space ops {list(ops)!r}: each one of {', '.join(OPS)}, once"
                + (f" ({', '.join(map(repr, bad))} unknown)" if bad else "")
            )
        object.__setattr__(self, "ops", ops)
        self._check_builder(ranges, where)

    def _check_builder(self, ranges: Mapping[str, Range], where: str) -> None:
        reserved = [k for k in ranges if k in DATA_PARAMS]
        if reserved:
            raise ConfigError(
                f"{where}: {', '.join(reserved)} set by the data, not searched; remove "
                f"{'it' if len(reserved) == 1 else 'them'} from the space"
            )
        builder = _builder(self.model)
        if builder is None:
            return
        fields = signature_fields(builder, exclude=DATA_PARAMS)
        unknown = [k for k in ranges if k not in fields]
        if unknown and not accepts_var_kwargs(builder):
            hints = "".join(did_you_mean(k, fields) for k in unknown[:1])
            raise ConfigError(
                f"{where}: unknown parameter{'s' * (len(unknown) > 1)} {', '.join(unknown)} of model "
                f"{self.model!r}.{hints} Valid parameters: {', '.join(fields) or '(none)'}."
            )
        for key, rng in ranges.items():
            probes = list(rng.choices) if rng.kind == "choice" else list(rng.bounds())
            if rng.kind == "float":  # a float range on an int parameter fails between its bounds
                assert rng.low is not None and rng.high is not None  # a float range has both
                probes.append((float(rng.low) + float(rng.high)) / 2)
            for i, value in enumerate(probes):
                try:
                    validate_kwargs(builder, {key: value}, where=where, exclude=DATA_PARAMS)
                except ConfigError as exc:
                    if rng.kind == "float" and i == 2:
                        raise ConfigError(
                            f"{exc}: a float range draws values between its bounds; for an integer "
                            "parameter use kind: int or a list of choices"
                        ) from None
                    raise

    @classmethod
    def from_mapping(cls, raw: Any, where: str = "student space") -> StudentSpace:
        """Read ``{model, params, ops}`` (e.g. YAML); see the module docstring.

        Raises:
            ConfigError: Not a mapping, unknown keys (all listed), or an invalid space.
        """
        if isinstance(raw, cls):
            return raw
        if not isinstance(raw, Mapping):
            raise ConfigError(
                f"{where}: expected a mapping with keys {', '.join(SPACE_KEYS)}, got {type(raw).__name__} {raw!r:.80}"
            )
        unknown = [str(k) for k in raw if k not in SPACE_KEYS]
        if unknown:
            raise ConfigError(
                f"{where}: unknown key{'s' * (len(unknown) > 1)} {', '.join(unknown)}."
                f"{did_you_mean(unknown[0], SPACE_KEYS)} Valid keys: {', '.join(SPACE_KEYS)}."
            )
        if "model" not in raw:
            raise ConfigError(f"{where}: missing 'model' (the student family, e.g. model: cnn1d)")
        return cls(model=raw["model"], params=raw.get("params") or {}, ops=raw.get("ops") or ())

    def to_dict(self) -> dict[str, Any]:
        """Plain data that :meth:`from_mapping` reads back (recorded in ``trials.json``)."""
        return {"model": self.model, "params": {k: r.to_dict() for k, r in self.params.items()}, "ops": list(self.ops)}

    def _values(self, key: str) -> list[Any]:
        rng = self.params[key]
        if rng.kind == "choice":
            return list(rng.choices)
        if rng.kind == "int":
            return list(range(int(rng.low), int(rng.high) + 1))
        raise ConfigError(
            f"student space {self.model}.params.{key}: a float range [{rng.low}, {rng.high}] has no "
            "grid; give choices (a list) or kind: int"
        )

    def size(self) -> int | float:
        """How many distinct candidates the space holds (``math.inf`` with a float range)."""
        counts = {
            "choice": lambda r: len(r.choices),
            "int": lambda r: int(r.high) - int(r.low) + 1,
            "float": lambda r: math.inf,
        }
        return math.prod(counts[r.kind](r) for r in self.params.values()) * max(1, len(self.ops))

    def grid(self) -> Iterator[Candidate]:
        """Every candidate, parameters in their declared order, ``ops`` varying fastest.

        Raises:
            ConfigError: The space has a float range (no finite grid).
        """
        keys = list(self.params)
        axes = [self._values(k) for k in keys]
        for combo in itertools.product(*axes):
            for op in self.ops or ("plain",):
                yield Candidate(self.model, dict(zip(keys, combo)), op)

    def distributions(self) -> dict[str, Any]:
        """Optuna's distributions by parameter name (``params.<key>``, ``ops``): for replaying trials."""
        from optuna import distributions as d

        out: dict[str, Any] = {}
        for key, rng in self.params.items():
            if rng.kind == "choice":
                out[f"params.{key}"] = d.CategoricalDistribution(list(rng.choices))
            elif rng.kind == "int":
                out[f"params.{key}"] = d.IntDistribution(int(rng.low), int(rng.high), log=rng.log)
            else:
                out[f"params.{key}"] = d.FloatDistribution(float(rng.low), float(rng.high), log=rng.log)
        if self.ops:
            out["ops"] = d.CategoricalDistribution(list(self.ops))
        return out

    def sample(self, trial: Any) -> Candidate:
        """Draw one candidate with an optuna trial (``suggest_*`` on ``params.<key>`` and ``ops``)."""
        params: dict[str, Any] = {}
        for key, rng in self.params.items():
            name = f"params.{key}"
            if rng.kind == "choice":
                params[key] = trial.suggest_categorical(name, list(rng.choices))
            elif rng.kind == "int":
                params[key] = trial.suggest_int(name, int(rng.low), int(rng.high), log=rng.log)
            else:
                params[key] = trial.suggest_float(name, float(rng.low), float(rng.high), log=rng.log)
        op = trial.suggest_categorical("ops", list(self.ops)) if self.ops else "plain"
        return Candidate(self.model, params, op)

    def optuna_params(self, candidate: Candidate) -> dict[str, Any]:
        """``candidate`` as optuna's parameter mapping (inverse of :meth:`sample`)."""
        out = {f"params.{k}": v for k, v in candidate.params.items()}
        if self.ops:
            out["ops"] = candidate.ops
        return out

    def contains(self, candidate: Candidate) -> bool:
        """Whether ``candidate`` is a point of this space."""
        return (
            candidate.model == self.model
            and set(candidate.params) == set(self.params)
            and all(self.params[k].contains(v) for k, v in candidate.params.items())
            and candidate.ops in (self.ops or ("plain",))
        )


__all__ = ["DATA_PARAMS", "OPS", "Candidate", "StudentSpace", "is_number"]
