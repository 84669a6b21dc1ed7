"""Validate keyword arguments against a function's signature, with clear errors.

Registered builders (models, datasets, losses) declare their parameters with type hints,
optionally ``Annotated[float, Field(gt=0)]`` for ranges. A recipe's ``params:`` mapping is
checked here before anything runs, so a typo or a wrong type names the key path, the bad
value and what is allowed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import pydantic

from darkknowledge.errors import ConfigError, close_matches, did_you_mean

_SKIP_KINDS = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def signature_fields(fn: Callable[..., Any], exclude: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
    """Return ``{name: (annotation, default)}`` of ``fn``'s keyword parameters.

    Args:
        fn: A function or a class (its ``__init__`` is read).
        exclude: Parameter names supplied by the framework, not by the user.
    """
    target = fn.__init__ if inspect.isclass(fn) else fn
    sig = inspect.signature(target)
    namespace = getattr(inspect.unwrap(target), "__globals__", {})
    fields: dict[str, tuple[Any, Any]] = {}
    for name, p in sig.parameters.items():
        if name in ("self", *exclude) or p.kind in _SKIP_KINDS:
            continue
        ann = Any if p.annotation is inspect.Parameter.empty else _resolve(p.annotation, namespace)
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields[name] = (ann, default)
    return fields


def _resolve(annotation: Any, namespace: dict[str, Any]) -> Any:
    """A string annotation evaluated in the function's module (``Any`` if it names a type
    imported only for type checking)."""
    if not isinstance(annotation, str):
        return annotation
    try:
        return eval(annotation, dict(namespace))  # the module's own annotation text
    except NameError:
        return Any


def accepts_var_kwargs(fn: Callable[..., Any]) -> bool:
    """True when ``fn`` takes ``**kwargs`` (then unknown keys cannot be checked here)."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(target).parameters.values())


def validate_kwargs(
    fn: Callable[..., Any],
    kwargs: Mapping[str, Any],
    where: str,
    exclude: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Check ``kwargs`` against ``fn``'s signature and return them coerced to the declared types.

    Args:
        fn: The builder the kwargs will be passed to.
        kwargs: User-supplied keyword arguments (from YAML or the API).
        where: The config path shown in errors, e.g. ``"losses.kd"``.
        exclude: Parameters the framework passes itself (not settable by the user).

    Raises:
        ConfigError: Unknown key (with close matches), wrong type or out-of-range value.
    """
    fields = signature_fields(fn, exclude)
    open_ended = accepts_var_kwargs(fn)
    unknown = [k for k in kwargs if k not in fields]
    if unknown and not open_ended:
        k = unknown[0]
        raise ConfigError(
            f"{where}.{k}: unknown parameter {k!r}.{did_you_mean(k, fields)} "
            f"Valid parameters: {', '.join(fields) or '(none)'}."
        )
    known = {k: v for k, v in kwargs.items() if k in fields}
    model = pydantic.create_model(  # type: ignore[call-overload]  # field definitions by name
        f"{getattr(fn, '__name__', 'params')}_params",
        __config__=pydantic.ConfigDict(arbitrary_types_allowed=True, strict=False),
        **{k: fields[k] for k in known},
    )
    try:
        checked = model(**known)
    except pydantic.ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where)) from None
    out = {k: getattr(checked, k) for k in known}
    out.update({k: v for k, v in kwargs.items() if k not in fields})
    return out


def format_validation_error(exc: pydantic.ValidationError, where: str = "") -> str:
    """Turn a pydantic error into one line per problem: ``path: message (got value)``."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        path = f"{where}.{loc}" if where and loc else (where or loc)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        got = err.get("input")
        shown = "" if err["type"] in ("missing",) or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{path}: {msg}{shown}")
    return "; ".join(lines)


def weights_problem(expected: Mapping[str, Any], given: Mapping[str, Any]) -> str:
    """The first differences between a model's state dict and a file's, in a few words ('' when none)."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [k for k in expected if k in given and tuple(expected[k].shape) != tuple(given[k].shape)]
    parts = []
    if shapes:
        k = shapes[0]
        more = f" (+{len(shapes) - 1} more)" if len(shapes) > 1 else ""
        parts.append(f"{k} is {tuple(given[k].shape)} in the file but {tuple(expected[k].shape)} in the model{more}")
    for label, keys in (("missing from the file", missing), ("not in the model", unexpected)):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            parts.append(f"{label}: {', '.join(keys[:3])}{more}")
    return "; ".join(parts)


def _sub_models(annotation: Any) -> list[type[pydantic.BaseModel]]:
    """The pydantic models a field's annotation holds (``X``, ``X | None``, ``dict[str, X]``...)."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return [annotation]
    return [m for a in getattr(annotation, "__args__", ()) for m in _sub_models(a)]


def key_paths(model: type[pydantic.BaseModel], prefix: str = "", depth: int = 3) -> list[str]:
    """Dotted paths of every field of ``model`` and of the models nested in it (``depth`` levels)."""
    paths = []
    for name, f in model.model_fields.items():
        path = f"{prefix}{name}"
        paths.append(path)
        if depth > 1:
            for sub in _sub_models(f.annotation):
                if "dict[" not in str(f.annotation):  # a mapping of models: its keys are the user's names
                    paths += key_paths(sub, path + ".", depth - 1)
    return list(dict.fromkeys(paths))


def key_hint(key: str, model: type[pydantic.BaseModel], where: str = "") -> str:
    """A ' Did you mean ...?' for unknown ``key`` of ``model`` (at path ``where``) that also looks in
    the nested sections: ``epochs`` at the top of a recipe -> ``'train.epochs'``.

    A key that exists in a nested section points there; otherwise the closest keys of ``model``
    and of its sections (closest first), each with its full path; '' when nothing is close.
    """
    prefix = f"{where}." if where else ""
    paths = key_paths(model)
    exact = [p for p in paths if "." in p and p.rsplit(".", 1)[1] == key]
    if exact:
        return " Did you mean " + ", ".join(repr(prefix + p) for p in exact[:5]) + "?"
    by_leaf: dict[str, list[str]] = {}
    for p in paths:
        by_leaf.setdefault(p.rsplit(".", 1)[-1], []).append(p)
    found = [
        p
        for leaf in close_matches(key, by_leaf)  # closest first; of one name, this section's first
        for p in sorted(by_leaf[leaf], key=lambda q: q.count("."))
    ]
    return " Did you mean " + ", ".join(repr(prefix + p) for p in found[:5]) + "?" if found else ""
