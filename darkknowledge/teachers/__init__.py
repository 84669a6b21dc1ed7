"""Teachers: frozen models that provide outputs to the losses."""

from darkknowledge.teachers.frozen import FrozenTeacher

__all__ = ["FrozenTeacher"]
