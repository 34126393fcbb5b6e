"""Overlapping evaluation groups: an example may belong to several groups at once.

WILDS' CivilComments (Koh et al. 2021, "WILDS: A Benchmark of in-the-Wild Distribution Shifts", arXiv:2012.07421) is
evaluated on 16 groups, each of 8 identities x toxic / non-toxic; a comment mentioning two identities counts in two
groups, one mentioning none in no group. Such a split keeps its disjoint `group` column (what training uses: samplers,
group-balanced last layers) and adds the column `overlapping_groups`: the list of the example's group ids, a
`List(ClassLabel)` whose names name the groups. Evaluation (`hf_robust.core.evaluation`) then reports every group and
the worst of them over these instead of `group`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from datasets import ClassLabel, Dataset

OVERLAPPING_GROUPS = "overlapping_groups"


def overlapping_feature(names: Sequence[str]):
    """The feature of an `overlapping_groups` column: a list of group ids named by `names`."""
    from datasets import features

    inner = ClassLabel(names=list(names))
    return features.List(inner) if hasattr(features, "List") else features.Sequence(inner)


def add_overlapping_groups(dataset: Dataset, memberships: Sequence[Sequence[int]], names: Sequence[str]) -> Dataset:
    """`dataset` with the column `overlapping_groups` (the group ids of each example, named by `names`)."""
    if len(memberships) != len(dataset):
        raise ValueError(f"{len(memberships)} group lists for {len(dataset)} examples: expected one list per example.")
    bad = sorted({g for ids in memberships for g in ids if not 0 <= g < len(names)})
    if bad:
        raise ValueError(f"Group ids {bad[:5]} are outside 0..{len(names) - 1} ({len(names)} group names).")
    if OVERLAPPING_GROUPS in dataset.column_names:
        dataset = dataset.remove_columns(OVERLAPPING_GROUPS)
    return dataset.add_column(OVERLAPPING_GROUPS, [sorted(set(ids)) for ids in memberships],
                              feature=overlapping_feature(names))


def overlapping_group_names(dataset: Dataset) -> list[str] | None:
    """The names of the overlapping groups of `dataset`, or None when it has none."""
    feature = dataset.features.get(OVERLAPPING_GROUPS) if hasattr(dataset, "features") else None
    inner = getattr(feature, "feature", None)
    if isinstance(inner, ClassLabel):
        return list(inner.names)
    return None if feature is None else []


def padded_group_ids(rows: list[dict]) -> torch.Tensor:
    """The `overlapping_groups` of a batch of rows as one LongTensor (B, K), each row padded with -1 (K = the most
    groups any example of the batch has; 0 when none has any). Padding of any negative value means "no group": the
    evaluation loop pads further with -100 when it concatenates batches or processes."""
    lists = [list(row.get(OVERLAPPING_GROUPS) or []) for row in rows]
    width = max((len(ids) for ids in lists), default=0)
    out = torch.full((len(lists), width), -1, dtype=torch.long)
    for i, ids in enumerate(lists):
        if ids:
            out[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    return out


def group_lists(padded: np.ndarray) -> list[list[int]]:
    """A padded (N, K) id matrix (negative = padding) back to one list of group ids per example."""
    padded = np.asarray(padded)
    if padded.ndim == 1:
        padded = padded[:, None]
    return [row[row >= 0].tolist() for row in padded]
