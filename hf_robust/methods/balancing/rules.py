"""The balancing rules as pure functions: per-example weights, and the seeded subsample of SUBG / SUBY (Idrissi et
al., "Simple data balancing achieves competitive worst-group-accuracy", CLeaR 2022, arXiv:2110.14503)."""

from __future__ import annotations

import numpy as np

from ...data.core import require_train_groups

SUBSAMPLE_STREAM = 2022  # the seed stream of the subsample (the seed's other uses draw from other streams)


def balance_keys(dataset, balance_by: str, method: str) -> np.ndarray:
    """The group (or class) of every training example; a `DataValidationError` before training when balancing by
    group on a split without usable group labels (a missing or unknown group, or one group only)."""
    if balance_by == "class":
        return np.asarray(dataset["label"], dtype=np.int64)
    keys, _, _ = require_train_groups(dataset, f"{method} with balance_by='group'",
                                      "balance by class (balance_by='class'), which needs no group labels")
    return keys


def balanced_weights(keys: np.ndarray) -> np.ndarray:
    """Per-example weights `N / (K * n_k)`: each of the K present keys gets the same total weight, and the weights
    average 1 (a balanced batch has the plain loss's scale)."""
    keys = np.asarray(keys, dtype=np.int64)
    counts = np.bincount(keys)
    present = int((counts > 0).sum())
    return len(keys) / (present * counts[keys].astype(np.float64))


def subsample_positions(keys: np.ndarray, seed: int) -> np.ndarray:
    """SUBG / SUBY: for every present key, `n_min` (the smallest key's size) of its positions drawn without
    replacement by a generator seeded with (seed, SUBSAMPLE_STREAM); all kept positions, sorted."""
    keys = np.asarray(keys, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), SUBSAMPLE_STREAM]))
    present = np.unique(keys)
    members = [np.flatnonzero(keys == k) for k in present]
    n_min = min(len(m) for m in members)
    kept = [m[np.sort(rng.permutation(len(m))[:n_min])] for m in members]
    return np.sort(np.concatenate(kept))
