"""Paired data: several named views (modalities) of each sample, for cross-modal distillation.

A dataset's stored input ``x`` is its *base* view (``DatasetInfo.view``, e.g. ``image``). A
``TensorData`` may hold further stored views of the same samples (``TensorData.views``, e.g.
``depth``), and a recipe may *derive* views on the fly from another view with a registered
transform (:mod:`darkknowledge.data.views`), so a built-in set becomes a paired set without
new files::

    data:
      name: mnist_digits
      views:
        small: {source: image, transform: downsample, params: {size: 7}}
    teacher: {name: mlp, input: image}     # the privileged view, at training time only
    student: {name: mlp, input: small}     # the view it keeps at test time

The loader computes the views a run's models read, per batch, after the base view is scaled,
augmented and normalised (a derived view is a function of what its source looked like in that
step, so the pair stays a pair under augmentation); stored views are delivered as float, as
stored. Each model reads only its own view (:func:`darkknowledge.data.batch.model_input`).

Cross-modal distillation: Gupta, Hoffman & Malik, "Cross Modal Distillation for Supervision
Transfer", CVPR 2016; learning with privileged information: Lopez-Paz, Bottou, Schölkopf &
Vapnik, "Unifying distillation and privileged information", ICLR 2016.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from darkknowledge.data.bundle import DataBundle, DatasetInfo
from darkknowledge.data.tensors import TensorData
from darkknowledge.data.view_plan import DerivedView, ViewPlan
from darkknowledge.data.views import view_shape
from darkknowledge.errors import ConfigError, ShapeError

__all__ = ["DerivedView", "ViewPlan", "check_view_in_split", "concat", "plan_views", "split_views"]


def plan_views(
    bundle: DataBundle, derived: Mapping[str, Mapping[str, Any]] | None = None, where: str = "data.views"
) -> DataBundle:
    """``bundle`` with its view plan (``info.views``) and a fingerprint that covers the derived views.

    Args:
        bundle: A dataset (its ``train`` split's stored views name the stored views).
        derived: ``{name: {"source": view, "transform": name, "params": {...}}}``.
        where: Config path for messages.

    Returns:
        ``bundle`` unchanged when it has a single view and nothing is derived.

    Raises:
        ConfigError: A name clash, an unknown source or transform, bad params, a cycle, or a
            transform that does not accept its source's shape.
    """
    info = bundle.info
    derived = dict(derived or {})
    if info.views is not None:  # planned already (e.g. by the preflight): the same views, or a mistake
        asked = {
            n: {"source": d.get("source"), "transform": d.get("transform"), "params": dict(d.get("params") or {})}
            for n, d in derived.items()
            if isinstance(d, Mapping)
        }
        have = {
            d.name: {"source": d.source, "transform": d.transform, "params": dict(d.params)} for d in info.views.derived
        }
        if asked != have:
            raise ConfigError(
                f"{where}: dataset {info.name!r} already has derived views {sorted(have)}, planned "
                f"with other settings than {sorted(asked)}; plan the views once"
            )
        return bundle
    train = bundle.train
    stored = dict(train.views) if isinstance(train, TensorData) else {}
    if not stored and not derived:
        return bundle
    shapes: dict[str, tuple[int, ...]] = {info.view: tuple(info.input_shape)}
    for name, v in stored.items():
        if name == info.view:
            raise ConfigError(f"dataset {info.name!r}: stored view {name!r} has the base view's name")
        shapes[name] = tuple(v.shape[1:])
    ordered: list[DerivedView] = []
    pending = dict(derived)
    while pending:
        ready = [n for n, spec in pending.items() if _source(spec, n, where) in shapes]
        if not ready:
            name, spec = next(iter(pending.items()))
            raise ConfigError(
                f"{where}.{name}.source: {_source(spec, name, where)!r} is not a view of dataset "
                f"{info.name!r} (views: {', '.join(shapes)}, derived: {', '.join(derived)}); "
                "a derived view needs an existing source and no cycle"
            )
        for name in ready:
            spec = pending.pop(name)
            unknown = set(spec) - {"source", "transform", "params"}
            if unknown:
                raise ConfigError(f"{where}.{name}: unknown keys {sorted(unknown)}; valid: source, transform, params")
            if name in shapes:
                raise ConfigError(f"{where}.{name}: dataset {info.name!r} already has a view called {name!r}")
            if "transform" not in spec:
                raise ConfigError(f"{where}.{name}: needs a transform (see darkknowledge.data.views)")
            view = DerivedView(name, spec["source"], str(spec["transform"]), dict(spec.get("params") or {}))
            try:
                shapes[name] = tuple(
                    view_shape(view.transform, view.params, shapes[view.source], where=f"{where}.{name}.params")
                )
            except (ConfigError, ShapeError) as exc:
                text = str(exc) if str(exc).startswith(where) else f"{where}.{name}: {exc}"
                raise type(exc)(text) from None
            ordered.append(view)
    plan = ViewPlan(info.view, tuple(stored), tuple(ordered), shapes)
    transfer = bundle.transfer
    if isinstance(transfer, TensorData) and len(transfer) and set(transfer.views) != set(stored):
        raise ConfigError(
            f"dataset {info.name!r}: the transfer set holds views {sorted(transfer.views)} but the "
            f"training split {sorted(stored)}; a transfer set appended to training needs the same"
        )
    extra = json.dumps([d.describe() for d in ordered], sort_keys=True)
    fp = hashlib.sha256(f"{info.fingerprint}|{extra}".encode()).hexdigest()[:16] if ordered else info.fingerprint
    return replace(bundle, info=replace(info, views=plan, fingerprint=fp))


def _source(spec: Any, name: str, where: str) -> str:
    if not isinstance(spec, Mapping) or not isinstance(spec.get("source"), str):
        raise ConfigError(f"{where}.{name}: expected {{source: VIEW, transform: NAME, params: {{...}}}}, got {spec!r}")
    return spec["source"]


def split_views(data: Any) -> set[str]:
    """The stored views a split holds (none for a generic dataset)."""
    return set(data.views) if isinstance(data, TensorData) else set()


def check_view_in_split(info: DatasetInfo, data: Any, name: str, split: str, who: str) -> None:
    """Raise when ``split`` cannot give view ``name`` (a stored view it lacks), before anything trains."""
    plan = info.views
    if plan is None:
        return
    plan.check(name, f"{who}.input")
    stored, _ = plan.needs([name])
    missing = [s for s in stored if s not in split_views(data)]
    if missing:
        raise ConfigError(
            f"{who}.input={name!r}: the {split} split of dataset {info.name!r} lacks the stored view "
            f"{missing[0]!r} it needs; {who} is evaluated on its own view, so the {split} split must "
            "hold it (or read another view; a teacher may instead come trained: teacher.checkpoint)"
        )


def concat(a: TensorData, b: TensorData) -> TensorData:
    """``a`` then ``b`` (e.g. training split + transfer set), views included."""
    if set(a.views) != set(b.views):
        raise ConfigError(f"cannot append data with views {sorted(b.views)} to data with views {sorted(a.views)}")
    return TensorData(
        torch.cat([a.x, b.x]), torch.cat([a.y, b.y]), {k: torch.cat([v, b.views[k]]) for k, v in a.views.items()}
    )
