"""MNIST-1D generated offline with the ``mnist1d`` package, cached as ``.npz``.

The package's ``make_dataset`` draws samples from numpy's global RNG and standardises the
whole generated set with one scalar mean and std (computed over train and test together)
before splitting 80/20. We reproduce that loop exactly (same samples, bit for bit) but keep
the raw mean/std, so that extra unlabeled *transfer* samples, generated with a different
seed, go through the very same affine map as the training split. ``get_dataset()`` is never
called: it downloads.
"""

from __future__ import annotations

import importlib.metadata
import logging
import random
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field

from darkknowledge.data.batch import UNLABELED
from darkknowledge.data.bundle import DataBundle, DatasetInfo, TensorData
from darkknowledge.data.cache import data_dir, load_npz, save_npz_atomic
from darkknowledge.data.catalog import register_dataset
from darkknowledge.data.fingerprint import hash_params
from darkknowledge.data.seeds import TRANSFER_STREAM, derive_seed

logger = logging.getLogger(__name__)

NUM_CLASSES = 10
SEQ_LEN = 40
CACHE_VERSION = 1  # bump when the cached layout or the generation changes


def _package_version() -> str:
    try:
        return importlib.metadata.version("mnist1d")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _generator_args(num_samples: int, seed: int) -> Any:
    """The package's default generation args with our sample count and seed."""
    from mnist1d.data import get_dataset_args

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    return args


def generate_raw(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Generate unnormalised MNIST-1D samples exactly as ``mnist1d.data.make_dataset`` does.

    numpy's and Python's global RNG states are restored afterwards, so generating data does
    not disturb the caller's random streams.

    Args:
        num_samples: Requested samples; ``num_samples // 10`` are made per class.
        seed: The generator's seed.

    Returns:
        ``(x, y)``: raw signals ``(M, 40)`` float64 and labels ``(M,)`` int64, shuffled,
        with ``M = 10 * (num_samples // 10)``.
    """
    from mnist1d.data import get_templates
    from mnist1d.transform import transform
    from mnist1d.utils import set_seed

    args = _generator_args(num_samples, seed)
    templates = get_templates()
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        set_seed(args.seed)
        xs, ys = [], []
        per_class = args.num_samples // len(templates["y"])
        for label_ix in range(len(templates["y"])):
            for _ in range(per_class):
                x, _t = transform(templates["x"][label_ix], templates["t"], args)
                xs.append(x)
                ys.append(templates["y"][label_ix])
        order = np.random.permutation(len(ys))
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    if not xs:
        return np.zeros((0, args.final_seq_length)), np.zeros((0,), dtype=np.int64)
    return np.stack(xs)[order], np.stack(ys).astype(np.int64)[order]


def _main_arrays(num_samples: int, seed: int) -> dict[str, np.ndarray]:
    """Train/test arrays plus the raw mean/std, from the cache or freshly generated."""
    key = hash_params({"v": CACHE_VERSION, "pkg": _package_version(), "n": num_samples, "seed": seed})
    path = data_dir() / f"mnist1d-{key}.npz"
    keys = ("x", "y", "x_test", "y_test", "raw_mean", "raw_std")
    cached = load_npz(path, keys)
    if cached is not None:
        logger.debug("mnist1d: using cached %s", path)
        return cached
    logger.info("mnist1d: generating %d samples (seed %d) into %s", num_samples, seed, path)
    xs, ys = generate_raw(num_samples, seed)
    raw_mean, raw_std = xs.mean(), xs.std()
    xs = (xs - raw_mean) / raw_std  # as make_dataset: one scalar over all samples
    split = int(len(ys) * _generator_args(num_samples, seed).train_split)
    arrays = {
        "x": xs[:split].astype(np.float32),
        "y": ys[:split],
        "x_test": xs[split:].astype(np.float32),
        "y_test": ys[split:],
        "raw_mean": np.asarray(raw_mean, dtype=np.float64),
        "raw_std": np.asarray(raw_std, dtype=np.float64),
    }
    save_npz_atomic(path, **arrays)
    return arrays


def _transfer_arrays(num_samples: int, seed: int, count: int, raw_mean: float, raw_std: float) -> np.ndarray:
    """``count`` extra samples normalised with the training split's mean/std (cached)."""
    transfer_seed = derive_seed(seed, TRANSFER_STREAM) % (2**32)  # numpy seeds are 32-bit
    key = hash_params(
        {"v": CACHE_VERSION, "pkg": _package_version(), "n": num_samples, "seed": seed, "transfer": count}
    )
    path = data_dir() / f"mnist1d-transfer-{key}.npz"
    cached = load_npz(path, ("x",))
    if cached is not None:
        return cached["x"]
    logger.info("mnist1d: generating %d transfer samples (seed %d) into %s", count, transfer_seed, path)
    per_class = -(-count // NUM_CLASSES)  # ceil: the generator makes whole classes
    xs, _ = generate_raw(per_class * NUM_CLASSES, transfer_seed)
    x = ((xs[:count] - raw_mean) / raw_std).astype(np.float32)  # same map as the train split
    save_npz_atomic(path, x=x)
    return x


@register_dataset(
    "mnist1d", example=lambda root, variant: {"num_samples": 200, "transfer_samples": 40, "seed": 42 + variant}
)
def mnist1d(
    *,
    root: Path,
    split_seed: int,
    num_samples: Annotated[int, Field(ge=NUM_CLASSES)] = 5000,
    transfer_samples: Annotated[int, Field(ge=0)] = 0,
    seed: Annotated[int, Field(ge=0)] = 42,
) -> DataBundle:
    """MNIST-1D: 10 classes of length-40 float32 signals, already standardised.

    Args:
        root: Unused (arrays are cached under ``cache_dir()/data``).
        split_seed: Unused (the package's fixed 80/20 split is kept).
        num_samples: Labeled samples generated; 80% train, 20% test (5000 -> 4000/1000).
        transfer_samples: Extra unlabeled samples (``y == UNLABELED``) from the same
            distribution, generated with a seed derived from ``seed``.
        seed: The generator's seed (42 reproduces the published MNIST-1D).
    """
    del root, split_seed
    arrays = _main_arrays(num_samples, seed)
    train = TensorData(torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"]))
    test = TensorData(torch.from_numpy(arrays["x_test"]), torch.from_numpy(arrays["y_test"]))
    transfer = None
    if transfer_samples > 0:
        x_tr = _transfer_arrays(
            num_samples, seed, transfer_samples, float(arrays["raw_mean"]), float(arrays["raw_std"])
        )
        unlabeled = torch.full((x_tr.shape[0],), UNLABELED, dtype=torch.int64)  # (M,)
        transfer = TensorData(torch.from_numpy(x_tr), unlabeled)
    info = DatasetInfo(name="mnist1d", num_classes=NUM_CLASSES, input_shape=(SEQ_LEN,), view="signal")
    return DataBundle(train=train, test=test, info=info, transfer=transfer)
