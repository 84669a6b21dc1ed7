"""Raw config mappings: merging, dotted ``key=value`` overrides, the plain-data check.

They work on the mappings read from YAML, before :mod:`darkknowledge.config` validates them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from darkknowledge.errors import ConfigError
from darkknowledge.yamlio import load_yaml


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``over`` into a copy of ``base``.

    Raises:
        ConfigError: ``over`` (or ``base``) is not a mapping.
    """
    for side in (base, over):
        if not isinstance(side, Mapping):
            raise ConfigError(f"expected a mapping of config keys to merge, got {type(side).__name__} {side!r:.80}")
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``"train.epochs=3"`` into ``(["train", "epochs"], 3)`` (value read as YAML).

    A value that is not valid YAML (``lr=[0.1``, ``x=!!int abc``, a date that does not
    exist) is kept as the text it is; validation then names the key that wanted otherwise.

    Raises:
        ConfigError: No ``=``, an empty key, or an empty part in a dotted key (``train..epochs``).
    """
    if not isinstance(text, str):
        raise ConfigError(f"override {text!r}: expected a KEY=VALUE string, e.g. train.epochs=3")
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.epochs=3")
    path = [part.strip() for part in key.strip().split(".")]
    if not all(path):
        raise ConfigError(
            f"override {text!r}: the key {key.strip()!r} has an empty part; "
            "expected dotted names, e.g. train.optimizer.lr=0.01"
        )
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:  # load_yaml turns PyYAML's other errors (bad tagged scalars, deep nesting) into it
        value = raw
    return path, value


def apply_overrides(cfg: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set each dotted ``key=value`` in a copy of the raw config mapping.

    Raises:
        ConfigError: A malformed override, or a key path through a value that is not a mapping.
    """
    if isinstance(overrides, str):
        raise ConfigError(f"overrides: expected a list of KEY=VALUE strings, got the string {overrides!r}")
    out = copy.deepcopy(dict(cfg))
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(
                    f"override {text!r}: {'.'.join(path[: i + 1])} is not a mapping "
                    f"(it is {type(nxt).__name__} {nxt!r:.80})"
                )
            node = nxt
        node[path[-1]] = value
    return out


_PLAIN = (str, int, float, bool, type(None))
_MAX_DEPTH = 64


def check_plain(value: Any, path: str, seen: tuple[int, ...] = ()) -> None:
    """A config holds plain data: strings, numbers, booleans, null, lists and mappings with
    string keys, nested at most ``_MAX_DEPTH`` deep and never containing itself.

    YAML can produce more (``!!binary``, ``!!set``, dates, an alias that refers to its own
    anchor); such a value could not be written to ``config.yaml`` or compared on resume.
    """
    where = path or "the config"
    if isinstance(value, _PLAIN):
        return
    if not isinstance(value, (Mapping, list, tuple)):
        raise ConfigError(
            f"{where}: a config value must be a number, string, boolean, null, list or mapping; "
            f"got {type(value).__name__} {value!r:.80} (quote it in YAML to keep it as text)"
        )
    if id(value) in seen:
        raise ConfigError(f"{where}: the value contains itself (a YAML alias inside its own anchor)")
    if len(seen) >= _MAX_DEPTH:
        raise ConfigError(f"{where}: nested deeper than {_MAX_DEPTH} levels")
    inner = (*seen, id(value))
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{where}: keys must be strings, got {type(k).__name__} {k!r:.80}")
            check_plain(v, f"{path}.{k}" if path else k, inner)
    else:
        for i, v in enumerate(value):
            check_plain(v, f"{path}.{i}" if path else str(i), inner)
