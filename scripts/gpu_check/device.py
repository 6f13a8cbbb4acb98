#!/usr/bin/env python3
"""GPU-machine side of `make gpu-check` (docs/gpu-check.md). Standard library only: it runs under the
device image's python3 before any of our wheels are installed.

  device.py install --stage /tmp/lowq_gpu_stage --target /tmp/lowq_site [--without dali]
      reassemble the received chunks into wheels, check every sha256 against manifest.json,
      `pip install --no-index --no-deps --target` them (skipped when the same set is already there)
  device.py probe --out env.json [--imports "deepspeed nvidia.dali"] [--allow-cpu]
      versions, the CUDA device, one import of each package we carry
  device.py summary --steps steps.tsv --env env.json --out-dir DIR
      summary.json + one closing line; warns about files in DIR the tool would not bring back

Errors are one line on stderr starting with "gpu-check:"; exit status 3.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = 1
BLOCK = 8 << 20
STAMP = ".lowq_installed"
# What the device tool brings back from $OUT (device README, Limits).
OUT_MAX_FILES, OUT_MAX_BYTES, OUT_MAX_DEPTH = 8, 16 << 20, 3
OUT_NAME_OK = re.compile(r"^[A-Za-z0-9._-]+$")


class CheckError(Exception):
    """A problem the operator must act on; printed as one line."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
    return h.hexdigest()


def load_manifest(stage: Path) -> dict:
    path = stage / MANIFEST
    if not path.is_file():
        raise CheckError(f"no {path}: no part was received here (fresh machine?); send part_00.. again with receive.sh")
    try:
        man = json.loads(path.read_text())
    except ValueError as e:
        raise CheckError(f"{path} is not valid JSON ({e}); send any part again with receive.sh") from e
    if man.get("format") != FORMAT:
        raise CheckError(f"{path} has format {man.get('format')!r}, this script reads {FORMAT}; re-run make gpu-stage")
    return man


def assemble(
    stage: Path, wheels_dir: Path, without: tuple[str, ...] = (), skip: frozenset[str] = frozenset()
) -> list[Path]:
    """Concatenate each wheel's chunks into wheels_dir, checking chunk and wheel sha256.

    Wheels of a group in `without` and files named in `skip` are left out. Every problem is collected
    first and reported in ONE line (which wheel, which part to re-send)."""
    man = load_manifest(stage)
    wheels_dir.mkdir(parents=True, exist_ok=True)
    done: list[Path] = []
    missing: dict[str, set[str]] = {}
    corrupt: dict[str, set[str]] = {}
    for w in man["wheels"]:
        if w["group"] in without or w["file"] in skip:
            continue
        absent = [c for c in w["chunks"] if not (stage / c["file"]).is_file()]
        if absent:
            missing[w["file"]] = {c["part"] for c in absent}
            continue
        dst = wheels_dir / w["file"]
        tmp = dst.with_name(dst.name + ".tmp")
        whole = hashlib.sha256()
        bad_parts = set()
        with open(tmp, "wb") as out:
            for c in w["chunks"]:
                part_hash = hashlib.sha256()
                size = 0
                with open(stage / c["file"], "rb") as f:
                    while block := f.read(BLOCK):
                        part_hash.update(block)
                        whole.update(block)
                        out.write(block)
                        size += len(block)
                if size != c["size"] or part_hash.hexdigest() != c["sha256"]:
                    bad_parts.add(c["part"])
        if bad_parts or whole.hexdigest() != w["sha256"]:
            tmp.unlink()
            corrupt[w["file"]] = bad_parts or {c["part"] for c in w["chunks"]}
            continue
        os.replace(tmp, dst)
        done.append(dst)
    if missing or corrupt:
        items = [f"{name} missing ({', '.join(sorted(p))} not received)" for name, p in sorted(missing.items())]
        items += [f"{name} corrupt (sha256 mismatch in {', '.join(sorted(p))})" for name, p in sorted(corrupt.items())]
        parts = sorted(set().union(*missing.values(), *corrupt.values()))
        groups = sorted({w["group"] for w in man["wheels"] if w["file"] in missing or w["file"] in corrupt})
        raise CheckError(
            f"{len(items)} wheel(s) not usable: {'; '.join(items)}. Send {', '.join(parts)} again with receive.sh"
            f" (or skip the group with GPU_CHECK_WITHOUT={','.join(groups)})"
        )
    return done


NAMESPACE_INIT = "__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n"


