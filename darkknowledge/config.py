"""Typed run configuration: YAML recipes + dotted ``key=value`` overrides, validated up front.

Every error names the key's path, the bad value and what is allowed, and is raised before
any model is built or any file is written.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

from darkknowledge.config_raw import apply_overrides, check_plain, deep_merge, parse_override  # noqa: F401 (re-exported)
from darkknowledge.errors import ConfigError
from darkknowledge.recipes import read_recipe, recipe_names  # noqa: F401 (recipe_names: re-exported)
from darkknowledge.validation import format_validation_error, key_hint


def losses_default(terms: Mapping[str, dict[str, Any] | None]) -> Callable[[], dict[str, dict[str, Any] | None]]:
    """A ``default_factory`` for a losses mapping field: a fresh copy of ``terms`` per model."""
    return lambda: copy.deepcopy(dict(terms))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # lr=.inf is a mistake


class ModelConfig(_Strict):
    """A model from the zoo (or ``torchvision:NAME`` / ``timm:NAME`` / ``hf:FOLDER_OR_MODEL_TYPE``)."""

    name: str = Field(description="registry name, see `dk list models`")
    params: dict[str, Any] = Field(default_factory=dict, description="builder keyword arguments")
    checkpoint: str | None = Field(default=None, description="weights to load (exported .pt)")
    input: str | None = Field(
        default=None,
        description="the data view it reads on a paired dataset (cross-modal: "
        "data.views or the dataset's stored views); default the stored input",
    )
    width: float = Field(
        default=1.0,
        gt=0.0,
        description="shrink: multiply the family's channels/units (students/"
        "shrink.py); with `from: teacher` the teacher's family",
    )
    depth: float = Field(default=1.0, gt=0.0, description="shrink: multiply the layers/blocks per stage (>= 1 each)")
    ops: Literal["plain", "depthwise"] = Field(
        default="plain",
        description="depthwise: every k>1 convolution becomes depthwise-separable (students/depthwise.py)",
    )
    quantize: dict[str, Any] | None = Field(
        default=None,
        description="fake-quantized weights/activations, e.g. {bits: 4, act_bits: 4} (students/quant: QuantSpec)",
    )


class AugmentConfig(_Strict):
    """Batch-level augmentation of training inputs."""

    hflip: bool = False
    crop_padding: int = Field(default=0, ge=0)
    shift: int = Field(default=0, ge=0)
    noise: float = Field(default=0.0, ge=0.0)
    scale: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="amplitude: multiply each sample by a factor drawn from [1-scale, 1+scale] (1-D signals)",
    )
    mixup: float = Field(
        default=0.0,
        ge=0.0,
        description="mixup's Beta(a, a) concentration (1: uniform; 0: off): inputs between training points, "
        "without a label; only stages with a teacher mix (data/mixing.py)",
    )
    cutmix: float = Field(default=0.0, ge=0.0, description="cutmix's Beta(a, a) concentration (0: off)")
    mix_prob: float = Field(
        default=1.0, gt=0.0, le=1.0, description="share of samples mixed (needs mixup or cutmix); the rest keep labels"
    )

    def enabled(self) -> bool:
        return bool(self.hflip or self.crop_padding or self.shift or self.noise or self.scale or self.mixes())

    def mixes(self) -> bool:
        """Whether samples are mixed with partners (mixup or cutmix)."""
        return bool(self.mixup or self.cutmix)

    @pydantic.model_validator(mode="after")
    def _mix_prob_needs_mixing(self) -> AugmentConfig:
        if self.mix_prob != 1.0 and not self.mixes():
            raise PydanticCustomError(
                "mix_prob_without_mixing",
                "mix_prob={mix_prob} has nothing to mix: set data.augment.mixup or data.augment.cutmix > 0 "
                "(e.g. mixup: 1.0), or leave mix_prob out",
                {"mix_prob": self.mix_prob},
            )
        return self


class DataConfig(_Strict):
    """Dataset and batching."""

    name: str = "mnist1d"
    params: dict[str, Any] = Field(default_factory=dict, description="dataset builder arguments")
    root: str | None = Field(default=None, description="where downloadable datasets live")
    batch_size: int = Field(default=128, gt=0, description="global batch (split across ranks)")
    eval_batch_size: int = Field(default=1024, gt=0)
    val_fraction: float = Field(default=0.0, ge=0.0, lt=1.0, description="carved from train; best/tuning use it")
    holdout: Literal["test", "val"] = Field(
        default="test",
        description="the split a run evaluates on: the "
        "dataset's test split, or (tuning) the validation split carved by "
        "val_fraction, with the test split dropped unread",
    )
    split_seed: int = 0
    train_samples: int | None = Field(
        default=None,
        gt=0,
        description="train on a class-stratified subset of this many samples of the training split "
        "(drawn from split_seed after val_fraction is carved; the rest is dropped)",
    )
    use_transfer: bool = Field(default=True, description="add the unlabeled transfer set when distilling")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    views: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="derived views for cross-modal runs: {name: {source: VIEW, transform: NAME, params: {...}}}",
    )
    num_workers: int = Field(default=0, ge=0)
    device_data_mb: float = Field(
        default=2048.0,
        ge=0.0,
        description="in-memory datasets up to this size are "
        "copied to the GPU once and indexed there (0: copy each batch from the host)",
    )

    @pydantic.model_validator(mode="after")
    def _holdout_needs_val(self) -> DataConfig:
        if self.holdout == "val" and self.val_fraction <= 0:
            raise PydanticCustomError(
                "holdout_without_val",
                "data.holdout=val evaluates on the validation split carved by data.val_fraction, which is 0; "
                "set data.val_fraction in (0, 1), e.g. data.val_fraction=0.1, or data.holdout=test",
            )
        return self


class OptimizerConfig(_Strict):
    name: Literal["sgd", "adamw", "adam"] = "adamw"
    lr: float = Field(default=1e-3, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0, description="SGD only")
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    fused: bool = Field(default=True, description="torch's fused update kernel where the device has one (same rule)")


class SchedulerConfig(_Strict):
    name: Literal["constant", "cosine", "step", "multistep"] = "cosine"
    warmup_epochs: float = Field(default=0.0, ge=0.0, description="linear warm-up from 0")
    step_size: int = Field(default=30, gt=0, description="step: epochs between decays")
    milestones: list[int] = Field(default_factory=list, description="multistep: decay epochs")
    gamma: float = Field(default=0.1, gt=0.0, le=1.0)
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0, description="cosine floor as a fraction of lr")


class TrainConfig(_Strict):
    """Optimisation and engine settings."""

    epochs: int = Field(default=10, ge=1)
    steps: int | None = Field(
        default=None,
        gt=0,
        description="budget in optimizer steps instead of epochs: trains exactly this many "
        "(epochs = ceil(steps / steps per epoch), the last one cut short) and the LR schedule "
        "spans them; leave epochs at its default",
    )
    min_steps: int | None = Field(
        default=None,
        gt=0,
        description="train.epochs, but at least this many optimizer steps: on a training set too small "
        "for the epochs to reach them, a budget of min_steps steps (the LR schedule spans them)",
    )
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    grad_accum: int = Field(default=1, ge=1)
    clip_grad_norm: float | None = Field(default=None, gt=0.0)
    amp: Literal["off", "auto", "bf16", "fp16"] = "off"
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:N or mps")
    deterministic: bool = False
    eval_every: int = Field(default=1, ge=1)
    checkpoint_every_steps: int | None = Field(default=None, gt=0, description="extra mid-epoch checkpoints")
    compile: bool = Field(
        default=False,
        description="torch.compile student and live teacher (pays off on GPU; "
        "compilation costs tens of seconds on CPU)",
    )
    channels_last: bool = Field(default=False, description="channels_last memory format for 4-D inputs and models")
    keep_host_memory: bool = Field(
        default=True,
        description="CPU runs on glibc: keep freed memory in the process "
        "(mallopt) instead of page-faulting it back in every step",
    )

    @pydantic.model_validator(mode="after")
    def _one_budget(self) -> TrainConfig:
        default = TrainConfig.model_fields["epochs"].default
        if self.steps is not None and self.epochs != default:
            raise PydanticCustomError(
                "two_budgets",
                "steps={steps} and epochs={epochs} are two budgets for one stage; steps sets the epochs "
                "itself, so leave epochs at its default ({default}), or set steps to null to train by "
                "epochs (a teacher inherits train.steps: teacher.train.steps=null)",
                {"steps": self.steps, "epochs": self.epochs, "default": default},
            )
        if self.steps is not None and self.min_steps is not None:
            raise PydanticCustomError(
                "two_budgets",
                "steps={steps} and min_steps={min_steps}: steps is an exact budget; set one of them",
                {"steps": self.steps, "min_steps": self.min_steps},
            )
        return self


class TeacherConfig(ModelConfig):
    """The teacher: loaded from ``checkpoint`` or trained first (and cached for reuse)."""

    train: dict[str, Any] = Field(default_factory=dict, description="overrides of `train` for the teacher")
    seed: int = 0
    reuse: bool = Field(default=True, description="reuse a cached teacher trained with the same settings")


class CacheConfig(_Strict):
    """Teacher-output cache: the frozen teacher's outputs computed once, then read by index.

    ``cache: true`` in a recipe switches it on with these defaults.
    """

    enabled: bool = False
    dtype: Literal["fp16", "bf16", "fp32"] = Field(default="fp16", description="storage dtype of cached tensors")
    topk: int | None = Field(default=None, gt=0, description="keep only the top-k logits (+ the rest's mass)")
    views: int = Field(
        default=4,
        ge=0,
        description="augmented views cached per sample (FKD); 0 = live teacher whenever data.augment is on",
    )
    memory_limit_mb: float = Field(default=1024.0, ge=0.0, description="larger caches are memory-mapped from disk")
    taps: list[str] | None = Field(default=None, description="teacher taps to cache (default: what the losses need)")
    logits: bool | None = Field(default=None, description="cache logits (default: when a loss needs them)")
    seed: int = Field(default=0, ge=0, description="seed of the cached views' augmentation draws")
    live_batches: int | None = Field(
        default=None,
        ge=1,
        description="without a cache: batches the live teacher runs "
        "on at once (same outputs, fewer calls); default: on CPU up to 4 within 1 MiB of "
        "inputs, 1 on accelerators",
    )


class ProfileConfig(_Strict):
    """The student report: size, FLOPs and CPU latency of each trained model (students/profile.py)."""

    enabled: bool = Field(default=True, description="profile each trained model architecture once per run")
    repeats: int = Field(default=10, ge=1, description="timed forward calls; the latency is their median")
    warmup: int = Field(default=2, ge=0, description="untimed forward calls before timing")
    quant_bits: int = Field(default=8, ge=2, le=8, description="a float model's quantized size: weights at these bits")


LOGGERS = ("tensorboard", "mlflow")
"""The loggers a run can send its metrics to (``log.<name>``, ``dk run --log NAME``)."""


class LogConfig(_Strict):
    """Where a run's metrics go besides ``metrics.jsonl`` (engine/loggers.py); each an optional extra.

    ``dk run --log tensorboard,mlflow`` sets ``tensorboard: true`` and ``mlflow: true``. Rank 0
    writes; a resumed run appends to the same event folder and the same MLflow run.
    """

    tensorboard: bool | str = Field(
        default=False, description="true: event files in <run>/tensorboard; a folder: there (extra `tensorboard`)"
    )
    mlflow: bool | str = Field(
        default=False,
        description="true: $MLFLOW_TRACKING_URI when set, else a local "
        "store in <run>/mlflow (sqlite); a tracking URI: that store or server (extra `mlflow`)",
    )
    experiment: str | None = Field(default=None, description="MLflow experiment (default: the recipe name)")

    @pydantic.field_validator("tensorboard", "mlflow", mode="before")
    @classmethod
    def _switch_or_place(cls, value: Any) -> Any:
        if not isinstance(value, (bool, str)) or (isinstance(value, str) and not value.strip()):
            raise ValueError("expected true, false, or a folder (tensorboard) / tracking URI (mlflow)")
        return value

    def asked(self) -> list[str]:
        """The loggers switched on, e.g. ``["tensorboard", "mlflow"]``."""
        return [name for name in LOGGERS if getattr(self, name) is not False]


class SchemeConfig(_Strict):
    """Who teaches whom: a registered scheme (``dk list schemes``) and its parameters.

    A recipe may write ``scheme: mutual`` (no parameters) or
    ``scheme: {name: mutual, params: {peers: 3}}``.
    """

    name: str = Field(default="offline", description="registry name, see `dk list schemes`")
    params: dict[str, Any] = Field(default_factory=dict, description="the scheme's keyword arguments")


class RunConfig(_Strict):
    """A whole run: data, teacher(s), student, scheme, objective, training."""

    name: str = "run"
    description: str = ""
    seed: int = 0
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1, description="seeds of `dk run`")
    scheme: SchemeConfig = Field(default_factory=SchemeConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig | None = None
    teachers: list[TeacherConfig] = Field(default_factory=list, description="more teachers (multi_teacher)")
    student: ModelConfig = Field(default_factory=lambda: ModelConfig(name="mlp"))
    losses: dict[str, dict[str, Any] | None] = Field(default_factory=losses_default({"kd": {}}))
    train: TrainConfig = Field(default_factory=TrainConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    profile: ProfileConfig = Field(default_factory=ProfileConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @pydantic.field_validator("scheme", mode="before")
    @classmethod
    def _scheme_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @pydantic.field_validator("cache", mode="before")
    @classmethod
    def _cache_switch(cls, value: Any) -> Any:
        return {"enabled": value} if isinstance(value, bool) else value

    def teacher_train(self, spec: TeacherConfig | None = None, where: str = "teacher") -> TrainConfig:
        """A teacher's training settings: ``train`` with ``<teacher>.train`` merged over it."""
        spec = spec if spec is not None else self.teacher
        merged = deep_merge(self.train.model_dump(), (spec.train if spec else {}) or {})
        try:
            return TrainConfig(**merged)
        except pydantic.ValidationError as exc:
            raise ConfigError(format_validation_error(exc, f"{where}.train")) from None

    def all_teachers(self) -> list[tuple[str, TeacherConfig]]:
        """``teacher`` then each of ``teachers``, with their config paths (``teachers.1``)."""
        named = [("teacher", self.teacher)] if self.teacher is not None else []
        return named + [(f"teachers.{i}", t) for i, t in enumerate(self.teachers)]


