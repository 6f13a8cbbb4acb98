# Shared body of the sbatch scripts in jobs/ (sourced, not run). Each jobs/<recipe>.sh carries its
# own #SBATCH header and ends with:   lowq_train configs/<recipe>.yaml "$@"
#
# What lowq_train does, inside the allocation (the batch shell runs on the first node):
#   1. cd to $SLURM_SUBMIT_DIR (sbatch copies the script to a spool dir, so the repo is found
#      through the directory sbatch was called from: run sbatch from the repository root);
#   2. picks the interpreter: $PYTHON if set, else the repo's .venv/bin/python, else `python`;
#   3. exports MASTER_ADDR = NodeAddr of the first node of $SLURM_JOB_NODELIST (`scontrol show
#      node`; a node name need not resolve, e.g. simulated nodes n1/n2) and
#      MASTER_PORT = 10000 + job id % 50000 (stable across requeues, distinct between jobs);
#      each task derives RANK/WORLD_SIZE/LOCAL_RANK from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID
#      (pipeline/distributed.py);
#   4. runs `srun python -m pipeline.train --config <recipe> "$@"`, one task per GPU;
#   5. preemption: the header asks for `--signal=USR1@120`: 120 s before the time limit Slurm
#      sends SIGUSR1 to every task of the job step (not to this batch shell). The trainer
#      (pipeline/train/preempt.py) agrees across ranks to stop after the current step, writes a
#      checkpoint, and rank 0 calls `scontrol requeue $SLURM_JOB_ID` (the job has --requeue).
#      The requeued job starts again with the same job id (same MASTER_PORT) and
#      SLURM_RESTART_COUNT+1, and the trainer resumes from the newest checkpoint in output.dir.
#      The log (--open-mode=append) keeps every run.
#      Simulate it with:  scancel --signal=USR1 <jobid>

lowq_log() { echo "[$(date '+%F %T')] ${SLURM_JOB_NAME:-job} ${SLURM_JOB_ID:-?}: $*"; }

lowq_master_addr() {
    local first addr
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    addr=$(scontrol show node "$first" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n 1)
    echo "${addr:-$first}"
}

lowq_train() {
    local recipe=$1
    shift
    if [ -z "${SLURM_JOB_ID:-}" ]; then
        echo "error: submit this script with sbatch from the repository root (SLURM_JOB_ID is not set)" >&2
        return 2
    fi
    cd "$SLURM_SUBMIT_DIR"
    if [ ! -f "$recipe" ]; then
        echo "error: $recipe not found under $SLURM_SUBMIT_DIR: run sbatch from the repository root" >&2
        return 2
    fi
    if [ -z "${PYTHON:-}" ]; then
        if [ -x "$SLURM_SUBMIT_DIR/.venv/bin/python" ]; then
            PYTHON="$SLURM_SUBMIT_DIR/.venv/bin/python"
        else
            PYTHON=python
        fi
    fi
    # Each task's rank comes from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; torchrun-style values
    # inherited from the submitting shell (sbatch exports it) would override them: drop them.
    unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE
    MASTER_ADDR=$(lowq_master_addr)
    MASTER_PORT=$((10000 + SLURM_JOB_ID % 50000))
    export MASTER_ADDR MASTER_PORT
    # One intra-op thread pool per task sized to its CPUs, unless the caller chose.
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"

    lowq_log "nodes=$SLURM_JOB_NODELIST tasks=${SLURM_NTASKS:-?} cpus/task=${SLURM_CPUS_PER_TASK:-?}" \
             "gpus/node=${SLURM_GPUS_PER_NODE:-0} restart=${SLURM_RESTART_COUNT:-0}" \
             "master=$MASTER_ADDR:$MASTER_PORT python=$PYTHON"
    lowq_log "srun $PYTHON -m pipeline.train --config $recipe $*"

    local rc=0
    # srun (22.05) does not inherit --cpus-per-task from sbatch: pass it on explicitly.
    srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
        "$PYTHON" -m pipeline.train --config "$recipe" "$@" || rc=$?
    lowq_log "srun finished rc=$rc"
    return "$rc"
}
