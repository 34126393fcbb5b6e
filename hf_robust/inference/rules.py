"""The two label-free rules that infer a minority from an ERM model, and how their sets match the true groups.

Pure functions on tensors (no model, no trainer):

- `error_set`: the examples the model misclassifies (argmax of the logits != label), the error set of JTT (Liu et
  al., "Just Train Twice: Improving Group Robustness without Training Group Information", ICML 2021,
  arXiv:2107.09044);
- `gradient_norm_set`: the examples GradTune (Kenfack et al., "GradTune: Last-Layer Fine-Tuning for Group
  Robustness without Group Annotation") fine-tunes on: GradTune's own selection
  (`hf_robust.methods.gradtune.rule.select_by_gradient_norm`: the `top_k` largest last-layer gradient norms plus
  `size - top_k` drawn in proportion to the norm) applied to norms computed by GradTune's own closed form
  (`hf_robust.methods.last_layer.scores.last_layer_gradient_norms`), with GradTune's defaults;
- `group_table`: per group, precision (share of the set in the group) and recall (share of the group in the set);
  `class_table`: the same counts per class, for data without group labels;
- `example_order`: which members of a set to show (highest score first, classes taken in turn).
"""

from __future__ import annotations

from dataclasses import fields

import torch

from ..methods.gradtune.rule import select_by_gradient_norm
from ..methods.last_layer.scores import last_layer_gradient_norms

RULES = ("error_set", "gradient_norm")

__all__ = ["RULES", "class_table", "error_set", "example_order", "gradient_norm_defaults", "gradient_norm_set",
           "group_table", "last_layer_gradient_norms"]


def error_set(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) bool: True where the model's prediction (argmax logit) is not the label."""
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels, dtype=torch.long)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"Expected logits (N, K) and labels (N,); got {tuple(logits.shape)} and {tuple(labels.shape)}.")
    return logits.argmax(-1).cpu() != labels.cpu()


def gradient_norm_defaults(args=None) -> dict:
    """GradTune's selection and held-out settings: those of `args` where it has them (a GradTune or other
    last-layer config), else the defaults of `GradTuneConfig` (M' = 500, k = 0.8 M', half of "validation")."""
    from ..methods.gradtune.config import GradTuneConfig

    names = ("finetune_set_size", "top_k", "heldout_split", "heldout_fraction")
    defaults = {f.name: f.default for f in fields(GradTuneConfig) if f.name in names}
    return {name: getattr(args, name, defaults[name]) for name in names}


def gradient_norm_set(norms: torch.Tensor, size: int = 500, top_k: int | None = None, seed: int = 0) -> torch.Tensor:
    """(N,) bool: the examples GradTune's selection picks from these norms (`select_by_gradient_norm`)."""
    norms = torch.as_tensor(norms)
    chosen = torch.zeros(len(norms), dtype=torch.bool)
    chosen[select_by_gradient_norm(norms, size, top_k, seed)] = True
    return chosen


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def group_table(in_set: torch.Tensor, groups: torch.Tensor, group_names: list[str] | None = None) -> dict | None:
    """{group name: {"count", "in_set", "precision", "recall"}} over the groups present, or None when a group label
    is unknown (-1). precision_g = |S and g| / |S| (None for an empty set), recall_g = |S and g| / |g|."""
    in_set, groups = torch.as_tensor(in_set, dtype=torch.bool), torch.as_tensor(groups, dtype=torch.long)
    if len(groups) == 0 or (groups < 0).any():
        return None
    names = list(group_names or [])
    size = int(in_set.sum())
    table = {}
    for g in torch.unique(groups).tolist():
        members = groups == g
        hits = int((members & in_set).sum())
        table[names[g] if g < len(names) else f"group_{g}"] = {
            "count": int(members.sum()), "in_set": hits,
            "precision": _ratio(hits, size), "recall": _ratio(hits, int(members.sum())),
        }
    return table


def class_table(in_set: torch.Tensor, labels: torch.Tensor, label_names: list[str] | None = None) -> dict:
    """{class name: {"count", "in_set"}}: the composition of the set by class (no group labels needed)."""
    in_set, labels = torch.as_tensor(in_set, dtype=torch.bool), torch.as_tensor(labels, dtype=torch.long)
    names = list(label_names or [])
    return {(names[c] if c < len(names) else str(c)): {"count": int((labels == c).sum()),
                                                        "in_set": int(((labels == c) & in_set).sum())}
            for c in torch.unique(labels).tolist()}


def example_order(in_set: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of up to `count` members of the set to show: within each class by score, highest first (ties:
    lower position first), the classes taken in turn (class 0's first, class 1's first, ..., class 0's second, ...)
    so that every class the set holds is seen."""
    in_set = torch.as_tensor(in_set, dtype=torch.bool)
    scores = torch.as_tensor(scores, dtype=torch.float64)
    labels = torch.as_tensor(labels, dtype=torch.long)
    queues = []
    for c in torch.unique(labels[in_set]).tolist():
        members = torch.nonzero(in_set & (labels == c)).flatten()
        queues.append(members[torch.sort(scores[members], descending=True, stable=True).indices].tolist())
    picked: list[int] = []
    rank = 0
    while len(picked) < count and any(rank < len(q) for q in queues):
        picked += [q[rank] for q in queues if rank < len(q)][: count - len(picked)]
        rank += 1
    return torch.as_tensor(picked, dtype=torch.long)
