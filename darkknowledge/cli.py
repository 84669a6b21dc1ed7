"""The ``dk`` command line.

    dk run [RECIPE]            teacher + baseline + distilled student over seeds, table + report.md
    dk distill RECIPE          one distilled student; exports student.pt
    dk train RECIPE            the student (or --model teacher) alone with cross-entropy
    dk eval CHECKPOINT         accuracy of an exported model on its dataset
    dk export RUN              the run's student as safetensors + spec, ONNX, torch.export; size and latency
    dk list [losses|models|datasets|recipes|schemes]
    dk explain NAME            a loss's or scheme's paper, equation, parameters
    dk pairs STUDENT TEACHER   stage-aligned tap pairs to paste into a feature loss
    dk bench SUITE             every cell of a benchmark suite (resumable), then its tables
    dk tune SUITE              each method's hyper-parameters, same trial budget, validation split only
    dk search SEARCH           a student architecture under a latency/size budget (KD proxy, Pareto front)

RECIPE is a shipped recipe name (``quickstart``) or a YAML path. Every command takes dotted
``key=value`` overrides (``train.epochs=3 seed=1``), ``--out DIR`` and ``--resume``. The same
command runs under ``torchrun --nproc_per_node=N -m darkknowledge.cli ...``.

Errors and exit codes:

- 0: done.
- 2: bad input or a problem of the environment, told in one line ``dk: error: ...`` that names
  the bad value and what would be valid: every ``DarkKnowledgeError`` (config, checkpoint,
  data, divergence, a full disk met by an atomic write), and an ``OSError`` about a named
  file (disk full or quota exceeded, permission denied, no such file, a file where a folder
  should be). Argument errors (argparse) exit 2 too. ``--verbose`` (before or after the
  command) adds the full traceback above that line.
- 1: an unexpected exception: a bug in darkknowledge, not in the input. Its traceback is always
  printed (it is what a bug report needs), followed by a line saying so.
- 130: interrupted (Ctrl-C); the run continues with ``--resume``.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from darkknowledge import __version__
from darkknowledge.errors import ConfigError, DarkKnowledgeError
from darkknowledge.runs.outcome import summary_lines

VERBOSE_HELP = "log every epoch even when not on a terminal; on an error, also print its traceback"

DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
"""``errno`` values of a full disk or an exhausted quota."""


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dk", description="darkknowledge: knowledge distillation for any PyTorch model")
    p.add_argument("--verbose", dest="verbose_all", action="store_true", help=VERBOSE_HELP)
    p.add_argument("--version", action="version", version=f"dk (darkknowledge) {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_run_args(sp: argparse.ArgumentParser, recipe_optional: bool) -> None:
        sp.add_argument(
            "recipe",
            nargs="?" if recipe_optional else None,
            default="quickstart" if recipe_optional else None,
            help="shipped recipe name or path to a YAML file" + (" (default: quickstart)" if recipe_optional else ""),
        )
        sp.add_argument(
            "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.epochs=3 seed=1"
        )
        sp.add_argument("--out", help="run folder (default: runs/<name>, a new one per run)")
        sp.add_argument("--resume", action="store_true", help="continue the run in --out (or the latest runs/<name>*)")
        sp.add_argument("--quiet", action="store_true", help="no progress bars and no log lines")
        sp.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
        sp.add_argument(
            "--log",
            action="append",
            type=_logger_names,
            default=[],
            metavar="NAMES",
            help="also send the metrics to tensorboard and/or mlflow (comma-separated, repeatable; "
            "same as log.tensorboard=true / log.mlflow=true; files go into the run folder)",
        )

    rp = sub.add_parser("run", help="compare baseline and distilled students over seeds")
    with_run_args(rp, True)
    rp.add_argument(
        "--readme",
        metavar="PATH",
        help="also write the run's table and verdict into the "
        "<!-- run:NAME --> block of this Markdown file (e.g. README.md)",
    )
    with_run_args(sub.add_parser("distill", help="distill one student from the recipe's teacher"), False)
    tp = sub.add_parser("train", help="train the student (or teacher) alone with cross-entropy")
    with_run_args(tp, False)
    tp.add_argument(
        "--model",
        choices=("student", "teacher"),
        default="student",
        help="which model to train; the teacher trains with train + teacher.train and teacher.seed, "
        "and train.*/seed overrides apply to it (train.epochs=2: 2 epochs)",
    )
    ep = sub.add_parser("eval", help="evaluate an exported model (student.pt / model.pt)")
    ep.add_argument("checkpoint")
    ep.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. data.name=mnist1d train.device=cpu")
    so = sub.add_parser(
        "search",
        help="search a student architecture under a latency/size budget (KD proxy on "
        "cached teacher outputs, NSGA-II Pareto front, retrained with full budget)",
    )
    so.add_argument("search", help="shipped search name (darkknowledge/bench/searches) or a search YAML file")
    so.add_argument("--out", help="search folder (default runs/search/NAME); rerun to resume")
    so.add_argument("--trials", type=int, help="override the search's trial budget")
    so.add_argument("--quiet", action="store_true", help="no log lines")
    xo = sub.add_parser(
        "export",
        help="a run's student as safetensors + spec, ONNX and torch.export, with its size, FLOPs and CPU latency",
    )
    xo.add_argument("run", help="a run folder, a stage folder, or an exported .pt file")
    xo.add_argument("--stage", help="the stage to export (default: the run's student)")
    xo.add_argument("--out", help="output folder (default RUN/export/STAGE)")
    xo.add_argument(
        "--formats",
        nargs="+",
        default=["safetensors", "onnx", "torch_export"],
        choices=("safetensors", "onnx", "torch_export"),
        help="formats to write",
    )
    xp = sub.add_parser("explain", help="a loss's, scheme's or synthesizer's paper, equation and parameters")
    xp.add_argument("loss")
    pp = sub.add_parser("pairs", help="propose stage-aligned student/teacher tap pairs")
    pp.add_argument("student", help="zoo model name")
    pp.add_argument("teacher", help="zoo model name")
    pp.add_argument("--data", default="mnist1d", help="dataset whose input shape to probe with")
    lp = sub.add_parser("list", help="list registered losses, models, datasets, views, recipes, schemes, synthesizers")
    lp.add_argument(
        "what",
        nargs="?",
        default="all",
        choices=("all", "losses", "models", "datasets", "views", "recipes", "schemes", "synthesizers", "suites"),
    )
    bp = sub.add_parser("bench", help="run a benchmark suite's cells (resumable) and write its tables")
    tu = sub.add_parser("tune", help="tune every method of a suite with the same trial budget on validation data")
    for sp in (bp, tu):
        sp.add_argument("suite", help="shipped suite name (dk list suites) or a suite YAML file")
        sp.add_argument("--out", help="bench folder: cells' run folders and the event log (default runs/bench/SUITE)")
        sp.add_argument("--results", help="results folder: one JSON per cell, tables (default OUT/results)")
        sp.add_argument("--only", nargs="+", metavar="PREFIX", help="cells whose id starts with PAIR or PAIR/METHOD")
        sp.add_argument(
            "--set",
            nargs="+",
            default=[],
            metavar="KEY=VALUE",
            help="override the suite's own keys, e.g. seeds=[0,1] budget.train.epochs=2",
        )
        sp.add_argument("--jobs", type=int, default=1, help="cells run in parallel (default 1)")
        sp.add_argument(
            "--executor",
            choices=("serial", "local", "submitit"),
            default=None,
            help="serial (default for --jobs 1), local processes (default for --jobs N), submitit",
        )
        sp.add_argument("--cluster", default=None, help="submitit cluster: slurm, local, debug (default: auto)")
        sp.add_argument(
            "--slurm",
            nargs="+",
            default=[],
            metavar="KEY=VALUE",
            help="submitit parameters, e.g. slurm_partition=gpu gpus_per_node=1 timeout_min=600",
        )
        sp.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    bp.add_argument("--status", action="store_true", help="say which cells are done, stale or to run; run nothing")
    bp.add_argument("--tables", action="store_true", help="only (re)write the tables from the results; run nothing")
    bp.add_argument("--readme", help="also rewrite this README's <!-- bench:SUITE --> block from the results")
    tu.add_argument(
        "--trials",
        type=int,
        default=None,
        help="trials per (pair, method), the same for every method (default: the suite's `trials`)",
    )
    tu.add_argument("--sampler-seed", type=int, default=0, help="seed of the search")
    for other in (ep, xp, pp, lp):
        other.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    return p


def _logger_names(text: str) -> list[str]:
    """``--log tensorboard,mlflow`` -> ``["tensorboard", "mlflow"]``; an unknown name is argparse's error."""
    from darkknowledge.config import LOGGERS

    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in LOGGERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown logger {(unknown or [text])[0]!r}; valid: {', '.join(LOGGERS)}")
    return names


