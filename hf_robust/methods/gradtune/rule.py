"""GradTune's rule for the last-layer stages (Kenfack et al., "GradTune: Last-Layer Fine-Tuning for Group Robustness
without Group Annotation"): the fine-tuning set is drawn from the held-out examples by the norm of their
last-layer gradient — high for the examples the shortcut gets wrong — and the ERM head is fine-tuned on it with the
shared head training (`hf_robust.methods.last_layer.linear_head`). No group labels are used."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..last_layer.retraining import LastLayerRetraining, LastLayerRule
from ..last_layer.scores import SELECT_STREAM, LastLayerData, seeded_generator


def select_by_gradient_norm(
    norms: torch.Tensor, size: int = 500, top_k: int | None = None, seed: int = 0
) -> torch.Tensor:
    """GradTune's fine-tuning set: positions (sorted) of the `top_k` largest norms, plus `size - top_k` drawn
    without replacement from the others with probability proportional to their norm.

    `size` is capped by the number of examples and `top_k` (default `round(0.8 * size)`) by `size`. The draw is
    successive sampling (each next pick proportional to the norm among those left), done in one pass with
    Efraimidis-Spirakis keys `log(u) / norm`; zero norms come last, in seeded random order.
    """
    norms = torch.as_tensor(norms, dtype=torch.float64).flatten().cpu()
    if (norms < 0).any() or not torch.isfinite(norms).all():
        raise ValueError("Gradient norms must be finite and non-negative.")
    size = min(int(size), len(norms))
    top_k = min(int(round(0.8 * size)) if top_k is None else int(top_k), size)
    if size < 0 or top_k < 0:
        raise ValueError(f"size={size} and top_k={top_k} must be >= 0.")
    order = torch.sort(norms, descending=True, stable=True).indices
    top, rest = order[:top_k], order[top_k:]
    generator = seeded_generator(seed, SELECT_STREAM)
    u = torch.rand(len(rest), generator=generator, dtype=torch.float64).clamp_min(1e-300)
    tie_break = torch.rand(len(rest), generator=generator, dtype=torch.float64)
    weights = norms[rest]
    positive = (weights > 0).nonzero().flatten()
    zero = (weights == 0).nonzero().flatten()
    keys = u[positive].log() / weights[positive]
    ranked = torch.cat([
        positive[torch.sort(keys, descending=True, stable=True).indices],
        zero[torch.argsort(tie_break[zero])],  # zero norms: after every positive one, in seeded random order
    ])
    drawn = rest[ranked[: size - top_k]]
    return torch.sort(torch.cat([top, drawn])).values


@dataclass
class GradTuneRule(LastLayerRule):
    """M' = `size` held-out examples: the `top_k` largest gradient norms (default `round(0.8 * M')`), plus the
    rest drawn without replacement with probability proportional to the norm (the paper's section 4.1 and
    appendix B: k = 400 of M' = 500). The head: the shared head training (`fit_head` not overridden), from the
    ERM head unless `reset_last_layer`."""

    size: int = 500
    top_k: int | None = None

    @classmethod
    def from_args(cls, args) -> GradTuneRule:
        """From a `GradTuneConfig` (`finetune_set_size`, `top_k`)."""
        return cls(size=args.finetune_set_size, top_k=args.top_k)

    def select(self, retraining: LastLayerRetraining, data: LastLayerData) -> torch.Tensor:
        """One set, (1, M') example indices."""
        held = retraining.heldout_idx
        chosen = select_by_gradient_norm(data.norms[data.rows(held)], self.size, self.top_k, retraining.args.seed)
        return held[chosen][None]
