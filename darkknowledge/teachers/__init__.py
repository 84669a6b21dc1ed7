"""Teachers: anything that provides teacher outputs to an objective (see ``teachers.base``)."""

from darkknowledge.teachers.base import Teacher
from darkknowledge.teachers.ema import EMA
from darkknowledge.teachers.ensemble import Ensemble
from darkknowledge.teachers.flow import Flow, Group, Link
from darkknowledge.teachers.frozen import Frozen, FrozenTeacher
from darkknowledge.teachers.mixture import Mixture
from darkknowledge.teachers.peers import Peer
from darkknowledge.teachers.virtual import Virtual

__all__ = [
    "EMA",
    "Ensemble",
    "Flow",
    "Frozen",
    "FrozenTeacher",
    "Group",
    "Link",
    "Mixture",
    "Peer",
    "Teacher",
    "Virtual",
]