def _switch_on_loggers(cfg: Any, asked: Sequence[Sequence[str]]) -> None:
    """``--log NAME``: ``log.NAME=true``, unless the config already names a folder or URI for it."""
    for name in {n for names in asked for n in names}:
        if getattr(cfg.log, name) is False:
            setattr(cfg.log, name, True)


def _split_overrides(args: argparse.Namespace) -> list[str]:
    """argparse puts a lone ``key=value`` into ``recipe`` when the recipe is optional."""
    overrides = list(getattr(args, "overrides", []) or [])
    if getattr(args, "recipe", None) and "=" in args.recipe and not os.path.exists(args.recipe):
        overrides.insert(0, args.recipe)
        args.recipe = "quickstart"
    return overrides


def _list(what: str) -> None:
    from darkknowledge.config import recipe_names
    from darkknowledge.data import list_datasets
    from darkknowledge.describe import (
        list_losses_text,
        list_schemes_text,
        list_synthesizers_text,
    )
    from darkknowledge.models import list_models

    if what in ("all", "losses"):
        _out("losses:  (name, knowledge, needs, citation; `dk explain NAME` for details)")
        for line in list_losses_text():
            _out(line)
    if what in ("all", "models"):
        _out("models:")
        _out("  " + ", ".join(list_models()))
        _out("  (+ torchvision:NAME, timm:NAME and hf:FOLDER_OR_MODEL_TYPE when those extras are installed)")
    if what in ("all", "datasets"):
        _out("datasets:")
        _out("  " + ", ".join(list_datasets()))
    if what in ("all", "views"):
        from darkknowledge.data.views import list_view_transforms

        _out("views:  (transforms that derive a view for cross-modal runs: data.views.NAME.transform)")
        _out("  " + ", ".join(list_view_transforms()))
    if what in ("all", "recipes"):
        _out("recipes:")
        _out("  " + ", ".join(recipe_names()))
    if what in ("all", "suites"):
        from darkknowledge.bench.suite import suite_names

        _out("suites:  (dk bench NAME)")
        _out("  " + ", ".join(suite_names()))
    if what in ("all", "schemes"):
        _out("schemes:  (name, how knowledge flows, citation; `dk explain NAME` for details)")
        for line in list_schemes_text():
            _out(line)
    if what in ("all", "synthesizers"):
        _out("synthesizers:  (inputs made from a teacher, for data-free schemes; `dk explain NAME`)")
        for line in list_synthesizers_text():
            _out(line)


