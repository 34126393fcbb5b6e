"""Worst-group accuracy: the accuracy of the group a classifier serves worst.

A group is a (label, spurious attribute) pair, e.g. "waterbird on land". The metric follows the protocol of
Sagawa et al. 2020 (Group DRO, arXiv:1911.08731) and WILDS (Koh et al. 2021, arXiv:2012.07421): per-group accuracy
over the groups present, the minimum of them, their unweighted mean, and a mean weighted by given group proportions
(WILDS' `adj_acc_avg` with the training proportions). Groups may overlap (WILDS' CivilComments: each of 8 identities x
toxic / non-toxic, an example counting in every group it belongs to): give each example its list of group ids, or a
multi-hot matrix. `worst_class_accuracy` and `class_balanced_accuracy` need no groups. With `probabilities`, the
expected calibration error (Guo et al. 2017, "On Calibration of Modern Neural Networks", arXiv:1706.04599) too.
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
Accuracy per group (label x spurious attribute; groups may overlap), worst-group accuracy (the minimum over non-empty
groups), mean-group accuracy (unweighted mean over non-empty groups), optionally a weighted group accuracy,
worst-class accuracy and class-balanced accuracy (the minimum and the mean of the per-class recalls; they need no
groups) and, given probabilities, the expected calibration error (15 equal-width confidence bins). Examples in no
group (group -1, or an empty list) count for accuracy and the class metrics only. Empty groups are left out of
every aggregate.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): true labels.
    groups (optional): the group(s) of each example, in one of three forms:
        - `list[int]`: one group per example (`label * num_attributes + attribute`), -1 where unknown;
        - `list[list[int]]`: the ids of every group the example belongs to (overlapping groups), `[]` for none;
        - a 2-D array (numpy or torch) of 0/1, shape (num_examples, num_groups): a multi-hot membership matrix
          (its width sets `num_groups`). A 2-D array is always read as multi-hot: give group ids as lists.
        Left out: no group labels (the class metrics still hold).
    probabilities (2-D array, *optional*): class probabilities (softmax of the logits), shape (num_examples,
        num_classes); `predictions` must be their argmax. Adds `expected_calibration_error`.
    group_weights (`dict` or `list` of `float`, *optional*): weight of each group for
        `weighted_group_accuracy`, e.g. the training-set proportions.
    num_groups (`int`, *optional*): total number of groups; groups absent from the batch are then
        reported with `group_{g}_count` = 0 (and no accuracy).
    ece_bins (`int`, *optional*, default 15): number of equal-width confidence bins of the calibration error.
Returns:
    accuracy, worst_class_accuracy, class_balanced_accuracy, class_{c}_accuracy, worst_group_accuracy,
    mean_group_accuracy, group_{g}_accuracy and group_{g}_count for each non-empty group, with `group_weights`
    weighted_group_accuracy, and with `probabilities` expected_calibration_error. A group key whose value is
    undefined (no example in any group) is NaN.
Examples:
    >>> metric = evaluate.load("/abs/path/to/metrics/worst_group_accuracy")
    >>> metric.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0], groups=[0, 3, 1, 1])
    {'accuracy': 0.75, 'worst_class_accuracy': 0.6666666666666666, 'class_balanced_accuracy': 0.8333333333333333, 'class_0_accuracy': 0.6666666666666666, 'class_1_accuracy': 1.0, 'worst_group_accuracy': 0.5, 'mean_group_accuracy': 0.8333333333333334, 'group_0_accuracy': 1.0, 'group_0_count': 1, 'group_1_accuracy': 0.5, 'group_1_count': 2, 'group_3_accuracy': 1.0, 'group_3_count': 1}
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0], groups=[[0, 2], [3], []])["group_0_accuracy"]
    1.0
"""

ECE_BINS = 15


