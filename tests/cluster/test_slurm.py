"""The real ``sbatch jobs/*.sh`` on a real one-machine Slurm (tests/slurm_cluster.py), CPU only.

* job machinery, with a stand-in trainer (a gloo all_reduce): MASTER_ADDR/PORT, ranks, nodes,
  argument and environment pass-through, for 1 node × 2 tasks and 2 nodes × 1 task;
* the real trainer, smoke layer, shards of real LFW training faces: jobs/scan_r101.sh on both
  shapes (exit code, checkpoint, TensorBoard t histograms), jobs/lrfr_r50.sh, and jobs/lgaf_r100.sh /
  jobs/cqa_r100.sh / jobs/lcd_r50.sh (their monitors, histograms and the attention-map PNG of the checkpoint);
* preemption: SIGUSR1 to a running job → checkpoint → requeue → resume → finish.

Needs root (installs Debian's slurm-wlm + munge if missing, starts the daemons) and FAILS, never
skips, otherwise. The GPU request in the job headers is overridden with --gpus-per-node=0.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.cluster.slurm_cluster import LocalSlurm, SlurmError
from tests.helpers import REPO

JOBS = sorted(p for p in (REPO / "jobs").glob("*.sh") if not p.name.startswith("_"))

SHAPES = {"1x2": ("--nodes=1", "--ntasks-per-node=2"), "2x1": ("--nodes=2", "--ntasks-per-node=1")}
CPU_ONLY = ("--gpus-per-node=0", "--cpus-per-task=1", "--time=15")


@pytest.fixture(scope="module")
def slurm():
    # Not under pytest's tmp_path: munged (user munge) must be able to reach its socket dir, and
    # pytest's base temp dir is private to root.
    root = Path(tempfile.mkdtemp(prefix="lowq-slurm-"))
    cluster = LocalSlurm(root)
    try:
        cluster.start()
    except SlurmError as exc:
        pytest.fail(f"could not start the local Slurm cluster: {exc}")
    yield cluster
    cluster.stop()
    if not os.environ.get("LOWQ_KEEP_SLURM"):
        shutil.rmtree(root, ignore_errors=True)


def job_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHON"] = sys.executable  # the interpreter running the tests (the repo's .venv in CI)
    # Shared JIT cache for DeepSpeed's CPU ops; sbatch's default --export=ALL carries it to the tasks.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    return env


def submit(
    slurm: LocalSlurm,
    script: Path,
    shape: str,
    log_dir: Path,
    train_args: list[str],
    cwd: Path = REPO,
    extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> int:
    log_dir.mkdir(parents=True, exist_ok=True)  # sbatch opens --output at job start: the dir must exist
    return slurm.sbatch(
        [*SHAPES[shape], *CPU_ONLY, *extra, f"--output={log_dir}/%x-%j.out", str(script), *train_args],
        cwd=cwd,
        env=env or job_env(),
    )


def finish(slurm: LocalSlurm, job: int, log_dir: Path, timeout_s: float = 240) -> dict[str, str]:
    """Wait for the job; fail with its output log when it did not exit 0:0."""
    try:
        info = slurm.wait_job(job, timeout_s)
    except SlurmError as exc:
        pytest.fail(f"{exc}\n{job_log(log_dir, job)}")
    if info.get("JobState") != "COMPLETED" or info.get("ExitCode") != "0:0":
        pytest.fail(
            f"job {job}: JobState={info.get('JobState')} ExitCode={info.get('ExitCode')} "
            f"Reason={info.get('Reason')}\n{job_log(log_dir, job)}\n{slurm.logs_tail(15)}"
        )
    return info


def job_log(log_dir: Path, job: int) -> str:
    logs = sorted(log_dir.glob(f"*-{job}.out"))
    return (
        "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-6000:]}" for p in logs)
        or f"(no log for job {job} in {log_dir})"
    )


# --------------------------------------------------------------------------- scripts, statically


def sbatch_options(script: Path) -> dict[str, str]:
    """The #SBATCH header; fails if an #SBATCH line follows a command (sbatch would ignore it)."""
    opts, body_started = {}, False
    for line in script.read_text().splitlines():
        if line.startswith("#SBATCH"):
            assert not body_started, f"{script}: '{line}' comes after a command; sbatch ignores it"
            key, _, value = line.split(None, 1)[1].partition("=")
            opts[key] = value
        elif line.strip() and not line.startswith("#"):
            body_started = True
    return opts


