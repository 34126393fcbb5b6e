"""JTT's error set and its upsampled retraining set, as pure functions of the identification model's predictions
(Liu et al., ICML 2021, arXiv:2107.09044)."""

from __future__ import annotations

import numpy as np
import torch


def error_set(predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The positions the identification model gets wrong (argmax != label), sorted."""
    return torch.nonzero(torch.as_tensor(predictions) != torch.as_tensor(labels)).flatten()


def upsampled_positions(num_examples: int, errors: np.ndarray, upweight: int) -> np.ndarray:
    """Positions of the retraining set: every example once, then each error-set example `upweight - 1` more times
    (the paper's upsampling: an error-set example appears `upweight` times in all)."""
    extra = np.repeat(np.asarray(errors, dtype=np.int64)[None], max(upweight - 1, 0), axis=0).reshape(-1)
    return np.concatenate([np.arange(num_examples, dtype=np.int64), extra])


def error_set_by_group(errors: torch.Tensor, groups: torch.Tensor, names: list[str]) -> dict:
    """Per group: its size, how many of its examples are in the error set, precision (share of the error set that
    is this group) and recall (share of this group that is in the error set)."""
    groups = torch.as_tensor(groups)
    in_error = torch.zeros(len(groups), dtype=torch.bool)
    in_error[torch.as_tensor(errors, dtype=torch.long)] = True
    total = int(in_error.sum())
    report = {}
    for g, name in enumerate(names):
        members = groups == g
        size, hits = int(members.sum()), int((members & in_error).sum())
        if size == 0:
            continue
        report[name] = {"size": size, "in_error_set": hits, "precision": hits / total if total else None,
                        "recall": hits / size}
    return report
