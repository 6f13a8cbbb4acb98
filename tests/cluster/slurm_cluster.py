"""A real one-machine Slurm cluster (Debian 12's slurm-wlm 22.05 + munge) for tests of ``sbatch``.

Two simulated compute nodes ``n1`` and ``n2`` (this build has ``MULTIPLE_SLURMD``), both on
127.0.0.1 with their own slurmd ports, each with ``CPUs = nproc``. One cluster serves both shapes
the tests need: ``--nodes=1 --ntasks-per-node=2`` (two tasks on one node) and
``--nodes=2 --ntasks-per-node=1`` (one task on each node). ``scontrol show hostnames`` then names
``n1``, which does not resolve: job scripts take MASTER_ADDR from ``scontrol show node``'s NodeAddr.

Everything (config, munge socket, state, logs, pid files) lives under one directory; the client
commands find the cluster through ``SLURM_CONF``, which :meth:`LocalSlurm.env` provides. Only the
daemons this object started are stopped, by the pid files it wrote, never by name.

Needs root (CI runs as root): it calls ``.ci/install_slurm.sh`` when the packages are missing,
starts ``munged`` as user munge and ``slurmctld``/``slurmd`` as root.

By hand::

    python tests/slurm_cluster.py up /tmp/slurm      # prints the `export SLURM_CONF=...` line
    SLURM_CONF=/tmp/slurm/slurm.conf sinfo
    python tests/slurm_cluster.py down /tmp/slurm
"""

from __future__ import annotations

import argparse
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import REPO

INSTALL_SCRIPT = REPO / ".ci" / "install_slurm.sh"
NODES = ("n1", "n2")
BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "munged", "munge", "unmunge")


