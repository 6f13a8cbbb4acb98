"""Shared by tests/unit/test_gpu_check.py and tests/integration/test_gpu_check.py: fixtures and helpers of both halves."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO

GC = REPO / "scripts" / "gpu_check"


def _load(name: str):
    sys.path.insert(0, str(GC))
    try:
        spec = importlib.util.spec_from_file_location(f"gpu_check_{name}", GC / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(GC))


stage = _load("stage")


device = _load("device")


PART = 64 * 1024  # small parts: the big wheel spans several


def make_wheel(out: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal valid py3-none-any wheel (stored, so sizes are predictable)."""
    dist = f"{name}-{version}.dist-info"
    files = dict(files)
    files[f"{dist}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    files[f"{dist}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    whl = out / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w", zipfile.ZIP_STORED) as z:
        for path, data in files.items():
            z.writestr(path, data)
    return whl


@pytest.fixture()
def staged(tmp_path):
    """Synthetic wheels split into parts; returns (stage_dir, manifest, wheel paths)."""
    src = tmp_path / "wheels"
    src.mkdir()
    rnd = random.Random(0)
    w = [
        ("tinya", "1.0", "core", None, {"tinya/__init__.py": b"VALUE = 1\n"}),
        (
            "nsfake",
            "1.0",
            "core",
            None,
            {"nvidia/__init__.py": b"", "nvidia/fakelib/__init__.py": b"NAME = 'fakelib'\n"},
        ),
        ("newenough", "2.0", "core", ">=1.0", {"newenough.py": b"WHO = 'carried'\n"}),
        ("tooold", "2.0", "core", ">=1.0", {"tooold.py": b"WHO = 'carried'\n"}),
        ("bigdali", "3.0", "dali", None, {"bigdali/__init__.py": b"", "bigdali/blob.bin": rnd.randbytes(200_000)}),
    ]
    chosen = []
    for name, version, group, cond, files in w:
        entry = {"name": name, "version": version, "group": group, "file": make_wheel(src, name, version, files)}
        if cond:
            entry["if_image_lacks"] = cond
        chosen.append(entry)
    st = tmp_path / "repo" / ".gpu_stage"
    man = stage.split(chosen, st, PART)
    return st, man, {c["name"]: c["file"] for c in chosen}


@pytest.fixture()
def image_site(tmp_path):
    """A fake device image site-packages: a regular `nvidia` package with its own subpackage,
    newenough 1.5 (satisfies >=1.0), tooold 0.5 (does not)."""
    site = tmp_path / "image_site"
    (site / "nvidia" / "imagelib").mkdir(parents=True)
    (site / "nvidia" / "__init__.py").write_text("")
    (site / "nvidia" / "imagelib" / "__init__.py").write_text("NAME = 'imagelib'\n")
    for name, version in [("newenough", "1.5"), ("tooold", "0.5")]:
        (site / f"{name}.py").write_text("WHO = 'image'\n")
        d = site / f"{name}-{version}.dist-info"
        d.mkdir()
        (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return site


def receive(st: Path, part: str, outside: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """One device call: a fresh work tree holding only the carried part, receive.sh run in it."""
    tree = tmp_path / f"device_tree_{part}"
    shutil.rmtree(tree, ignore_errors=True)
    (tree / ".gpu_stage").mkdir(parents=True)
    shutil.copytree(st / part, tree / ".gpu_stage" / part)
    env = {**os.environ, "LOWQ_GPU_STAGE": str(outside)}
    return subprocess.run(
        ["bash", str(GC / "receive.sh"), part], cwd=tree, env=env, capture_output=True, text=True, timeout=60
    )
