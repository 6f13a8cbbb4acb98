"""bench_gpu's report: ``bench_gpu.md`` (one section per part, in a fixed order) and ``bench_gpu.json``, written
atomically after every part ("incomplete" until the run ends)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.gpu.flops import PUBLISHED_R100_GFLOP


def fmt(v, spec=".3f", none="—") -> str:
    return none if v is None else format(v, spec)


def profile_table(prof: dict, title: str) -> list[str]:
    L = [f"### {title}", "", "| variant | wall ms/step | GPU kernels ms/step | host ops/step | host reads/step |"]
    L += ["|---|---:|---:|---:|---:|"]
    for name, r in prof.items():
        if isinstance(r, dict):
            L.append(
                f"| {name} | {r['wall_ms']:.1f} | {fmt(r['gpu_kernel_ms'], '.1f')} | {r['host_ops']:.0f} | "
                f"{r['host_reads']:.0f} |"
            )
    return L + ["", "(top operators of each: bench_gpu_profile.txt)", ""]


def markdown(R: dict) -> str:
    L = _head(R["machine"]) + _flops(R.get("flops", {})) + _loader(R.get("loader", {})) + _dali(R.get("dali", {}))
    L += _train(R.get("train", {})) + _levers(R.get("levers", {})) + _scan(R.get("scan", {}))
    L += _classifier(R.get("classifier", {})) + _errors(R.get("errors", {}))
    return "\n".join(L)


def _head(m: dict) -> list[str]:
    return [
        f"# bench_gpu.py — {m['device_name']} ({'CPU SMOKE: tiny sizes, not a measurement' if m['cpu_smoke'] else 'measured'})",
        "",
        f"torch {m['torch']}, {m['cpu_cores']} CPU cores, {m['date']}; peak bf16 {fmt(m['peak_tflops'], '.1f')} TFLOP/s "
        f"({m['peak_source']}); timing: {m['timing']}",
        "",
    ]


def _flops(fl: dict) -> list[str]:
    if not fl:
        return []
    L = ["## FLOPs (FlopCounterMode, 2 FLOPs per multiply-add, 112 px, per image)", ""]
    L += ["| network | forward GFLOP | counted fwd+bwd / fwd | parameters (M) |", "|---|---:|---:|---:|"]
    for k, v in fl.items():
        if isinstance(v, dict) and "fwd_flop" in v:
            L.append(
                f"| {k} | {v['fwd_flop'] / 1e9:.3f} | {v['train_flop_counted'] / v['fwd_flop']:.2f} | {v['params'] / 1e6:.3f} |"
            )
    if "r100_vs_published" in fl:
        L += ["", f"iresnet100 forward / published {PUBLISHED_R100_GFLOP} GFLOP: **{fl['r100_vs_published']:.4f}**"]
    L.append("")
    return L


def _loader(ld: dict) -> list[str]:
    L = ["## Loader", ""]
    if "skipped" in ld:
        L += [f"skipped: {ld['skipped']}", ""]
    elif ld:
        L += [
            "| loader | batch | threads/workers | img/s |",
            "|---|---:|---:|---:|",
            f"| DALI ({ld['dali_device']}) | {ld['batch']} | {ld['dali_threads']} | {ld['dali_img_s']:.0f} |",
            f"| torch | {ld['batch']} | {ld['torch_workers']} | {ld['torch_img_s']:.0f} |",
            "",
            f"DALI / torch: **{ld['dali_over_torch']:.2f}**",
            "",
        ]
    return L


def _dali(dl: dict) -> list[str]:
    if "sweep" not in dl:
        if "skipped" in dl and dl["skipped"] != "not in --parts":
            return ["## DALI sweep", "", f"skipped: {dl['skipped']}", ""]
        return []
    L = [f"## DALI sweep ({dl['dali_device']}, batch {dl['batch']})", ""]
    L += ["| threads | prefetch | hw_decoder_load | img/s |", "|---:|---:|---:|---:|"]
    for r in dl["sweep"]:
        L.append(f"| {r['threads']} | {r['prefetch']} | {r['hw_decoder_load']} | {r['img_s']:.0f} |")
    fed = dl.get("trainer_fed", {})
    if "fed_over_memory" in fed:
        L += [
            "",
            f"Trainer iresnet{fed['depth']} batch {fed['batch']} fed by DALI (the best row): "
            f"{fed['dali_fed_img_s']:.0f} img/s vs {fed['in_memory_img_s']:.0f} on an in-memory batch: "
            f"**{fed['fed_over_memory']:.3f}** (goal ≥ 0.95)",
        ]
    elif fed:
        L += ["", f"trainer fed by DALI: skipped: {fed.get('skipped')}"]
    L.append("")
    return L


def _train(tr: dict) -> list[str]:
    if "runs" not in tr:
        return ["## Training step", "", f"skipped: {tr.get('skipped')}", ""] if tr else []
    L = [f"## Training step ({tr['precision']})", ""]
    L += [
        "| network | batch | bare img/s | bare MFU | trainer img/s | trainer MFU | trainer / bare | bare peak step MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in tr["runs"]:
        t = r.get("trainer") or {}
        L.append(
            f"| iresnet{r['depth']} | {r['batch']} | {r['bare']['img_s']:.1f} | {fmt(r['bare']['mfu'], '.1%')} | "
            f"{fmt(t.get('img_s'), '.1f')} | {fmt(t.get('mfu'), '.1%')} | {fmt(r['trainer_over_bare'])} | "
            f"{fmt(r['bare']['peak_step_mib'], '.0f')} |"
        )
    notes = {r["trainer_note"] for r in tr["runs"] if r["trainer_note"]}
    L += [""] + [f"note: {n}" for n in notes] + ([""] if notes else [])
    if tr.get("profile"):
        L += profile_table(tr["profile"], f"Where a step goes ({tr['profile']['label']})")
    return L


def _levers(lv: dict) -> list[str]:
    if "variants" not in lv:
        return []
    L = [
        f"## Levers (bare loop, iresnet{lv['depth']}, batch {lv['batch']}, compile backend "
        f"{lv['compile_backend']}; all = {lv['all_is']})",
        "",
    ]
    L += ["| variant | img/s | speed-up vs default | note |", "|---|---:|---:|---|"]
    for k, v in lv["variants"].items():
        L.append(f"| {k} | {fmt(v.get('img_s'), '.1f')} | {fmt(v['speedup_vs_default'])} | {v.get('note') or ''} |")
    L.append("")
    return L


def _scan(sc: dict) -> list[str]:
    if "train_scan_over_plain" not in sc:
        return []
    L = [
        f"## SCAN (iresnet{sc['depth']})",
        "",
        "| ratio | measured | goal |",
        "|---|---:|---|",
        f"| training step SCAN / plain (batch {sc['train_batch']}) | **{sc['train_scan_over_plain']:.3f}** | <= 1.3 |",
        f"| inference folded SCAN / plain (batch {sc['infer_batch']}) | **{sc['infer_folded_over_plain']:.3f}** | <= 1.02 |",
        "",
        f"parameters plain / folded: {sc['params_plain']:,} / {sc['params_folded']:,} ({'equal' if sc['params_equal'] else 'DIFFERENT'})",
        "",
    ]
    if sc.get("profile"):
        L += profile_table(sc["profile"], f"Where a training step goes (iresnet{sc['depth']} vs SCAN)")
    return L


def _classifier(cl: dict) -> list[str]:
    if "runs" not in cl:
        return []
    L = [f"## Sharded classifier ({cl['classes']:,} classes, D {cl['dim']}, batch {cl['batch']}, one device)", ""]
    L += [
        "| sample rate | step ms | TF32 speed-up | peak MiB | predicted peak MiB (at) | measured / predicted | state MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in cl["runs"]:
        L.append(
            f"| {r['sample_rate']} | {r['step_s'] * 1000:.1f} | {fmt(r.get('tf32_speedup'))} | "
            f"{fmt(r['peak_mib'], '.1f')} | {r['predicted_peak_mib']:.1f} ({r['predicted_peak_at']}) | "
            f"{fmt(r['peak_over_predicted'])} | {r['state_mib']:.1f} |"
        )
    L += ["", f"peak: {cl['runs'][0]['peak_how']}", ""]
    return L


def _errors(errs: dict) -> list[str]:
    return ["## Errors", ""] + [f"- {k}: {v}" for k, v in errs.items()] + [""] if errs else []


def write_results(out: Path | None, R: dict, final: bool) -> str:
    """bench_gpu.json and bench_gpu.md into ``out`` (atomically); before the end they say "incomplete"."""
    R["machine"]["complete"] = final
    md = markdown(R)
    if not final:
        md = md.replace("\n", "\n\n**incomplete: the run had not finished when this was written**\n", 1)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in (
            ("bench_gpu.json", json.dumps(R, indent=1, default=str) + "\n"),
            ("bench_gpu.md", md + "\n"),
        ):
            tmp = out / f".{name}.tmp"
            tmp.write_text(text)
            tmp.replace(out / name)
    return md
