"""Worst-group accuracy: the accuracy of the group a classifier serves worst.

A group is a (label, spurious attribute) pair, e.g. "waterbird on land". The metric follows the protocol of
Sagawa et al. 2020 (Group DRO) and WILDS: per-group accuracy over the groups present, the minimum of them,
their unweighted mean, and a mean weighted by given group proportions (WILDS' `adj_acc_avg` with the
training proportions). `worst_class_accuracy` needs no groups: it is the model-selection criterion of
methods that may not look at group labels (GradTune, DFR without groups).
"""

import datasets
import evaluate
import numpy as np

_CITATION = """\
@inproceedings{sagawa2020distributionally,
  title={Distributionally Robust Neural Networks for Group Shifts: On the Importance of Regularization for Worst-Case Generalization},
  author={Sagawa, Shiori and Koh, Pang Wei and Hashimoto, Tatsunori B. and Liang, Percy},
  booktitle={International Conference on Learning Representations},
  year={2020}
}
"""

_DESCRIPTION = """\
Accuracy per group (label x spurious attribute), worst-group accuracy (the minimum over non-empty groups),
mean-group accuracy (unweighted mean over non-empty groups), optionally a weighted group accuracy, and
worst-class accuracy (minimum per-class accuracy, needs no groups). Examples with group -1 (attribute
unknown) count for accuracy and class accuracies but belong to no group. Empty groups are left out.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): true labels.
    groups (`list` of `int`): group index of each example (`label * num_attributes + attribute`), -1 where the
        attribute is unknown (all -1 when there are no group labels: the class metrics still hold).
    group_weights (`dict` or `list` of `float`, *optional*): weight of each group for
        `weighted_group_accuracy`, e.g. the training-set proportions.
    num_groups (`int`, *optional*): total number of groups; groups absent from the batch are then
        reported with `group_{g}_count` = 0 (and no accuracy).
Returns:
    accuracy, worst_class_accuracy, class_{c}_accuracy, worst_group_accuracy, mean_group_accuracy,
    group_{g}_accuracy and group_{g}_count for each non-empty group, and, with `group_weights`,
    weighted_group_accuracy. A group key whose value is undefined (no known group at all) is NaN.
Examples:
    >>> metric = evaluate.load("/abs/path/to/metrics/worst_group_accuracy")
    >>> metric.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0], groups=[0, 3, 1, 1])
    {'accuracy': 0.75, 'worst_class_accuracy': 0.6666666666666666, 'class_0_accuracy': 0.6666666666666666, 'class_1_accuracy': 1.0, 'worst_group_accuracy': 0.5, 'mean_group_accuracy': 0.8333333333333334, 'group_0_accuracy': 1.0, 'group_0_count': 1, 'group_1_accuracy': 0.5, 'group_1_count': 2, 'group_3_accuracy': 1.0, 'group_3_count': 1}
"""


def _accuracy_by(keys: np.ndarray, correct: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    counts = np.bincount(keys, minlength=size)
    hits = np.bincount(keys, weights=correct, minlength=size)
    return counts, np.divide(hits, counts, out=np.full(size, np.nan), where=counts > 0)


def _checked(predictions, references, groups):
    """Class indices as they are (a float that is not a whole number, e.g. a probability, is an error: the int64
    features would truncate it silently); groups=None means unknown groups (-1)."""
    for name, values in (("predictions", predictions), ("references", references)):
        if values is None:
            continue
        array = np.asarray(values)
        if array.dtype.kind == "f" and array.size and not np.array_equal(array, np.round(array)):
            raise ValueError(
                f"{name} must be class indices; got non-integer floats such as {array[array != np.round(array)][:3].tolist()} "
                "(pass logits.argmax(-1), not probabilities)."
            )
    if groups is None and predictions is not None:
        groups = [-1] * len(predictions)
    return predictions, references, groups


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class WorstGroupAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # `groups` is a batched feature so that add_batch() carries it; pass -1 where groups are unknown
            # (evaluate matches inputs against the first feature set only, so it cannot be optional here).
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                    "groups": datasets.Value("int64"),
                }
            ),
            reference_urls=["https://arxiv.org/abs/1911.08731", "https://wilds.stanford.edu"],
        )

    def add_batch(self, *, predictions=None, references=None, groups=None, **kwargs):
        """Add a batch of predictions, references and groups (groups=None: unknown, -1)."""
        predictions, references, groups = _checked(predictions, references, groups)
        return super().add_batch(predictions=predictions, references=references, groups=groups, **kwargs)

    def compute(self, *, predictions=None, references=None, groups=None, **kwargs):
        """Compute the metrics (of these inputs, or of the batches added so far)."""
        if predictions is None and references is None and groups is None:  # after add_batch()
            return super().compute(**kwargs)
        predictions, references, groups = _checked(predictions, references, groups)
        return super().compute(predictions=predictions, references=references, groups=groups, **kwargs)

    def _compute(self, predictions, references, groups, group_weights=None, num_groups=None):
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        if predictions.shape != references.shape:
            raise ValueError(f"predictions {predictions.shape} and references {references.shape} differ in shape.")
        if (references < 0).any():
            raise ValueError("references must be class indices >= 0; found negative labels.")
        correct = (predictions == references).astype(np.float64)
        result = {"accuracy": float(correct.mean()) if len(correct) else float("nan")}

        num_classes = int(references.max()) + 1 if len(references) else 0
        class_counts, class_acc = _accuracy_by(references, correct, num_classes)
        present = class_counts > 0
        result["worst_class_accuracy"] = float(class_acc[present].min()) if present.any() else float("nan")
        for c in np.flatnonzero(present):
            result[f"class_{c}_accuracy"] = float(class_acc[c])

        groups = np.asarray(groups, dtype=np.int64)
        known = groups >= 0
        size = max(int(groups.max()) + 1 if known.any() else 0, num_groups or 0)
        counts, acc = _accuracy_by(groups[known], correct[known], size)
        present = counts > 0
        result["worst_group_accuracy"] = float(acc[present].min()) if present.any() else float("nan")
        result["mean_group_accuracy"] = float(acc[present].mean()) if present.any() else float("nan")
        if group_weights is not None:
            weights = np.zeros(size)
            items = group_weights.items() if isinstance(group_weights, dict) else enumerate(group_weights)
            for g, w in items:
                if int(g) < size:
                    weights[int(g)] = float(w)
            w = weights[present]
            result["weighted_group_accuracy"] = float((w * acc[present]).sum() / w.sum()) if w.sum() > 0 else float("nan")
        for g in range(size):
            if present[g]:
                result[f"group_{g}_accuracy"] = float(acc[g])
            if present[g] or num_groups is not None:
                result[f"group_{g}_count"] = int(counts[g])
        return result
