"""Wiring the recipe's objective into links: who is taught what, by which teachers.

:func:`taught` is how every plan turns "view V learns the recipe's ``losses`` from teachers
T1..Tn" into links. With one teacher it is one link with the whole objective. With several,
the terms that read no teacher (e.g. ``ce``) count once, and the terms that read one get a
fresh copy (their own adapters) per teacher, combined by ``mode``: averaged (``mean``, e.g.
deep mutual learning's ``1/(K-1) sum_l KL(p_l || p_k)``, one loss per teacher), summed, or one
teacher drawn per step (``draw``). Without teachers only the teacher-free terms apply (e.g. a
network's own deepest classifier in BYOT, which no one teaches).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from darkknowledge.errors import ConfigError
from darkknowledge.losses.objective import Objective
from darkknowledge.teachers.base import Teacher
from darkknowledge.teachers.flow import Group, Link, Mode


def taught(
    view: str,
    make: Callable[[], Objective],
    teachers: Sequence[Teacher],
    *,
    mode: Mode = "mean",
    suffix: str = "",
    teacher_suffixes: Sequence[str] | None = None,
    seed: int = 0,
    untaught: bool = False,
    where: str = "losses",
) -> list[Link | Group]:
    """Links that teach ``view`` the objective ``make()`` from ``teachers``.

    Args:
        view: The taught view.
        make: Makes a fresh objective (called once per teacher beyond the first).
        teachers: Its teachers. None with terms that read one is an error, unless ``untaught``.
        mode: How several teachers combine: ``mean``, ``sum`` or ``draw``.
        suffix: Appended to every term name in metrics (e.g. ``@peer1`` for a view other than the student).
        teacher_suffixes: Further appended per teacher (e.g. ``@t0``), when several teachers'
            values should be reported apart.
        seed: Seed of the ``draw`` sequence.
        untaught: The view has no teacher by design: only the terms that read no teacher apply.
        where: Config path of the objective, for messages.
    """
    first = make()
    reading = first.teacher_terms()
    if not teachers and not untaught:
        return [Link(view, first, None, suffix, where)]  # binding it fails if a term needs a teacher
    if len(teachers) == 1:
        return [Link(view, first, teachers[0], suffix + (teacher_suffixes[0] if teacher_suffixes else ""), where)]
    free = first.subset(n for n in first.terms if n not in reading)
    links: list[Link | Group] = [Link(view, free, None, suffix, where)] if free is not None else []
    if not teachers or not reading:
        return links
    objectives = [first.subset(reading)] + [make().subset(reading) for _ in teachers[1:]]
    extra = list(teacher_suffixes) if teacher_suffixes else [""] * len(teachers)
    # subsets of the teacher-read terms: not None:
    group = [Link(view, o, t, suffix + s, where) for o, t, s in zip(objectives, teachers, extra)]  # type: ignore[arg-type]
    links.append(Group(group, mode=mode, seed=seed))
    return links


def require_teacher_terms(objective: Objective, scheme: str, example: str = "kd: {T: 3, alpha: 1}") -> None:
    """Refuse an objective that reads no teacher where the scheme's point is to teach.

    Raises:
        ConfigError: None of the losses reads a teacher.
    """
    if not objective.teacher_terms():
        raise ConfigError(
            f"scheme {scheme!r}: none of the losses {list(objective.terms)} reads a teacher, so nothing "
            f"would be distilled; add a distillation term such as {example}"
        )