def _accuracy_by(keys: np.ndarray, correct: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    counts = np.bincount(keys, minlength=size)
    hits = np.bincount(keys, weights=correct, minlength=size)
    return counts, np.divide(hits, counts, out=np.full(size, np.nan), where=counts > 0)


def _is_2d_array(values) -> bool:
    return hasattr(values, "ndim") and hasattr(values, "shape") and values.ndim == 2


def _group_lists(groups, n: int) -> tuple[list[list[int]], int | None]:
    """Every form of `groups` as a list of group-id lists (duplicates and -1 dropped), and the number of groups a
    multi-hot matrix declares (None for the other forms)."""
    if groups is None:
        return [[] for _ in range(n)], None
    if _is_2d_array(groups):
        matrix = np.asarray(groups.detach().cpu() if hasattr(groups, "detach") else groups)
        if matrix.shape[0] != n:
            raise ValueError(f"groups is a {matrix.shape} membership matrix for {n} predictions: one row each.")
        if matrix.size and not np.isin(matrix, (0, 1)).all():
            raise ValueError(
                "groups is a 2-D array, read as a multi-hot membership matrix, but it holds values other than 0 and 1 "
                f"(e.g. {np.unique(matrix[~np.isin(matrix, (0, 1))])[:3].tolist()}): give group ids as a list of "
                "lists instead (one list per example)."
            )
        rows, cols = np.nonzero(matrix)
        lists = [[] for _ in range(n)]
        for r, c in zip(rows.tolist(), cols.tolist()):
            lists[r].append(c)
        return lists, int(matrix.shape[1])
    flat = np.asarray(groups.detach().cpu() if hasattr(groups, "detach") else groups, dtype=object)
    if flat.ndim == 1 and len(flat) == n and all(isinstance(g, (int, np.integer)) for g in flat):
        flat = flat.astype(np.int64)  # one group per example (the common case): no per-entry parsing
        if (flat < -1).any():
            raise ValueError(f"Group ids are integers >= 0 (-1: unknown); found {flat[flat < -1][:3].tolist()}.")
        return [[g] if g >= 0 else [] for g in flat.tolist()], None
    groups = list(groups)
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} predictions: expected one per example.")
    lists = []
    for entry in groups:
        ids = [int(g) for g in (np.ravel(entry).tolist() if np.ndim(entry) else [entry])]
        bad = [g for g in ids if g < -1]
        if bad:
            raise ValueError(f"Group ids are integers >= 0 (-1: unknown); found {bad[:3]}.")
        lists.append(sorted({g for g in ids if g >= 0}))
    return lists, None


def _confidences(probabilities, predictions, n: int) -> list[float]:
    """The max-probability confidence of each example (NaN when no probabilities are given)."""
    if probabilities is None:
        return [float("nan")] * n
    if hasattr(probabilities, "detach"):
        probabilities = probabilities.detach().cpu()
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != n:
        raise ValueError(f"probabilities has shape {probs.shape}: expected (num_examples={n}, num_classes).")
    sums = probs.sum(axis=1)
    if (probs < 0).any() or (probs > 1).any() or not np.allclose(sums, 1.0, atol=1e-3):
        raise ValueError(
            "probabilities must be class probabilities in [0, 1] summing to 1 per example (found sums such as "
            f"{sums[:3].round(4).tolist()}): pass softmax(logits), not the logits."
        )
    confidence = probs.max(axis=1)
    chosen = probs[np.arange(n), np.asarray(predictions, dtype=np.int64)] if n else confidence
    if n and (chosen < confidence - 1e-12).any():
        raise ValueError(
            "predictions are not the argmax of probabilities for some examples: the calibration error compares "
            "the max-probability confidence with the accuracy of that prediction (pass probabilities.argmax(-1))."
        )
    return confidence.tolist()


def expected_calibration_error(confidences: np.ndarray, correct: np.ndarray, num_bins: int = ECE_BINS) -> float:
    """ECE (Guo et al. 2017): `num_bins` equal-width bins over the max-probability confidence, bin m holding the
    confidences in ((m-1)/M, m/M] (a confidence of exactly 0 goes to the first bin); the sum over bins of
    |bin| / n * |accuracy(bin) - mean confidence(bin)|."""
    if len(confidences) == 0:
        return float("nan")
    upper = np.arange(1, num_bins + 1) / num_bins  # compared exactly: a confidence of 0.4 stays in (1/3, 0.4]
    bins = np.minimum(np.searchsorted(upper, confidences, side="left"), num_bins - 1)
    counts = np.bincount(bins, minlength=num_bins)
    gap = np.abs(np.bincount(bins, weights=correct, minlength=num_bins)
                 - np.bincount(bins, weights=confidences, minlength=num_bins))
    return float(gap.sum() / counts.sum())