def _code_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def fix_namespace_inits(target: Path) -> list[str]:
    """Make top-level folders shared with the image, such as `nvidia/`, extend their __path__.

    Several nvidia-* wheels ship an empty `nvidia/__init__.py`; installed with --target in front of
    PYTHONPATH it would hide the image's own `nvidia.*` packages (cublas, cudnn, ...) from imports.
    With pkgutil.extend_path both folders are searched. Only empty inits of folders that also exist
    on this python's sys.path are touched."""
    elsewhere = [Path(p) for p in sys.path if p and Path(p).is_dir() and Path(p).resolve() != target.resolve()]
    fixed = []
    for init in sorted(target.glob("*/__init__.py")):
        name = init.parent.name
        if not any((p / name).is_dir() for p in elsewhere):
            continue
        code = _code_lines(init.read_text(errors="replace"))
        if not code:
            init.write_text(NAMESPACE_INIT)
        if not code or code == [NAMESPACE_INIT.strip()]:
            fixed.append(name)
    return fixed


def image_version(name: str, spec: str, target: Path) -> str | None:
    """The version of `name` this python3 has outside `target`, if it satisfies `spec`."""
    from importlib import metadata

    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:
        return None  # cannot compare: install the fallback
    want = re.sub(r"[-_.]+", "-", name).lower()
    for d in metadata.distributions():
        n = re.sub(r"[-_.]+", "-", d.metadata["Name"] or "").lower()
        where = str(d.locate_file(""))
        if n == want and not where.startswith(str(target)):
            return d.version if SpecifierSet(spec).contains(d.version, prereleases=True) else None
    return None


def install(stage: Path, target: Path, without: tuple[str, ...] = (), python: str = sys.executable) -> str:
    man_sha = sha256_file(stage / MANIFEST) if (stage / MANIFEST).is_file() else ""
    key = json.dumps({"manifest": man_sha, "without": sorted(without)})
    stamp = target / STAMP
    if stamp.is_file() and stamp.read_text() == key:
        return f"already installed in {target} (same manifest), nothing to do"
    t0 = time.monotonic()
    man = load_manifest(stage)
    skip, kept = set(), []
    for w in man["wheels"]:
        if w.get("if_image_lacks") and w["group"] not in without:
            v = image_version(w["name"], w["if_image_lacks"], target)
            if v:
                skip.add(w["file"])
            else:
                kept.append(f"{w['name']} {w['version']}")
    wheels = assemble(stage, stage / "wheels", without, frozenset(skip))
    if not wheels:
        raise CheckError(f"no wheel to install from {stage} (all groups skipped?)")
    t1 = time.monotonic()
    if target.exists():
        shutil.rmtree(target)
    cmd = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"]
    cmd += ["--disable-pip-version-check", "--upgrade", "--target", str(target), *map(str, wheels)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout + r.stderr)
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        raise CheckError(f"pip install --target {target} failed (rc {r.returncode}): {last}")
    fixed = fix_namespace_inits(target)
    stamp.write_text(key)
    size = sum(w.stat().st_size for w in wheels) / 2**20
    return (
        f"{len(wheels)} wheels ({size:.1f} MiB) verified in {t1 - t0:.1f} s, installed into {target} in "
        f"{time.monotonic() - t1:.1f} s"
        + (f"; over the image's (too old or absent): {', '.join(kept)}" if kept else "")
        + (f"; image's own kept: {len(skip)} fallback wheel(s)" if skip else "")
        + (f"; namespace folders made shared: {', '.join(fixed)}" if fixed else "")
    )


# ---------------------------------------------------------------- probe
VERSIONS = [
    "torch",
    "numpy",
    "deepspeed",
    "nvidia-dali-cuda130",
    "nvidia-dali-cuda120",
    "nvidia-nvimgcodec-cu13",
    "webdataset",
    "submitit",
    "pydantic",
    "tensorboard",
    "onnxruntime",
]


# What the probe imports for each wheel group that was installed.
GROUP_IMPORTS = {"core": ["deepspeed", "webdataset", "submitit"], "dali": ["nvidia.dali"]}


def default_imports(stage: Path, without: tuple[str, ...]) -> list[str]:
    """The imports of the groups staged and not skipped (all of them when nothing was staged)."""
    try:
        groups = {w["group"] for w in load_manifest(stage)["wheels"]}
    except CheckError:
        groups = set(GROUP_IMPORTS)
    return [m for g, mods in GROUP_IMPORTS.items() if g in groups and g not in without for m in mods]


