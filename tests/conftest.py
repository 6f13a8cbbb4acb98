"""Shared fixtures. Tests that need ../shared/data fail (never skip) when it is missing."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))


def _shared_root() -> Path:
    env = os.environ.get("LOWQ_SHARED")
    return Path(env) if env else REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = _shared_root() / "data"
    if not (root / "lfw_view1_112" / "train_112").is_dir():
        pytest.fail(f"{root}: the shared face data is missing (expected ../shared/data beside the repo)")
    return root


@pytest.fixture(scope="session")
def lfw_train(shared_data) -> Path:
    return shared_data / "lfw_view1_112" / "train_112"


@pytest.fixture(scope="session")
def lfw_bin(shared_data) -> Path:
    return shared_data / "lfw_view1_112" / "lfw_devtest_112.bin"
