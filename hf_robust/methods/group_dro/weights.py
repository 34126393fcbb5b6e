"""GroupDRO's objective as pure functions: per-group losses of a batch, and the exponentiated-gradient update of
the group weights q (Sagawa et al., ICLR 2020, arXiv:1911.08731, Algorithm 1 in its batched form)."""

from __future__ import annotations

import numpy as np
import torch

from ...data.core import require_train_groups


def group_sums(losses: torch.Tensor, groups: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the per-example `losses` of each group, number of examples of each group), both (num_groups,); the
    sums keep the losses' graph."""
    one_hot = torch.nn.functional.one_hot(groups.long(), num_groups).to(losses.dtype)
    return one_hot.T @ losses, one_hot.sum(0)


def adjusted_group_losses(sums: torch.Tensor, counts: torch.Tensor, adjustment: torch.Tensor) -> torch.Tensor:
    """Each group's mean loss in the batch (0 for a group absent from it), plus its adjustment `C / sqrt(n_g)`."""
    return sums / counts.clamp_min(1) + adjustment


def eg_update(q: torch.Tensor, group_losses: torch.Tensor, eta: float) -> torch.Tensor:
    """One exponentiated-gradient step: `q_g * exp(eta * loss_g)`, renormalised to sum to 1 (in float64)."""
    q = q.double() * torch.exp(eta * group_losses.detach().double())
    return q / q.sum()


def adjustment_of(counts: np.ndarray, c: float) -> torch.Tensor:
    """`C / sqrt(n_g)` per group (0 for a group without training examples, whose weight is 0 anyway)."""
    counts = torch.as_tensor(np.asarray(counts), dtype=torch.float64)
    return torch.where(counts > 0, c / counts.clamp_min(1).sqrt(), torch.zeros_like(counts))


def initial_weights(counts: np.ndarray) -> torch.Tensor:
    """Uniform over the groups present in training, 0 for the others (float64)."""
    present = torch.as_tensor(np.asarray(counts) > 0, dtype=torch.float64)
    return present / present.sum()


def train_group_counts(dataset, method: str, alternative: str) -> tuple[np.ndarray, list[str]]:
    """(training size of each group, group names) of a training split, or a `DataValidationError` (raised before any
    training) when it has no usable group labels (`hf_robust.data.core.require_train_groups`)."""
    _, counts, names = require_train_groups(dataset, method, alternative)
    return counts, names
