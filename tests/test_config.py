import pytest

from darkknowledge.config import (
    apply_overrides,
    load_config,
    parse_override,
    read_recipe,
    recipe_names,
)
from darkknowledge.errors import ConfigError, RegistryError
from darkknowledge.lm.config import is_lm_recipe, validate_lm_config
from darkknowledge.runs.build import check_config


def test_overrides_parse_yaml_values():
    assert parse_override("train.epochs=3") == (["train", "epochs"], 3)
    assert parse_override("losses.kd.T=2.5") == (["losses", "kd", "T"], 2.5)
    assert parse_override("seeds=[1,2]") == (["seeds"], [1, 2])
    assert apply_overrides({"a": {"b": 1}}, ["a.c=x", "d.e=true"]) == {"a": {"b": 1, "c": "x"}, "d": {"e": True}}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("train.epochs")


def test_shipped_recipes_validate():
    assert "quickstart" in recipe_names()
    for name in recipe_names():
        if is_lm_recipe(read_recipe(name)):  # a language-model run: its own config (tests/test_lm_run.py)
            validate_lm_config(read_recipe(name))
            with pytest.raises(ConfigError, match="kind: lm"):
                load_config(name)
            continue
        check_config(load_config(name))


def test_quickstart_overrides_apply():
    cfg = load_config("quickstart", ["train.epochs=3", "seed=1", "losses.kd.T=2"])
    assert cfg.train.epochs == 3 and cfg.seed == 1 and cfg.losses["kd"]["T"] == 2
    assert cfg.teacher_train().epochs != 3 or cfg.teacher.train.get("epochs") == 3


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["trian.epochs=3"], r"trian: unknown key\. Did you mean 'train'"),
        (["train.epoch=3"], r"train\.epoch: unknown key.*Did you mean 'train\.epochs'"),
        (["epochs=3"], r"epochs: unknown key\. Did you mean 'train\.epochs'\?"),  # the section it lives in
        (["train.lr=0.1"], r"train\.lr: unknown key.*Did you mean 'train\.optimizer\.lr'\?"),
        (["train.epochs=zero"], r"train\.epochs: .*integer.*got 'zero'"),
        (["train.epochs=0"], r"train\.epochs: .*greater than or equal to 1.*got 0"),
        (["train.optimizer.name=adamax"], r"train\.optimizer\.name: .*'sgd', 'adamw' or 'adam'.*got 'adamax'"),
        (["data.batch_size=-4"], r"data\.batch_size: .*greater than 0"),
    ],
)
def test_bad_values_name_path_value_and_allowed(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config("quickstart", overrides)


def test_unknown_names_are_caught_before_anything_runs():
    with pytest.raises(RegistryError, match="unknown loss 'kdd'.*Did you mean 'kd'"):
        check_config(load_config("quickstart", ["losses={kdd: {}}"]))
    with pytest.raises(RegistryError, match="unknown model 'mpl'.*'mlp'"):
        check_config(load_config("quickstart", ["student.name=mpl"]))
    with pytest.raises(RegistryError, match="unknown dataset 'mnist1'.*'mnist1d'"):
        check_config(load_config("quickstart", ["data.name=mnist1"]))
    with pytest.raises(ConfigError, match=r"student\.params\.hiden: unknown parameter.*'hidden'"):
        check_config(load_config("quickstart", ["student.params.hiden=[10]"]))
    with pytest.raises(ConfigError, match=r"losses\.kd\.T: .*greater than 0"):
        check_config(load_config("quickstart", ["losses.kd.T=-1"]))
    with pytest.raises(ConfigError, match=r"teacher\.train\.epochs: .*greater than or equal to 1 \(got 0\)"):
        check_config(load_config("quickstart", ["teacher.train.epochs=0"]))


def test_recipe_by_path_and_unknown_recipe(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("name: mine\nstudent: {name: mlp}\nlosses: {ce: {}}\n")
    assert load_config(str(path)).name == "mine"
    assert read_recipe(str(path))["name"] == "mine"
    with pytest.raises(ConfigError, match="unknown recipe 'quikstart'.*'quickstart'"):
        load_config("quikstart")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