class SlurmError(RuntimeError):
    """The local cluster could not be installed, started or queried (message says which step)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _which(name: str) -> str | None:
    # Daemons live in /usr/sbin, which a non-login root shell may not have on PATH.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


def install() -> None:
    """Install slurmctld/slurmd/slurm-client/munge with apt when missing (root only)."""
    if all(_which(b) for b in BINARIES):
        return
    if os.geteuid() != 0:
        raise SlurmError(
            "the local Slurm test needs root to apt-get install slurmctld slurmd "
            "slurm-client munge (run as root, or install them first: .ci/install_slurm.sh)"
        )
    r = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True)
    if r.returncode != 0 or not all(_which(b) for b in BINARIES):
        raise SlurmError(f"{INSTALL_SCRIPT} failed (rc={r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}")


def _real_memory_mb() -> int:
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True).stdout
    m = re.search(r"RealMemory=(\d+)", out)
    # Leave headroom: slurmd drains a node whose configured memory exceeds what it finds.
    return max(1, int(m.group(1)) - 256) if m else 1000


class LocalSlurm:
    """Start/stop munged + slurmctld + two slurmd (n1, n2) under ``root`` (a directory)."""

    def __init__(self, root: str | os.PathLike, cpus_per_node: int | None = None):
        self.root = Path(root).resolve()
        self.cpus = cpus_per_node or os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.started: list[tuple[str, Path]] = []  # (name, pid file) of the daemons we started

    # -- environment for client commands (sbatch, scontrol, sinfo, srun inside jobs) -------------
    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
        return env

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env())
        r = subprocess.run(list(cmd), capture_output=True, text=True, **kw)
        if check and r.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} failed (rc={r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
        return r

    # -- start -------------------------------------------------------------------------------------
    def _write_config(self) -> None:
        ctld_port = _free_port()
        node_ports = [_free_port() for _ in NODES]
        mem = _real_memory_mb()
        r = self.root
        lines = [
            "ClusterName=lowqtest",
            # The job scripts derive MASTER_PORT from the job id; a random first id keeps a run's
            # ports clear of leftovers of an earlier test cluster on the same machine.
            f"FirstJobId={random.randint(1000, 20000)}",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also delays a requeued job's restart (default 120 s); 5 s keeps tests quick.
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            # Schedule every second (defaults 60 s / 30 s): a requeued job starts once eligible.
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            # Keep finished jobs visible to `scontrol show job` for a while; requeue quickly.
            "MinJobAge=600",
            "KillWait=5",
            "InactiveLimit=0",
            f"StateSaveLocation={r / 'ctld_state'}",
            f"SlurmdSpoolDir={r / 'slurmd_spool_%n'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd_%n.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'slurmd_%n.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        for name, port in zip(NODES, node_ports):
            lines.append(
                f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
                f"CPUs={self.cpus} RealMemory={mem} State=UNKNOWN"
            )
        lines.append(f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP")
        (r / "ctld_state").mkdir(parents=True, exist_ok=True)
        for name in NODES:
            (r / f"slurmd_spool_{name}").mkdir(parents=True, exist_ok=True)
        self.conf.write_text("\n".join(lines) + "\n")

    def _start_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        # munged refuses directories writable by others; its own dir must belong to munge.
        os.chmod(self.root, 0o755)
        self.munge_dir.mkdir(mode=0o755, exist_ok=True)
        os.chown(self.munge_dir, munge.pw_uid, munge.pw_gid)
        pid = self.munge_dir / "munged.pid"
        cmd = [
            "runuser",
            "-u",
            "munge",
            "--",
            _which("munged"),
            f"--socket={self.munge_socket}",
            f"--pid-file={pid}",
            f"--log-file={self.munge_dir / 'munged.log'}",
            f"--seed-file={self.munge_dir / 'munged.seed'}",
        ]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SlurmError(f"munged did not start: {r.stderr.strip()} (log: {self.munge_dir / 'munged.log'})")
        self.started.append(("munged", pid))
        check = subprocess.run(
            f"{_which('munge')} -S {self.munge_socket} -n | {_which('unmunge')} -S {self.munge_socket}",
            shell=True,
            capture_output=True,
            text=True,
        )
        if check.returncode != 0:
            raise SlurmError(f"munge -n | unmunge failed: {check.stderr.strip()}")

    def _start_daemon(self, name: str, cmd: list[str], pid_file: Path, log: Path) -> None:
        r = subprocess.run(cmd, capture_output=True, text=True)  # both daemonize by default
        deadline = time.monotonic() + 10
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if r.returncode != 0 or not pid_file.exists():
            raise SlurmError(f"{name} did not start (rc={r.returncode}) {r.stderr.strip()}\n{_tail(log)}")
        self.started.append((name, pid_file))

    def start(self, timeout_s: float = 30.0) -> LocalSlurm:
        install()
        if os.geteuid() != 0:
            raise SlurmError("the local Slurm test needs root (slurmd runs jobs as the submitting user via setuid)")
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._write_config()
            self._start_munge()
            self._start_daemon(
                "slurmctld",
                [_which("slurmctld"), "-f", str(self.conf)],
                self.root / "slurmctld.pid",
                self.root / "slurmctld.log",
            )
            for name in NODES:
                self._start_daemon(
                    f"slurmd {name}",
                    [_which("slurmd"), "-f", str(self.conf), "-N", name],
                    self.root / f"slurmd_{name}.pid",
                    self.root / f"slurmd_{name}.log",
                )
            self.wait_idle(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        out = ""
        while time.monotonic() < deadline:
            r = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
            out = r.stdout.strip()
            states = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
            if all(states.get(n) == "idle" for n in NODES):
                return
            time.sleep(0.25)
        raise SlurmError(f"nodes not idle after {timeout_s:.0f} s: sinfo says {out!r}\n{self.logs_tail()}")

    # -- jobs --------------------------------------------------------------------------------------
    def sbatch(self, args: list[str], cwd: str | os.PathLike, env: dict[str, str] | None = None) -> int:
        r = self.run("sbatch", "--parsable", *args, cwd=str(cwd), env=self.env(env))
        return int(r.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        r = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout))

    def wait_job(self, job_id: int, timeout_s: float, poll_s: float = 0.5) -> dict[str, str]:
        """Poll ``scontrol show job`` until the job leaves PENDING/RUNNING/etc.; return its fields."""
        deadline = time.monotonic() + timeout_s
        active = {
            "PENDING",
            "RUNNING",
            "CONFIGURING",
            "COMPLETING",
            "REQUEUED",
            "REQUEUE_HOLD",
            "REQUEUE_FED",
            "RESIZING",
            "SUSPENDED",
            "SIGNALING",
            "STAGE_OUT",
            "",
        }
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") not in active:
                return info
            time.sleep(poll_s)
        self.run("scancel", str(job_id), check=False)
        raise SlurmError(
            f"job {job_id} still {info.get('JobState')} after {timeout_s:.0f} s "
            f"(reason {info.get('Reason')})\n{self.logs_tail()}"
        )

    def logs_tail(self, n: int = 30) -> str:
        parts = [_tail(self.root / "slurmctld.log", n)]
        parts += [_tail(self.root / f"slurmd_{name}.log", n) for name in NODES]
        return "\n".join(parts)

    # -- stop --------------------------------------------------------------------------------------
    def stop(self, timeout_s: float = 15.0) -> None:
        """Cancel our jobs, then stop only the daemons started here (newest first) by pid file."""
        if any(name == "slurmctld" for name, _ in self.started):
            self.run("scancel", "--user", pwd.getpwuid(os.geteuid()).pw_name, check=False, timeout=10)
        # slurmd/slurmctld first (they may still talk to munge while shutting down), each group
        # signalled together: a daemon takes ~2 s to stop, so one at a time would add up.
        daemons = [(n, p) for n, p in self.started if n != "munged"]
        _terminate_all([_read_pid(p) for _, p in daemons], timeout_s)
        _terminate_all([_read_pid(p) for n, p in self.started if n == "munged"], timeout_s)
        self.started.clear()

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _terminate_all(pids: list[int | None], timeout_s: float) -> None:
    """SIGTERM each pid, wait for all to exit, SIGKILL what is left after ``timeout_s``."""
    pids = [p for p in pids if p]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _tail(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return f"--- {path}: (missing)"
    return f"--- {path} (last {len(lines)} lines)\n" + "\n".join(lines)


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Start or stop a one-machine Slurm (nodes n1, n2 on 127.0.0.1) under DIR. Needs root.",
        epilog="example: python tests/slurm_cluster.py up /tmp/slurm && "
        "SLURM_CONF=/tmp/slurm/slurm.conf sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=0 "
        "--cpus-per-task=1 jobs/scan_r101.sh --config configs/smoke.yaml data.train=DIR",
    )
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("dir", help="directory for config, state, logs and pid files")
    a = p.parse_args(argv)
    cluster = LocalSlurm(a.dir)
    try:
        if a.action == "up":
            cluster.start()
            print(f"export SLURM_CONF={cluster.conf}")
        else:
            # Stop what `up` started: the pid files under DIR name exactly those daemons.
            cluster.started = [("slurmd", Path(a.dir) / f"slurmd_{n}.pid") for n in NODES]
            cluster.started.insert(0, ("slurmctld", Path(a.dir) / "slurmctld.pid"))
            cluster.started.insert(0, ("munged", Path(a.dir) / "munge" / "munged.pid"))
            cluster.stop()
    except SlurmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main())
