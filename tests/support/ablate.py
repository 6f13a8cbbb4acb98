"""Shared by tests/unit/test_ablate.py and tests/integration/test_ablate.py: fixtures and helpers of both halves."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipeline.experiments.spec import SpecError
from tests.helpers import REPO

EXAMPLE = REPO / "configs" / "ablations" / "smoke_scan.yaml"


def ablate(*args, timeout=420) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline.ablate", *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=timeout)


def describe(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"


def write_spec(path: Path, shared_data: Path, edit=None) -> Path:
    """The example spec with this machine's shared data (LOWQ_SHARED may move it); ``edit(raw)`` changes it."""
    raw = yaml.safe_load(EXAMPLE.read_text())
    for entry in raw["eval"]:
        for key in ("bin", "pairs", "root"):
            if key in entry:
                entry[key] = entry[key].replace("../shared/data", str(shared_data))
    if edit:
        edit(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@dataclass
class Grid:
    spec: Path
    out: Path
    shards: Path
    stdout: str


@pytest.fixture(scope="module")
def grid(lfw_shards, shared_data, tmp_path_factory) -> Grid:
    """The example spec run once: 2 arms × 2 seeds, 2 cells at a time."""
    work = tmp_path_factory.mktemp("ablate")
    spec = write_spec(work / "smoke_scan.yaml", shared_data)
    out = work / "out"
    proc = ablate(spec, f"data.train={lfw_shards}", "--output", out, "--jobs", "2")
    assert proc.returncode == 0, describe(proc)
    return Grid(spec, out, lfw_shards, proc.stdout)


def markdown_table(md: str, section: str) -> tuple[list[str], list[list[str]]]:
    """(header, body rows) of the first table after the heading ``section``."""
    table = []
    for line in md.split(section, 1)[1].splitlines()[1:]:
        if line.startswith("|"):
            table.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif table:
            break
    return table[0], table[2:]


def markdown_rows(md: str, section: str) -> list[list[str]]:
    return markdown_table(md, section)[1]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.fixture
def bad_spec(tmp_path):
    """A valid small spec as a dict, and a writer; nothing here trains or reads faces."""
    dummy_bin = tmp_path / "set.bin"
    dummy_bin.write_bytes(b"")
    raw = {
        "config": [str(REPO / "configs" / "base.yaml"), str(REPO / "configs" / "smoke.yaml")],
        "arms": ["a", {"name": "b", "overrides": ["optim.lr=0.05"]}],
        "seeds": [0, 1],
        "budget": {"schedule.max_steps": 3},
        "eval": [str(dummy_bin)],
    }

    def write(**changes) -> Path:
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump({**raw, **changes}))
        return path

    return write


def _one_line_error(fn, *args, match: str) -> str:
    with pytest.raises(SpecError) as err:
        fn(*args)
    msg = str(err.value)
    assert "\n" not in msg and re.search(match, msg), msg
    return msg