def recipe_of(script: Path) -> str:
    m = re.search(r"^lowq_train (\S+) \"\$@\"$", script.read_text(), re.M)
    assert m, f"{script}: no 'lowq_train configs/<recipe>.yaml \"$@\"' line"
    return m.group(1)


def test_job_scripts_present():
    assert {p.stem for p in JOBS} >= {"scan_r101", "iresnet_r100", "lrfr_r50", "lgaf_r100", "cqa_r100", "lcd_r50"}


@pytest.mark.parametrize("script", JOBS, ids=lambda p: p.stem)
def test_job_headers(script):
    opts = sbatch_options(script)
    for key in ("--job-name", "--nodes", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task", "--time"):
        assert opts.get(key), f"{script}: no #SBATCH {key}"
    assert opts["--ntasks-per-node"] == opts["--gpus-per-node"], f"{script}: one task per GPU"
    assert opts["--output"] == "logs/%x-%j.out" and opts["--open-mode"] == "append"
    assert re.fullmatch(r"USR1@\d+", opts["--signal"]), opts["--signal"]  # to the tasks, not B: the shell
    assert "--requeue" in opts
    assert (REPO / recipe_of(script)).is_file(), f"{script}: {recipe_of(script)} does not exist"
    subprocess.run(["bash", "-n", str(script)], check=True)
    # Thin wrappers: identical but for the title, name, time limit and recipe.
    ref = REPO / "jobs" / "scan_r101.sh"

    def norm(p):
        return [
            ln
            for ln in p.read_text().replace(recipe_of(p), "RECIPE").replace(p.stem, "NAME").splitlines()
            if not ln.startswith(("#SBATCH --time", "# ")) and ln.strip() != "#"
        ]

    assert norm(script) == norm(ref)


def test_job_script_outside_slurm():
    """Run by hand (bash, not sbatch): a one-line error and status 2, nothing started."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(["bash", str(REPO / "jobs" / "scan_r101.sh")], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "submit with sbatch" in r.stderr
    r = subprocess.run(
        ["bash", str(REPO / "jobs" / "scan_r101.sh")],
        env=env | {"SLURM_SUBMIT_DIR": str(REPO)},
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "error: submit this script with sbatch" in r.stderr


# --------------------------------------------------------------------------- job machinery

FAKE_TRAINER = r'''
"""Stand-in for pipeline.train: checks what the job script hands each task via a gloo all_reduce."""
import datetime, json, os, sys
out = os.environ["FAKE_OUT"]
if not os.path.isdir(out):
    sys.exit(3)  # test_job_script_reports_failure
import torch, torch.distributed as dist
rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60),
                        init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}")
x = torch.tensor([float(rank + 1)])
dist.all_reduce(x)
keys = ("MASTER_ADDR", "MASTER_PORT", "SLURMD_NODENAME", "SLURM_LOCALID", "SLURM_JOB_ID",
        "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR", "SLURM_CPUS_PER_TASK", "RANK", "WORLD_SIZE")
rec = {"rank": rank, "world": world, "sum": x.item(), "argv": sys.argv[1:], "cwd": os.getcwd(),
       **{k: os.environ.get(k) for k in keys}}
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(rec, f)
dist.destroy_process_group()
'''


@pytest.fixture(scope="module")
def fake_repo(tmp_path_factory) -> Path:
    """A submit dir holding the real jobs/ scripts, stub recipe files and a stand-in trainer."""
    root = tmp_path_factory.mktemp("fake_repo")
    shutil.copytree(REPO / "jobs", root / "jobs")
    (root / "configs").mkdir()
    for script in (REPO / "jobs").glob("*.sh"):
        m = re.search(r"^lowq_train (\S+)", script.read_text(), re.M)
        if m:
            (root / m.group(1)).write_text("# stub\n")
    (root / "pipeline").mkdir()
    (root / "pipeline" / "__init__.py").write_text("")
    (root / "pipeline" / "train.py").write_text(FAKE_TRAINER)
    return root


# The three scripts share jobs/_common.sh (test_job_headers checks they differ only in name,
# time and recipe); each also runs for real below.
@pytest.mark.parametrize("script,shape", [("scan_r101", "1x2"), ("lrfr_r50", "2x1")])
@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_job_script_environment(slurm, fake_repo, tmp_path, script, shape):
    out = tmp_path / "out"
    out.mkdir()
    env = job_env() | {
        "FAKE_OUT": str(out),
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext_cache"),
        "RANK": "7",
        "WORLD_SIZE": "9",
    }  # stale torchrun values in the submitting shell
    args = ["--config", "configs/smoke.yaml", "data.train=/some/dir", "note=two words"]
    job = submit(slurm, fake_repo / "jobs" / f"{script}.sh", shape, tmp_path / "logs", args, cwd=fake_repo, env=env)
    finish(slurm, job, tmp_path / "logs", timeout_s=120)

    recipe = re.search(r"^lowq_train (\S+)", (REPO / "jobs" / f"{script}.sh").read_text(), re.M).group(1)
    recs = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in recs] == [0, 1] and all(r["world"] == 2 for r in recs)
    assert all(r["sum"] == 3.0 for r in recs)  # 1 + 2 over both ranks
    for r in recs:
        assert r["argv"] == ["--config", recipe, *args]  # the recipe first, then "$@" verbatim
        assert r["MASTER_ADDR"] == "127.0.0.1"  # NodeAddr of n1/n2, not the unresolvable name
        assert int(r["MASTER_PORT"]) == 10000 + job % 50000
        assert r["OMP_NUM_THREADS"] == "1" and r["SLURM_CPUS_PER_TASK"] == "1"
        assert r["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "ext_cache")  # --export=ALL
        assert Path(r["cwd"]).resolve() == fake_repo.resolve()
        assert r["RANK"] is None and r["WORLD_SIZE"] is None  # dropped: ranks come from SLURM_*
    nodes = {r["SLURMD_NODENAME"] for r in recs}
    assert len(nodes) == (1 if shape == "1x2" else 2)
    assert sorted(r["SLURM_LOCALID"] for r in recs) == (["0", "1"] if shape == "1x2" else ["0", "0"])
    log = job_log(tmp_path / "logs", job)
    assert f"master=127.0.0.1:{10000 + job % 50000}" in log and "srun finished rc=0" in log


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_job_script_reports_failure(slurm, fake_repo, tmp_path):
    """A failing trainer makes the job fail (non-zero ExitCode), not look successful."""
    env = job_env() | {"FAKE_OUT": str(tmp_path / "missing_dir")}  # the stand-in exits with 3
    job = submit(slurm, fake_repo / "jobs" / "scan_r101.sh", "2x1", tmp_path / "logs", [], cwd=fake_repo, env=env)
    info = slurm.wait_job(job, 120)
    # 3, or 143 when srun's --kill-on-bad-exit terminated the other rank first.
    assert info["JobState"] == "FAILED" and info["ExitCode"] in ("3:0", "143:0"), info
    assert re.search(r"srun finished rc=(3|143)\b", job_log(tmp_path / "logs", job))


# --------------------------------------------------------------------------- real trainer


def checkpoints(run: Path) -> list[Path]:
    return sorted(p for p in (run / "checkpoints").glob("step_*") if p.is_dir())


def histogram_tags(run: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"histograms": 0})
    acc.Reload()
    return acc.Tags()["histograms"]


def run_smoke(slurm, script: str, shape: str, tmp_path: Path, shards: Path, extra=()) -> tuple[int, Path]:
    run = tmp_path / "run"
    # The smoke layer, cut to 4 steps (histograms at 2 and 4, checkpoint at 4) to keep CI quick.
    job = submit(
        slurm,
        REPO / "jobs" / f"{script}.sh",
        shape,
        tmp_path / "logs",
        [
            "--config",
            "configs/smoke.yaml",
            f"data.train={shards}",
            f"output.dir={run}",
            "schedule.max_steps=4",
            "output.histogram_every=2",
            "output.log_every=2",
            *extra,
        ],
    )
    finish(slurm, job, tmp_path / "logs")
    return job, run


@pytest.mark.parametrize("shape", ["1x2", "2x1"])
@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_scan_r101_smoke(slurm, lfw_shards, tmp_path, shape):
    job, run = run_smoke(slurm, "scan_r101", shape, tmp_path, lfw_shards)
    ckpts = checkpoints(run)
    log = job_log(tmp_path / "logs", job)
    assert ckpts, f"no checkpoint under {run}/checkpoints\n{log}"
    assert (ckpts[-1] / "model.pt").is_file() and (ckpts[-1] / "config.yaml").is_file()
    tags = histogram_tags(run)
    t_tags = [t for t in tags if re.search(r"(^|/)t(/|$)", t)]
    assert "hist/t/all" in tags and len(t_tags) > 1, f"no SCAN t histograms in {run}/tb: {tags}\n{log}"
    assert "world=2" in log, log


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_lrfr_r50_smoke(slurm, lfw_shards, tmp_path):
    job, run = run_smoke(slurm, "lrfr_r50", "2x1", tmp_path, lfw_shards)
    ckpts = checkpoints(run)
    assert ckpts and (ckpts[-1] / "model.pt").is_file(), job_log(tmp_path / "logs", job)


def tb_scalar_tags(run: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return acc.Tags()["scalars"]


@pytest.mark.parametrize(
    "script, shape, scalars, hists",
    [
        # LGAF: the LGF weights and statistics (EMA all-reduced over the 2 ranks), the γ_l histogram
        (
            "lgaf_r100",
            "2x1",
            {"monitor/lgaf/gamma_l_mean", "monitor/lgaf/ema_mu_l", "monitor/lgaf/share_l"},
            {"hist/lgaf/gamma_l"},
        ),
        # CQA-Face: CAL as its own loss term, the quality scores
        ("cqa_r100", "1x2", {"loss/cal", "monitor/cqa/q_spread", "monitor/cqa/cal_active_frac"}, {"hist/cqa/q0"}),
        # LCD: both SR terms, their gradient share on the regularised conv, SAM's θ, the dropped fraction
        (
            "lcd_r50",
            "2x1",
            {
                "loss/sr_filter",
                "loss/sr_response",
                "grad_ratio/lcd_conv/sr_filter",
                "monitor/sam/theta_var_over_samples",
                # measured on the fixed validation faces at each evaluation (spec §8)
                "monitor/lcd/occlusion_concentration",
                "monitor/sam/theta_clean_vs_occluded",
                "monitor/lcd/next_bn_mean_gap",
                "monitor/lcd/eq8_mse@0.3",
                "val/val20/tar@far=1e-01",  # 10 impostor pairs: FAR 0.1 is the lowest measurable
            },
            {"hist/lcd/gamma_frac", "hist/sam/theta"},
        ),
    ],
)
@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_method_smoke(slurm, lfw_shards, lfw_bin, tmp_path, script, shape, scalars, hists):
    from pipeline.faces.io import read_bin, write_bin

    bins, issame = read_bin(lfw_bin)  # 20 pairs of real faces: the final evaluation and the PNG's faces
    pairs = list(range(10)) + list(range(50, 60))  # the .bin alternates 50 matched and 50 mismatched pairs
    write_bin(tmp_path / "val20.bin", [bins[j] for i in pairs for j in (2 * i, 2 * i + 1)], [issame[i] for i in pairs])
    job, run = run_smoke(slurm, script, shape, tmp_path, lfw_shards, [f"data.val=[{tmp_path / 'val20.bin'}]"])
    ckpts = checkpoints(run)
    log = job_log(tmp_path / "logs", job)
    assert ckpts and (ckpts[-1] / "model.pt").is_file(), f"no checkpoint under {run}/checkpoints\n{log}"
    assert (ckpts[-1] / "attention_maps.png").stat().st_size > 5000, log  # the maps over 8 fixed faces
    assert scalars <= set(tb_scalar_tags(run)), f"{sorted(tb_scalar_tags(run))}\n{log}"
    assert hists <= set(histogram_tags(run)), log
    assert "world=2" in log, log
    evaluated = json.loads((run / "eval_latest.json").read_text())["results"]["val20"]
    # the head's own per-sample values on the validation faces, in TensorBoard too (after 4 steps the eval-mode
    # BatchNorm statistics of a 100-layer trunk are far from settled, so only their range is checked)
    if script == "lgaf_r100":
        assert 0.0 <= evaluated["mean_gamma_l"] <= 1.0 and "val/val20/gamma_l" in tb_scalar_tags(run), evaluated
    if script == "cqa_r100":
        assert all(0.0 <= evaluated[f"mean_q{i}"] <= 1.0 for i in range(4)), evaluated
        assert "val/val20/q0" in tb_scalar_tags(run), evaluated
    if script == "lcd_r50":
        monitors = json.loads((run / "eval_latest.json").read_text())["monitors"]
        assert 0.1 <= monitors["lcd/occlusion_concentration/eyes"] <= 1.0, monitors  # ⌈0.1·c⌉ of c channels
        assert 0.0 <= monitors["lcd/spatial_entropy_val"] <= 1.0, monitors


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_preemption_requeue_resume(slurm, lfw_shards, tmp_path):
    """SIGUSR1 (what --signal=USR1@120 sends) → checkpoint → scontrol requeue → resume → finish."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    # The baseline job with a shallower backbone (this test is about the requeue cycle, not the
    # model) and 10 steps so that the signal, sent at the first logged step, lands mid-run.
    job = submit(
        slurm,
        REPO / "jobs" / "iresnet_r100.sh",
        "2x1",
        logs,
        [
            "--config",
            "configs/smoke.yaml",
            f"data.train={lfw_shards}",
            f"output.dir={run}",
            "model.backbone=iresnet18",
            "schedule.max_steps=10",
            "output.checkpoint_every=1000",
            "output.log_every=2",
        ],
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # wait for the first logged step: every rank is in its loop
        if re.search(r"\[train\] step \d+/", job_log(logs, job)):
            break
        if slurm.job_info(job).get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
            pytest.fail(f"job {job} ended before it could be signalled\n{job_log(logs, job)}")
        time.sleep(0.5)
    else:
        pytest.fail(f"job {job} never started training\n{job_log(logs, job)}")
    slurm.run("scancel", "--signal=USR1", str(job))
    info = finish(slurm, job, logs, timeout_s=240)
    log = job_log(logs, job)
    assert int(info["Restarts"]) == 1, log
    assert "stopped by signal" in log and "resumed from" in log, log
    final = checkpoints(run)
    assert final and final[-1].name == "step_0000010", [p.name for p in final]
    stopped = int(re.search(r"stopped by signal at step (\d+)", log).group(1))
    assert 0 < stopped < 10 and f"resumed from {run / 'checkpoints' / f'step_{stopped:07d}'}" in log, log


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_launcher_on_slurm_preemption(slurm, lfw_shards, tmp_path):
    """pipeline.launch --executor slurm, 2 nodes × 1 task; submitit's preemption signal (USR2)
    becomes the trainer's SIGUSR1 → checkpoint → requeue → the same submission resumes."""
    run, folder = tmp_path / "run", tmp_path / "submitit"
    cmd = [
        sys.executable,
        "-m",
        "pipeline.launch",
        "--config",
        "configs/iresnet_r100_ms1mv2.yaml",
        "--config",
        "configs/smoke.yaml",
        f"data.train={lfw_shards}",
        f"output.dir={run}",
        "model.backbone=iresnet18",
        "schedule.max_steps=10",
        "output.checkpoint_every=1000",
        "output.log_every=2",
        "--executor",
        "slurm",
        "--nodes",
        "2",
        "--gpus-per-node",
        "0",
        "--tasks-per-node",
        "1",
        "--cpus-per-task",
        "1",
        "--time",
        "15",
        "--folder",
        str(folder / "%j"),
    ]
    r = subprocess.run(cmd, cwd=REPO, env=slurm.env(job_env()), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    job = int(re.search(r"slurm job (\d+):", r.stdout).group(1))

    def logs():
        return "\n".join(
            f"--- {p}\n{p.read_text(errors='replace')[-5000:]}" for p in sorted((folder / str(job)).glob("*_log.*"))
        )

    deadline = time.monotonic() + 180
    while not re.search(r"\[train\] step \d+/", logs()):
        if time.monotonic() > deadline or slurm.job_info(job).get("JobState") not in (
            "PENDING",
            "RUNNING",
            "CONFIGURING",
        ):
            pytest.fail(f"job {job} did not reach its training loop\n{logs()}")
        time.sleep(0.5)
    slurm.run("scancel", "--signal=USR2", str(job))
    info = slurm.wait_job(job, 240)
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", f"{info}\n{logs()}"
    assert int(info["Restarts"]) == 1, logs()
    assert "stopped by signal" in logs() and "resumed from" in logs(), logs()
    # Neither task of the preempted run reported success to submitit (job.results() would then
    # have returned before the requeued run): both waited to be stopped.
    assert logs().count("[launch] job requeued after preemption") == 2, logs()
    final = checkpoints(run)
    assert final and final[-1].name == "step_0000010", [p.name for p in final]
