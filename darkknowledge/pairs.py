"""Propose stage-aligned (student, teacher) tap pairs for models that are not in the zoo.

Pairs are chosen by relative depth (student stage ``i`` of ``n_s`` goes with the teacher
stage at the same fraction of depth) and, when a dry run is possible, refined to the
teacher stage of the same spatial size nearest in depth.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from darkknowledge.taps import probe_shapes, unwrap


def align_by_depth(student: Sequence[str], teacher: Sequence[str]) -> tuple[list[str], list[str]]:
    """Pair each student stage with the teacher stage at the same relative depth.

    The shorter list keeps all its stages; each is matched to the stage of the longer list
    at ``round((i + 1) * n_long / n_short) - 1`` (so last goes with last).
    """
    s, t = list(student), list(teacher)
    if len(s) <= len(t):
        return s, [t[max(0, round((i + 1) * len(t) / len(s)) - 1)] for i in range(len(s))]
    return [s[max(0, round((i + 1) * len(s) / len(t)) - 1)] for i in range(len(t))], t


def candidate_stages(model: nn.Module) -> list[str]:
    """Stage outputs of a model: its ``feature_taps()``, else the top-level children that have
    weights and are not a linear classifier (a common layout of hand-written models)."""
    inner = unwrap(model)
    if (feature_taps := getattr(inner, "feature_taps", None)) is not None:
        return list(feature_taps())
    return [
        name
        for name, child in inner.named_children()
        if not isinstance(child, nn.Linear) and any(True for _ in child.parameters())
    ]


def propose_pairs(
    student: nn.Module, teacher: nn.Module, sample: torch.Tensor
) -> list[tuple[str, str, tuple[int, ...], tuple[int, ...]]]:
    """Stage-aligned pairs from a dry run on ``sample`` ``(B, ...)``.

    Returns:
        ``(student_path, teacher_path, student_shape, teacher_shape)`` per pair; feed the
        paths to a feature loss as ``student_taps``/``teacher_taps``.
    """
    s_paths, t_paths = candidate_stages(student), candidate_stages(teacher)
    s_shapes = probe_shapes(student, sample, s_paths, "the student")
    t_shapes = probe_shapes(teacher, sample, t_paths, "the teacher")
    s_al, t_al = align_by_depth(s_paths, t_paths)
    pairs = []
    for sp, tp in zip(s_al, t_al):
        spatial = s_shapes[sp][1:]
        same = [p for p in t_paths if t_shapes[p][1:] == spatial and len(t_shapes[p]) == len(s_shapes[sp])]
        if same and tp not in same:  # prefer the same spatial size, nearest in depth
            tp = min(same, key=lambda p: abs(t_paths.index(p) - t_paths.index(tp)))
        pairs.append((sp, tp, s_shapes[sp], t_shapes[tp]))
    return pairs


def format_pairs(pairs: Sequence[tuple[str, str, tuple[int, ...], tuple[int, ...]]]) -> str:
    """A printable table plus the recipe lines that use the pairs as they are."""
    lines = [f"{'student':<24} {'shape':<16} {'teacher':<24} shape"]
    for sp, tp, ss, ts in pairs:
        lines.append(f"{sp:<24} {str(ss):<16} {tp:<24} {ts}")
    lines.append(f"student_taps: {[p[0] for p in pairs]}")
    lines.append(f"teacher_taps: {[p[1] for p in pairs]}")
    return "\n".join(lines)
