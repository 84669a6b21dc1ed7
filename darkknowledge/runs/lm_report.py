"""The report of a language-model run: students against the same student trained alone, and the caches.

Rows group the results entries by arm (and the cache it read); each shows the held-out perplexity
over seeds (mean ± std), the paired difference to the arm trained alone with cross-entropy (a
t-interval over seeds; lower is better), the KL to the teacher on held-out text, next-token
accuracy and training tokens per second. Verdicts state which of the issue's targets held.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from darkknowledge.stats import mean_std, paired_ci


def _by_seed(entries: Sequence[dict[str, Any]], key: str) -> dict[Any, float]:
    return {e["seed"]: float(e[key]) for e in entries if e.get(key) is not None}


def lm_rows(results: Sequence[dict[str, Any]], baseline_arm: str | None) -> list[dict[str, Any]]:
    """One row per (arm, cache) over seeds, with paired differences to ``baseline_arm``."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for e in results:
        if e.get("role") in ("student", "baseline"):
            groups.setdefault(e["name"].rsplit("-s", 1)[0], []).append(e)
    base = groups.get(baseline_arm) if baseline_arm else None
    rows = []
    for label, entries in groups.items():
        ppl = _by_seed(entries, "heldout_ppl")
        row: dict[str, Any] = {
            "label": label,
            "arm": entries[0]["arm"],
            "method": entries[0]["method"],
            "cache": entries[0].get("cache"),
            "seeds": sorted(ppl),
            "n": len(ppl),
        }
        row["ppl"], row["ppl_std"] = mean_std(ppl.values())
        row["ppl_by_seed"] = ppl
        row["val_ppl"] = mean_std(_by_seed(entries, "val_ppl").values())[0]
        row["kl"] = (
            mean_std(_by_seed(entries, "kl_teacher_student").values())[0]
            if any(e.get("kl_teacher_student") is not None for e in entries)
            else math.nan
        )
        row["acc"] = mean_std(_by_seed(entries, "next_token_acc").values())[0]
        row["tok_s"] = mean_std(_by_seed(entries, "train_tokens_per_s").values())[0]
        cache = entries[0].get("teacher_cache") or {}
        row["bytes_per_token"] = cache.get("bytes_per_token")
        row["reads_teacher"] = entries[0]["role"] == "student"
        if base is not None and label != baseline_arm:
            row["vs_base"] = paired_ci(ppl, _by_seed(base, "heldout_ppl"))
        rows.append(row)
    return rows


def _pm(m: float, s: float, n: int, digits: int = 1) -> str:
    if math.isnan(m):
        return "—"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if n > 1 else f"{m:.{digits}f}"


def _diff(row: dict[str, Any]) -> str:
    d = row.get("vs_base")
    if not d or d["n"] == 0:
        return "—"
    ci = f" [{d['lo']:+.1f}, {d['hi']:+.1f}]" if d["n"] > 1 else ""
    lower = d["n"] - d["wins"] - d["ties"]  # seeds where the arm's perplexity is lower than the baseline's
    return f"{d['mean_diff']:+.1f}{ci}, lower on {lower}/{d['n']}"


