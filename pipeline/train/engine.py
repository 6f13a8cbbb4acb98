"""The backbone's training engine: DeepSpeed behind one small interface (the only trainer code that touches it).

Which DeepSpeed path a run takes (``deepspeed.precision`` × ``deepspeed.zero_stage``):

================  ===========  =====================================================================================
precision         zero_stage   engine
================  ===========  =====================================================================================
fp32              0            the client optimizer on fp32 parameters; DeepSpeed all-reduces gradients (DDP-like)
**bf16**          **0**        **torch autocast** (DeepSpeed's ``torch_autocast``): fp32 parameters and gradients,
                               bf16 convolutions and matmuls, the client optimizer (foreach SGD / AdamW) — arcface_
                               torch's step (DDP + autocast); gradient clipping by one foreach norm
bf16              1, 2         DeepSpeed's BF16_Optimizer / ZeRO: bf16 parameters, fp32 master weights and gradient
                               accumulation, optimizer state partitioned over ranks (for models whose state matters)
fp16              ≥ 1          DeepSpeed's ZeRO optimizer with a dynamic loss scale (stage 0 is raised to 1: its
                               stage-0 wrapper mis-scales fp16 updates, tests/integration/test_mixed_precision.py)
================  ===========  =====================================================================================

Why bf16 at stage 0 is autocast (issue 21 item 2): BF16_Optimizer's step costs, per parameter, a norm kernel, an fp32
gradient accumulation (``to`` + ``add_``) and a clip multiply, plus a host read of the global norm — an r100 step
dispatched 2.0× the launching ops of a bare autocast + foreach-SGD loop (tests/integration/test_engine.py counts them), and for
a 65 M-parameter backbone ZeRO-1 saves under 0.8 GB. The autocast engine dispatches what the bare loop does.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from pipeline import distributed
from pipeline.config import Config, ConfigError

__all__ = [
    "PRECISIONS",
    "Engine",
    "EngineState",
    "zero_stage",
    "uses_autocast",
    "deepspeed_config",
    "cast_buffers",
    "deepspeed_ops_dir",
    "announce_op_build",
    "report_op_build",
]

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def zero_stage(cfg: Config, world_size: int) -> int:
    """The ZeRO stage DeepSpeed runs. On one rank 0 (nothing to partition), except fp16: at least 1, because
    DeepSpeed 0.19's stage-0 wrapper of an fp16 model, FP16_UnfusedOptimizer, is wrong twice over (both found by the
    GPU check of 2026-11-27 on an H100): engine.backward() scales the loss only for ZeRO optimizers, yet this wrapper
    divides every gradient by the loss scale at step() (updates 2^16 times too small, no overflow ever seen); and it
    reads every gradient's overflow flag back to the host, one parameter at a time. bf16 at stage 0 does not use that
    wrapper: it runs under torch autocast (:func:`uses_autocast`)."""
    stage = cfg.deepspeed.zero_stage if world_size > 1 else 0
    return max(stage, 1) if cfg.deepspeed.precision == "fp16" else stage


def uses_autocast(cfg: Config, world_size: int) -> bool:
    """bf16 at stage 0: torch autocast over fp32 parameters (see the module docstring)."""
    return cfg.deepspeed.precision == "bf16" and zero_stage(cfg, world_size) == 0


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    prec = cfg.deepspeed.precision
    stage = zero_stage(cfg, world_size)
    autocast = uses_autocast(cfg, world_size)
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.deepspeed.grad_accum,
        "zero_optimization": {"stage": stage},
        # bf16 gradients accumulate in fp32 (micro steps, ranks): DeepSpeed then picks its BF16_Optimizer at
        # stage 1, which keeps fp32 master weights; bf16 accumulation would round away small gradients
        **({"data_types": {"grad_accum_dtype": "fp32"}} if prec == "bf16" and not autocast else {}),
        "zero_allow_untested_optimizer": True,  # our client SGD/AdamW (FACTS.md)
        # stage 0: the Engine clips with one foreach norm (DeepSpeed's fp32 clip is a loop over the parameters)
        "gradient_clipping": 0.0 if stage == 0 else cfg.optim.grad_clip,
        "fp16": {"enabled": prec == "fp16", "initial_scale_power": cfg.deepspeed.initial_scale_power},
        "bf16": {"enabled": prec == "bf16" and not autocast},
        **({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}} if autocast else {}),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def cast_buffers(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Floating buffers to ``dtype``: DeepSpeed casts parameters to fp16/bf16 but not buffers, and BatchNorm needs
    its running statistics in the dtype of its input and weight. A module lists the buffers it keeps in float32
    (running statistics it computes in float32, e.g. LGAF's EMA: an α = 0.01 update rounds away in bf16) in
    ``fp32_buffers`` (put back to float32 should anything have cast them)."""
    for buf_owner in model.modules():
        keep = getattr(buf_owner, "fp32_buffers", ())
        for name, buf in buf_owner.named_buffers(recurse=False):
            if buf.is_floating_point():
                setattr(buf_owner, name, buf.to(torch.float32 if name in keep else dtype))


