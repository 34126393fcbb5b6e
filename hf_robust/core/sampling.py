"""The training sampler of `balanced_sampling`: examples drawn with equal total weight per class or per group,
the same draw for an epoch whether the run is resumed or spread over processes."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler

from ..data.core import DataValidationError


class EpochSeededWeightedSampler(WeightedRandomSampler):
    """`WeightedRandomSampler` whose draw is a pure function of (seed, epoch).

    The Trainer calls `set_epoch(epoch)` before each epoch (accelerate forwards it through its batch-sampler
    shards), so epoch k draws the same indices in an uninterrupted run, in a resumed one (which does not replay
    the finished epochs) and on every process. Iterating without `set_epoch` moves to the next epoch's draw.
    """

    def __init__(self, weights, num_samples: int, seed: int):
        super().__init__(weights, num_samples, replacement=True)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(2, dtype=np.uint32)
        self.generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        yield from super().__iter__()
        self.epoch += 1


def balanced_sampler(dataset, mode: str, seed: int) -> EpochSeededWeightedSampler:
    """Draws `len(dataset)` examples with replacement, each with weight 1 / (size of its class, or of its group
    for `mode="group"`)."""
    keys = np.asarray(dataset["label" if mode == "class" else "group"])
    if (keys < 0).any():
        raise DataValidationError(
            "balanced_sampling='group' needs a group label on every training example; some are -1. Use "
            "balanced_sampling='class' for data without group labels."
        )
    weights = 1.0 / np.bincount(keys)[keys]
    return EpochSeededWeightedSampler(torch.as_tensor(weights), len(dataset), seed=seed)
