"""``dk.Distiller``: any loss, any teacher and the taps inside the user's own training loop.

README's "Bring your own loop" examples are executed here as they are written (Lightning and
``transformers`` only where installed: ``pip install -e ".[loops]"``).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import darkknowledge as dk
from darkknowledge.errors import ConfigError
from darkknowledge.losses.kd import kd_loss
from darkknowledge.teachers import Frozen, Mixture

ROOT = Path(__file__).resolve().parents[1]


def readme_examples() -> dict[str, str]:
    """The fenced python blocks of README that follow an ``<!-- example: NAME -->`` marker."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"<!-- example: (\w+) -->\s*```python\n(.*?)```", text, flags=re.S)
    return dict(blocks)


def nets(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 3))
    student = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    return student, teacher


def test_readme_has_one_example_per_loop_style():
    assert set(readme_examples()) == {"plain", "lightning", "transformers"}


@pytest.mark.parametrize("name,needs", [("plain", None), ("lightning", "lightning"), ("transformers", "transformers")])
def test_readme_example_runs(name, needs, tmp_path):
    if needs is not None and importlib.util.find_spec(needs) is None:
        pytest.skip(f"{needs} is not installed (pip install -e '.[loops]')")
    script = tmp_path / f"example_{name}.py"  # not lightning.py: it would shadow the library
    script.write_text(readme_examples()[name])
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_loss_is_the_objective_on_student_and_teacher_outputs():
    student, teacher = nets()
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    distiller = dk.Distiller(student, teacher, losses={"kd": {"T": 2.0, "alpha": 0.7}})
    loss, terms = distiller(x, y)
    with torch.no_grad():
        expected = kd_loss(student(x), teacher(x), y, 2.0, 0.7)
    assert torch.allclose(loss, expected, atol=1e-6) and set(terms) == {"kd"}


def test_adapters_are_parameters_and_the_teacher_is_not_trained():
    student, teacher = nets()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distiller = dk.Distiller(
        student, teacher, losses={"ce": {}, "fitnet": {"student_taps": ["1"], "teacher_taps": ["1"]}}, example=x[:4]
    )
    params = list(distiller.parameters())
    adapter = list(distiller.objective.terms["fitnet"].parameters())
    assert adapter and {id(p) for p in adapter} <= {id(p) for p in params}  # built before the optimizer
    assert {id(p) for p in student.parameters()} <= {id(p) for p in params}
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in params}
    optimizer = torch.optim.SGD(params, lr=0.5)
    for _ in range(3):
        loss, _ = distiller(x, y)
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in teacher.parameters())
        optimizer.step()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items()) and not teacher.training
    assert all(p.grad is not None for p in adapter)


def test_clear_errors_for_what_the_losses_read():
    student, teacher = nets()
    x = torch.randn(4, 6)
    with pytest.raises(ConfigError, match=r"losses \['fitnet'\] build adapters.*example="):
        dk.Distiller(student, teacher, losses={"fitnet": {"student_taps": ["1"], "teacher_taps": ["1"]}})
    with pytest.raises(ConfigError, match=r"read labels: call distiller\(x, y\)"):
        dk.Distiller(student, teacher, losses={"ce": {}, "kd": {}})(x)
    with pytest.raises(ConfigError, match="need a teacher"):
        dk.Distiller(student, None, losses={"kd": {}})
    with pytest.raises(ConfigError, match="renamed to 'T'"):
        dk.Distiller(student, teacher, losses={"dist": {"tau": 2.0}})
    with pytest.raises(ConfigError, match="no features"):  # a mixture of soft labels cannot feed a hint
        mixed = Mixture([Frozen(teacher, "a"), Frozen(nets(1)[1], "b")], T=1.0)
        dk.Distiller(student, mixed, losses={"fitnet": {"student_taps": ["1"], "teacher_taps": ["1"]}}, example=x)


def test_any_teacher_provider_and_soft_labels_alone():
    student, teacher = nets()
    other = nets(1)[1]
    x = torch.randn(8, 6)
    mixed = Mixture([Frozen(teacher, "a"), Frozen(other, "b")], rule="mean", T=2.0)
    loss, terms = dk.Distiller(student, mixed, losses={"kd": {"T": 2.0, "alpha": 1.0}})(x)  # no labels needed
    assert torch.isfinite(loss) and set(terms) == {"kd"}


def test_the_teacher_stays_outside_the_module():
    student, teacher = nets()
    distiller = dk.Distiller(student, teacher, losses={"kd": {"alpha": 1.0}})
    assert all(m is not teacher for m in distiller.modules())  # not moved, saved or optimised with the student
    saved = {k for k in distiller.state_dict() if k != "flow.draws"}  # the draw counter of random teachers
    assert saved == {f"flow.student.{k}" for k in student.state_dict()}