class Engine:
    """The backbone (a recipe module) under DeepSpeed: forward, backward, step, and the state a checkpoint needs.

    ``param_dtype``: the dtype of the parameters, buffers and input batches (bf16 / fp16 under DeepSpeed's own
    mixed precision; fp32 under autocast, where the casts happen per op). ``optimizer.param_groups``: where the
    trainer sets the learning rate.
    """

    def __init__(self, cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world_size: int):
        import deepspeed

        self.model = model
        self.stage = zero_stage(cfg, world_size)
        self.autocast = uses_autocast(cfg, world_size)
        self.precision = cfg.deepspeed.precision
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg, world_size), dist_init_required=False
        )
        if world_size == 1 and self.stage == 0:
            # nothing to average over one rank (ZeRO's optimizers fill their gradient partitions in that step)
            self.ds.enable_backward_allreduce = False
        self.param_dtype = torch.float32 if self.autocast else PRECISIONS[cfg.deepspeed.precision]
        if self.param_dtype != torch.float32:
            cast_buffers(model, self.param_dtype)
        self._own_clip = self.stage == 0  # DeepSpeed clips at stage ≥ 1 (deepspeed_config)
        self._clip = cfg.optim.grad_clip if self._own_clip else 0.0
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._clip_norm: torch.Tensor | None = None

    # ------------------------------------------------------------------ the step
    def __call__(self, batch: dict):
        return self.ds(batch)

    def is_boundary(self) -> bool:
        """This micro step ends a gradient-accumulation window (the optimizer steps after it)."""
        return self.ds.is_gradient_accumulation_boundary()

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        """DeepSpeed's step (an optimizer step at a window's end); at stage 0 the foreach clip first."""
        if self._clip > 0 and self.is_boundary():
            self._clip_norm = torch.nn.utils.clip_grad_norm_(self._params, self._clip, foreach=True)
        self.ds.step()

    def skip_micro_step(self) -> None:
        """A micro step whose backward was not run (a non-finite loss): keep DeepSpeed's accumulation counter
        in step with the loop, so that the window ends where it would have."""
        self.ds.micro_steps += 1

    def zero_grad(self) -> None:
        self.ds.optimizer.zero_grad()

    def step_applied(self) -> bool:
        """False when fp16 overflow made DeepSpeed skip the last step."""
        return self.ds.was_step_applied()

    @property
    def loss_scale(self) -> float:
        """DeepSpeed's current dynamic fp16 loss scale (1 outside fp16)."""
        return float(getattr(self.optimizer, "loss_scale", getattr(self.optimizer, "cur_scale", 1.0)))

    def grad_norm(self) -> float | None:
        """The backbone's gradient norm of the last step, when the engine measured one (clipping on)."""
        norm = self._clip_norm if self._own_clip else self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    # ------------------------------------------------------------------ state
    def save(self, directory: Path) -> None:
        """DeepSpeed's per-rank files (weights, optimizer partitions) under ``directory/deepspeed``."""
        self.ds.save_checkpoint(str(directory), tag="deepspeed", save_latest=False)

    def load(self, directory: Path) -> None:
        self.ds.load_checkpoint(str(directory), tag="deepspeed", load_lr_scheduler_states=False)

    def _base_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer under DeepSpeed's wrapper (ZeRO / BF16_Optimizer), or the optimizer itself."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def optimizer_state(self, named_parameters, keep: bool) -> dict:
        """The backbone's optimizer state by parameter name, whole and world-size independent (written as
        ``optimizer_full.pt`` beside DeepSpeed's per-rank partitions, which only a run of the same world size can
        read): per parameter the fp32 master weight and each moment of its shape (SGD momentum, Adam's two), and
        the step count. ZeRO 1/2 and BF16_Optimizer assemble them from the ranks' partitions (a collective: every
        rank calls this; only the rank with ``keep`` returns the tensors); otherwise they are the torch optimizer's."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        base = self._base_optimizer()
        keys = sorted({k for st in base.state.values() for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0})
        steps = [float(st["step"]) for st in base.state.values() if "step" in st]
        out = {"step": steps[0] if steps else None, "params": {}}
        linked = getattr(self.optimizer, "_hp_optimizer_states_linked", True)  # ZeRO links its state at step 1
        if linked and hasattr(self.optimizer, "_lazy_init_hp_params_optimizer_state"):
            # DeepSpeed 0.19 links every group's state right after the FIRST group's first step(), when the other
            # groups (e.g. the no-weight-decay group) have no state yet: their parameters would never see their
            # moments. Link again now that every group has stepped.
            self.optimizer._hp_optimizer_states_linked = False
            self.optimizer._lazy_init_hp_params_optimizer_state()
        for name, p in named_parameters:
            if not p.requires_grad:
                continue
            if hasattr(p, "_hp_mapping") or hasattr(p, "ds_id"):
                master = safe_get_full_fp32_param(p)
                moments = {k: safe_get_full_optimizer_state(p, k) for k in keys} if linked else {}
            else:
                master = p.detach().float()
                moments = {k: v for k, v in base.state.get(p, {}).items() if k in keys}
            if keep:  # the others only take part in the assembly
                entry = {"fp32": master.detach().cpu().clone()}
                entry.update({k: v.detach().float().cpu().clone() for k, v in moments.items() if v is not None})
                out["params"][name] = entry
        return out

    def load_optimizer_state(self, saved: dict, named_parameters, path: Path, device: torch.device) -> None:
        """Put a state from :meth:`optimizer_state` (read from ``path``) into this run's optimizer, whatever its
        world size: every parameter's fp32 master weight and moments (ZeRO: each rank writes its own partition)."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        base = self._base_optimizer()
        params = dict(named_parameters)
        missing = sorted(n for n, p in params.items() if p.requires_grad and n not in saved["params"])
        if missing:
            raise ConfigError(f"--resume: {path} has no optimizer state for parameter '{missing[0]}'")
        if any(hasattr(p, "_hp_mapping") for p in params.values()):
            # ZeRO / BF16_Optimizer create and link their flat state at the first step(): create it now (zeros, to
            # be overwritten below) and link it, so that each parameter's slice of it can be written
            moment_keys = {k for entry in saved["params"].values() for k in entry if k != "fp32"}
            for group in base.param_groups:
                for flat in group["params"]:
                    state = base.state[flat]
                    for k in moment_keys:
                        state.setdefault(k, torch.zeros_like(flat))
                    if saved["step"] is not None:
                        state.setdefault("step", torch.tensor(0.0))
            self.optimizer._hp_optimizer_states_linked = False
            self.optimizer._lazy_init_hp_params_optimizer_state()
        for name, entry in saved["params"].items():
            p = params[name]
            if hasattr(p, "_hp_mapping") or hasattr(p, "ds_id"):
                safe_set_full_fp32_param(p, entry["fp32"].to(device))
                for k, v in entry.items():
                    if k != "fp32":
                        safe_set_full_optimizer_state(p, v.to(device), k)
            else:
                with torch.no_grad():
                    p.copy_(entry["fp32"].to(p.device, p.dtype))
                state = base.state[p]
                for k, v in entry.items():
                    if k != "fp32":
                        state[k] = v.to(p.device)
        if saved["step"] is not None:  # Adam's bias correction counts steps
            for st in base.state.values():
                if "step" in st:
                    st["step"] = torch.tensor(saved["step"]) if torch.is_tensor(st["step"]) else saved["step"]


