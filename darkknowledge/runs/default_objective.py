"""What ``dk.distill`` does when the user names no objective: function matching, patiently.

Chosen with ``dk bench small-data`` (``darkknowledge/bench/suites/small-data.yaml``: three
built-in datasets, whole and as 50-500-sample labelled subsets, no unlabelled transfer set, 5
seeds; the table is in the README). Hinton KD as it was the default (T=4, alpha=0.9, 10
epochs) lost to the student trained alone on small labelled sets, even with a much better
teacher; function matching (Beyer, Zhai, Royer, Markeeva, Anil, Kolesnikov, "Knowledge
distillation: A good teacher is patient and consistent", CVPR 2022) is what the table chose:

* **consistent views**: the teacher scores exactly the input the student trains on;
* **inputs between the training points**: every training input is mixed with a partner
  (mixup, ``lam ~ Beta(1, 1)``); a mixed input has no label, so only the teacher teaches on
  it. An unlabelled transfer set, when the data has one, joins the training data and the pool
  of partners;
* **the pure KL to the teacher** at ``T = 1`` (``kd: {T: 1, alpha: 1}``: no label term);
* **patience**: ``train.epochs`` 10, but at least ``MIN_STEPS`` optimizer steps, over which the
  cosine schedule decays (``train.min_steps``): a small set gets a long schedule (30,000 steps:
  at 10,000 the MLP on the whole of MNIST-1D gained nothing from a teacher 27 points better);
* **no worse than the student alone**: the same student also trains alone (cross-entropy, the
  same initialisation and budget) and the one better on a validation split is delivered
  (``scheme.params.keep_better``, :mod:`darkknowledge.schemes.keep_better`): a teacher no better
  than the student has nothing to transfer, and no objective that listens to it wins then. The
  split is ``VAL_FRACTION`` of the training data unless the data has its own or the user chose.

Inputs that cannot be mixed (integer token ids) keep Hinton KD without mixing. Whatever the user
sets in ``losses``, ``epochs``, ``train`` or ``data.augment`` is theirs: the default fills only
what they left out.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

log = logging.getLogger(__name__)

LOSSES: dict[str, dict[str, Any]] = {"kd": {"T": 1.0, "alpha": 1.0}}
"""The default objective: KL(teacher || student) at T = 1 on every view."""

MIXUP = 1.0
"""Mixup's Beta(a, a) concentration: a uniform share of each partner."""

EPOCHS = 10
"""Epochs of a default run (as ``dk.train``)."""

MIN_STEPS = 30_000
"""At least this many optimizer steps: the patient schedule on a small training set."""

VAL_FRACTION = 0.1
"""Share of the training split held out to choose between the distilled student and the student alone."""

FALLBACK_LOSSES: dict[str, dict[str, Any]] = {"kd": {}}
"""Inputs that cannot be mixed (token ids): Hinton KD with its defaults (T=4, alpha=0.9)."""


def default_config(
    config: dict[str, Any] | None, mixable: bool, epochs_given: bool, validation: str = "carve"
) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """The losses and the config keys of the default objective, around the user's ``config``.

    Args:
        config: The user's ``config=`` mapping (not changed).
        mixable: Whether the training inputs are floating point (images, signals, features),
            which mixup can blend; False for integer token ids.
        epochs_given: The user passed ``epochs``: their budget, not the patient one.
        validation: Where a validation split comes from: ``"own"`` (the data has one), ``"carve"``
            (``data.val_fraction`` can carve one) or ``"unknown"`` (a folder that may hold one).

    Returns:
        ``(losses, config)``: the default losses and ``config`` with the default's keys added where
        the user set none of their own: ``data.augment.mixup``; ``train.min_steps`` unless the user
        passed ``epochs`` or set ``train.epochs``, ``train.steps`` or ``train.min_steps``;
        ``data.val_fraction`` (``VAL_FRACTION``) where a split can be carved, the user set neither
        it nor ``data.holdout`` and did not turn ``keep_better`` off; and ``scheme.params.keep_better``
        when there will be a validation split to choose on (else a warning says the run cannot check
        against the student alone).
    """
    if not mixable:
        log.info("dk.distill: the inputs are token ids, which mixup cannot blend: Hinton KD (T=4, alpha=0.9)")
        return copy.deepcopy(FALLBACK_LOSSES), config
    if config is not None and not isinstance(config, dict):
        return copy.deepcopy(LOSSES), config  # not a mapping: the config check names it
    out = copy.deepcopy(config) if config else {}
    augment = _node(out, "data", "augment")
    if augment is not None and "mixup" not in augment and "cutmix" not in augment:  # a mixing set (0: off) is theirs
        augment["mixup"] = MIXUP
    train = _node(out, "train")
    if train is not None and not epochs_given and not any(k in train for k in ("epochs", "steps", "min_steps")):
        train["min_steps"] = MIN_STEPS
    data = _node(out, "data")
    params = _node(out, "scheme", "params")
    choose = params is not None and params.get("keep_better", True) is True  # off only when the user says so
    if choose and data is not None and validation == "carve" and not {"val_fraction", "holdout"} & set(data):
        data["val_fraction"] = VAL_FRACTION  # the split the choice is made on
    if params is not None and "keep_better" not in params:
        if _will_have_validation(data, validation):
            params["keep_better"] = True
        else:
            log.warning(
                "dk.distill: no validation split, so the distilled student cannot be checked against the "
                "student trained alone; set config={'data': {'val_fraction': 0.1}} to have the better one kept"
            )
    return copy.deepcopy(LOSSES), out


def _will_have_validation(data: dict[str, Any] | None, validation: str) -> bool:
    """Whether the run's data will have a validation split (``data``: the config's ``data`` mapping)."""
    if validation == "own":
        return True
    if data is None or data.get("holdout") == "val":  # holdout=val makes the carved split the test split
        return False
    fraction = data.get("val_fraction", 0)
    return isinstance(fraction, (int, float)) and fraction > 0


def _node(config: dict[str, Any], *path: str) -> dict[str, Any] | None:
    """The mapping at ``path`` in ``config``, made where missing; None where the user put something
    else there (the config check names it)."""
    node: Any = config
    for key in path:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            return None
    return node
