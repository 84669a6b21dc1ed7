"""The trials file of a resumable search (``dk tune``, ``dk search``): read back under its header.

A search writes ``{**header, "trials": [...]}`` atomically after every trial; a rerun continues
it only when the header (what was searched, how, with which seed) is the same.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from darkknowledge.errors import ConfigError


def read_trials(path: Path, header: Mapping[str, Any], elsewhere: str) -> list[Any]:
    """The recorded trials of ``path`` ([] without the file), checked against ``header``.

    Args:
        path: The trials file.
        header: What this search records beside its trials; every key must match.
        elsewhere: What to do instead, for the errors (e.g. ``"tune into another folder"``).

    Raises:
        ConfigError: The file is unreadable or malformed, or it records another search.
    """
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        records = data["trials"]
        if not isinstance(records, list):
            raise TypeError("'trials' is not a list")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{str(path)!r} cannot be read ({exc}); move it away or {elsewhere}") from None
    differs = [k for k in header if data.get(k) != header[k]]
    if differs:
        raise ConfigError(
            f"{str(path)!r} records another search (a different {', '.join(differs)}), so its "
            f"trials cannot be continued here: {elsewhere}"
        )
    return records
