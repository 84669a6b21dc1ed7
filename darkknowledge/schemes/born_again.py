"""Born-again networks: generations of one architecture, each taught by the one before.

Furlanello, Lipton, Tschannen, Itti & Anandkumar, "Born-Again Neural Networks", ICML 2018
(arXiv:1805.04770), Sec. 3 and 3.1. Generation 0 is trained on the labels alone; generation
``k`` (same architecture, freshly initialised) is trained to match generation ``k-1`` frozen,
the paper's Eq. (1) applied in sequence ("sequence of teaching selves")::

    theta_k = argmin_theta  L( f(x, theta_{k-1}), f(x, theta) )          k = 1 .. K

where ``L`` is here the recipe's ``losses`` objective (normally ``kd``: Hinton's
``alpha * T^2 * KL(p_{k-1}^T || p_k^T) + (1 - alpha) * CE``; the paper's plain BAN is
``kd`` with ``T=1, alpha=1``, i.e. the cross-entropy to the teacher's distribution). The
born-again network ensemble (BANE, Sec. 3.1) averages the generations' predictions::

    f_BANE(x) = 1 / (K + 1) * sum_{i=0..K} softmax(f(x, theta_i))

(the paper's ``f^k(x) = 1/k sum_{i=1..k} f(x, theta_i)`` with its first model = our
generation 0). Tf-KD_self (Yuan et al., CVPR 2020) is this scheme with ``generations: 1``.

Plan: one stage per generation, an offline stage whose frozen teacher is the previous
generation (:func:`~darkknowledge.schemes.offline.offline_task`).

Initialisation: generation 0 starts exactly as the seed's baseline (``ctx.student(seed)``);
generation ``k >= 1`` starts from seed ``generation_seed(seed, k) = seed + 7919 * k``, so every
generation has its own fresh initialisation, reproducible per seed. Every generation sees
the same data order (the run seed) and the recipe's ``train`` settings.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import Field
from torch import nn

from darkknowledge.models import count_params
from darkknowledge.models.ensemble import ProbabilityEnsemble
from darkknowledge.schemes.base import Scheme, SchemeParams, register_scheme
from darkknowledge.schemes.offline import offline_task
from darkknowledge.teachers.frozen import Frozen

if TYPE_CHECKING:
    from darkknowledge.schemes.context import Context

log = logging.getLogger(__name__)

SEED_STRIDE = 7919
"""Generation ``k`` of seed ``s`` is initialised from seed ``s + SEED_STRIDE * k``."""


def generation_seed(seed: int, k: int) -> int:
    """Initialisation seed of generation ``k`` (0 = the baseline's own seed)."""
    return seed + SEED_STRIDE * k


class BornAgainParams(SchemeParams):
    """``scheme.params`` of ``born_again``."""

    generations: Annotated[int, Field(ge=1, le=20)] = Field(
        default=2, description="K, the born-again generations after generation 0"
    )
    ensemble: bool = Field(default=True, description="also report the ensemble of all generations (BANE)")


@register_scheme("born_again")
class BornAgain(Scheme):
    """Born-again networks: K generations of the recipe's student, gen k taught by gen k-1."""

    citation = "Furlanello et al., Born-Again Neural Networks, ICML 2018."
    summary = "generation k (fresh init, same architecture) is taught by generation k-1, frozen"
    report_notes: ClassVar[tuple[str, ...]] = (
        "born_again: the baseline is generation 0 (the student alone); 'student' is the last generation, "
        "'genK' rows the intermediate ones, 'ensemble' the average of all generations' softmax (BANE).",
    )
    example: ClassVar[dict[str, Any]] = {"teacher": None, "scheme": {"params": {"generations": 1}}}
    Params = BornAgainParams

    @classmethod
    def run(cls, ctx: Context, seed: int, params: Any) -> list[dict[str, Any]]:
        """Train generation 0 (or reuse the seed's baseline), then generations 1..K.

        Returns:
            The results entries: the last generation first, then the earlier generations'
            and the ensemble's.
        """
        # scheme.params.transfer: generations k >= 1 also learn from the unlabeled transfer set,
        # labelled by generation k-1's soft targets only; not in the paper, off by default
        # (generation 0, like the baseline, never sees it)
        transfer = ctx.uses_transfer(False)
        models = [cls._generation_zero(ctx, seed)]
        entries: list[dict[str, Any]] = []
        for k in range(1, params.generations + 1):
            student = ctx.model(None, seed=generation_seed(seed, k), where="student")
            task = offline_task(student, ctx.objective(), Frozen(models[-1], f"gen{k - 1}"))
            role = "student" if k == params.generations else f"gen{k}"
            stage = ctx.stage_name(seed, f"gen{k}")
            entries.append(ctx.train(stage, task, seed, role=role, label="born_again", with_transfer=transfer)[0])
            models.append(ctx.exports[stage])
        out = [entries[-1], *entries[:-1]]
        if params.ensemble and len(models) > 1:
            out.append(cls._evaluate_ensemble(ctx, seed, models, entries[-1]))
        return out

    @staticmethod
    def _generation_zero(ctx: Context, seed: int) -> nn.Module:
        """The seed's baseline when ``dk run`` trained it already (same init, same training),
        else a new stage ``born_again-gen0-s<seed>``."""
        model = ctx.student(seed)
        baseline = f"baseline-s{seed}"
        if ctx.reuse(baseline, model):
            log.info("[born_again] generation 0 of seed %d is the baseline %s", seed, baseline)
            ctx.exports[baseline] = model
            return model
        stage = ctx.stage_name(seed, "gen0")
        ctx.train_alone(stage, model, seed, role="gen0")
        return ctx.exports[stage]

    @staticmethod
    def _evaluate_ensemble(ctx: Context, seed: int, models: list[nn.Module], last: dict[str, Any]) -> dict[str, Any]:
        """Evaluate the BANE on the test split and record it as the ``ensemble`` row."""
        metrics = ctx.evaluate(ProbabilityEnsemble(models), seed)
        entry = {
            "name": f"{last['name']}:ensemble",
            "role": "ensemble",
            "model": last.get("model"),
            "seed": seed,
            "scheme": "born_again",
            "method": f"born_again(ensemble of {len(models)})",
            "epochs": last.get("epochs"),
            "steps": 0,
            "train_seconds": 0.0,
            "losses": last.get("losses", []),
            "params": sum(count_params(m) for m in models),
            "extra_params": 0,
            "member_of": last["name"],
            "last_acc": metrics["top1"],
            "last_top5": metrics.get("top5"),
            "best_acc": None,
            "best_selected_on": last.get("best_selected_on"),  # no best epoch of its own; keeps the protocol line
        }
        ctx.record(entry)
        return entry
