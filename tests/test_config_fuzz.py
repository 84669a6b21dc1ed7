"""Fuzz the config loader and the override parser: any input gives a config or one ConfigError.

Random dotted keys (real config paths, near misses, junk), random YAML values (numbers in
every notation, booleans, nulls, tags, dates, aliases, deep nesting, unicode, long text) and
random nested Python values are applied to the shipped quickstart recipe. Nothing may escape
as another exception; a config that validates must survive what the run does with it next
(written as YAML, read back to the same config, the teacher's merged training settings).
Deterministic (``derandomize``) and a few seconds in all.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from darkknowledge.config import (
    RunConfig,
    TrainConfig,
    apply_overrides,
    deep_merge,
    load_config,
    parse_override,
    read_recipe,
    validate_config,
)
from darkknowledge.errors import ConfigError, DarkKnowledgeError

QUICKSTART = read_recipe("quickstart")

FUZZ = settings(
    max_examples=100, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)

REAL_PATHS = [
    "name",
    "description",
    "seed",
    "seeds",
    "scheme",
    "scheme.name",
    "scheme.params.peers",
    "cache",
    "cache.enabled",
    "cache.dtype",
    "cache.topk",
    "data",
    "data.name",
    "data.batch_size",
    "data.val_fraction",
    "data.params",
    "data.params.num_samples",
    "data.augment.noise",
    "data.augment.hflip",
    "teacher",
    "teacher.name",
    "teacher.train",
    "teacher.train.epochs",
    "teacher.train.optimizer.lr",
    "teacher.seed",
    "teacher.reuse",
    "teachers",
    "student",
    "student.name",
    "student.params.hidden",
    "losses",
    "losses.kd",
    "losses.kd.T",
    "losses.ce.weight",
    "train",
    "train.epochs",
    "train.optimizer",
    "train.optimizer.lr",
    "train.optimizer.name",
    "train.optimizer.betas",
    "train.scheduler.name",
    "train.scheduler.milestones",
    "train.clip_grad_norm",
    "train.amp",
    "train.grad_accum",
    "train.checkpoint_every_steps",
    "train.device",
]
"""Paths that exist in the config (some free-form: ``data.params``, ``losses.kd``, ``scheme.params``)."""

# ------------------------------------------------------------------ strategies

name_part = st.one_of(
    st.sampled_from(["train", "epochs", "optimizer", "lr", "data", "params", "kd", "T", "x", "epoch", "trian"]),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="=."), min_size=1, max_size=12),
)
dotted_key = st.one_of(
    st.sampled_from(REAL_PATHS),
    st.lists(name_part, min_size=1, max_size=6).map(".".join),
    st.builds(lambda p, extra: f"{p}.{extra}", st.sampled_from(REAL_PATHS), name_part),
    st.text(max_size=20),  # anything, dots and empty parts included
)

number_text = st.one_of(
    st.integers(-(10**30), 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.builds(lambda m, e: f"{m}e{e}", st.integers(-99, 99), st.integers(-400, 400)),  # 1e-3: YAML 1.1 reads text
    st.builds(
        lambda m, e: f"{m}E+{e}", st.floats(0, 10, allow_nan=False).map(lambda v: f"{v:.3g}"), st.integers(0, 40)
    ),
    st.sampled_from([".inf", "-.inf", ".nan", "0x1F", "0o17", "017", "1_000", "+3", "-0", "1:30", "190:20:30"]),
)
scalar_text = st.one_of(
    number_text,
    st.sampled_from(["true", "false", "yes", "no", "on", "off", "True", "null", "~", "", "  ", "''", '""']),
    st.sampled_from(
        [
            "2020-01-01",
            "2001-13-45",
            "2001-12-14t21:59:43.10-05:00",
            "!!int x",
            "!!float x",
            "!!bool x",
            "!!timestamp x",
            "!!binary aGVsbG8=",
            "!!set {a, b}",
            "!!str 3",
            "!!null ''",
            "&a [*a]",
            "&a {x: *a}",
            "*undefined",
            "!!python/object:os.system x",
            "{? [1]: 2}",
            "[1, 2",
            "{a: 1",
            "a: b: c",
            "- 1\n- 2",
            "'unterminated",
            "\t",
            "%YAML 1.1\n--- 3",
        ]
    ),
    st.integers(1, 300).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 300).map(lambda n: "{a: " * n + "1" + "}" * n),
    st.text(max_size=40),
    st.text(min_size=1, max_size=3).map(lambda t: t * 2000),  # very long
)
yaml_value_text = st.one_of(
    scalar_text,
    st.lists(scalar_text.filter(lambda t: "\n" not in t), max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
    st.dictionaries(
        st.sampled_from(["a", "lr", "epochs", "T", "name", "1"]),
        scalar_text.filter(lambda t: "\n" not in t and "," not in t),
        max_size=3,
    ).map(lambda d: "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"),
)
override = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", dotted_key, yaml_value_text),
    st.text(max_size=30),  # no '=' at all, or '=' first
)

plain_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(),
    st.text(max_size=30),
    st.sampled_from(["1e-3", "5E4", "adamw", "sgd", "cosine", "mnist1d", "mlp", "kd", "fp16", "auto"]),
)
plain_value = st.recursive(
    plain_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.tuples(inner, inner), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
odd_value = st.one_of(
    st.binary(max_size=4),
    st.frozensets(st.integers(), max_size=2),
    st.complex_numbers(),
    st.dictionaries(st.integers(), st.integers(), min_size=1, max_size=2),
    st.dates(),
)


def nested(path: str, value: object) -> dict:
    """``"a.b.c", v`` -> ``{"a": {"b": {"c": v}}}``."""
    out: object = value
    for part in reversed(path.split(".")):
        out = {part: out}
    return out  # type: ignore[return-value]


def deep(depth: int) -> dict:
    out: dict = {"x": 1}
    for _ in range(depth):
        out = {"x": out}
    return out


# ------------------------------------------------------------------ checks


def loads_or_config_error(build: Callable[[], RunConfig]) -> RunConfig | None:
    """``build()``'s config, or None after a ConfigError with a message of one line; any other
    exception fails the test."""
    try:
        cfg = build()
    except DarkKnowledgeError as exc:
        assert isinstance(exc, ConfigError), type(exc)
        text = str(exc)
        assert text.strip() and "Traceback" not in text
        return None
    assert isinstance(cfg, RunConfig)
    dumped = cfg.model_dump(mode="json")
    assert validate_config(dumped) == cfg  # config.yaml holds exactly this config
    assert validate_config(yaml.safe_load(yaml.safe_dump(dumped, sort_keys=False))) == cfg
    for where, spec in cfg.all_teachers():
        try:
            assert isinstance(cfg.teacher_train(spec, where), TrainConfig)
        except ConfigError as exc:
            assert str(exc).startswith(f"{where}.train")
    return cfg


# ------------------------------------------------------------------ the fuzz tests


@FUZZ
@given(st.one_of(override, st.text(max_size=60)))
def test_parse_override_gives_a_path_or_a_config_error(text):
    try:
        path, _ = parse_override(text)
    except ConfigError as exc:
        assert str(exc).startswith("override ")
        return
    assert path and all(isinstance(p, str) and p and p == p.strip() for p in path)
    assert ".".join(path) in text


@FUZZ
@given(st.lists(override, min_size=1, max_size=4))
def test_overrides_on_the_quickstart_recipe_give_a_config_or_one_config_error(overrides):
    before = repr(QUICKSTART)
    loads_or_config_error(lambda: load_config(QUICKSTART, overrides))
    assert repr(QUICKSTART) == before  # the recipe mapping is never modified


@FUZZ
@given(st.sampled_from(REAL_PATHS), yaml_value_text)
def test_one_override_of_a_real_key_gives_a_config_or_one_config_error(key, value):
    """About a quarter of these are valid configs: the round trip is checked on them."""
    cfg = loads_or_config_error(lambda: load_config(QUICKSTART, [f"{key}={value}"]))
    if cfg is not None and key in ("train.epochs", "data.batch_size", "seed"):
        parsed = parse_override(f"{key}={value}")[1]
        section, _, field = key.rpartition(".")
        got = getattr(getattr(cfg, section) if section else cfg, field)
        assert got == parsed  # the value given is the value used (1e1 == 10, True == 1: YAML's reading)


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.sampled_from(REAL_PATHS) | st.lists(name_part, min_size=1, max_size=4).map(".".join),
            st.one_of(plain_value, odd_value),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_dict_recipes_with_random_values_give_a_config_or_one_config_error(changes):
    raw = QUICKSTART
    for path, value in changes:
        raw = deep_merge(raw, nested(path, value))
    loads_or_config_error(lambda: validate_config(raw))
    loads_or_config_error(lambda: load_config(raw, [f"{path}={value!r}" for path, value in changes[:2]]))


@FUZZ
@given(st.one_of(plain_value, odd_value, st.lists(st.text(max_size=5))))
def test_anything_as_a_whole_recipe_gives_a_config_or_one_config_error(raw):
    loads_or_config_error(lambda: validate_config(raw))
    loads_or_config_error(lambda: load_config(raw) if isinstance(raw, dict) else validate_config(raw))


@FUZZ
@given(st.integers(1, 10**6), st.integers(-9, -1), st.integers(1, 9), st.sampled_from(["e", "E"]))
def test_valid_overrides_take_effect_in_any_number_notation(epochs, exponent, mantissa, e):
    lr_text = f"{mantissa}{e}{exponent}"
    cfg = load_config(
        QUICKSTART,
        [f"train.epochs={epochs}", f"train.optimizer.lr={lr_text}", f"teacher.train.optimizer.lr={float(lr_text)!r}"],
    )
    assert cfg.train.epochs == epochs
    assert math.isclose(cfg.train.optimizer.lr, float(lr_text), rel_tol=1e-12)
    assert math.isclose(cfg.teacher_train().optimizer.lr, float(lr_text), rel_tol=1e-12)
    assert cfg.teacher_train().epochs == QUICKSTART["teacher"]["train"]["epochs"]  # the teacher's own epochs win


@pytest.mark.parametrize("depth", [10, 63, 200, 600])
def test_deep_nesting_is_refused_with_one_error_not_a_recursion_error(depth):
    raw = {**QUICKSTART, "data": {**QUICKSTART["data"], "params": deep(depth)}}
    cfg = loads_or_config_error(lambda: validate_config(raw))
    assert (cfg is None) == (depth > 60), depth  # 64 levels in all, counted from the recipe's top
    assert (loads_or_config_error(lambda: load_config(raw)) is None) == (depth > 60)
    override = "data.params.x=" + "[" * depth + "]" * depth
    loads_or_config_error(lambda: load_config(QUICKSTART, [override]))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("data.params=&a {x: *a}", r"data\.params\.x: the value contains itself"),
        ("losses.kd.T=!!binary aGVsbG8=", r"losses\.kd\.T: a config value must be .*got bytes"),
        ("description=2020-01-01", r"description: .*got date .*quote it"),
        ("train..epochs=3", r"override 'train\.\.epochs=3': the key 'train\.\.epochs' has an empty part"),
        ("train.epochs=2001-13-45", r"train\.epochs: Input should be a valid integer.*'2001-13-45'"),
        ("train.epochs=!!int x", r"train\.epochs: Input should be a valid integer.*'!!int x'"),
        ("seeds.0=1", r"override 'seeds\.0=1': seeds is not a mapping \(it is list \[0, 1, 2\]\)"),
    ],
)
def test_what_the_fuzzer_found_gets_one_clear_error(text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(QUICKSTART, [text])


def test_apply_overrides_and_deep_merge_refuse_non_mappings():
    with pytest.raises(ConfigError, match=r"overrides: expected a list of KEY=VALUE strings, got the string"):
        apply_overrides(QUICKSTART, "train.epochs=3")
    with pytest.raises(ConfigError, match=r"expected a mapping of config keys to merge, got int 5"):
        deep_merge(QUICKSTART, 5)  # type: ignore[arg-type]
    assert apply_overrides({}, ["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}
