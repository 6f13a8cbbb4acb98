"""The unit tier (``make test-fast``): in-process tests only, each under UNIT_LIMIT_S seconds.

Enforced here, for every test under tests/unit/: starting a subprocess or a multiprocessing child, a process group
or DeepSpeed fails the test with the rule it broke (such a test belongs in tests/integration/); so does a test whose
setup and call take longer than UNIT_LIMIT_S. ``LOWQ_RECORD_DURATIONS=FILE`` writes every test's seconds to FILE
(``make test-durations`` refreshes the committed tests/unit/durations.txt).
"""

from __future__ import annotations

import contextlib
import multiprocessing.process
import os
import platform
import subprocess
import time
from pathlib import Path

import pytest

UNIT_LIMIT_S = 5.0
_durations: dict[str, float] = {}


def _refuse(what: str):
    def refuse(*_args, **_kwargs):
        raise RuntimeError(f"unit tests run in-process: this one started {what} (move it to tests/integration/)")

    return refuse


@contextlib.contextmanager
def in_process_only():
    """Refuse what a unit test may not start, for the whole of its setup (the fixtures it brings up, whatever
    their scope: a session fixture first built for a unit test is built in-process too) and its call."""
    import torch.distributed

    from pipeline.train import engine

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subprocess.Popen, "__init__", _refuse("a subprocess"))
        mp.setattr(multiprocessing.process.BaseProcess, "start", _refuse("a multiprocessing child"))
        mp.setattr(torch.distributed, "init_process_group", _refuse("a process group"))
        mp.setattr(engine.Engine, "__init__", _refuse("DeepSpeed (pipeline.train.engine.Engine)"))
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with in_process_only():
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with in_process_only():
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "setup":
        item.unit_setup_s = report.duration
    if report.when != "call":
        return
    took = getattr(item, "unit_setup_s", 0.0) + report.duration
    _durations[item.nodeid] = took
    if report.passed and took > UNIT_LIMIT_S:
        report.outcome = "failed"
        report.longrepr = (
            f"unit test took {took:.1f} s (setup + call), over the unit tier's {UNIT_LIMIT_S:g} s: make it smaller or "
            "move it to tests/integration/"
        )


def pytest_sessionfinish(session):
    path = os.environ.get("LOWQ_RECORD_DURATIONS")
    if not path or not _durations:
        return
    rows = sorted(_durations.items(), key=lambda kv: -kv[1])
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    head = [
        f"# unit tier durations (setup + call, seconds), {time.strftime('%Y-%m-%d')}, {platform.node() or 'host'}: "
        f"{os.cpu_count()} cores, {cpu}",
        f"# {len(rows)} tests, {sum(_durations.values()):.1f} s in all; the tier fails any test over {UNIT_LIMIT_S:g} s",
    ]
    Path(path).write_text("\n".join(head + [f"{s:7.3f}  {name}" for name, s in rows]) + "\n")
