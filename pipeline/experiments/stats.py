"""Aggregation: per-arm mean ± spread over seeds and paired differences against the reference arm."""

from __future__ import annotations

import dataclasses
import math

from pipeline.checkpoint import load_json
from pipeline.experiments.grid import Cell, base_record, cell_status
from pipeline.experiments.spec import CELL_JSON, Spec


def _describe(by_seed: dict[int, float]) -> dict:
    values = list(by_seed.values())
    n = len(values)
    mean = sum(values) / n if n else None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n >= 2 else None
    return {"n": n, "mean": mean, "sd": sd, "values": {str(s): v for s, v in by_seed.items()}}


def _paired(arm: dict[int, float], ref: dict[int, float]) -> dict:
    """Difference arm − reference over the seeds both have, with a 95 % t-interval (n − 1 dof) over seeds."""
    from scipy.stats import t

    seeds = [s for s in arm if s in ref]
    diffs = {s: arm[s] - ref[s] for s in seeds}
    out = _describe(diffs)
    out["seeds"] = seeds
    out["ci95"] = None
    if out["n"] >= 2:
        half = float(t.ppf(0.975, out["n"] - 1)) * out["sd"] / math.sqrt(out["n"])
        out["ci95"] = [out["mean"] - half, out["mean"] + half]
    return out


def summarize(
    values: dict[str, dict[int, dict[str, float]]], arms: list[str], reference: str, columns: list[str] = ()
) -> dict:
    """``values[arm][seed][column]`` → per arm and column: n, mean, sd over seeds (ddof = 1); per other arm and
    column: the paired difference vs ``reference`` (by seed) with its 95 % interval. Absent / None values are
    left out (a failed or missing cell). ``columns``: those always reported (more are found in ``values``)."""
    columns = list(columns)
    for by_seed in values.values():
        for row in by_seed.values():
            columns += [c for c in row if c not in columns]

    def column(arm: str, col: str) -> dict[int, float]:
        rows = values.get(arm, {})
        return {s: float(r[col]) for s, r in rows.items() if r.get(col) is not None}

    per_arm = {arm: {col: _describe(column(arm, col)) for col in columns} for arm in arms}
    paired = {
        arm: {col: _paired(column(arm, col), column(reference, col)) for col in columns}
        for arm in arms
        if arm != reference
    }
    return {"columns": columns, "per_arm": per_arm, "paired": paired}


def collect_records(cells: list[Cell]) -> list[dict]:
    """Each cell's record as the current spec sees it: its cell.json when the hashes match, else missing/stale."""
    records = []
    for cell in cells:
        status = cell_status(cell)
        if status in ("cached", "failed", "interrupted"):
            record = load_json(cell.dir / CELL_JSON)
        else:
            record = {**base_record(cell), "status": {"changed": "stale", "running": "running"}.get(status, "missing")}
        records.append({**record, "index": cell.index})  # its place in this grid (seeds or arms added since move it)
    return records


def build_report(spec: Spec, records: list[dict], params: dict[str, int] | None = None) -> dict:
    """The report of the cells' records; ``params``: each arm's network parameter count (:func:`arm_parameters`)."""
    arms = [a.name for a in spec.arms]
    ok = [r for r in records if r["status"] == "ok"]
    metric_values: dict = {}
    diag_values: dict = {}
    for r in ok:
        metric_values.setdefault(r["arm"], {})[r["seed"]] = {
            s.name: r["metrics"][s.name].get(s.reported(spec.metric)) for s in spec.eval
        }
        diag_values.setdefault(r["arm"], {})[r["seed"]] = r.get("diagnostics", {})
    return {
        "spec": str(spec.path),
        "metric": spec.metric,
        "set_metrics": {s.name: s.reported(spec.metric) for s in spec.eval},
        "reference": spec.reference,
        "arms": [dataclasses.asdict(a) for a in spec.arms],
        "seeds": spec.seeds,
        "budget": spec.budget,
        "nproc": spec.nproc,
        "eval_sets": [e.identity() for e in spec.eval],
        "complete": len(ok) == len(records),
        "counts": {s: sum(r["status"] == s for r in records) for s in sorted({r["status"] for r in records})},
        "params": params or {},
        "summary": summarize(metric_values, arms, spec.reference, [e.name for e in spec.eval]),
        "diagnostics": summarize(diag_values, arms, spec.reference),
        "cells": records,
    }