def probe(imports: list[str], allow_cpu: bool) -> tuple[dict, list[str]]:
    from importlib import import_module, metadata

    info: dict = {"python": sys.version.split()[0], "executable": sys.executable, "versions": {}, "imports": {}}
    problems = []
    for name in VERSIONS:
        try:
            info["versions"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    try:
        import torch

        cuda = torch.cuda.is_available()
        info["torch_cuda"] = torch.version.cuda
        info["cuda_available"] = cuda
        if cuda:
            p = torch.cuda.get_device_properties(0)
            info["device"] = torch.cuda.get_device_name(0)
            info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
            info["device_memory_gib"] = round(p.total_memory / 2**30, 1)
            info["device_count"] = torch.cuda.device_count()
        elif not allow_cpu:
            problems.append("torch sees no CUDA device")
    except Exception as e:  # report, do not crash the check
        problems.append(f"import torch failed: {type(e).__name__}: {e}")
    for mod in imports:
        t0 = time.monotonic()
        try:
            m = import_module(mod)
            extra = ""
            if mod == "deepspeed":
                from deepspeed.accelerator import get_accelerator

                extra = f" accelerator={get_accelerator()._name}"
            info["imports"][mod] = f"ok {getattr(m, '__version__', '')}{extra} ({time.monotonic() - t0:.1f} s)"
        except Exception as e:
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            info["imports"][mod] = "FAILED " + msg
            problems.append(f"import {mod} failed: {msg}")
    return info, problems


# ---------------------------------------------------------------- summary
def out_problems(out_dir: Path) -> list[str]:
    """What the device tool would not bring back from $OUT (8 files, 16 MiB each, 2 folders down)."""
    files = [p for p in sorted(out_dir.rglob("*")) if p.is_file() or p.is_symlink()]
    bad = []
    for p in files:
        rel = p.relative_to(out_dir)
        if p.is_symlink():
            bad.append(f"{rel} (a link)")
        elif p.stat().st_size > OUT_MAX_BYTES:
            bad.append(f"{rel} (over 16 MiB)")
        elif len(rel.parts) > OUT_MAX_DEPTH:
            bad.append(f"{rel} (more than 2 folders down)")
        elif not all(OUT_NAME_OK.match(s) for s in rel.parts):
            bad.append(f"{rel} (odd characters in its name)")
    if len(files) > OUT_MAX_FILES:
        bad.append(f"{len(files)} files, only {OUT_MAX_FILES} come back")
    return bad


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def table(out_dir: Path) -> list[str]:
    """The figures that matter, from what this call wrote into ``out_dir`` (bench_gpu.json, bench_eval.json, the
    pytest log): at most 40 lines, printed last so that the end of a device call's output is the answer."""
    L: list[str] = []
    bench = out_dir / "bench_gpu.json"
    R = json.loads(bench.read_text()) if bench.is_file() else {}
    for r in R.get("train", {}).get("runs", []):
        b, t = r.get("bare", {}), r.get("trainer") or {}
        L.append(
            f"train r{r['depth']} b{r['batch']}: bare {_fmt(b.get('img_s'), '.0f')} img/s (MFU {_fmt(b.get('mfu'), '.1%')}),"
            f" trainer {_fmt(t.get('img_s'), '.0f')} img/s (MFU {_fmt(t.get('mfu'), '.1%')}),"
            f" trainer/bare {_fmt(r.get('trainer_over_bare'), '.3f')} (goal ≥ 0.95)"
        )
    prof = R.get("train", {}).get("profile", {})
    for name in ("bare", "trainer"):
        p = prof.get(name)
        if p:
            L.append(
                f"  profile {prof.get('label', '')} {name}: {_fmt(p.get('wall_ms'), '.1f')} ms/step, GPU kernels"
                f" {_fmt(p.get('gpu_kernel_ms'), '.1f')} ms, {_fmt(p.get('host_ops'), '.0f')} host ops,"
                f" {_fmt(p.get('host_reads'), '.0f')} host reads"
            )
    lv = R.get("levers", {})
    for name, v in lv.get("variants", {}).items():
        L.append(
            f"lever r{lv.get('depth')} b{lv.get('batch')} {name}: x{_fmt(v.get('speedup_vs_default'), '.3f')}"
            + (f" ({v['note']})" if v.get("note") else "")
        )
    sc = R.get("scan", {})
    if "train_scan_over_plain" in sc:
        L.append(
            f"scan r{sc['depth']}: train SCAN/plain {sc['train_scan_over_plain']:.3f} (goal ≤ 1.3), folded inference"
            f" /plain {_fmt(sc.get('infer_folded_over_plain'), '.3f')} (goal ≤ 1.02)"
        )
    for run in R.get("classifier", {}).get("runs", [])[:3]:
        tf32 = run.get("tf32_step_s")
        L.append(
            f"classifier rate {run.get('sample_rate')}: step {_fmt(run.get('step_s'), '.4f')} s"
            + (f", TF32 {tf32:.4f} s" if tf32 else "")
            + f", peak {_fmt(run.get('peak_mib'), '.0f')} MiB"
        )
    dl = R.get("dali", {})
    if dl.get("best"):
        b = dl["best"]
        L.append(
            f"dali best: {b['img_s']:.0f} img/s at threads {b['threads']}, prefetch {b['prefetch']}, "
            f"hw_decoder_load {b['hw_decoder_load']} (goal ≥ 20k; {len(dl.get('sweep', []))} settings)"
        )
        fed = dl.get("trainer_fed", {})
        if "fed_over_memory" in fed:
            L.append(f"dali: trainer fed by DALI / in-memory {fed['fed_over_memory']:.3f} (goal ≥ 0.95)")
    for part, why in R.get("errors", {}).items():
        L.append(f"bench {part}: ERROR {why}"[:160])
    ev = out_dir / "bench_eval.json"
    if ev.is_file():
        e = json.loads(ev.read_text())
        L.append(
            f"bench_eval: pipeline {_fmt(e.get('pipeline_img_per_s'), '.0f')} img/s, plain "
            f"{_fmt(e.get('plain_img_per_s'), '.0f')}: pipeline/plain {_fmt(e.get('pipeline_over_plain'), '.3f')}"
        )
    log = out_dir / "pytest_gpu.log"
    if log.is_file():
        lines = [x for x in log.read_text().splitlines() if re.search(r"\d+ (passed|failed|error)", x)]
        L += [f"pytest: {x.strip('= ')}" for x in lines[-3:]]
    return L[:40]


def summary(steps_file: Path, env_file: Path, out_dir: Path, total_s: float, phase: str = "core") -> int:
    steps = []
    for line in steps_file.read_text().splitlines() if steps_file.is_file() else []:
        name, rc, secs, limit = line.split("\t")[:4]
        steps.append({"step": name, "rc": None if rc == "-" else int(rc), "seconds": int(secs), "limit_s": int(limit)})
    env = json.loads(env_file.read_text()) if env_file.is_file() else {}
    ok = bool(steps) and all(s["rc"] in (0, None) for s in steps)
    result = {
        "result": "PASS" if ok else "FAIL",
        "device": env.get("device", "no CUDA device"),
        "total_seconds": round(total_s),
        "steps": steps,
        "env": env,
    }
    (out_dir / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    for b in out_problems(out_dir):
        print(f"gpu-check: WARNING {b}: will not come back from $OUT")
    rc_of = {s["step"]: ("skipped" if s["rc"] is None else f"rc={s['rc']}") for s in steps}
    rows = table(out_dir)
    if rows:
        print(f"gpu-check: phase {phase}, the figures ({len(rows)} lines):")
        for row in rows:
            print("  " + row)
    print(
        f"gpu-check: {result['result']} device={result['device']!r} torch={env.get('versions', {}).get('torch', '?')}"
        f" cuda={env.get('torch_cuda', '?')} "
        + " ".join(f"{k}:{v}" for k, v in rc_of.items())
        + f" total={round(total_s)}s -> {out_dir / 'summary.json'}"
    )
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("assemble")
    a.add_argument("--stage", type=Path, required=True)
    a.add_argument("--wheels", type=Path)
    a.add_argument("--without", default="")
    i = sub.add_parser("install")
    i.add_argument("--stage", type=Path, required=True)
    i.add_argument("--target", type=Path, required=True)
    i.add_argument("--without", default="")
    p = sub.add_parser("probe")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--imports", default="", help="modules to import (default: those of the staged groups)")
    p.add_argument("--stage", type=Path, default=Path("/tmp/lowq_gpu_stage"))
    p.add_argument("--without", default="")
    p.add_argument("--allow-cpu", action="store_true")
    s = sub.add_parser("summary")
    s.add_argument("--steps", type=Path, required=True)
    s.add_argument("--env", type=Path, required=True)
    s.add_argument("--out-dir", type=Path, required=True)
    s.add_argument("--total-s", type=float, default=0.0)
    s.add_argument("--phase", default="core")
    args = ap.parse_args(argv)

    def groups(text: str) -> tuple[str, ...]:
        return tuple(g for g in re.split(r"[,\s]+", text) if g)

    try:
        if args.cmd == "assemble":
            got = assemble(args.stage, args.wheels or args.stage / "wheels", groups(args.without))
            print(f"gpu-check: {len(got)} wheels verified in {args.wheels or args.stage / 'wheels'}")
        elif args.cmd == "install":
            print("gpu-check: " + install(args.stage, args.target, groups(args.without)))
        elif args.cmd == "probe":
            mods = args.imports.split() or default_imports(args.stage, groups(args.without))
            info, problems = probe(mods, args.allow_cpu)
            args.out.write_text(json.dumps(info, indent=2) + "\n")
            print(f"python {info['python']} ({info['executable']})")
            print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
            print(
                f"device: {info.get('device', 'none')} capability {info.get('capability', '-')}"
                f" {info.get('device_memory_gib', '-')} GiB, torch CUDA {info.get('torch_cuda')}"
            )
            for mod, res in info["imports"].items():
                print(f"import {mod}: {res}")
            if problems:
                raise CheckError("; ".join(problems))
        elif args.cmd == "summary":
            return summary(args.steps, args.env, args.out_dir, args.total_s, args.phase)
    except CheckError as e:
        print(f"gpu-check: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
