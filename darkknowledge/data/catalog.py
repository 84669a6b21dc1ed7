"""The dataset registry and ``load_dataset``, the one entry point that builds a dataset."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from darkknowledge.data.bundle import DataBundle, TensorData
from darkknowledge.data.cache import data_dir
from darkknowledge.data.fingerprint import fingerprint
from darkknowledge.data.splits import check_fraction, random_split, stratified_subset
from darkknowledge.errors import ConfigError
from darkknowledge.registry import Registry
from darkknowledge.validation import signature_fields, validate_kwargs

logger = logging.getLogger(__name__)

DatasetBuilder = Callable[..., DataBundle]
"""``builder(*, root: Path, split_seed: int, **params) -> DataBundle``."""

DATASETS: Registry[DatasetBuilder] = Registry("dataset")

FRAMEWORK_ARGS = ("root", "split_seed")
"""Builder arguments supplied by ``load_dataset`` itself, not by ``data.params``."""


Example = Callable[[Path, int], dict[str, Any]]
"""``example(root, variant) -> data.params``: writes (or selects) a tiny instance of the dataset
under ``root`` and returns the params that load it; another ``variant`` gives other data."""


def register_dataset(name: str, example: Example | None = None) -> Callable[[DatasetBuilder], DatasetBuilder]:
    """Decorator registering a dataset builder under ``name``.

    The builder is called as ``builder(root=Path, split_seed=int, **params)`` and returns a
    ``DataBundle`` (its ``info.fingerprint`` may be empty: ``load_dataset`` fills it in).
    Declare each param with a type hint and a default so recipes are validated. ``example``
    makes a tiny instance offline (e.g. a few random images in the dataset's file format): the
    contract tests run every registered dataset through it.

    Example:
        >>> @register_dataset("toy", example=lambda root, variant: {"n": 10 + variant})
        ... def toy(*, root: Path, split_seed: int, n: int = 100) -> DataBundle: ...
    """

    def decorator(builder: DatasetBuilder) -> DatasetBuilder:
        builder.example = example  # type: ignore[attr-defined]  # an attribute on the function
        return DATASETS.register(name)(builder)

    return decorator


def list_datasets() -> list[str]:
    """Names of all registered datasets, sorted."""
    return DATASETS.names()


def _tensors_of(bundle: DataBundle) -> list[tuple[str, Any]]:
    """``(label, tensor)`` pairs of every in-memory split, for the fingerprint."""
    out = []
    for split in ("train", "val", "test", "transfer"):
        data = getattr(bundle, split)
        if isinstance(data, TensorData):
            out += [(f"{split}.x", data.x), (f"{split}.y", data.y)]
            out += [(f"{split}.views.{k}", v) for k, v in sorted(data.views.items())]
    return out


def load_dataset(
    name: str,
    *,
    root: str | Path | None = None,
    split_seed: int = 0,
    val_fraction: float = 0.0,
    holdout: str = "test",
    train_subset: int | None = None,
    **params: Any,
) -> DataBundle:
    """Build the registered dataset ``name``.

    Args:
        name: A registered dataset (see ``list_datasets()``).
        root: Directory holding the dataset files; default ``cache_dir() / "data"``.
        split_seed: Seed of every data split (train/test where the builder makes one, and
            the validation split).
        val_fraction: Share of the training split moved into ``bundle.val`` (0 = none),
            chosen deterministically from ``split_seed``.
        holdout: ``"test"``: ``bundle.test`` is the dataset's test split. ``"val"`` (tuning):
            the test split is dropped unread as soon as the builder returns (no fingerprint,
            label check or loader sees it); ``bundle.test`` is the validation split carved by
            ``val_fraction`` (> 0) and ``bundle.val`` is None. The fingerprint differs.
        train_subset: Keep only this many samples of the training split (a small labelled
            subset, stratified by class and drawn from ``split_seed``), taken after the
            validation split is carved; the rest is dropped. None keeps them all. The
            fingerprint differs.
        **params: The builder's own parameters (``data.params`` in a recipe).

    Returns:
        The ``DataBundle``, with ``info.fingerprint`` covering name, all parameters
        (defaults included) and the bytes of in-memory data.

    Raises:
        RegistryError: Unknown dataset (the message lists close names).
        ConfigError: Unknown or ill-typed parameter, bad ``val_fraction``, ``holdout`` or
            ``train_subset``, missing files.
    """
    builder = DATASETS.get(name)
    checked = validate_kwargs(builder, params, where="data.params", exclude=FRAMEWORK_ARGS)
    check_fraction(val_fraction, "data.val_fraction")
    if holdout not in ("test", "val"):
        raise ConfigError(f"data.holdout: expected 'test' or 'val', got {holdout!r}")
    if holdout == "val" and not val_fraction > 0:
        raise ConfigError(
            "data.holdout=val evaluates on the validation split carved by data.val_fraction, which "
            "is 0; set data.val_fraction in (0, 1), e.g. 0.1, or data.holdout=test"
        )
    root_path = Path(root).expanduser() if root is not None else data_dir()
    try:
        bundle = builder(root=root_path, split_seed=split_seed, **checked)
    except ConfigError as exc:  # e.g. a label below -1: say which dataset it came from
        text = str(exc)
        if name in text:
            raise
        raise type(exc)(f"dataset {name!r}: {text}") from None
    if not isinstance(bundle, DataBundle):
        raise TypeError(f"dataset builder {name!r} returned {type(bundle).__name__}, expected DataBundle")

    if holdout == "val":  # the dataset's test split is dropped here, unread; the carved split takes its place
        bundle = _carve(bundle, name, val_fraction, split_seed, as_test=True)

    resolved = {k: d for k, (_, d) in signature_fields(builder, FRAMEWORK_ARGS).items() if d is not ...}
    resolved.update(checked)
    identity = {"params": resolved, "split_seed": split_seed, "val_fraction": float(val_fraction)}
    if holdout == "val":
        identity["holdout"] = "val"  # other data is evaluated: another fingerprint (a teacher is not shared)
    if train_subset is not None:
        identity["train_samples"] = train_subset  # trained on fewer samples: another fingerprint
    fp = fingerprint(name, identity, _tensors_of(bundle))

    if holdout == "test" and val_fraction > 0:
        bundle = _carve(bundle, name, val_fraction, split_seed, as_test=False)
    if train_subset is not None:
        bundle = _subset(bundle, name, train_subset, split_seed)
    bundle = replace(bundle, info=replace(bundle.info, fingerprint=fp))
    logger.info("%s", bundle.describe())
    return bundle


def with_validation(bundle: DataBundle, fraction: float, seed: int) -> DataBundle:
    """A bundle given in memory (tensors, a ``DataBundle``) with ``fraction`` of its training split
    carved into ``val``, as ``data.val_fraction`` carves a named dataset's; the fingerprint covers it.

    Raises:
        ConfigError: A bad fraction, or the bundle already has a validation split or is not in memory.
    """
    check_fraction(fraction, "data.val_fraction")
    if fraction <= 0:
        return bundle
    carved = _carve(bundle, bundle.info.name, fraction, seed, as_test=False)
    identity = {"given": bundle.info.fingerprint, "val_fraction": float(fraction), "split_seed": seed}
    return replace(carved, info=replace(carved.info, fingerprint=fingerprint(bundle.info.name, identity)))


def _carve(bundle: DataBundle, name: str, fraction: float, seed: int, as_test: bool) -> DataBundle:
    """Move ``fraction`` of the training split into ``val``; with ``as_test`` into ``test``
    instead, replacing the dataset's own test split without reading it (``val`` stays None).

    Raises:
        ConfigError: The dataset has its own validation split, or is not in memory.
    """
    where = "data.holdout=val" if as_test else "data.val_fraction"
    if bundle.val is not None:
        fix = "use data.holdout=test" if as_test else "set data.val_fraction to 0"
        raise ConfigError(
            f"{where}: dataset {name!r} already has a validation split, so none is carved from "
            f"its training split; {fix}"
        )
    if not isinstance(bundle.train, TensorData):
        raise ConfigError(f"{where}: dataset {name!r} is not in memory, cannot carve a validation split")
    keep, held = random_split(len(bundle.train), fraction, seed)
    train, held_out = bundle.train.subset(keep), bundle.train.subset(held)
    if as_test:
        return replace(bundle, train=train, val=None, test=held_out)
    return replace(bundle, train=train, val=held_out)


def _subset(bundle: DataBundle, name: str, n: int, seed: int) -> DataBundle:
    """Keep a class-stratified draw of ``n`` samples of the training split; drop the rest.

    Raises:
        ConfigError: The training split is not in memory, or ``n`` is out of range.
    """
    if not isinstance(bundle.train, TensorData):
        raise ConfigError(f"data.train_samples: dataset {name!r} is not in memory, cannot draw a subset")
    keep = stratified_subset(bundle.train.y, n, seed)  # (n,)
    return replace(bundle, train=bundle.train.subset(keep))
