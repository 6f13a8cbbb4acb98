"""The Markdown table (and its JSON) of a spec's report."""

from __future__ import annotations

from collections.abc import Callable

from pipeline.checkpoint import save_json
from pipeline.experiments.grid import Cell, parameter_count
from pipeline.experiments.spec import Spec
from pipeline.experiments.stats import build_report, collect_records


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _mean_sd(stats: dict, show: Callable[[float | None], str]) -> str:
    if not stats["n"]:
        return "–"
    if stats["sd"] is None:
        return f"{show(stats['mean'])} (n=1)"
    return f"{show(stats['mean'])} ± {show(stats['sd'])}"


def _diff(stats: dict, scale: float, fmt: str) -> str:
    if not stats["n"]:
        return "–"
    d = format(scale * stats["mean"], fmt)
    if stats["ci95"] is None:
        return f"{d} [n/a] (n={stats['n']})"
    lo, hi = (format(scale * v, fmt) for v in stats["ci95"])
    return f"{d} [{lo}, {hi}] (n={stats['n']})"


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.4g}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def _cell_state(record: dict) -> str:
    status = record["status"]
    if status in ("failed", "interrupted"):
        log = f"; {record['log']}" if record.get("log") else ""
        return f"**{status}** (exit {record.get('exit_code')}{log})"
    if status == "stale":
        return "**stale** (config changed since it ran)"
    if status == "running":
        return "**running** (in another process)"
    return status if status == "ok" else f"**{status}**"


def render_markdown(spec: Spec, report: dict) -> str:
    """The ablation's report: what was run, the metric per arm, the paired differences, the diagnostics, the cells."""
    reported = {e.name: e.reported(spec.metric) for e in spec.eval}
    lines = _header(spec, report, reported)
    lines += _metric_tables(spec, report, reported)
    lines += _diagnostic_tables(spec, report["diagnostics"])
    lines += _cells_table(spec, report, reported)
    return "\n".join(lines)


def _header(spec: Spec, report: dict, reported: dict[str, str]) -> list[str]:
    budget = ", ".join(f"{k}={v}" for k, v in spec.budget.items())
    own = [e for e in spec.eval if reported[e.name] != spec.metric]
    what = f"{spec.metric} in % (insightface 10-fold protocol on each set)"
    if own:
        what = f"{spec.metric} in % (insightface 10-fold protocol) on the pair sets; " + "; ".join(
            f"`{e.name}`: {reported[e.name]}"
            + (" in % over all pairs of its images" if e.images else " in % (10-fold protocol)")
            for e in own
        )
    lines = [
        f"# Ablation `{spec.path.stem}`: {spec.metric}",
        "",
        f"Spec `{spec.path}`; budget {budget}; seeds {', '.join(map(str, spec.seeds))}; {spec.nproc} process(es) per "
        f"cell. {what}; mean ± sd over seeds (sd with "
        f"ddof = 1); paired differences vs `{spec.reference}` in points, by seed, with a 95 % t-interval over the "
        "seeds (n − 1 degrees of freedom; n/a with fewer than 2 pairs).",
        "",
    ]
    if not report["complete"]:
        counts = ", ".join(f"{n} {s}" for s, n in report["counts"].items() if s != "ok")
        lines += [
            f"**Incomplete: {counts}** of {len(report['cells'])} cells; the tables use the cells that finished.",
            "",
        ]
    return lines


def _metric_tables(spec: Spec, report: dict, reported: dict[str, str]) -> list[str]:
    sets = [e.name for e in spec.eval]
    arms = [a.name for a in spec.arms]
    summary, params = report["summary"], report.get("params", {})
    rows = [
        [
            f"{arm}{' (ref)' if arm == spec.reference else ''}",
            f"{params[arm]:,}" if arm in params else "–",
            str(max((summary["per_arm"][arm][s]["n"] for s in sets), default=0)),
        ]
        + [_mean_sd(summary["per_arm"][arm][s], _pct) for s in sets]
        for arm in arms
    ]
    heads = [s if reported[s] == spec.metric else f"{s} ({reported[s]})" for s in sets]
    lines = [
        f"## {spec.metric} (%): mean ± sd over seeds",
        "",
        *_table(["arm", "params", "n", *heads], rows),
        "",
        "params: the network's (trunk, inserts, head; the classifier adds classes × embedding size).",
        "",
    ]
    others = [a for a in arms if a != spec.reference]
    if others:
        title = f"## Paired difference vs `{spec.reference}` (points, 95 % interval)"
        lines += _paired_section(title, summary["paired"], others, sets, 100, "+.2f")
    return lines


