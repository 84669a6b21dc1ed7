"""Data given to the Python API as objects (``dk.train``, ``dk.distill``): tensors or a bundle.

A dataset named by string is loaded by the run like a recipe's; data passed as tensors or a
:class:`~darkknowledge.data.bundle.DataBundle` is checked and wrapped here, and these helpers tell
the default objective what it may do with it (blend it with mixup, carve a validation split).
"""

from __future__ import annotations

from typing import Any

import torch

from darkknowledge.data.bundle import DataBundle, DatasetInfo
from darkknowledge.data.fingerprint import fingerprint
from darkknowledge.data.tensors import TensorData
from darkknowledge.errors import ConfigError

DataLike = str | DataBundle | tuple
"""What the Python API takes as ``data``."""

LOADING_KEYS = ("params", "root", "holdout", "train_samples")
"""``data`` keys that say how a named dataset is loaded: meaningless for data given as objects
(``val_fraction`` and ``split_seed`` carve a validation split from given data too)."""


def given_data(data: DataLike, num_classes: int | None) -> tuple[dict[str, Any], DataBundle | None]:
    """The ``data`` config and the bundle of what the user passed: a dataset name becomes ``data.name``
    (loaded later, no bundle); a ``DataBundle`` is used as it is; ``((x, y), (x_test, y_test))`` tensors
    become a bundle named ``tensors`` (class count from the labels unless ``num_classes`` is given).

    Raises:
        ConfigError: Mismatched shapes, labels out of range, fewer than two classes, or another type.
    """
    if isinstance(data, str):
        return {"name": data}, None
    if isinstance(data, DataBundle):
        return {"name": data.info.name}, data
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(d, tuple) and len(d) == 2 for d in data):
        (x, y), (xt, yt) = data
        x, y, xt, yt = (torch.as_tensor(v) for v in (x, y, xt, yt))
        train, test = TensorData(x, y), TensorData(xt, yt)  # checks lengths and integer labels
        if tuple(xt.shape[1:]) != tuple(x.shape[1:]):
            raise ConfigError(
                f"data: test inputs have shape {tuple(xt.shape[1:])} per sample but training inputs "
                f"{tuple(x.shape[1:])}; both splits must have the same input shape"
            )
        top = int(max(train.y.max(), test.y.max())) if len(train) and len(test) else -1
        if num_classes is not None and not (isinstance(num_classes, int) and num_classes >= 2):
            raise ConfigError(f"num_classes: expected an integer >= 2, got {num_classes!r}")
        k = num_classes or top + 1
        if top >= k:
            raise ConfigError(
                f"data: label {top} is outside the class range 0..{k - 1} of num_classes={k}; "
                f"use labels 0..{k - 1} or num_classes >= {top + 1}"
            )
        if k < 2:
            raise ConfigError(f"data: the labels hold {k} class(es); a classifier needs at least 2")
        info = DatasetInfo(
            name="tensors",
            num_classes=k,
            input_shape=tuple(x.shape[1:]),
            fingerprint=fingerprint("tensors", {}, [("x", x), ("y", y), ("xt", xt), ("yt", yt)]),
        )
        return {"name": "tensors"}, DataBundle(train=train, test=test, info=info)
    raise ConfigError(
        f"data: expected a dataset name (see `dk list datasets`), a DataBundle, or ((x, y), (x_test, y_test)) "
        f"tensors; got {type(data).__name__}"
    )


def validation_source(data_cfg: dict[str, Any], bundle: DataBundle | None) -> str:
    """Where the default objective's validation split comes from: ``own`` (a given bundle has one),
    ``carve`` (``data.val_fraction`` can carve one) or ``unknown`` (an image folder may hold one)."""
    if bundle is not None:
        return "own" if bundle.val is not None else "carve"
    return "unknown" if data_cfg.get("name") == "image_folder" else "carve"


def mixable(bundle: DataBundle | None) -> bool:
    """Whether mixup can blend the training inputs: floating-point or ``uint8`` inputs of one view
    (a named dataset's are); not integer token ids, nor a paired dataset's several views."""
    if bundle is None:
        return True
    train = bundle.train
    if isinstance(train, TensorData):
        if train.views:
            return False
        x = train.x
    else:
        x = torch.as_tensor(train[0][0])
    return bool(x.is_floating_point() or x.dtype == torch.uint8)
