"""Built-in dataset builders; importing this package registers them."""

from __future__ import annotations

from darkknowledge.data.sources import (  # noqa: F401  (imported for registration)
    cifar,
    image_folder,
    mnist1d_generated,
    mnist_idx,
    sklearn_digits,
)