def _diagnostic_tables(spec: Spec, diags: dict) -> list[str]:
    arms = [a.name for a in spec.arms]
    dcols = diags["columns"]
    if not dcols:
        return []
    rows = [[arm] + [_mean_sd(diags["per_arm"][arm][c], _num) for c in dcols] for arm in arms]
    lines = ["## Diagnostics: mean ± sd over seeds", "", *_table(["arm", *dcols], rows), ""]
    others = [a for a in arms if a != spec.reference]
    if others:
        title = f"Paired difference vs `{spec.reference}` (95 % interval):"
        lines += _paired_section(title, diags["paired"], others, dcols, 1, "+.4g")
    return lines


def _paired_section(
    title: str, paired: dict, others: list[str], columns: list[str], scale: float, fmt: str
) -> list[str]:
    """Each arm's paired difference vs the reference per column (its 95 % interval), then the resolved ones."""
    rows = [[arm] + [_diff(paired[arm][c], scale, fmt) for c in columns] for arm in others]
    resolved = resolved_comparisons(paired, others, columns, scale, fmt)
    return [
        title,
        "",
        *_table(["arm", *columns], rows),
        "",
        "Resolved (the 95 % interval excludes 0): " + ("" if resolved else "none."),
        *resolved,
        "",
    ]


def _cells_table(spec: Spec, report: dict, reported: dict[str, str]) -> list[str]:
    sets = [e.name for e in spec.eval]
    dcols = report["diagnostics"]["columns"]
    rows = []
    for r in report["cells"]:
        ok = r["status"] == "ok"
        row = [str(r["index"]), r["arm"], str(r["seed"]), _cell_state(r)]
        row += [_pct(r["metrics"][s].get(reported[s])) if ok else "–" for s in sets]
        row += [_num(r.get("diagnostics", {}).get(c)) if ok else "–" for c in dcols]
        row += [str(r.get("train_s", "–")), str(r.get("eval_s", "–"))]
        rows.append(row)
    head = ["#", "arm", "seed", "status", *sets, *dcols, "train s", "eval s"]
    return ["## Cells", "", *_table(head, rows), ""]


def arm_parameters(cells: list[Cell]) -> dict[str, int]:
    """Each arm's network parameter count (from its first cell's resolved config; seeds do not change it)."""
    out: dict[str, int] = {}
    for cell in cells:
        if cell.arm not in out:
            out[cell.arm] = parameter_count(cell.config)
    return out


def resolved_comparisons(paired: dict, arms: list[str], columns: list[str], scale: float, fmt: str) -> list[str]:
    """The paired comparisons whose 95 % interval excludes 0, one line each (what the prose may call an effect)."""
    out = []
    for arm in arms:
        for col in columns:
            stats = paired.get(arm, {}).get(col)
            ci = stats and stats.get("ci95")
            if ci and (ci[0] > 0 or ci[1] < 0):
                lo, hi = (format(scale * v, fmt) for v in ci)
                out.append(f"- `{arm}` on `{col}`: {format(scale * stats['mean'], fmt)} [{lo}, {hi}] (n={stats['n']})")
    return out


def write_report(spec: Spec, cells: list[Cell]) -> dict:
    """results.json + results.md in the output folder, from the cells on disk."""
    report = build_report(spec, collect_records(cells), arm_parameters(cells))
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    save_json(spec.out_dir / "results.json", report)
    markdown = render_markdown(spec, report)
    (spec.out_dir / "results.md").write_text(markdown)
    return {**report, "markdown": markdown}
