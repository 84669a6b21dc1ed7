"""Hyper-parameter ranges: what a tuner may try for one value.

A loss declares its tunable parameters as ``search_space: ClassVar[dict[str, Range]]`` (keys:
its ``__init__`` parameters, or ``weight`` for the term's weight in the objective); a suite may
give its own ranges as a YAML mapping (:meth:`Range.from_mapping`)::

    losses.kd.T: {low: 1, high: 8, log: true}
    losses.kd.alpha: {low: 0.1, high: 1.0}
    student.params.dropout: {choices: [0.0, 0.1, 0.2]}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from darkknowledge.errors import ConfigError, did_you_mean

Kind = Literal["float", "int", "choice"]
KINDS: tuple[str, ...] = ("float", "int", "choice")
Choice = str | int | float | bool | None
_FIELDS = ("kind", "low", "high", "log", "choices")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Range:
    """The values a tuner may try for one hyper-parameter.

    Attributes:
        kind: ``float`` (any value in ``[low, high]``), ``int`` (integers in it) or ``choice``
            (one of ``choices``). Default: ``choice`` when ``choices`` is given, else ``float``.
        low: Lowest value (``float``/``int``).
        high: Highest value, above ``low``.
        log: Sample uniformly on a log scale (needs ``low > 0``), e.g. temperatures, weights.
        choices: The candidate values of a ``choice`` range (plain scalars, at least one).

    Raises:
        ConfigError: Naming the bad field and what is allowed.

    Example:
        >>> Range(low=1.0, high=8.0, log=True).contains(4.0)
        True
        >>> Range(choices=(1, 2)).kind
        'choice'
    """

    kind: Kind | None = None
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple[Choice, ...] = field(default=())

    def __post_init__(self) -> None:
        kind = self.kind if self.kind is not None else ("choice" if self.choices else "float")
        if kind not in KINDS:
            raise ConfigError(f"range kind {kind!r} is not one of {', '.join(KINDS)}")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "choices", tuple(self.choices))
        if not isinstance(self.log, bool):
            raise ConfigError(f"range log: expected true or false, got {self.log!r}")
        if kind == "choice":
            self._check_choices()
        else:
            self._check_bounds(kind)

    def _check_choices(self) -> None:
        if self.low is not None or self.high is not None or self.log:
            raise ConfigError(
                "a choice range takes only `choices`, not low/high/log; "
                f"got low={self.low!r}, high={self.high!r}, log={self.log!r}"
            )
        if not self.choices:
            raise ConfigError("a choice range needs at least one value in `choices`, e.g. choices: [1, 2]")
        for c in self.choices:
            if not (c is None or isinstance(c, (str, bool)) or _is_number(c)):
                raise ConfigError(f"range choice {c!r}: expected a number, string, boolean or null")
        if len(set(map(repr, self.choices))) != len(self.choices):
            raise ConfigError(f"range choices {list(self.choices)!r} repeat a value")

    def _check_bounds(self, kind: str) -> None:
        if self.choices:
            raise ConfigError(
                f"a {kind} range takes low/high, not `choices` (got {list(self.choices)!r}); "
                "for a list of values leave out kind or write kind: choice"
            )
        for name, value in (("low", self.low), ("high", self.high)):
            if value is None or not _is_number(value):
                raise ConfigError(f"range {name}: expected a finite number, got {value!r}")
            if kind == "int" and not float(value).is_integer():
                raise ConfigError(f"int range {name}: expected an integer, got {value!r}")
        assert self.low is not None and self.high is not None  # numbers: checked above
        cast = int if kind == "int" else float
        low, high = cast(self.low), cast(self.high)
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)
        if not low < high:
            raise ConfigError(f"range low={self.low!r} must be below high={self.high!r}")
        if self.log and not low > 0:
            raise ConfigError(f"a log range needs low > 0 (got low={self.low!r}); use log: false or a positive low")

    def bounds(self) -> tuple[Choice, ...]:
        """The extreme values: ``(low, high)``, or every choice."""
        return self.choices if self.kind == "choice" else (self.low, self.high)

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one this range may produce."""
        if self.kind == "choice":
            return any(type(value) is type(c) and value == c for c in self.choices)
        if not _is_number(value) or (self.kind == "int" and not float(value).is_integer()):
            return False
        return self.low <= value <= self.high

    def to_dict(self) -> dict[str, Any]:
        """A plain mapping that :meth:`from_mapping` reads back (for JSON/YAML)."""
        if self.kind == "choice":
            return {"kind": "choice", "choices": list(self.choices)}
        return {"kind": self.kind, "low": self.low, "high": self.high, "log": self.log}

    @classmethod
    def from_mapping(cls, raw: Any, where: str = "range") -> Range:
        """Read ``{low, high, log, kind}`` or ``{choices}`` (e.g. from a suite's YAML).

        Args:
            raw: The mapping.
            where: The key path shown in errors (e.g. ``losses.kd.T``).

        Raises:
            ConfigError: Not a mapping, an unknown key, or an invalid range (naming ``where``).
        """
        if isinstance(raw, cls):
            return raw
        if not isinstance(raw, Mapping):
            raise ConfigError(
                f"{where}: expected a range mapping such as {{low: 1, high: 8, log: true}} or "
                f"{{choices: [1, 2]}}, got {type(raw).__name__} {raw!r:.80}"
            )
        for key in raw:
            if key not in _FIELDS:
                raise ConfigError(
                    f"{where}.{key}: unknown range key.{did_you_mean(str(key), _FIELDS)} "
                    f"Valid keys: {', '.join(_FIELDS)}."
                )
        choices = raw.get("choices", ())
        if not isinstance(choices, (list, tuple)):
            raise ConfigError(f"{where}.choices: expected a list of values, got {choices!r:.80}")
        try:
            return cls(
                kind=raw.get("kind"),
                low=raw.get("low"),
                high=raw.get("high"),
                log=raw.get("log", False),
                choices=tuple(choices),
            )
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


__all__ = ["KINDS", "Range"]
