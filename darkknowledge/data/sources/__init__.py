"""Built-in dataset builders, one file each; importing this package registers them."""

from __future__ import annotations

from darkknowledge.discovery import import_modules

import_modules(__name__, __path__)
