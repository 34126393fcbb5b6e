"""The held-out split and its cached per-example scores, shared by every last-layer method.

- `split_heldout`: the seeded held-out / model-selection halves of an evaluation split.
- `last_layer_gradient_norms`: the per-example norm of the cross-entropy gradient w.r.t. a linear head, in closed
  form (the `scores` stage computes it for every method: GradTune selects by it, the report plots it).
- `LastLayerData`: what the `scores` stage caches (features, logits, labels, groups, norms by `example_idx`).
- `seeded_generator`: one random stream per seeded step (held-out split, selection, head training) from one seed.

Pure functions on tensors: no trainer needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# offsets that give each seeded step its own random stream from the one `seed`
HELDOUT_STREAM, SELECT_STREAM, HEAD_STREAM = 1_000_003, 2_000_003, 3_000_017


def seeded_generator(seed: int, stream: int) -> torch.Generator:
    """The CPU generator of one seeded step (`stream`: one of the `*_STREAM` offsets)."""
    return torch.Generator().manual_seed(int(seed) * 7_919 + stream)


def split_heldout(example_idx: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of a split's example indices: (held-out, model-selection), each sorted.

    The held-out part has `round(fraction * N)` examples (at least 1). It depends only on the set of indices and
    the seed, not on the row order.
    """
    ordered = torch.sort(torch.as_tensor(example_idx, dtype=torch.long)).values
    size = min(len(ordered), max(1, int(round(fraction * len(ordered)))))
    perm = torch.randperm(len(ordered), generator=seeded_generator(seed, HELDOUT_STREAM))
    heldout = torch.sort(ordered[perm[:size]]).values
    selection = torch.sort(ordered[perm[size:]]).values
    return heldout, selection


def last_layer_gradient_norms(
    features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, bias: bool = True
) -> torch.Tensor:
    """Per-example L2 norm of the cross-entropy gradient w.r.t. a linear head (W, b), in closed form.

    For `z = W h + b`: dL/dW = (p - e_y) h^T and dL/db = p - e_y, so the norm over (W, b) is
    `||p - e_y|| * sqrt(||h||^2 + 1)` (`||p - e_y|| * ||h||` without a bias). Computed in float64, with
    `p_y - 1 = -sum_{c != y} p_c` so that confident examples keep a non-zero, exact norm.
    """
    if features.ndim != 2 or logits.ndim != 2 or len(features) != len(logits) or len(labels) != len(logits):
        raise ValueError(
            f"Expected features (N, D), logits (N, K) and labels (N,); got {tuple(features.shape)}, "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}."
        )
    labels = labels.to(device=logits.device, dtype=torch.long)
    probs = torch.softmax(logits.double(), dim=-1)
    target = torch.nn.functional.one_hot(labels, logits.shape[-1]).bool()
    residual = torch.where(target, -(probs.masked_fill(target, 0).sum(-1, keepdim=True)), probs)
    scale = features.double().pow(2).sum(-1) + (1.0 if bias else 0.0)
    return residual.norm(dim=-1) * scale.sqrt()


def worst_class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The lowest per-class accuracy of `logits` (the model-selection criterion: no group labels needed)."""
    correct = (logits.argmax(-1) == labels).double()
    return min(correct[labels == c].mean().item() for c in torch.unique(labels).tolist())


@dataclass
class LastLayerData:
    """The `scores` stage's outputs for the whole held-out split, ordered by `example_idx`."""

    example_idx: torch.Tensor
    features: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    groups: torch.Tensor
    norms: torch.Tensor

    def rows(self, example_idx: torch.Tensor) -> torch.Tensor:
        """Row positions of the given example indices."""
        example_idx = torch.as_tensor(example_idx, dtype=torch.long)
        rows = torch.searchsorted(self.example_idx, example_idx).clamp_max(len(self.example_idx) - 1)
        if not torch.equal(self.example_idx[rows], example_idx):
            missing = example_idx[self.example_idx[rows] != example_idx][:5].tolist()
            raise KeyError(f"example_idx {missing} are not in the cached held-out split.")
        return rows

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ("example_idx", "features", "logits", "labels", "groups", "norms")}
