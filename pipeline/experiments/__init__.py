"""Experiments (``python -m pipeline.ablate``) — the ablation runner: every arm × seed trained with one budget, evaluated on every set, one table.

    python -m pipeline.ablate configs/ablations/smoke_scan.yaml        # train what is not cached, write the table
    python -m pipeline.ablate SPEC --list                              # the grid: index, arm, seed, status
    python -m pipeline.ablate SPEC --jobs 4 data.train=/scratch/lfw    # 4 cells at a time; key=value for every arm
    python -m pipeline.ablate SPEC --report-only                       # the table from the cells on disk

On Slurm, one array task per cell (N = arms × seeds; ``--list`` prints the exact line), then the table:

    sbatch --array=0-17 --cpus-per-task=4 --wrap "python -m pipeline.ablate SPEC --cell \\$SLURM_ARRAY_TASK_ID"
    python -m pipeline.ablate SPEC --report-only

The spec is YAML. Relative paths are relative to the directory you run from, as for ``pipeline.train``:

    config: [configs/scan_r18_casia.yaml, configs/smoke.yaml]   # base config layers of every arm
    overrides: [data.train=shards/lfw_view1]                    # key=value for every arm
    arms:                                   # name + config layers and/or key=value overrides
      - {name: plain, overrides: [model.conv=plain]}
      - full                                # an arm that changes nothing: the base as it is
    seeds: [0, 1, 2]
    budget: {schedule.max_steps: 280}       # set by the runner for every arm; an arm that sets it is an error
    eval:                                   # .bin files, or LFW pairs lists + image folder; name: default the stem
      - {name: lfw, bin: ../shared/data/lfw_view1_112/lfw_devtest_112.bin}
      - {name: lfw_pairs, pairs: ../shared/data/lfw_view1_112/pairsDevTest.txt,
         root: ../shared/data/lfw_view1_112/devtest_112}
      - {name: lfw_all, images: ../shared/data/lfw_view1_112/devtest_112, metric: tar@far=1e-3}
                                            # ^ a labelled image set (identity folders or a list): TAR at FAR over
                                            #   all its pairs (pipeline.eval tarfar); 1e-2, 1e-3, 1e-4 and its
                                            #   metric's FAR are kept, the metric (default tar@far=1e-3) is reported
    reference: plain                        # paired differences against this arm (default: the first)
    output: runs/ablations/scan             # default: runs/ablations/<spec file name>
    processes: 8                            # cores this runner may use (default: all of this machine's)
    parallel: 4                             # cells at a time (default: processes / nproc; on GPUs: GPUs / nproc)
    nproc: 1                                # trainer processes per cell (torchrun when > 1)
    diagnostics: [train_loss, embedding_norm]
    metric: accuracy                        # what the table reports for the pair sets: accuracy | accuracy_noflip | auc

How a cell's config is made: the spec's layers then the arm's layers; then the spec's overrides, the command
line's, the arm's; then the runner's: the budget, ``seed``, ``output.dir`` (the cell's folder), ``data.val=[]``
(the runner evaluates the spec's sets itself). Every arm's config is resolved and validated before anything
trains. The data order is a function of the seed and of :data:`DATA_ORDER_KEYS` (and of ``nproc``, one per
spec): arms must agree on those, so the same seed means the same batches in every arm.

Cells live in ``OUTPUT/cells/<arm>/seed_<seed>/``: ``config.yaml`` (the resolved config the trainer is given),
``train.log``, ``run/`` (the trainer's output.dir: checkpoints, tb), ``cell.json`` (metrics, diagnostics, the
hashes). ``train_hash`` covers the resolved config (less its output paths) and nproc; ``eval_hash`` the eval
sets and diagnostics. On a rerun a cell whose hashes match is skipped ("cached"); one whose eval sets changed is
evaluated again without training; one whose config changed trains again from scratch (said on the console). A
cell whose training stopped (Ctrl-C, preemption, a crash) resumes from its latest checkpoint with
``pipeline.train --resume``, which continues with the same data order and schedule (the same weights as an
uninterrupted run), as long as its config is unchanged. A failed cell is recorded with its exit code and log,
the other cells go on, the table marks it and the runner exits 1; a rerun tries it again.

Cores: ``parallel × nproc × threads ≤ processes``; each cell gets ``OMP_NUM_THREADS=threads``. With GPUs
(``device: auto`` or ``cuda``) each running cell gets its own ``CUDA_VISIBLE_DEVICES`` (nproc GPUs).

Diagnostics: ``@register_diagnostic(name)`` on ``fn(net, cfg, ctx) -> {column: float}`` (net: the cell's final
FaceNetwork in eval mode; cfg: its resolved Config; ctx: :class:`DiagnosticContext`). Register in this module or
in a module named in the config's ``plugins:`` list (imported when the config loads).

Exit codes: 0 every cell finished; 1 a cell failed or is missing (the table is still written); 2 a spec or
config error (one line); 130 interrupted (running cells checkpoint first; a rerun resumes them).
"""
