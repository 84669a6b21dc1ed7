"""What ``dk bench`` and ``dk tune`` do (the CLI parses, this runs)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from darkknowledge.bench.publish import write_tables
from darkknowledge.bench.runner import Bench
from darkknowledge.bench.suite import load_suite
from darkknowledge.bench.tuned import tune_suite
from darkknowledge.config import parse_override
from darkknowledge.errors import ConfigError

QUIET_INSIDE_CELLS = (
    "darkknowledge.runs",
    "darkknowledge.engine",
    "darkknowledge.data",
    "darkknowledge.teachers",
    "darkknowledge.schemes",
    "darkknowledge.losses",
    "darkknowledge.commands",
)
"""Loggers whose per-epoch lines would drown the bench's one line per cell (``--verbose`` keeps them)."""


def _slurm(items: list[str]) -> dict[str, Any]:
    out = {}
    for text in items:
        path, value = parse_override(text)
        out[".".join(path)] = value
    return out


def make_bench(args: argparse.Namespace) -> Bench:
    """The ``Bench`` the arguments describe (suite loaded and every cell's config checked)."""
    suite = load_suite(args.suite, args.set)
    out = Path(args.out) if args.out else Path("runs") / "bench" / suite.name
    return Bench(suite, out, Path(args.results) if args.results else None, only=args.only)


def bench_command(args: argparse.Namespace) -> Iterator[str]:
    """Run ``dk bench`` / ``dk tune``; yields the lines to print.

    Raises:
        ConfigError: A bad suite or option, or cells that failed (after every other cell ran).
    """
    if not args.verbose:
        for name in QUIET_INSIDE_CELLS:
            logging.getLogger(name).setLevel(logging.WARNING)
    executor = args.executor or ("serial" if args.jobs == 1 else "local")
    if executor == "serial" and args.jobs != 1:
        raise ConfigError(
            f"--jobs {args.jobs} with --executor serial: serial runs one cell at a time; use "
            "--executor local (or drop --executor)"
        )
    bench = make_bench(args)
    if args.command == "tune":
        for s in tune_suite(bench, args.trials, args.sampler_seed, executor=executor, jobs=args.jobs):
            yield (f"{s['pair']}/{s['method']}: {s['values']} -> validation {s['score']:.2f} ({s['trials']} trials)")
        yield f"tuned values: {bench.results / 'tuned'} (set `hp: tuned` in the suite to train with them)"
        return
    if args.status:
        yield from bench.status().lines()
        return
    failed = []
    if not args.tables:
        st = bench.run(executor, args.jobs, args.cluster, _slurm(args.slurm))
        yield from st.lines()
        failed = st.failed
    written = write_tables(bench, Path(args.readme) if args.readme else None)
    yield f"tables: {', '.join(str(p) for p in written.values())}"
    if failed:
        raise ConfigError(
            f"{len(failed)} cell(s) failed (listed above, and in {bench.out / 'bench.jsonl'}); fix "
            "the cause and run the same command again: finished cells are kept"
        )