NETWORK_FILE = "model.pt"  # the FaceNetwork's state_dict: what evaluation and export load
RECIPE_FILE = "recipe.pt"  # the whole training procedure's (the network + any procedure parameters)
OPTIMIZER_FULL = "optimizer_full.pt"  # the backbone's optimizer state by parameter name (any world size)


class EngineState:
    """The backbone as a checkpoint part (:class:`pipeline.checkpoint.manager.Stateful`): DeepSpeed's own per-rank
    files (``deepspeed/``), the network (``model.pt``), the recipe (``recipe.pt``) and the optimizer state by name
    (``optimizer_full.pt``). A run of the same world size resumes from DeepSpeed's files; another world size from
    ``recipe.pt`` + ``optimizer_full.pt``, exactly (an older checkpoint without the latter: moments re-initialised)."""

    def __init__(self, engine: Engine, world_size: int, device: torch.device, network_name: str):
        self.engine, self.world, self.device, self.network_name = engine, world_size, device, network_name

    def save(self, folder: Path, main: bool) -> None:
        model = self.engine.model
        self.engine.save(folder)
        state = self.engine.optimizer_state(model.named_parameters(), keep=main)  # every rank: ZeRO assembles
        if main:
            torch.save(model.net.state_dict(), folder / NETWORK_FILE)
            torch.save(model.state_dict(), folder / RECIPE_FILE)
            torch.save(state, folder / OPTIMIZER_FULL)

    def check(self, folder: Path, meta: dict) -> None:
        pass  # whether the weights fit shows at load (strict), named there

    def load(self, folder: Path, meta: dict) -> None:
        from pipeline.checkpoint import load_state_strict, read_state_dict

        model = self.engine.model
        try:
            if meta["world_size"] == self.world:
                self.engine.load(folder)
                return
            load_state_strict(model, read_state_dict(folder / RECIPE_FILE), folder / RECIPE_FILE, self.network_name)
            path = folder / OPTIMIZER_FULL
            kept = path.is_file()
            if kept:
                saved = torch.load(path, map_location="cpu", weights_only=True)
                self.engine.load_optimizer_state(saved, model.named_parameters(), path, self.device)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0][:300]
            raise ConfigError(f"--resume: checkpoint {folder} does not fit this model ({first})") from None
        if distributed.is_main():
            print(
                f"[train] resuming {folder} (world size {meta['world_size']}) on world size {self.world}: "
                + (
                    "backbone weights and optimizer state re-partitioned exactly"
                    if kept
                    else f"no {OPTIMIZER_FULL} (an older checkpoint): backbone optimizer moments re-initialised"
                )
                + "; classifier state re-sharded exactly",
                flush=True,
            )


