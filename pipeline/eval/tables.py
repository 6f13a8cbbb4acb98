"""Markdown tables of :func:`pipeline.eval.run.evaluate`'s rows: accuracy per set × degradation, embedding norms per
degradation level."""

from __future__ import annotations


def degraded_table(rows: list[dict], key: str = "set") -> str:
    """Markdown: one line per ``key`` value (set), one column per degradation; accuracy mean ± std."""
    cols = list(dict.fromkeys(r["degradation"] for r in rows))
    by = {(r[key], r["degradation"]): r for r in rows}
    lines = ["| " + " | ".join([key, *cols]) + " |", "|" + "---|" * (len(cols) + 1)]
    for name in dict.fromkeys(r[key] for r in rows):
        cells = [
            f"{by[(name, c)]['accuracy']:.4f} ± {by[(name, c)]['std']:.4f}" if (name, c) in by else "—" for c in cols
        ]
        lines.append("| " + " | ".join([str(name), *cells]) + " |")
    return "\n".join(lines)


NORMS_EXPECTED = (
    "expected: about √D for a trained fc head (its BatchNorm1d output; 22.6 at D = 512), lower on degraded faces "
    "(the norm tracks quality, AdaFace); orders of magnitude away = an untrained or broken network"
)


def format_norm(mean: float, sd: float) -> str:
    """``2.260e+01 ± 3.10e+00``: scientific, so 22.6 and 1.5e7 read alike and neither hides in fixed decimals."""
    return f"{mean:.3e} ± {sd:.2e}"


def norms_table(rows: list[dict], key: str = "set") -> str:
    """Markdown: embedding L2 norm (mean ± sd over the distinct images) per degradation level, then what to
    expect (:data:`NORMS_EXPECTED`)."""
    cols = list(dict.fromkeys(r["degradation"] for r in rows))
    by = {(r[key], r["degradation"]): r for r in rows}
    lines = ["| " + " | ".join([key, *cols]) + " |", "|" + "---|" * (len(cols) + 1)]
    for name in dict.fromkeys(r[key] for r in rows):
        cells = [format_norm(by[(name, c)]["mean"], by[(name, c)]["sd"]) if (name, c) in by else "—" for c in cols]
        lines.append("| " + " | ".join([str(name), *cells]) + " |")
    return "\n".join(lines + ["", NORMS_EXPECTED])
