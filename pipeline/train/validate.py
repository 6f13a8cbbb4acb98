"""In-training evaluation (rank 0): every ``data.val`` set through :func:`pipeline.eval.run.evaluate` — the
same front-end as ``python -m pipeline.eval verify`` — with accuracy, TAR@FAR and the network's own per-sample values
to TensorBoard (``val/<set>/…``) and ``eval_latest.json``; and the fixed faces the networks' validation monitors
and checkpoint figures read."""

from __future__ import annotations

from pathlib import Path

import torch

from data_prep.manifest import DataError
from pipeline import checkpoint as ckpt
from pipeline import distributed
from pipeline.config import Config

MONITOR_FACES = 64  # fixed validation faces for the networks' validation monitors (the first 8: attention maps)


class Validator:
    """``model``: the recipe (its ``net`` the FaceNetwork); ``autocast``: evaluate in bf16 as training runs
    (the autocast engine keeps fp32 weights); ``writer``: TensorBoard (rank 0), set by the trainer."""

    def __init__(self, cfg: Config, model, device: torch.device, dtype: torch.dtype, autocast: bool, out: Path):
        self.cfg, self.model, self.device, self.dtype, self.autocast, self.out = (
            cfg,
            model,
            device,
            dtype,
            autocast,
            out,
        )
        self.writer = None
        self._faces: torch.Tensor | None = None  # from data.val (None until first asked)
        self._first_batch_faces: torch.Tensor | None = None  # the fallback without data.val

    def remember_first_batch(self, images: torch.Tensor) -> None:
        """Keep the start of the first training batch (rank 0) as the fixed faces when there is no data.val."""
        if self._first_batch_faces is None and distributed.is_main():
            self._first_batch_faces = images[:MONITOR_FACES].detach().clone()

    def probe_faces(self) -> torch.Tensor | None:
        """Up to MONITOR_FACES fixed faces (rank 0): the first image of each of the first pairs of the first
        ``data.val`` set, else the start of the first training batch. The attention-map figure draws the first 8;
        the networks' validation monitors (:meth:`FaceNetwork.validation_monitors`) read them all."""
        if self._faces is None and self.cfg.data.val:
            from pipeline.eval.embed import to_model_input
            from pipeline.eval.sets import load_bin

            try:
                images, _ = load_bin(self.cfg.data.val[0], self.cfg.model.input_size)
                self._faces = to_model_input(images[0 : 2 * MONITOR_FACES : 2])
            except DataError as exc:
                print(f"[train] attention maps: no faces from {self.cfg.data.val[0]}: {exc}", flush=True)
        faces = self._faces if self._faces is not None else self._first_batch_faces
        return None if faces is None else faces.to(self.device, self.dtype)

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        # under the autocast engine the weights are fp32: evaluate in bf16 as training does
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.model.embed(images.to(self.device, self.dtype)).float()

    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        """Every ``data.val`` set at ``step`` (rank 0 evaluates; every rank waits at the barrier)."""
        results = {}
        if self.cfg.data.val and distributed.is_main():
            self.model.eval()
            for path in self.cfg.data.val:
                res = self._evaluate_set(path, step)
                if res is not None:
                    results[Path(path).stem] = res
            # what the network's modules measure on fixed clean faces (LCD's occlusion concentration, …; spec §8)
            faces = self.probe_faces()
            monitors = {} if faces is None else self.model.net.validation_monitors(faces)
            if self.writer:
                for k, v in monitors.items():
                    self.writer.add_scalar(f"monitor/{k}", v, step)
            self.model.train()
            if self.writer:
                self.writer.flush()
            record = {"step": step, "results": results}
            if monitors:
                record["monitors"] = monitors
            ckpt.save_json(self.out / "eval_latest.json", record)
        distributed.barrier()
        return results

    def _evaluate_set(self, path: str, step: int) -> dict | None:
        from pipeline.eval.embed import to_model_input
        from pipeline.eval.run import evaluate_bin
        from pipeline.eval.sets import load_bin

        name = Path(path).stem
        try:
            res = evaluate_bin(
                self._embed,
                path,
                batch_size=self.cfg.data.batch_size,
                device=str(self.device),
                progress=f"[eval] step {step} {name}: embedding",
                image_size=self.cfg.model.input_size,
            )
        except DataError as exc:  # rank 0 alone evaluates: report, never leave the others at the barrier
            print(f"[eval] step {step} {name}: skipped: {exc}", flush=True)
            return None
        result = dict(res)
        # the network's own per-sample values on this set (LGAF's γ_l, CQA's quality scores), if any
        images, _ = load_bin(path, self.cfg.model.input_size)
        values = self.model.net.sample_value_means(images, self.cfg.data.batch_size, to_model_input)
        result.update({f"mean_{k}": v for k, v in values.items()})
        if self.writer:
            self.writer.add_scalar(f"val/{name}/accuracy", res["accuracy"], step)
            for far, tar in res.get("tar_at_far", {}).items():  # over the set's pairs; None: too few impostors
                if tar is not None:
                    self.writer.add_scalar(f"val/{name}/tar@far={far}", tar, step)
            for k, v in values.items():
                self.writer.add_scalar(f"val/{name}/{k}", v, step)
        print(f"[eval] step {step} {name}: accuracy {res['accuracy']:.4f} ± {res['std']:.4f}", flush=True)
        return result
