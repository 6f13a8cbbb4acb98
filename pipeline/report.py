"""``python -m pipeline.report RUN_DIR...``: the papers' tables for a set of training runs.

For each run directory (a trainer ``output.dir``, a checkpoint root or a checkpoint directory: its
latest checkpoint, :func:`pipeline.checkpoint.find_checkpoint`) the ``.bin`` sets are verified under
every ``--degrade`` setting in one pass (:func:`pipeline.eval.run.evaluate`: each distinct
image embedded once per degradation). Results are cached in ``OUT/report_cache/<run>.json`` keyed by
the sha256 of the checkpoint's ``model.pt`` and ``config.yaml`` and by the evaluation settings (sets
with their size and mtime, degradations, norms): a rerun with nothing changed embeds nothing.

Written into ``--out`` (and the table printed):

- ``report.md``: checkpoints × benchmarks, 10-fold accuracy in %, the best of each column in bold;
- ``report.json``: every number (accuracy, std, AUC, TAR@FAR, threshold, norms) per checkpoint;
- ``report_accuracy.png``: accuracy vs degradation level, one line per checkpoint and degradation
  family, blur σ on one panel and resolution (px) on the other (clean = dotted line);
- with ``--norms`` (LGAF Sec. 3.1, the embedding norm falls with quality): the mean ± sd of the
  un-normalised embedding L2 norm per degradation level, a table in ``report.md`` and
  ``report_norms.png`` (norm vs level).

Example::

    python -m pipeline.report runs/arcface runs/lrfr --bin ../shared/data/lfw_view1_112/lfw_devtest_112.bin \\
        --degrade clean blur:1 blur:2 lr:7 lr:14 lr:20 cross:7 cross:14 cross:20 --norms --out reports/lfw
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from data_prep.manifest import DataError, sha256_file
from pipeline.config import ConfigError
from pipeline.core.cache import read_record, write_record
from pipeline.core.device import resolve_device
from pipeline.core.errors import print_error
from pipeline.eval.tables import NORMS_EXPECTED, format_norm

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BIN = REPO.parent / "shared" / "data" / "lfw_view1_112" / "lfw_devtest_112.bin"
DEFAULT_DEGRADE = ["clean", "blur:1", "blur:2", "lr:7", "lr:14", "lr:20", "cross:7", "cross:14", "cross:20"]
CACHE_VERSION = 1


def run_name(run: str | Path, taken: set[str]) -> str:
    """A file-safe name for a run directory (its last path part), unique among ``taken``."""
    p = Path(os.path.abspath(run))  # not resolve(): a symlink's own name is how a user names a run
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", p.name) or "run"
    if base.startswith("step_") and p.parent.name == "checkpoints":  # a checkpoint dir: name the run
        base = f"{p.parent.parent.name}_{base}"
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def cache_key(checkpoint: Path, bins: list[Path], degradations: list[str], norms: bool) -> dict:
    """What a cached result depends on: the weights, the architecture, the data and the settings."""
    return {
        "version": CACHE_VERSION,
        "model_sha256": sha256_file(checkpoint / "model.pt"),
        "config_sha256": sha256_file(checkpoint / "config.yaml"),
        "sets": [{"path": str(b.resolve()), "bytes": b.stat().st_size, "mtime_ns": b.stat().st_mtime_ns} for b in bins],
        "degradations": list(degradations),
        "norms": bool(norms),
        "flip": True,
    }


def evaluate_run(
    run: str | Path,
    name: str,
    bins: list[Path],
    degradations: list,
    cache_dir: Path,
    norms: bool = False,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = False,
) -> tuple[dict, bool]:
    """(result of one run, whether it came from the cache)."""
    from pipeline.checkpoint import find_checkpoint
    from pipeline.eval.checkpoint import load_model
    from pipeline.eval.run import evaluate
    from pipeline.eval.sets import EvalSet

    checkpoint = find_checkpoint(run)
    key = cache_key(checkpoint, bins, [d.label for d in degradations], norms)
    cache = cache_dir / f"{name}.json"
    cached = read_record(cache, key)
    if cached is not None:
        return cached, True
    net, info = load_model(checkpoint, device=device)
    out = evaluate(
        net,
        [EvalSet.from_bin(b) for b in bins],
        degradations,
        info["input_size"],
        batch_size,
        device,
        progress=progress,
        norms=norms,
    )
    result = {"run": name, "run_dir": str(run), "checkpoint": str(checkpoint), "info": info, **out}
    write_record(cache, key, result)
    return {**result, "key": key}, False


def columns(results: list[dict]) -> list[tuple[str, str]]:
    return list(dict.fromkeys((r["set"], r["degradation"]) for res in results for r in res["results"]))


def accuracy_table(results: list[dict]) -> str:
    """Markdown, checkpoints × benchmarks (set and degradation), accuracy in %; column best in bold."""
    cols = columns(results)
    one_set = len({s for s, _ in cols}) == 1
    head = [deg if one_set else f"{s} {deg}" for s, deg in cols]
    acc = {(res["run"], r["set"], r["degradation"]): r["accuracy"] for res in results for r in res["results"]}
    best = {c: max(acc[(res["run"], *c)] for res in results if (res["run"], *c) in acc) for c in cols}
    lines = ["| " + " | ".join(["checkpoint", *head]) + " |", "|---|" + "---:|" * len(cols)]
    for res in results:
        cells = []
        for c in cols:
            a = acc.get((res["run"], *c))
            text = "—" if a is None else f"{100 * a:.2f}"
            cells.append(f"**{text}**" if a is not None and a == best[c] else text)
        lines.append("| " + " | ".join([res["run"], *cells]) + " |")
    return "\n".join(lines)


def norms_table(results: list[dict]) -> str:
    """Markdown, checkpoint (× set) × degradation level: embedding L2 norm mean ± sd."""
    cols = list(dict.fromkeys(r["degradation"] for res in results for r in res["norms"]))
    lines = ["| " + " | ".join(["checkpoint", "set", *cols]) + " |", "|---|---|" + "---:|" * len(cols)]
    for res in results:
        for s in dict.fromkeys(r["set"] for r in res["norms"]):
            by = {r["degradation"]: r for r in res["norms"] if r["set"] == s}
            cells = [format_norm(by[c]["mean"], by[c]["sd"]) if c in by else "—" for c in cols]
            lines.append("| " + " | ".join([res["run"], s, *cells]) + " |")
    return "\n".join(lines + ["", NORMS_EXPECTED])


def _families(rows: list[dict]):
    """(panel, family label, line style, [(level, row)] sorted, clean row) per set: blur σ, LR px, cross px."""
    for s in dict.fromkeys(r["set"] for r in rows):
        mine = [r for r in rows if r["set"] == s]
        clean = next((r for r in mine if r["kind"] == "clean"), None)
        for kind, cross, panel, fam, style in (
            ("blur", False, 0, "blur", "-"),
            ("blur", True, 0, "blur cross", "--"),
            ("lr", False, 1, "LR", "-"),
            ("lr", True, 1, "cross", "--"),
        ):
            pts = sorted(
                ((r["level"], r) for r in mine if r["kind"] == kind and bool(r.get("cross")) == cross),
                key=lambda t: t[0],
            )
            if pts:
                yield panel, f"{s} {fam}", style, pts, clean


def _plot(results: list[dict], field: str, value, ylabel: str, path: Path, errors=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for i, res in enumerate(results):
        color = f"C{i % 10}"
        rows = res[field]
        for panel, fam, style, pts, clean in _families(rows):
            xs = [x for x, _ in pts]
            ys = [value(r) for _, r in pts]
            err = [errors(r) for _, r in pts] if errors else None
            axes[panel].errorbar(
                xs, ys, yerr=err, color=color, linestyle=style, marker="o", ms=3, capsize=2,
                label=f"{res['run']}: {fam}",
            )  # fmt: skip
            if clean is not None:
                axes[panel].axhline(value(clean), color=color, linestyle=":", linewidth=0.8)
    axes[0].set_xlabel("Gaussian blur σ (dotted: clean)")
    axes[1].set_xlabel("resolution (px) (dotted: clean)")
    for ax in axes:
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_accuracy(results: list[dict], path: Path) -> None:
    """Accuracy vs degradation level per checkpoint: blur σ on one panel, resolution px on the other."""
    _plot(results, "results", lambda r: 100 * r["accuracy"], "10-fold accuracy (%)", path)


def plot_norms(results: list[dict], path: Path) -> None:
    """Mean embedding L2 norm (± sd) vs degradation level per checkpoint (LGAF Sec. 3.1)."""
    _plot(results, "norms", lambda r: r["mean"], "embedding L2 norm (mean ± sd)", path, errors=lambda r: r["sd"])


def _parser() -> argparse.ArgumentParser:
    from pipeline.eval.degradations import DEGRADE_HELP

    ap = argparse.ArgumentParser(
        prog="python -m pipeline.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run output dirs / checkpoint dirs (latest checkpoint)")
    ap.add_argument("--bin", nargs="+", default=None, help=f"insightface .bin set(s) (default {DEFAULT_BIN})")
    ap.add_argument(
        "--degrade", nargs="+", default=DEFAULT_DEGRADE, metavar="SPEC", help=f"{DEGRADE_HELP} (default: %(default)s)"
    )
    ap.add_argument("--norms", action="store_true", help="also the embedding-norm analysis (table + PNG)")
    ap.add_argument("--out", default="report", help="output folder (default ./report); cache in OUT/report_cache")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def run(args) -> dict:
    from pipeline.eval.degradations import parse_degradations

    degradations = parse_degradations(args.degrade)
    bins = [Path(b) for b in (args.bin or [DEFAULT_BIN])]
    for b in bins:
        if not b.is_file():
            raise DataError(f"{b}: .bin file does not exist")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: must be ≥ 1, got {args.batch_size}")
    device = resolve_device(args.device)
    out = Path(args.out)
    taken: set[str] = set()
    results = []
    for r in args.runs:
        if not Path(r).exists():
            raise ConfigError(f"{r}: run directory does not exist")
        name = run_name(r, taken)
        res, cached = evaluate_run(
            r,
            name,
            bins,
            degradations,
            out / "report_cache",
            norms=args.norms,
            batch_size=args.batch_size,
            device=device,
            progress=not args.no_progress,  # a bar on a terminal, periodic lines in a log
        )
        print(f"{name}: {'cached' if cached else 'evaluated'} ({res['checkpoint']})", file=sys.stderr, flush=True)
        results.append(res)
    out.mkdir(parents=True, exist_ok=True)
    md = "## Verification accuracy (%, insightface 10-fold; best per column in bold)\n\n" + accuracy_table(results)
    if args.norms:
        md += "\n\n## Embedding L2 norm (un-normalised, no flip; mean ± sd over the distinct images)\n\n"
        md += norms_table(results)
    print(md, flush=True)
    (out / "report.md").write_text(md + "\n")
    payload = {
        "sets": [str(b) for b in bins],
        "degradations": [d.label for d in degradations],
        "checkpoints": [
            {k: res[k] for k in ("run", "run_dir", "checkpoint", "info", "results", "norms")} for res in results
        ],
    }
    (out / "report.json").write_text(json.dumps(payload, indent=1) + "\n")
    plot_accuracy(results, out / "report_accuracy.png")
    written = ["report.md", "report.json", "report_accuracy.png"]
    if args.norms:
        plot_norms(results, out / "report_norms.png")
        written.append("report_norms.png")
    print("wrote " + ", ".join(str(out / w) for w in written), file=sys.stderr)
    return payload


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        run(args)
    except (ConfigError, DataError) as exc:
        print_error(exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