def table_lines(rows: Sequence[dict[str, Any]], teacher: dict[str, Any] | None) -> list[str]:
    """The main Markdown table (teacher first)."""
    out = [
        (
            "| student | objective | teacher outputs | held-out ppl | Δ ppl vs alone (95% CI) | KL(t‖s) | "
            "next-token acc | train tok/s | seeds |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if teacher is not None:
        out.append(
            f"| teacher ({teacher['model']}, {teacher['params'] / 1e6:.1f}M) | pre-trained | — | "
            f"{teacher['heldout_ppl']:.1f} | — | 0 | {teacher['next_token_acc']:.2f} | — | — |"
        )
    for r in rows:
        source = "none (alone)" if not r["reads_teacher"] else r["cache"] if r["cache"] != "none" else "live teacher"
        if r["bytes_per_token"] and r["reads_teacher"]:
            source += f" ({r['bytes_per_token']:,} B/token)"
        kl = f"{r['kl']:.3f}" if r["kl"] == r["kl"] else "—"
        out.append(
            f"| {r['label']} | {r['method']} | {source} | {_pm(r['ppl'], r['ppl_std'], r['n'])} | {_diff(r)} | "
            f"{kl} | {r['acc']:.2f} | {r['tok_s']:,.0f} | {','.join(str(s) for s in r['seeds'])} |"
        )
    return out


def verdicts(rows: Sequence[dict[str, Any]], baseline_arm: str | None) -> list[str]:
    """Plain statements of what held: distillation against training alone, sparse against dense, speed."""
    out = []
    by_label = {r["label"]: r for r in rows}
    base = by_label.get(baseline_arm or "")
    for r in rows:
        d = r.get("vs_base")
        if d is None or d["n"] == 0 or base is None:
            continue
        better = r["ppl"] < base["ppl"]
        sure = d["n"] > 1 and d["hi"] < 0
        out.append(
            f"- {r['label']}: held-out perplexity {r['ppl']:.1f} against {base['ppl']:.1f} alone: "
            + ("lower" if better else "not lower")
            + (", and the 95% interval of the paired difference excludes 0" if sure else "")
            + "."
        )
    for r in rows:
        arm_dense = [o for o in rows if o["arm"] == r["arm"] and o["cache"] == "dense" and o is not r]
        if r["cache"] in ("topk", "sampled") and arm_dense:
            ref = arm_dense[0]
            d = paired_ci(r["ppl_by_seed"], ref["ppl_by_seed"])
            head = (
                f"- {r['label']} ({r['bytes_per_token']} bytes/token): perplexity {r['ppl']:.1f} against "
                f"{ref['ppl']:.1f} from the full distribution (paired difference {d['mean_diff']:+.1f}"
            )
            if d["n"] < 2:
                out.append(head + "; one seed, so no interval: run several seeds to judge the gap).")
            else:
                within = d["lo"] <= 0.0 <= d["hi"]
                out.append(
                    head
                    + f", 95% CI [{d['lo']:+.1f}, {d['hi']:+.1f}] over {d['n']} seeds): "
                    + ("within noise." if within else "a real difference at this level.")
                )
    if base is not None:
        for r in rows:
            if r["cache"] in ("topk", "sampled") and r["tok_s"] == r["tok_s"]:
                out.append(
                    f"- {r['label']} trains at {r['tok_s'] / base['tok_s']:.2f}x the tokens/s of the student "
                    "alone with cross-entropy (same machine, same run)."
                )
    return out


def render_lm_report(
    title: str,
    rows: Sequence[dict[str, Any]],
    teacher: dict[str, Any] | None,
    notes: Sequence[str],
    caches: Sequence[dict[str, Any]],
    baseline_arm: str | None,
    samples: dict[str, list[str]] | None = None,
    prompts: Sequence[str] = (),
) -> str:
    """``report.md``: the table, the verdicts, the caches and the generations."""
    lines = [
        f"# {title}",
        "",
        *table_lines(rows, teacher),
        "",
        (
            "Perplexity is exp(mean cross-entropy) over the held-out target tokens (documents never trained on); "
            "Δ is the paired per-seed difference to the same student trained alone with cross-entropy from the same "
            "initialisation (negative: distillation helped); KL(t‖s) is the per-token KL from the teacher on "
            "held-out text."
        ),
        "",
    ]
    found = verdicts(rows, baseline_arm)
    if found:
        lines += ["## Verdict", "", *found, ""]
    if caches:
        lines += [
            "## Teacher-output caches",
            "",
            "| cache | bytes/token | size MB | build s | teacher tok/s | blocks |",
            "|---|---|---|---|---|---|",
        ]
        for c in caches:
            lines.append(
                f"| {c.get('kind')} | {c.get('bytes_per_token'):,} | {c.get('size_mb', 0):.1f} | "
                f"{c.get('build_seconds', 0):.1f} | {c.get('teacher_tokens_per_s', 0):,.0f} | "
                f"{c.get('blocks', '')} |"
            )
        lines.append("")
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    if samples and prompts:
        lines += ["## Generations (greedy)", ""]
        for i, prompt in enumerate(prompts):
            lines.append(f"**Prompt:** {prompt}")
            lines.append("")
            for name, outs in samples.items():
                text = " ".join(outs[i].split()) if i < len(outs) else ""
                lines.append(f"- *{name}*: {text[:300] or '(nothing)'}")
            lines.append("")
    return "\n".join(lines)