def _setup_logging(quiet: bool, verbose: bool = False) -> None:
    rank = int(os.environ.get("RANK", "0"))
    level = logging.WARNING if quiet or rank != 0 else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr, force=True)
    logging.getLogger("darkknowledge").setLevel(level)  # our messages only; other libraries stay at WARNING


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dk``; returns the exit code (2 for bad input, 1 for failures)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may also come after options (`dk run --out d train.epochs=3`)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    verbose = bool(getattr(args, "verbose", False) or args.verbose_all)
    _setup_logging(getattr(args, "quiet", False), verbose)
    done = False
    try:
        code = _dispatch(args)
        done = True
        return code
    except DarkKnowledgeError as exc:
        return _user_error(str(exc), verbose)
    except KeyboardInterrupt:
        sys.stderr.write("dk: interrupted; continue with --resume (same --out)\n")
        return 130
    except Exception as exc:  # noqa: BLE001 - the last resort: say whose fault it is
        message = _os_error_message(exc) if isinstance(exc, OSError) else None
        if message is not None:
            return _user_error(message, verbose)
        traceback.print_exc()
        sys.stderr.write(
            f"dk: internal error: {type(exc).__name__}; this is a bug in darkknowledge, not in your "
            "input. Please report it with the traceback above.\n"
        )
        return 1
    finally:
        from darkknowledge.engine.distributed import shutdown_distributed

        shutdown_distributed(wait=done)  # after a success every rank reaches it: leave together


def _user_error(message: str, verbose: bool) -> int:
    """Print ``dk: error: MESSAGE`` (after the traceback with ``--verbose``); the exit code 2."""
    if verbose:
        traceback.print_exc()
    sys.stderr.write(f"dk: error: {message}\n")
    return 2


def _os_error_message(exc: OSError) -> str | None:
    """One line for an ``OSError`` that is the environment's, not a bug: a full disk, or a named
    file that cannot be used as asked; None for any other."""
    name = exc.filename
    if exc.errno in DISK_FULL:
        where = f" while writing {name}" if name else ""
        return (
            f"disk full{where}: no space left on the device (or quota exceeded). Free some space, or point "
            "--out / DK_CACHE at another disk, then continue with --resume (same --out)"
        )
    if name is None:
        return None
    reasons = {
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.EROFS: "read-only file system",
        errno.ENOENT: "no such file or directory",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.EISDIR: "it is a folder, not a file",
        errno.EEXIST: "it exists already (as a file)",
        errno.ENAMETOOLONG: "the name is too long",
    }
    reason = reasons.get(exc.errno) if exc.errno is not None else None
    if reason is None:
        return None
    return f"cannot use {name}: {reason}; check the path (--out, the recipe, a checkpoint) and its permissions"


