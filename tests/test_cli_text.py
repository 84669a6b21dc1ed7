"""What the command line shows people: aligned `dk list` columns, readable constraints in
`dk explain`, hints that name the section a key lives in, tap errors that name the model."""

from __future__ import annotations

import re

import pytest
import torch
from annotated_types import Ge, Gt, Le, Lt, MinLen
from torch import nn

from darkknowledge.commands import lm_config
from darkknowledge.describe import columns, explain_loss, format_constraint, list_losses_text
from darkknowledge.errors import ConfigError, TapError
from darkknowledge.losses import LOSSES
from darkknowledge.taps import FeatureTaps, probe_shapes, resolve_tap


def test_columns_are_as_wide_as_their_widest_cell() -> None:
    lines = columns([("a", "bb", "last one"), ("long_name", "c", "x")])
    assert lines == ["  a          bb  last one", "  long_name  c   x"]
    assert columns([]) == []


def test_loss_list_columns_never_run_together() -> None:
    lines = list_losses_text()
    assert len(lines) == len(LOSSES)
    for line, name in zip(lines, [ln.split()[0] for ln in lines], strict=True):
        assert re.match(rf"  {re.escape(name)}  +(label|response|feature|relation)  +", line), line
    starts = {line.index(line.split()[1], len(line.split()[0]) + 2) for line in lines}
    assert len(starts) == 1  # the second column starts at one offset on every line


@pytest.mark.parametrize(
    ("meta", "text"),
    [(Gt(0.0), "> 0.0"), (Ge(1), ">= 1"), (Lt(2), "< 2"), (Le(1.0), "<= 1.0"), (MinLen(1), "length >= 1")],
)
def test_constraints_read_as_written(meta: object, text: str) -> None:
    assert format_constraint(meta) == text


def test_explain_shows_bounds_not_validator_internals() -> None:
    text = explain_loss("kd")
    assert re.search(r"\n  T +4\.0 +float > 0\.0\n", text)
    assert re.search(r"\n  alpha +0\.9 +float >= 0\.0, <= 1\.0\n", text)
    for name in LOSSES:
        assert not re.search(r"\b(Gt|Ge|Lt|Le|MinLen|MaxLen)\(", explain_loss(name)), name


def test_lm_recipe_hint_names_the_section() -> None:
    with pytest.raises(ConfigError, match=r"epochs: unknown key\. Did you mean 'train\.epochs'\?"):
        lm_config("lm", ["epochs=2"])


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_tap_errors_name_the_model_they_looked_in() -> None:
    net = _Net()
    with pytest.raises(TapError, match=r"unknown tap path 'bod' in the student \(_Net\).*'body'"):
        resolve_tap(net, "bod", "the student")
    with pytest.raises(TapError, match=r"in the teacher \(_Net\)"):
        FeatureTaps(net, ["nope"], owner="the teacher")
    with pytest.raises(TapError, match=r"in the teacher \(_Net\)"):
        probe_shapes(net, torch.zeros(2, 3), ["nope"], "the teacher")
    with pytest.raises(TapError, match=r"unknown tap path 'x' in _Net:"):  # no owner given: the class alone
        resolve_tap(net, "x")


@pytest.mark.parametrize(
    ("key", "owner"),
    [("student_taps", "the student (CNN1d)"), ("teacher_taps", "the frozen teacher 'teacher' (CNN1d)")],
)
def test_a_runs_tap_error_says_whose_path_is_wrong(key: str, owner: str, tmp_path, capsys) -> None:
    from darkknowledge.cli import main

    rc = main(["distill", "fitnet", f"losses.fitnet.{key}=[layer9]", "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0 and f"unknown tap path 'layer9' in {owner}" in err, err


def test_version(capsys) -> None:
    from importlib.metadata import version

    import darkknowledge
    from darkknowledge.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"dk (darkknowledge) {darkknowledge.__version__}"
    assert version("darkknowledge") == darkknowledge.__version__  # pyproject and the package agree
