"""Each loss term's gradient norm on a watched tensor, measured inside the step's own backward.

A module may *watch* a tensor of its graph (``trace.watch(name, tensor)``: LCD watches the conv its spatial
regularisation acts on). At log steps the trainer wraps the step's backward in :class:`TermGradients` and logs

    grad_norm/<name>/<term>   ‖∂term/∂tensor‖ for "cls" (the weighted classification loss) and every aux term
    grad_ratio/<name>/<term>  ‖∂term/∂tensor‖ / ‖∂cls/∂tensor‖      (e.g. LCD spec §8: SR's share of the conv's
                                                                     gradient against ArcFace's)

The aux terms are differentiated separately first (``torch.autograd.grad``, the graph kept; they never pass
through the classifier). The classification term cannot be: the class-sharded classifier's backward runs once
per step (it holds collectives and its saved state). So its gradient is what remains of the step's real
backward: hooks catch the gradient reaching the watched tensor and the gradient reaching the total loss (the
factor DeepSpeed scaled the loss by: 1/grad_accum, the fp16 loss scale), and by linearity
∂cls/∂w = (hooked ∂/∂w) / factor − Σ_aux ∂aux/∂w. Nothing is accumulated into ``.grad`` by the probe itself.
"""

from __future__ import annotations

import torch


class TermGradients:
    """``with TermGradients(watched, aux_terms, total) as probe: engine.backward(total)``; then ``probe.result()``."""

    def __init__(self, watched: dict[str, torch.Tensor], aux_terms: dict[str, torch.Tensor], total: torch.Tensor):
        self.watched = watched
        self.aux: dict[str, dict[str, torch.Tensor]] = {name: {} for name in watched}
        for wname, w in watched.items():
            for tname, term in aux_terms.items():
                grad = (
                    torch.autograd.grad(term, w, retain_graph=True, allow_unused=True)[0]
                    if term.requires_grad
                    else None
                )
                self.aux[wname][tname] = torch.zeros_like(w) if grad is None else grad.detach()
        self.total = total
        self._caught: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> TermGradients:
        def catch(key):
            def hook(grad):
                self._caught[key] = grad.detach().clone()

            return hook

        self._handles = [w.register_hook(catch(name)) for name, w in self.watched.items()]
        self._handles.append(self.total.register_hook(catch("__total__")))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def result(self) -> dict[str, torch.Tensor]:
        """``grad_norm/<w>/<term>`` and ``grad_ratio/<w>/<term>`` (term ≠ cls), as 0-d float32 tensors."""
        factor = self._caught.get("__total__")
        out: dict[str, torch.Tensor] = {}
        for wname, w in self.watched.items():
            norms = {t: g.float().norm() for t, g in self.aux[wname].items()}
            if factor is not None and wname in self._caught:
                cls = self._caught[wname].float() / factor.float() - sum(
                    (g.float() for g in self.aux[wname].values()), torch.zeros_like(w, dtype=torch.float32)
                )
                norms = {"cls": cls.norm(), **norms}
            else:  # the tensor took no part in this backward: the same keys on every rank all the same
                norms = {"cls": torch.zeros((), device=w.device), **norms}
            for tname, norm in norms.items():
                out[f"grad_norm/{wname}/{tname}"] = norm
                if tname != "cls" and "cls" in norms:
                    out[f"grad_ratio/{wname}/{tname}"] = norm / norms["cls"].clamp_min(1e-30)
        return out