# ---------------------------------------------------------------------- DeepSpeed's CPU op, built once per venv

SHM_OP = "deepspeed_shm_comm"  # DeepSpeed's CPU communication op, JIT-built on first use


def deepspeed_ops_dir() -> Path:
    """Where torch JIT-builds DeepSpeed's CPU op: TORCH_EXTENSIONS_DIR if set, else a folder inside this venv
    (set here, so ``make`` and a direct ``python -m pipeline.train`` share one build, and another checkout's venv
    never loads or silently rebuilds this one's)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        root = str(Path(sys.prefix) / "torch_extensions")
        os.environ["TORCH_EXTENSIONS_DIR"] = root  # read by torch.utils.cpp_extension when DeepSpeed loads the op
    return Path(root)


def _op_identity() -> str:
    import deepspeed

    return f"python {sys.prefix}; torch {torch.__version__}; deepspeed {deepspeed.__version__}"


def _op_stamp(root: Path) -> Path:
    return root / f"{SHM_OP}.built_for"


def announce_op_build() -> float | None:
    """Before DeepSpeed starts on a CPU machine (rank 0): if its CPU op was not built for this venv (no stamp, or a
    stamp naming another interpreter, torch or DeepSpeed), say that it builds now (~30 s on 2 idle cores, several
    minutes on a loaded machine; once per venv). Returns the start time of that build, else None."""
    if torch.cuda.is_available() or not distributed.is_main():
        return None
    root = deepspeed_ops_dir()
    stamp = _op_stamp(root)
    if stamp.is_file() and stamp.read_text().strip() == _op_identity() and list(root.glob(f"**/{SHM_OP}*.so")):
        return None
    print(
        f"[train] DeepSpeed's CPU op is not built for this venv: building it now (once; cached in {root})", flush=True
    )
    return time.perf_counter()


def report_op_build(started: float | None) -> None:
    """After DeepSpeed started: 'built in N s' (and the stamp) after a build; 'loaded' otherwise."""
    if torch.cuda.is_available() or not distributed.is_main():
        return
    root = deepspeed_ops_dir()
    if started is None:
        print(f"[train] DeepSpeed CPU op: loaded (built earlier for this venv, {root})", flush=True)
        return
    if list(root.glob(f"**/{SHM_OP}*.so")):
        _op_stamp(root).write_text(_op_identity() + "\n")
        print(f"[train] DeepSpeed CPU op: built in {time.perf_counter() - started:.0f} s ({root})", flush=True)
