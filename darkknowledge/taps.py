"""Capture intermediate features of any ``nn.Module`` by module path, with forward hooks.

A tap path names a module as ``named_modules()`` does, optionally followed by ``:input``
or ``:output`` (the default)::

    "layer3"          output of model.layer3
    "layer3.1.bn2"    output of model.layer3[1].bn2
    "fc:input"        the input of model.fc (the penultimate feature)

A module that returns a Hugging Face ``ModelOutput`` (a ``transformers`` encoder or whole model)
delivers its first field (``last_hidden_state``; ``logits`` for a whole classifier).

Models wrapped by ``DistributedDataParallel``/``DataParallel`` work with or without the
``module.`` prefix. A module called several times in one forward (weight sharing, a
recurrent cell) is an error by default, because which call the loss should see is
ambiguous; ``on_repeat="list"`` keeps every call (the feature is a list of tensors, in
call order) and ``on_repeat="last"`` keeps the last one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from darkknowledge.errors import TapError, close_matches

OnRepeat = Literal["error", "list", "last"]
_KINDS = ("output", "input")


@dataclass(frozen=True)
class TapSpec:
    """A parsed tap path: ``module`` (path inside the unwrapped model) and ``kind``."""

    path: str
    module: str
    kind: str


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP/DataParallel (and ``torch.compile``) wrappers to reach the user's model."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def parse_tap(path: str) -> TapSpec:
    """Split ``"layer3:input"`` into module path and kind; strip a DDP ``module.`` prefix."""
    if not isinstance(path, str) or not path.strip():
        raise TapError(f"tap path must be a non-empty string, got {path!r}")
    module, _, kind = path.partition(":")
    kind = kind or "output"
    if kind not in _KINDS:
        raise TapError(f"tap {path!r}: unknown kind {kind!r}; use ':input' or ':output' (default)")
    if module.startswith("module."):
        module = module[len("module.") :]
    elif module == "module":
        module = ""
    return TapSpec(path=path, module=module, kind=kind)


def module_paths(model: nn.Module) -> list[str]:
    """Every addressable module path of ``model`` (the root is ``""``)."""
    return [name for name, _ in unwrap(model).named_modules()]


def _owner(model: nn.Module, owner: str) -> str:
    """``the student (ResNet)`` or ``ResNet``: which model a tap path was looked up in."""
    name = type(unwrap(model)).__name__
    return f"{owner} ({name})" if owner else name


def resolve_tap(model: nn.Module, path: str, owner: str = "") -> tuple[TapSpec, nn.Module]:
    """Find the module a tap path names; unknown paths raise with the closest valid paths.

    Args:
        model: The model to look in.
        path: ``module.path`` or ``module.path:input``.
        owner: Which model this is, named in the error (e.g. ``"the student"``, ``"the teacher"``).
    """
    spec = parse_tap(path)
    modules = dict(unwrap(model).named_modules())
    if spec.module not in modules:
        valid = [p for p in modules if p]
        hint = close_matches(spec.module, valid, n=6)
        shown = ", ".join(repr(h) for h in hint) if hint else ", ".join(repr(p) for p in valid[:12])
        raise TapError(
            f"unknown tap path {path!r} in {_owner(model, owner)}: no module named "
            f"{spec.module!r}. Closest valid paths: {shown}."
        )
    return spec, modules[spec.module]


def validate_taps(model: nn.Module, paths: list[str] | tuple[str, ...], owner: str = "") -> None:
    """Raise ``TapError`` for the first path that does not name a module of ``model`` (``owner``: see
    :func:`resolve_tap`)."""
    for p in paths:
        resolve_tap(model, p, owner)


def _first_tensor(value: Any) -> Any:
    """Hooks see tuples of inputs/outputs; a single tensor inside is returned unwrapped, and so is
    the first field of a Hugging Face ``ModelOutput`` (``last_hidden_state`` of an encoder)."""
    if isinstance(value, tuple) and len(value) == 1:
        return value[0]
    to_tuple = getattr(value, "to_tuple", None)
    if isinstance(value, Mapping) and callable(to_tuple):  # a transformers ModelOutput
        fields = to_tuple()
        if fields and isinstance(fields[0], torch.Tensor):
            return fields[0]
    return value


class FeatureTaps:
    """Forward hooks that record the features named by ``paths`` on every forward.

    Use as a context manager or call :meth:`remove`. After a forward, ``features`` maps each
    path (as given) to its tensor (or list of tensors with ``on_repeat="list"``).

    Args:
        model: Any module (DDP-wrapped is fine).
        paths: Tap paths; duplicates are captured once.
        on_repeat: What to do when a tapped module runs more than once in one forward.
        detach: Detach captured tensors (for frozen teachers).
        owner: Which model this is, named in tap errors (e.g. ``"the student"``).

    Example:
        >>> taps = FeatureTaps(model, ["layer3", "fc:input"])
        >>> logits = model(x); feats = taps.pop()   # {"layer3": (B,C,H,W), "fc:input": (B,D)}
    """

    def __init__(
        self,
        model: nn.Module,
        paths: list[str] | tuple[str, ...],
        on_repeat: OnRepeat = "error",
        detach: bool = False,
        owner: str = "",
    ) -> None:
        if on_repeat not in ("error", "list", "last"):
            raise TapError(f"on_repeat must be 'error', 'list' or 'last', got {on_repeat!r}")
        self.paths = list(dict.fromkeys(paths))
        self.on_repeat = on_repeat
        self.detach = detach
        self.active = True  # set False to run the model without recording (e.g. evaluation)
        self.features: dict[str, Any] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for path in self.paths:
            spec, module = resolve_tap(model, path, owner)
            if spec.kind == "output":
                handle = module.register_forward_hook(self._make_hook(path, output=True))
            else:
                handle = module.register_forward_pre_hook(self._make_hook(path, output=False))
            self._handles.append(handle)

    def _make_hook(self, path: str, output: bool):  # a torch hook's signature
        def store(value: Any) -> None:
            if not self.active:
                return
            value = _first_tensor(value)
            if self.detach and isinstance(value, torch.Tensor):
                value = value.detach()
            if path not in self.features:
                self.features[path] = [value] if self.on_repeat == "list" else value
            elif self.on_repeat == "list":
                self.features[path].append(value)
            elif self.on_repeat == "last":
                self.features[path] = value
            else:
                raise TapError(
                    f"tap {path!r}: the module ran more than once in one forward pass, so the "
                    "feature is ambiguous. Tap a module that runs once, or create the taps with "
                    "on_repeat='list' (all calls) or 'last'."
                )

        if output:
            return lambda _mod, _inp, out: store(out)
        return lambda _mod, inp: store(inp)

    def clear(self) -> None:
        """Forget captured features (call before each forward)."""
        self.features = {}

    def pop(self) -> dict[str, Any]:
        """Return the captured features and clear them."""
        feats, self.features = self.features, {}
        return feats

    def remove(self) -> None:
        """Remove every hook."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@torch.no_grad()
def probe_shapes(model: nn.Module, x: torch.Tensor, paths: list[str], owner: str = "") -> dict[str, tuple[int, ...]]:
    """Run one forward on ``x`` and return the per-sample shape of each tap (batch dim dropped;
    ``owner``: which model this is, named in errors)."""
    was_training = model.training
    model.eval()
    try:
        with FeatureTaps(model, paths, owner=owner) as taps:
            model(x)
            feats = taps.pop()
    finally:
        model.train(was_training)
    missing = [p for p in paths if p not in feats]
    if missing:
        raise TapError(f"taps {missing} did not run during a forward pass of {_owner(model, owner)}")
    return {p: tuple(v.shape[1:]) for p, v in feats.items() if isinstance(v, torch.Tensor)}
