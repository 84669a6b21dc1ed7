"""The recipes shipped with the package (``darkknowledge/recipes/*.yaml``) and how a recipe is read."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from darkknowledge.errors import ConfigError, did_you_mean
from darkknowledge.yamlio import load_yaml


def recipe_names() -> list[str]:
    """Names of the recipes shipped in the package (``darkknowledge/recipes/*.yaml``)."""
    files = resources.files("darkknowledge.recipes").iterdir()
    return sorted(Path(f.name).stem for f in files if f.name.endswith(".yaml"))


def read_recipe(name_or_path: str) -> dict[str, Any]:
    """Read a recipe by shipped name (``quickstart``) or by file path (``my.yaml``)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():  # a folder named like a recipe (a run folder) is not one
        if not path.is_file():
            raise ConfigError(f"recipe file {str(path)!r} does not exist")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"recipe file {str(path)!r} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at "
                f"offset {exc.start}); save it as UTF-8"
            ) from None
        except OSError as exc:
            raise ConfigError(f"recipe file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    else:
        names = recipe_names()
        if name_or_path not in names:
            raise ConfigError(
                f"unknown recipe {name_or_path!r}.{did_you_mean(name_or_path, names)} "
                f"Shipped recipes: {', '.join(names)}; or give a path to a .yaml file."
            )
        text = resources.files("darkknowledge.recipes").joinpath(f"{name_or_path}.yaml").read_text()
    try:
        raw = load_yaml(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise ConfigError(f"recipe {name_or_path!r} is not valid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {name_or_path!r} must be a mapping of keys")
    return raw
