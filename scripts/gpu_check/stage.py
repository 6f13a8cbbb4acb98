#!/usr/bin/env python3
"""CPU side of `make gpu-check` (docs/gpu-check.md): `make gpu-stage`.

Downloads (or builds) the wheels the lent GPU machine lacks for CPython 3.12 / manylinux x86_64 --
DeepSpeed (built here, DS_BUILD_OPS=0: pure Python, ops JIT-built there), NVIDIA DALI for the
machine's CUDA major with its codec wheels, WebDataset, submitit and every dependency of those that
the machine's image does not hold -- into .gpu_stage/wheels, one version of each. Then cuts them
into parts that each fit one device call with the working tree (.gpu_stage/part_00, ...), each
part holding its chunks, `part_NN.sha256` and the common manifest.json. Prints the sizes, the number
of transfers and the exact device calls (also written to .gpu_stage/commands.txt).

  stage.py                      resolve, download, split, print the calls
  stage.py --without dali       leave the DALI group out (one transfer fewer or more; see the docs)
  stage.py --print-commands     only print the calls for the manifest already staged
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
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import device  # noqa: E402  (the GPU side: manifest format, sha256)

MIB = 1 << 20
CALL_LIMIT = 64 * MIB  # the working tree + carried paths of one device call
COMMAND_LIMIT = 2000  # characters of one device call's command
CALL1_TARGET = 25 * MIB  # call 1 (core wheels + faces + tree) starts the check fast (issue 21 item 5)
MARGIN = 2 * MIB  # slack between a call's size and CALL_LIMIT (tree growth, folder entries)
PYTHON_VERSION = "3.12"
PLATFORMS = [  # device README: pip matches each manylinux_2_N exactly
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]
# Marker environment of the device image's python3 (3.12.3, Linux x86-64).
MARKER_ENV = {
    "implementation_name": "cpython",
    "implementation_version": "3.12.3",
    "os_name": "posix",
    "platform_machine": "x86_64",
    "platform_python_implementation": "CPython",
    "platform_release": "",
    "platform_system": "Linux",
    "platform_version": "",
    "python_full_version": "3.12.3",
    "python_version": "3.12",
    "sys_platform": "linux",
}
# /work/.library/device/KINDS.md, "Python packages already there" (image 'cuda', read 2026-11-17):
# never carried, their versions there are used.
GPU_HAS = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp""".split()
# The device image's torch is 2.11.0+cu130 with nvcc 13.0 and driver 580 (KINDS.md): CUDA major 13.
CUDA_MAJOR = 13
# Fallback versions when the local .venv lacks a root (the .venv holds the tested set, FACTS.md).
ROOT_FALLBACK = {"deepspeed": "0.19.8", "webdataset": "1.0.2", "submitit": "1.5.4", "nvidia-dali": "2.4.0"}
# Pins for names with no local version to follow. nvidia-nvjpeg (nvimgcodec-cu13[all] asks for it
# unversioned): the 13.0 line, the CUDA minor of the image's toolkit and driver; 13.1+ may need a
# newer driver than 580.
PINS = {"nvidia-nvjpeg": "==13.0.*"}
GROUP_ORDER = ["core", "dali"]
# Image-held packages never staged as fallbacks, whatever version our packages ask for.
NEVER_CARRY = {"torch", "numpy", "triton"}  # packed in this order: part_00 holds all of `core`


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def local_versions() -> dict[str, str]:
    """Versions installed in the interpreter running this script (the project's .venv)."""
    from importlib import metadata

    return {canon(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def roots(cuda_major: int, without: set[str], have: dict[str, str]) -> list[tuple[str, str, str]]:
    """(name, specifier, group) of what the project needs beyond the image."""
    dali_version = have.get("nvidia-dali-cuda120") or have.get(f"nvidia-dali-cuda{cuda_major}0")
    out = [
        ("deepspeed", "==" + have.get("deepspeed", ROOT_FALLBACK["deepspeed"]), "core"),
        ("webdataset", "==" + have.get("webdataset", ROOT_FALLBACK["webdataset"]), "core"),
        ("submitit", "==" + have.get("submitit", ROOT_FALLBACK["submitit"]), "core"),
        (f"nvidia-dali-cuda{cuda_major}0", "==" + (dali_version or ROOT_FALLBACK["nvidia-dali"]), "dali"),
    ]
    return [r for r in out if r[2] not in without]


def wheel_name_version(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return canon(name), version


def wheel_requires(path: Path, extras: set[str]) -> list[str]:
    """Requires-Dist of a wheel that apply on the device for the requested extras."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        text = z.read(meta).decode()
    out = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is None or any(req.marker.evaluate({**MARKER_ENV, "extra": e}) for e in {"", *extras}):
            out.append(str(req))
    return out


def find_wheel(wheels: Path, name: str, spec: str) -> Path | None:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    found = []
    for w in wheels.glob("*.whl"):
        n, v = wheel_name_version(w)
        if n == name and SpecifierSet(spec).contains(v, prereleases=True):
            found.append((Version(v), w))
    return max(found)[1] if found else None


def pip_download(wheels: Path, reqs: list[str]) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", PYTHON_VERSION, "--implementation", "cp", "--disable-pip-version-check"]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    cmd += ["-d", str(wheels), *reqs]
    print("gpu-stage: pip download " + " ".join(reqs), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        err = [ln for ln in r.stderr.splitlines() if "ignored: it is neither a file nor a directory" not in ln]
        sys.exit("gpu-stage: pip download failed:\n" + "\n".join(err[-15:]))


def build_deepspeed(wheels: Path, spec: str) -> None:
    """DeepSpeed is an sdist: build its pure-Python wheel with no prebuilt ops (they JIT-build on the GPU)."""
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-cache-dir"]
    cmd += ["--disable-pip-version-check", "-w", str(wheels), "deepspeed" + spec]
    print(f"gpu-stage: building deepspeed{spec} (DS_BUILD_OPS=0, ~30 s)", flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DS_BUILD_OPS": "0"})
    if r.returncode != 0:
        sys.exit("gpu-stage: building the deepspeed wheel failed:\n" + r.stderr[-3000:])


def resolve(wheels: Path, cuda_major: int, without: set[str]) -> list[dict]:
    """Breadth-first over Requires-Dist from the roots, skipping what the image holds.

    Version of a dependency: the one in the local .venv when it satisfies the requirement (the set
    tested here), else a PINS entry, else the newest pip finds. One version per name; a second,
    incompatible requirement on a chosen name stops with an error.

    A name the image holds is not followed; but where our packages ask for a version of it (pydantic
    2.14 wants typing-extensions>=4.16), one wheel of it is staged as a fallback
    (`if_image_lacks`: the combined requirement): device.py installs it only when the image's own
    version fails that requirement. Large ones (NEVER_CARRY) are never staged."""
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    have = local_versions()
    gpu_has = {canon(n) for n in GPU_HAS}
    chosen: dict[str, dict] = {}
    held: dict[str, dict] = {}  # image-held names our packages constrain: specs, group
    level = [(n, s, g, set()) for n, s, g in roots(cuda_major, without, have)]
    fallback_round = False
    while level:
        todo = []  # (name, spec, group, extras) needing a wheel file
        for name, spec, group, extras in level:
            if name in chosen:
                v = chosen[name]["version"]
                if not SpecifierSet(spec).contains(v, prereleases=True):
                    sys.exit(f"gpu-stage: {name} {v} is chosen but another package needs {name}{spec}")
                if extras - chosen[name]["extras"]:
                    chosen[name]["extras"] |= extras
                    todo.append((name, spec, group, extras))  # re-read its requirements with the new extras
                continue
            if name in have and SpecifierSet(spec).contains(have[name], prereleases=True):
                spec = "==" + have[name]
            elif name in PINS:
                spec = ",".join(s for s in (spec, PINS[name]) if s)
            chosen[name] = {"name": name, "spec": spec, "group": group, "extras": set(extras)}
            if fallback_round:
                chosen[name]["if_image_lacks"] = str(held[name]["spec"])
            todo.append((name, spec, group, extras))
        fetch = [f"{n}{s}" for n, s, _, _ in todo if n != "deepspeed" and find_wheel(wheels, n, s) is None]
        if fetch:
            pip_download(wheels, fetch)
        for n, s, _, _ in todo:
            if n == "deepspeed" and find_wheel(wheels, n, s) is None:
                build_deepspeed(wheels, s)
        nxt = []
        for name, spec, group, _ in todo:
            path = find_wheel(wheels, name, spec)
            if path is None:
                sys.exit(f"gpu-stage: no wheel for {name}{spec} in {wheels} after the download")
            c = chosen[name]
            c["file"], c["version"] = path, wheel_name_version(path)[1]
            if fallback_round:
                continue  # a fallback's own needs are the image's business
            for r in wheel_requires(path, c["extras"]):
                req = Requirement(r)
                dep = canon(req.name)
                if dep in gpu_has:
                    h = held.setdefault(dep, {"spec": SpecifierSet(), "group": group, "by": set()})
                    h["spec"] &= req.specifier
                    h["by"].add(name)
                    continue
                nxt.append((dep, str(req.specifier), group, set(req.extras)))
        level = nxt
        if not level and not fallback_round:
            fallback_round = True
            level = [(n, str(h["spec"]), h["group"], set()) for n, h in sorted(held.items()) if str(h["spec"])]
            level = [x for x in level if x[0] not in NEVER_CARRY]
    relied = sorted(f"{n}{h['spec']}" for n, h in held.items())
    print("gpu-stage: taken from the image: " + ", ".join(relied))
    return sorted(chosen.values(), key=lambda c: (GROUP_ORDER.index(c["group"]), c["file"].stat().st_size, c["name"]))


def split(wheels: list[dict], stage: Path, part_bytes: int, meta: dict | None = None) -> dict:
    """Cut the wheels, in order, into parts of at most part_bytes; write the parts and the manifest.

    wheels: dicts with name, version, group, file (Path), if_image_lacks (optional). Returns the manifest."""
    stage.mkdir(parents=True, exist_ok=True)
    for old in stage.glob("part_*"):
        shutil.rmtree(old)
    names = [w["name"] for w in wheels]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SystemExit(f"gpu-stage: two versions of {', '.join(dup)}: keep one")
    entries, part_sizes = [], [0]
    for i, w in enumerate(wheels):
        path: Path = w["file"]
        size = path.stat().st_size
        if i and w["group"] not in FIRST_CALL_GROUPS and wheels[i - 1]["group"] in FIRST_CALL_GROUPS:
            part_sizes.append(0)  # call 1 carries the core wheels alone (≤ 25 MiB with the faces): DALI starts anew
        entry = {
            "file": path.name,
            "name": w["name"],
            "version": w["version"],
            "group": w["group"],
            **({"if_image_lacks": w["if_image_lacks"]} if w.get("if_image_lacks") else {}),
            "size": size,
            "sha256": device.sha256_file(path),
            "chunks": [],
        }
        sliver = min(MIB, part_bytes // 16)
        with open(path, "rb") as f:
            offset = 0
            while offset < size:
                room = part_bytes - part_sizes[-1]
                if room == 0 or (room < sliver and size - offset > room):  # no sliver chunks: next part
                    part_sizes.append(0)
                    room = part_bytes
                n = min(room, size - offset)
                part = f"part_{len(part_sizes) - 1:02d}"
                chunk = f"{path.name}.{len(entry['chunks']):03d}"
                data = f.read(n)
                (stage / part).mkdir(parents=True, exist_ok=True)
                (stage / part / chunk).write_bytes(data)
                entry["chunks"].append(
                    {
                        "file": chunk,
                        "part": part,
                        "offset": offset,
                        "size": n,
                        "sha256": hashlib.sha256(data).hexdigest(),
                    }
                )
                part_sizes[-1] += n
                offset += n
        entries.append(entry)
    parts = [f"part_{i:02d}" for i in range(len(part_sizes))]
    manifest = {
        "format": device.FORMAT,
        "n_parts": len(parts),
        "parts": parts,
        "part_bytes": part_bytes,
        "total_bytes": sum(e["size"] for e in entries),
        **(meta or {}),
        "wheels": entries,
    }
    text = json.dumps(manifest, indent=1) + "\n"
    (stage / device.MANIFEST).write_text(text)
    for p in parts:
        (stage / p / device.MANIFEST).write_text(text)
        sums = [f"{c['sha256']}  {c['file']}" for e in entries for c in e["chunks"] if c["part"] == p]
        (stage / p / f"{p}.sha256").write_text("\n".join(sums) + "\n")
    return manifest


def tree_bytes(repo: Path = REPO) -> int:
    """What travels with every device call besides the carried part: tracked and untracked-not-ignored
    files, plus shared/ where the checkout has one."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        capture_output=True,
        check=True,
    ).stdout
    total = 0
    for rel in {p for p in out.decode().split("\0") if p}:
        p = repo / rel
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    shared = repo / "shared"
    if shared.is_dir():
        total += sum(p.stat().st_size for p in shared.rglob("*") if p.is_file() and not p.is_symlink())
    return total


def part_dir_bytes(stage: Path, part: str) -> int:
    return sum(p.stat().st_size for p in (stage / part).iterdir())


# The real faces the GPU tier reads (tests/conftest.py: $LOWQ_SHARED/data): ../shared does not travel, so the
# files it needs are copied under the stage and carried by the last call (~17 MiB).
SHARED_FILES = ("lfw_view1_112/train_112", "lfw_view1_112/train_list.txt", "lfw_view1_112/lfw_devtest_112.bin")
SHARED_DIR = "shared"


def stage_shared_data(stage: Path, source: Path = REPO.parent / "shared" / "data") -> int:
    """Copy SHARED_FILES into STAGE/shared/data (idempotent); returns its size in bytes."""
    dst_root = stage / SHARED_DIR / "data"
    for rel in SHARED_FILES:
        src, dst = source / rel, dst_root / rel
        if not src.exists():
            sys.exit(f"gpu-stage: {src} is missing (the GPU tier needs the shared LFW faces)")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        elif not dst.is_file() or dst.stat().st_size != src.stat().st_size:
            shutil.copy2(src, dst)
    return sum(p.stat().st_size for p in (stage / SHARED_DIR).rglob("*") if p.is_file())


FIRST_CALL_GROUPS = ("core",)  # the wheels of call 1 (with their fallbacks); DALI's come in the later calls
# seconds per call: gpu_check.sh's phase budget (core 360, more 100, dali 300) + the receive + slack
TIMEOUT_S = {"core": 420, "more": 150, "dali": 360}
DALI_CALLS_NEED_S = 360  # device time that must remain after call 1 before the DALI calls start


def device_calls(manifest: dict, stage_rel: str = ".gpu_stage") -> list[dict]:
    """The calls the lead makes, in order. Call 1 receives part_00 (the core wheels) with the shared faces and runs
    the core phase (the figures that matter, no DALI); every later call receives one DALI part and does work too
    (phase ``more``: one queued task), the last runs the DALI phase. Calls 2.. only when ≥ DALI_CALLS_NEED_S of
    device time remain (``status``)."""
    calls = []
    src = "" if stage_rel == ".gpu_stage" else f"GPU_STAGE_SRC={stage_rel} "
    parts = manifest["parts"]
    for i, p in enumerate(parts):
        phase = "core" if i == 0 else ("dali" if i == len(parts) - 1 else "more")
        cmd = (
            f"{src}bash scripts/gpu_check/receive.sh {p} && GPU_CHECK_PHASE={phase} bash scripts/gpu_check/gpu_check.sh"
        )
        carry = [f"{stage_rel}/{p}"] + ([f"{stage_rel}/{SHARED_DIR}"] if i == 0 else [])
        calls.append({"command": cmd, "carry": carry, "timeout_s": TIMEOUT_S[phase], "phase": phase})
    return calls


def stage_rel(stage: Path) -> str:
    """The stage folder as the device calls name it: relative to the repository root (it must be inside)."""
    try:
        return str(stage.resolve().relative_to(REPO))
    except ValueError:
        return str(stage)  # not inside the repo: it cannot be carried; the printed calls say so by their path


def format_calls(calls: list[dict]) -> str:
    lines = [
        f"{len(calls)} device calls, back to back (the machine is given back after ~30 s idle); call 1 is the check"
        f" (no DALI); calls 2-{len(calls)} only when status says budget_left_s >= {DALI_CALLS_NEED_S} after it:",
    ]
    for i, c in enumerate(calls, 1):
        lines.append(
            f"  {i}. run(command={json.dumps(c['command'])}, carry={json.dumps(c['carry'])}, timeout_s={c['timeout_s']})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage-dir", type=Path, default=REPO / ".gpu_stage")
    ap.add_argument("--part-mib", type=float, default=56.0, help="largest part (default 56 MiB)")
    ap.add_argument("--cuda-major", type=int, default=CUDA_MAJOR)
    ap.add_argument("--without", action="append", default=[], choices=["dali"], help="leave a wheel group out")
    ap.add_argument("--print-commands", action="store_true", help="print the device calls of the staged manifest")
    args = ap.parse_args(argv)
    stage: Path = args.stage_dir
    if args.print_commands:
        man_path = stage / device.MANIFEST
        if not man_path.is_file():
            sys.exit(f"gpu-stage: no {man_path}: run make gpu-stage first")
        print(format_calls(device_calls(json.loads(man_path.read_text()), stage_rel(stage))))
        return 0

    t0 = time.monotonic()
    rel = stage_rel(stage)
    ignored = subprocess.run(["git", "check-ignore", "-q", rel + "/"], cwd=REPO).returncode == 0
    if rel.startswith("/") or not ignored:
        print(
            f"gpu-stage: WARNING {stage} is not a git-ignored folder of the repository: a device call cannot carry it"
        )
    tree = tree_bytes()
    part_bytes = int(args.part_mib * MIB)
    if tree + part_bytes + MARGIN > CALL_LIMIT:
        part_bytes = CALL_LIMIT - MARGIN - tree
        print(f"gpu-stage: the working tree is {tree / MIB:.1f} MiB: parts shrunk to {part_bytes / MIB:.1f} MiB")
        if part_bytes < 8 * MIB:
            sys.exit("gpu-stage: the working tree leaves under 8 MiB per call: ignore or remove large files first")
    wheels_dir = stage / "wheels"
    wheels_dir.mkdir(parents=True, exist_ok=True)
    without = set(args.without)
    chosen = resolve(wheels_dir, args.cuda_major, without)
    meta = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": PYTHON_VERSION,
        "platforms": PLATFORMS,
        "cuda_major": args.cuda_major,
        "without": sorted(without),
    }
    manifest = split(chosen, stage, part_bytes, meta)
    calls = device_calls(manifest, stage_rel(stage))

    print(f"gpu-stage: {len(chosen)} wheels for CPython {PYTHON_VERSION} manylinux x86_64, CUDA {args.cuda_major}:")
    for w in manifest["wheels"]:
        parts = sorted({c["part"] for c in w["chunks"]})
        cond = f"  only if the image lacks {w['name']}{w['if_image_lacks']}" if w.get("if_image_lacks") else ""
        print(
            f"  {w['group']:<5} {w['name']:<24} {w['version']:<12} {w['size'] / MIB:8.2f} MiB  {','.join(parts)}{cond}"
        )
    sizes = [part_dir_bytes(stage, p) for p in manifest["parts"]]
    data = stage_shared_data(stage)
    sizes_with_data = [sizes[0] + data] + sizes[1:]
    call1 = sizes_with_data[0] + tree
    print(f"gpu-stage: call 1 carries {call1 / MIB:.1f} MiB (part_00 + faces + working tree)")
    if call1 > CALL1_TARGET:
        print(
            f"gpu-stage: WARNING call 1 exceeds its {CALL1_TARGET // MIB} MiB target (issue 21): trim the working tree"
        )
    biggest = max(sizes_with_data) + tree
    print(f"gpu-stage: shared LFW faces for the GPU tier: {data / MIB:.1f} MiB in {stage / SHARED_DIR} (call 1)")
    print(
        f"gpu-stage: total {manifest['total_bytes'] / MIB:.1f} MiB in {len(sizes)} parts "
        f"({', '.join(f'{s / MIB:.1f}' for s in sizes)} MiB) under {stage}"
    )
    print(
        f"gpu-stage: working tree {tree / MIB:.2f} MiB travels with each call; largest call "
        f"{biggest / MIB:.1f} MiB of {CALL_LIMIT // MIB} MiB"
    )
    if biggest > CALL_LIMIT - MIB:
        sys.exit("gpu-stage: a call would exceed the 64 MiB limit: lower --part-mib")
    text = format_calls(calls)
    (stage / "commands.txt").write_text(text + "\n")
    print(f"gpu-stage: {len(calls)} transfers = {len(calls)} device calls ({time.monotonic() - t0:.0f} s here)")
    print(text)
    longest = max(len(c["command"]) for c in calls)
    assert longest < COMMAND_LIMIT, longest
    return 0


if __name__ == "__main__":
    sys.exit(main())
