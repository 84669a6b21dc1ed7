"""A directory of images, one sub-directory per class (the ImageFolder layout)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field

from darkknowledge.data.bundle import DataBundle, DatasetInfo, TensorData
from darkknowledge.data.catalog import register_dataset
from darkknowledge.data.sources.common import VISION_EXTRA, DataFormatError, channel_stats
from darkknowledge.errors import ConfigError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
LAYOUT_HINT = (
    "Expected <root>/train/<class>/*.png|jpg and <root>/test/<class>/... (or val/); "
    "set data.root to the directory holding train/."
)


def class_dirs(split_dir: Path) -> list[str]:
    """Sorted names of the class sub-directories of ``split_dir``."""
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_files(class_dir: Path) -> list[Path]:
    """Sorted image files directly inside ``class_dir``."""
    return sorted(p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _pil_image() -> Any:
    """``PIL.Image``, or a ``ConfigError`` saying how to install pillow."""
    try:
        from PIL import Image
    except ImportError:
        raise ConfigError(f"image_folder needs pillow to read images: {VISION_EXTRA} (or pip install pillow)") from None
    return Image


def load_image(path: Path, image_size: int) -> np.ndarray:
    """One RGB image resized to ``image_size`` x ``image_size``, as ``(3, S, S)`` uint8."""
    Image = _pil_image()  # the module's own name
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
            if rgb.size != (image_size, image_size):
                bilinear = getattr(Image, "Resampling", Image).BILINEAR  # Resampling: pillow>=9.1
                rgb = rgb.resize((image_size, image_size), bilinear)
            array = np.asarray(rgb, dtype=np.uint8)  # (S, S, 3)
    except OSError as exc:
        raise DataFormatError(f"cannot read image {path}: {exc}") from None
    return array.transpose(2, 0, 1).copy()  # (3, S, S)


def read_split(split_dir: Path, classes: list[str], image_size: int) -> TensorData:
    """All images of one split; labels index into ``classes``.

    Raises:
        ConfigError: A class directory not among ``classes`` (the train split's classes).
    """
    unknown = [c for c in class_dirs(split_dir) if c not in classes]
    if unknown:
        raise ConfigError(f"image_folder: {split_dir} has classes {unknown} that train/ does not have")
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        folder = split_dir / name
        if not folder.is_dir():
            continue
        for path in image_files(folder):
            images.append(load_image(path, image_size))
            labels.append(label)
    if not images:
        raise ConfigError(f"image_folder: no images (*{'|*'.join(sorted(IMAGE_SUFFIXES))}) under {split_dir}")
    x = torch.from_numpy(np.stack(images))  # (N, 3, S, S) uint8
    return TensorData(x, torch.tensor(labels, dtype=torch.int64))


def example(root: Path, variant: int = 0) -> dict[str, Any]:
    """Three classes of two 6x6 PNG images each in ``train/`` and ``test/`` (needs pillow)."""
    image = _pil_image()
    rng = np.random.default_rng(variant)
    for split in ("train", "test"):
        for name in ("ant", "bee", "cat"):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(2):
                image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return {"image_size": 8}


@register_dataset("image_folder", example=example)
def image_folder(
    *,
    root: Path,
    split_seed: int,
    image_size: Annotated[int, Field(ge=1)] = 32,
) -> DataBundle:
    """Images under ``<root>/train/<class>/`` and ``<root>/test/<class>/`` (or ``val/``).

    Classes are the train split's sub-directories in alphabetical order. Images are
    converted to RGB, resized (bilinear) to ``image_size`` and kept as ``uint8``. When both
    ``test/`` and ``val/`` exist, ``val/`` becomes the validation split.

    Args:
        root: Directory holding ``train/`` and ``test/`` or ``val/``.
        split_seed: Unused (the split comes from the directories).
        image_size: Side length of the square images.
    """
    del split_seed
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise ConfigError(f"image_folder: no directory {train_dir}. {LAYOUT_HINT}")
    held_out = [root / name for name in ("test", "val") if (root / name).is_dir()]
    if not held_out:
        raise ConfigError(f"image_folder: neither {root / 'test'} nor {root / 'val'} exists. {LAYOUT_HINT}")
    classes = class_dirs(train_dir)
    if not classes:
        raise ConfigError(f"image_folder: {train_dir} has no class sub-directories. {LAYOUT_HINT}")
    _pil_image()  # fail early, before walking the directories
    logger.info("image_folder: reading %s (%d classes)", root, len(classes))
    train = read_split(train_dir, classes, image_size)
    test = read_split(held_out[0], classes, image_size)
    val = read_split(held_out[1], classes, image_size) if len(held_out) > 1 else None
    mean, std = channel_stats(train.x)
    info = DatasetInfo("image_folder", len(classes), train.sample_shape, mean=mean, std=std, class_names=tuple(classes))
    return DataBundle(train=train, test=test, info=info, val=val)
