"""Any loss in any scheme that can feed it: every cell trains with the loss it was given (its
term in the metrics), and a combination that cannot work fails before the student trains,
saying why."""

from __future__ import annotations

import json

import pytest

from darkknowledge import commands
from darkknowledge.errors import ConfigError
from test_contract_schemes import recipe

SCHEMES = [
    "offline",
    "mutual",
    "kdcl",
    "one",
    "codistill",
    "byot",
    "ema",
    "born_again",
    "multi_teacher",
    "cskd",
    "tfkd",
]
LOSSES = {
    "kd": {"T": 4.0, "alpha": 1.0},
    "dkd": {},
    "dist": {},
    "fitnet": {"student_taps": ["fc:input"], "teacher_taps": ["fc:input"]},  # a feature loss
    "rkd": {},  # a relation loss
}
CANNOT = {  # (scheme, loss): why, as the error says
    ("multi_teacher", "fitnet"): "per_teacher",  # a mixture of soft labels has no features
    ("multi_teacher", "rkd"): "per_teacher",
    ("tfkd", "fitnet"): "no features",  # a virtual teacher made from the label
    ("tfkd", "rkd"): "no features",
}


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_feeds_every_loss_it_can(scheme, loss, tmp_path):
    ce = {"weight": 0.7} if scheme == "byot" else {}
    cfg = recipe(scheme, train={"epochs": 1})
    cfg = cfg.model_copy(update={"losses": {"ce": ce, loss: dict(LOSSES[loss])}})
    if (scheme, loss) in CANNOT:
        with pytest.raises(ConfigError, match=CANNOT[scheme, loss]):
            commands.distill(cfg, out=tmp_path / "run", progress=False)
        assert not (tmp_path / "run").exists()  # the preflight refused it: no teacher trained, nothing written
        return
    out = commands.distill(cfg, out=tmp_path / "run", progress=False)
    assert any(t.split("@")[0] == loss for t in out["student"]["losses"]), out["student"]["losses"]
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    stage = out["student"]["name"]
    train = [r for r in logged if r["kind"] == "train" and r["stage"] == stage]
    assert train and any(k.split("@")[0] == f"train/{loss}" for k in train[-1])  # the loss really ran