def _dispatch(args: argparse.Namespace) -> int:
    from darkknowledge import commands
    from darkknowledge.config import load_config

    if args.command == "list":
        _list(args.what)
        return 0
    if args.command in ("explain", "pairs"):
        from darkknowledge import describe

        _out(
            describe.explain(args.loss)
            if args.command == "explain"
            else describe.pairs_text(args.student, args.teacher, args.data)
        )
        return 0
    if args.command in ("bench", "tune"):
        from darkknowledge.bench.command import bench_command

        for line in bench_command(args):
            _out(line)
        return 0
    if args.command == "search":
        from darkknowledge.bench.search_command import search_command

        res = search_command(args.search, args.out, args.trials, progress=not args.quiet)
        for f in res["final"]:
            _out(
                f"{f['tag']:>10}  {f['label']:<40} latency {f['profile']['latency_ms_b1']:.3f} ms  "
                f"proxy {f['proxy_acc']:.2f}  full {f['mean']:.2f} ± {f['std']:.2f}"
            )
        _out(f"report: {res['report']}")
        return 0
    if args.command == "export":
        res = commands.export_run(args.run, args.stage, args.out, args.formats)
        for fmt, made in res["formats"].items():
            _out(f"{fmt}: {made['path'] if made.get('ok') else 'not written: ' + str(made.get('reason'))}")
        _out(json.dumps({"source": str(res["source"]), "profile": res["profile"]}, indent=2))
        return 0
    if args.command == "eval":
        from darkknowledge.config import apply_overrides

        eval_overrides = apply_overrides({}, args.overrides)
        _out(json.dumps(commands.evaluate_checkpoint(args.checkpoint, eval_overrides), indent=2))
        return 0
    overrides = _split_overrides(args)
    progress = not args.quiet
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if args.command == "run" and commands.is_lm_run(args.recipe):
        lm_cfg = commands.lm_config(args.recipe, overrides)
        _switch_on_loggers(lm_cfg, args.log)
        _check_readme(args.readme, lm_cfg.name)
        res = commands.run_lm(lm_cfg, args.out, args.resume, progress)
        _report_run(res, args.readme if main_rank else None)
        return 0
    cfg = load_config(args.recipe, overrides)
    _switch_on_loggers(cfg, args.log)
    if args.command == "run":
        _check_readme(args.readme, cfg.name)
    if args.command == "run":
        res = commands.compare(cfg, args.out, args.resume, progress)
        _report_run(res, args.readme if main_rank else None)
    elif args.command == "distill":
        res = commands.distill(cfg, args.out, args.resume, progress)
        if main_rank:
            _out(
                "\n".join(
                    summary_lines(
                        res["student"], res["teacher"], res["entries"][1:], res["run_dir"], res["exported"], "student"
                    )
                )
            )
    elif args.command == "train":
        res = commands.train(cfg, args.out, args.resume, progress, which=args.model, overrides=overrides)
        if main_rank:
            _out(
                "\n".join(summary_lines(res["student"], run_dir=res["run_dir"], exported=res["exported"], what="model"))
            )
    return 0


def _check_readme(readme: str | None, name: str) -> None:
    """Before a run trains: ``--readme``'s file exists and holds the run's block."""
    if not readme:
        return
    from darkknowledge.bench.publish import readme_section

    try:
        text = Path(readme).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--readme {readme!r} cannot be read: {exc.strerror or exc}") from None
    readme_section(text, name, kind="run")


def _report_run(res: dict, readme: str | None) -> None:
    """Print a run's table and verdict (rank 0 calls it), and write them into ``readme``'s block."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    about = res.get("teachers") or []  # the teachers' calibration and training fit; a memorised one's warning
    _out("\n".join(res["table"]))
    _out()
    if about:
        _out("\n".join(about))
        _out()
    _out(res["verdict"])
    _out(f"run folder: {res['run_dir']}  (report.md, results.json, metrics.jsonl)")
    if readme:
        from darkknowledge.bench.publish import update_readme

        block = "\n".join(res["table"]) + "\n\n" + ("\n".join(about) + "\n\n" if about else "") + res["verdict"] + "\n"
        update_readme(Path(readme), res["name"], block, kind="run")
        _out(f"README block run:{res['name']} written to {readme}")


if __name__ == "__main__":
    sys.exit(main())
