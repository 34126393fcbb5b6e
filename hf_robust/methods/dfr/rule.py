"""DFR's rule for the last-layer stages (Kirichenko et al., "Last Layer Re-Training is Sufficient for Robustness
to Spurious Correlations", ICLR 2023, arXiv:2204.02937): group- (or class-) balanced subsets of the held-out
half, and the paper's head — L1-regularised logistic regression on standardised features, one per subset,
coefficients averaged, its inverse strength C chosen on the model-selection half.

Written from the paper's description (the authors' code, github.com/PolinaKirichenko/deep_feature_reweighting,
fixes the same recipe: standardisation, liblinear L1, the C grid, averaged retrainings).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ...data.core import DataValidationError
from ..last_layer.retraining import Head, LastLayerRetraining, LastLayerRule
from ..last_layer.scores import SELECT_STREAM, LastLayerData, seeded_generator, worst_class_accuracy


def balanced_subsets(keys: torch.Tensor, num_subsets: int = 1, seed: int = 0) -> torch.Tensor:
    """DFR's balanced subsets: (num_subsets, n_min * K) positions (each row sorted), where each of the K present
    keys (groups or classes) contributes `n_min` = the smallest key count examples, drawn without replacement."""
    keys = torch.as_tensor(keys, dtype=torch.long).cpu()
    if (keys < 0).any():
        raise DataValidationError("balanced_subsets got keys of -1 (unknown group): every example needs a key.")
    present = torch.unique(keys)
    members = [torch.nonzero(keys == k).flatten() for k in present.tolist()]
    n_min = min(len(m) for m in members)
    generator = seeded_generator(seed, SELECT_STREAM)
    rows = []
    for _ in range(num_subsets):
        chosen = [m[torch.randperm(len(m), generator=generator)[:n_min]] for m in members]
        rows.append(torch.sort(torch.cat(chosen)).values)
    return torch.stack(rows)


def worst_group_accuracy(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> float:
    correct = (logits.argmax(-1) == labels).double()
    return min(correct[groups == g].mean().item() for g in torch.unique(groups).tolist())


def fit_logistic_l1(
    features: torch.Tensor, labels: torch.Tensor, subsets: torch.Tensor, C: float, num_classes: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """DFR's head: features standardised (statistics of all `features`), one L1-regularised logistic regression
    (liblinear, inverse strength `C`) per row of `subsets`, coefficients averaged, the standardisation folded
    back in. Returns (weight (K, D), bias (K,)) for `z = W h + b`; with two classes the single logit `w.h + c` is
    split as `(-(w.h + c) / 2, (w.h + c) / 2)`, which gives the same probabilities and predictions; with more,
    one-vs-rest regressions, whose argmax is the prediction."""
    from sklearn.linear_model import LogisticRegression

    x = torch.as_tensor(features, dtype=torch.float64).cpu().numpy()
    y = torch.as_tensor(labels).cpu().numpy()
    mean, std = x.mean(0), x.std(0)
    # constant features, and features whose spread is float32 rounding noise (next to their own size or to the
    # widest feature's spread), are not scaled up: 1/std would blow the folded-back head up to ~1e8
    std[(std <= 1e-6 * np.abs(mean)) | (std <= 1e-6 * std.max(initial=0.0))] = 1.0
    x = (x - mean) / std
    penalty = {"l1_ratio": 1.0} if _sklearn_l1_ratio() else {"penalty": "l1"}
    coefs, intercepts = [], []
    for row in torch.as_tensor(subsets).reshape(-1, subsets.shape[-1]).tolist():
        xs, ys = x[row], y[row]
        # liblinear is binary: more classes are one-vs-rest, as DFR's (older) scikit-learn did implicitly
        tasks = [(0, ys == 1)] if num_classes == 2 else [(c, ys == c) for c in range(num_classes)]
        coef = np.zeros((len(tasks), x.shape[1]))
        intercept = np.zeros(len(tasks))
        for i, target in tasks:
            if target.all() or not target.any():  # a class absent from the subset keeps a zero row
                continue
            model = LogisticRegression(C=C, solver="liblinear", random_state=seed, **penalty).fit(xs, target)
            coef[i], intercept[i] = model.coef_[0], model.intercept_[0]
        coefs.append(coef)
        intercepts.append(intercept)
    coef, intercept = np.mean(coefs, 0) / std, np.mean(intercepts, 0)
    intercept = intercept - coef @ mean
    if num_classes == 2:
        coef = np.concatenate([-coef / 2, coef / 2])
        intercept = np.concatenate([-intercept / 2, intercept / 2])
    return torch.as_tensor(coef, dtype=torch.float32), torch.as_tensor(intercept, dtype=torch.float32)


def _sklearn_l1_ratio() -> bool:
    """scikit-learn >= 1.8 spells an L1 penalty `l1_ratio=1` (`penalty=` is deprecated)."""
    import sklearn

    major, minor = (int(part) for part in sklearn.__version__.split(".")[:2])
    return (major, minor) >= (1, 8)


@dataclass
class DFRRule(LastLayerRule):
    """`num_subsets` subsets of the held-out half balanced by group (`balance="group"`, the paper; needs the
    held-out split's group labels) or by class (`"class"`: no group labels); the head: `"logistic_l1"` (the paper's,
    `regularization` the C grid) or `"sgd"` (the shared head training)."""

    balance: str = "class"
    num_subsets: int = 10
    head: str = "logistic_l1"
    regularization: list[float] = field(default_factory=lambda: [1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01])

    @classmethod
    def from_args(cls, args) -> DFRRule:
        """From a `DFRConfig` (`dfr_balance`, `dfr_num_subsets`, `dfr_head`, `dfr_regularization`)."""
        return cls(balance=args.dfr_balance, num_subsets=args.dfr_num_subsets, head=args.dfr_head,
                   regularization=list(args.dfr_regularization))

    def check(self, retraining: LastLayerRetraining) -> None:
        """Group balancing needs the group of every example of the held-out split (checked before training)."""
        if self.balance == "group" and (np.asarray(retraining.heldout_dataset["group"]) < 0).any():
            raise DataValidationError(
                "dfr_balance='group' balances the held-out set by group, but the held-out split has examples with "
                "an unknown group (-1). Use dfr_balance='class' (no group labels needed), or add the attribute "
                "with as_group_dataset(..., attribute_column=...)."
            )

    def select(self, retraining: LastLayerRetraining, data: LastLayerData) -> torch.Tensor:
        """(num_subsets, n) example indices of the held-out half."""
        held = retraining.heldout_idx
        rows = data.rows(held)
        keys = data.groups[rows] if self.balance == "group" else data.labels[rows]
        return held[balanced_subsets(keys, self.num_subsets, retraining.args.seed)]

    def fit_head(self, retraining: LastLayerRetraining, data: LastLayerData, finetune_sets: torch.Tensor) -> Head:
        if self.head == "sgd":
            return retraining.train_head(data, finetune_sets)
        return self.fit_logistic_l1_head(retraining, data, finetune_sets)

    def fit_logistic_l1_head(
        self, retraining: LastLayerRetraining, data: LastLayerData, finetune_sets: torch.Tensor
    ) -> Head:
        """`fit_logistic_l1` for each C of the grid, the C kept by worst-group accuracy on the model-selection half
        (worst-class accuracy with `balance="class"` or unknown groups); the standardisation statistics are the
        held-out half's."""
        heldout = data.rows(retraining.heldout_idx)
        num_classes = retraining.classifier.out_features
        subsets = torch.searchsorted(heldout, torch.stack([data.rows(s) for s in finetune_sets]))
        grid = list(self.regularization)
        scores, fits = {}, {}
        use_groups = self.balance == "group"
        selection = data.rows(retraining.selection_idx) if len(retraining.selection_idx) else None
        start = time.perf_counter()
        for C in grid:
            fits[C] = fit_logistic_l1(data.features[heldout], data.labels[heldout], subsets, C, num_classes,
                                      retraining.args.seed)
            if selection is not None and len(grid) > 1:
                logits = data.features[selection] @ fits[C][0].T + fits[C][1]
                if use_groups and (data.groups[selection] >= 0).all():
                    scores[C] = worst_group_accuracy(logits, data.labels[selection], data.groups[selection])
                else:
                    scores[C] = worst_class_accuracy(logits, data.labels[selection])
        best = max(grid, key=lambda c: (scores.get(c, 0.0), -grid.index(c))) if scores else grid[0]
        weight, bias = fits[best]
        info = {"head": "logistic_l1", "C": best, "selection_scores": {str(c): s for c, s in scores.items()},
                "selection_metric": "worst_group" if use_groups else "worst_class",
                "train_seconds": round(time.perf_counter() - start, 3)}
        return weight, bias if retraining.classifier.bias is not None else None, info
