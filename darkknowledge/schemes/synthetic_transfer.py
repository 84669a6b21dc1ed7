"""Generator-made transfer data for ordinary distillation: real batches plus synthesised samples.

The survey's first use of a GAN structure in adversarial distillation (Gou et al., IJCV 2021,
Sec. 5.1, case (a)): a generator trained against the teacher and the student (e.g. ``dfad``'s,
which seeks the inputs where they disagree most) adds synthetic, unlabelled samples to every
real batch; the frozen teacher labels them by its outputs, as it does the unlabelled transfer set
of Hinton et al. The student learns the recipe's ``losses`` (cross-entropy reads the real samples'
labels only; response and feature terms read every sample).

Compare it in the same run folder, or the same benchmark suite, with the same objective on the
real data alone (the offline scheme): the difference is what the generated samples add.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from darkknowledge.schemes.base import Scheme, SchemeParams, register_scheme
from darkknowledge.schemes.context import Context
from darkknowledge.schemes.data_free import SynthesizerSpec, synthetic_task
from darkknowledge.schemes.synthetic import SyntheticTask


class SyntheticTransferParams(SchemeParams):
    """``scheme.params`` of ``synthetic_transfer``."""

    synthesizer: SynthesizerSpec = Field(description="how the extra samples are made (e.g. dfad's generator)")
    synthetic_batch: int | None = Field(
        default=None,
        ge=1,
        description="synthesised samples added to each real batch (default: half of data.batch_size)",
    )
    samples: int = Field(default=64, ge=0, description="synthesised samples kept for the report (samples.pt)")


@register_scheme("synthetic_transfer")
class SyntheticTransfer(Scheme):
    """Each real batch is extended by a generator's samples, labelled by the teacher alone."""

    default_transfer = True
    citation = (
        "Gou et al., Knowledge Distillation: A Survey, IJCV 2021 (Sec. 5.1, generator-made transfer "
        "data); Fang et al., Data-Free Adversarial Distillation, arXiv:1912.11006, 2019 (the generator)."
    )
    summary = "a generator trained against teacher and student adds synthetic samples to every real batch"
    Params = SyntheticTransferParams
    example: ClassVar[dict[str, Any]] = {
        "losses": {"ce": {}, "kd": {"T": 4.0, "alpha": 1.0}},
        "scheme": {
            "params": {"synthesizer": {"name": "dfad", "params": {"latent_dim": 8, "every": 2}}, "synthetic_batch": 8}
        },
    }

    @classmethod
    def label(cls, ctx: Context, params: Any) -> str:
        return f"{'+'.join(ctx.cfg.losses)} + {params.synthesizer.name} samples"

    @classmethod
    def task(cls, ctx: Context, seed: int, params: Any) -> SyntheticTask:
        extra = params.synthetic_batch or max(1, ctx.cfg.data.batch_size // 2)
        return synthetic_task(
            ctx, seed, params.synthesizer, ctx.stage_name(seed), extra, 1, real=True, samples=params.samples
        )