def _checked(predictions, references):
    """Class indices as they are (a float that is not a whole number, e.g. a probability, is an error: the int64
    features would truncate it silently)."""
    for name, values in (("predictions", predictions), ("references", references)):
        if values is None:
            continue
        array = np.asarray(values)
        if array.dtype.kind == "f" and array.size and not np.array_equal(array, np.round(array)):
            raise ValueError(
                f"{name} must be class indices; got non-integer floats such as {array[array != np.round(array)][:3].tolist()} "
                "(pass logits.argmax(-1), not probabilities; probabilities go in `probabilities=`)."
            )


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class WorstGroupAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # every input is a batched feature so that add_batch() carries it; `groups` (a list of group ids per
            # example) and `confidences` (NaN without probabilities) are filled in by add_batch/compute below
            # (evaluate matches inputs against the first feature set only, so they cannot be optional here).
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                    "groups": datasets.Sequence(datasets.Value("int64")),
                    "confidences": datasets.Value("float64"),
                }
            ),
            reference_urls=["https://arxiv.org/abs/1911.08731", "https://wilds.stanford.edu",
                            "https://arxiv.org/abs/1706.04599"],
        )

    def _prepare(self, predictions, references, groups, probabilities) -> dict:
        _checked(predictions, references)
        n = len(predictions) if predictions is not None else 0
        lists, width = _group_lists(groups, n)
        if width is not None:
            self._matrix_width = max(getattr(self, "_matrix_width", 0) or 0, width)
        return dict(predictions=predictions, references=references, groups=lists,
                    confidences=_confidences(probabilities, predictions, n))

    def add_batch(self, *, predictions=None, references=None, groups=None, probabilities=None, **kwargs):
        """Add a batch of predictions, references, groups (any form; None: unknown) and optional probabilities."""
        if "confidences" in kwargs:  # evaluate's compute() re-adding the inputs it was given, already prepared
            return super().add_batch(predictions=predictions, references=references, groups=groups, **kwargs)
        inputs = self._prepare(predictions, references, groups, probabilities)
        return super().add_batch(**inputs, **kwargs)

    def compute(self, *, predictions=None, references=None, groups=None, probabilities=None, **kwargs):
        """Compute the metrics (of these inputs, or of the batches added so far)."""
        if predictions is None and references is None and groups is None and probabilities is None:
            inputs = {}  # after add_batch()
        else:
            self._matrix_width = None
            inputs = self._prepare(predictions, references, groups, probabilities)
        if getattr(self, "_matrix_width", None) and kwargs.get("num_groups") is None:
            kwargs["num_groups"] = self._matrix_width
        self._matrix_width = None
        return super().compute(**inputs, **kwargs)

    def _compute(self, predictions, references, groups, confidences, group_weights=None, num_groups=None,
                 ece_bins=ECE_BINS):
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
        result["class_balanced_accuracy"] = float(class_acc[present].mean()) if present.any() else float("nan")
        for c in np.flatnonzero(present):
            result[f"class_{c}_accuracy"] = float(class_acc[c])

        confidences = np.asarray(confidences, dtype=np.float64)
        given = ~np.isnan(confidences)
        if given.any():
            if not given.all():
                raise ValueError(
                    f"probabilities were given for {int(given.sum())} of {len(given)} examples (some batches had "
                    "none): give them for every batch, or for none."
                )
            result["expected_calibration_error"] = expected_calibration_error(confidences, correct, int(ece_bins))

        # one (example, group) pair per membership: an example counts in every group it belongs to
        lengths = np.asarray([len(g) for g in groups], dtype=np.int64)
        members = np.asarray([g for ids in groups for g in ids], dtype=np.int64)
        rows = np.repeat(np.arange(len(groups)), lengths)
        size = max(int(members.max()) + 1 if members.size else 0, num_groups or 0)
        counts, acc = _accuracy_by(members, correct[rows], size)
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