def validate_config(raw: Mapping[str, Any]) -> RunConfig:
    """Validate a raw mapping into a :class:`RunConfig` (key paths and values in errors).

    Raises:
        ConfigError: Not a mapping, not plain data, an unknown key, or a bad value.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a recipe must be a mapping of keys, got {type(raw).__name__}")
    if raw.get("kind") == "lm":
        raise ConfigError(
            "this recipe is a language-model run (kind: lm): run it with `dk run RECIPE`; "
            "dk distill, dk train and the bench take classification recipes"
        )
    fields = RunConfig.model_fields
    for key in raw:
        if key not in fields:
            shown = key if isinstance(key, str) and key.isprintable() else repr(key)
            raise ConfigError(f"{shown}: unknown key.{key_hint(str(key), RunConfig)} Valid keys: {', '.join(fields)}.")
    check_plain(raw, "")
    try:
        return RunConfig(**student_from_teacher(raw))
    except pydantic.ValidationError as exc:
        raise ConfigError(_with_hints(exc)) from None


def student_from_teacher(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    """``student: {from: teacher, width: 0.5}``: the teacher's family (its name and params), then
    shrunk or converted by the student's other keys (``width``, ``depth``, ``ops``, ``quantize``)."""
    student = raw.get("student")
    if not isinstance(student, Mapping) or "from" not in student:
        return raw
    source, teacher = student["from"], raw.get("teacher")
    if source != "teacher":
        raise ConfigError(f"student.from: {source!r} is not a model to derive from; valid: 'teacher'")
    if not isinstance(teacher, Mapping) or "name" not in teacher:
        raise ConfigError("student.from: 'teacher' needs a `teacher:` section with a name")
    if "name" in student:
        raise ConfigError(
            f"student: give `from: teacher` or `name: {student['name']}`, not both (to override a "
            "recipe's student on the command line, replace the section: student={from: teacher, "
            "width: 0.5})"
        )
    rest = {k: v for k, v in student.items() if k != "from"}
    return {
        **raw,
        "student": {"name": teacher["name"], "params": copy.deepcopy(dict(teacher.get("params") or {})), **rest},
    }


