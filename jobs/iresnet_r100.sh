#!/bin/bash
# Plain iresnet-100 baseline for SCAN, ArcFace, MS1MV2 (configs/iresnet_r100_ms1mv2.yaml).
#
#   mkdir -p logs && sbatch jobs/iresnet_r100.sh [--config MORE.yaml ...] [key=value ...]
#
# Run sbatch from the repository root (the script finds the repo through SLURM_SUBMIT_DIR).
# logs/ must exist before submitting: Slurm opens --output when the job starts and fails the job
# silently if the directory is missing. Arguments after the script go to pipeline.train, e.g.
#   sbatch jobs/iresnet_r100.sh data.train=/data/ms1mv2_wds output.dir=runs/iresnet_r100
# Any #SBATCH value can be overridden on the sbatch command line, e.g. 2 nodes × 8 GPUs:
#   sbatch --nodes=2 jobs/iresnet_r100.sh ...
# The header asks for GPUs (GRES gpu); on a CPU-only cluster pass --gpus-per-node=0, e.g. the
# smoke run of tests/cluster/test_slurm.py:
#   sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=0 --cpus-per-task=1 \
#          jobs/iresnet_r100.sh --config configs/smoke.yaml data.train=DIR output.dir=OUT
# One task per GPU (--ntasks-per-node = --gpus-per-node). data.batch_size is per GPU.
# Preemption: SIGUSR1 120 s before the time limit → the trainer checkpoints and requeues the job,
# which resumes from output.dir's newest checkpoint (see jobs/_common.sh).
#SBATCH --job-name=iresnet_r100
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=2-00:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=USR1@120
#SBATCH --requeue
set -euo pipefail
source "${SLURM_SUBMIT_DIR:?submit with sbatch from the repository root}/jobs/_common.sh"
lowq_train configs/iresnet_r100_ms1mv2.yaml "$@"