def _with_hints(exc: pydantic.ValidationError, root: type[BaseModel] | None = None) -> str:
    """Error text with a "did you mean" for unknown nested keys (of ``root``, default :class:`RunConfig`)."""
    msg = format_validation_error(exc)
    for err in exc.errors():
        if err["type"] == "extra_forbidden":
            loc = [str(p) for p in err["loc"]]
            model: Any = root or RunConfig
            for part in loc[:-1]:
                f = getattr(model, "model_fields", {}).get(part)
                ann = getattr(f, "annotation", None)
                model = next((a for a in getattr(ann, "__args__", (ann,)) if hasattr(a, "model_fields")), None)
                if model is None:
                    break
            if model is not None:
                msg += f" ({'.'.join(loc)}:{key_hint(loc[-1], model, '.'.join(loc[:-1])) or ' no close key'})"
    return msg


def load_config(recipe: str | Mapping[str, Any] | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a recipe (name, path or mapping), apply overrides, validate.

    Args:
        recipe: Shipped recipe name, YAML path, a mapping, or None for the defaults.
        overrides: Dotted ``key=value`` strings, e.g. ``["train.epochs=3", "seed=1"]``.
    """
    if recipe is None:
        raw: dict[str, Any] = {}
    elif isinstance(recipe, Mapping):
        check_plain(recipe, "")  # before copying: a self-containing or very deep mapping fails here, clearly
        raw = copy.deepcopy(dict(recipe))
    else:
        raw = read_recipe(recipe)
    return validate_config(apply_overrides(raw, overrides))
