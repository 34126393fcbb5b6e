"""The worst-group accuracy evaluate module, checked against a brute-force computation."""

import math
from pathlib import Path

import numpy as np
import pytest

from hf_robust.resources import metric_path

# the module of this checkout (an editable install elsewhere would resolve metric_path to its own copy)
METRIC_DIR = str(Path(__file__).resolve().parents[1] / "metrics" / "worst_group_accuracy")


def brute_force(predictions, references, groups, weights=None):
    out = {"accuracy": sum(p == r for p, r in zip(predictions, references)) / len(references)}
    per_class = {}
    for c in sorted(set(references)):
        idx = [i for i, r in enumerate(references) if r == c]
        per_class[c] = sum(predictions[i] == c for i in idx) / len(idx)
    out["worst_class_accuracy"] = min(per_class.values())
    per_group = {}
    for g in sorted(set(groups) - {-1}):
        idx = [i for i, x in enumerate(groups) if x == g]
        per_group[g] = sum(predictions[i] == references[i] for i in idx) / len(idx)
    out["worst_group_accuracy"] = min(per_group.values())
    out["mean_group_accuracy"] = sum(per_group.values()) / len(per_group)
    if weights is not None:
        total = sum(weights[g] for g in per_group)
        out["weighted_group_accuracy"] = sum(weights[g] * a for g, a in per_group.items()) / total
    return out, per_group


@pytest.fixture(scope="module")
def metric():
    import evaluate

    return evaluate.load(METRIC_DIR, keep_in_memory=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force(metric, seed):
    rng = np.random.default_rng(seed)
    n = 300
    references = rng.integers(0, 3, n).tolist()
    attributes = rng.integers(0, 2, n)
    groups = (np.asarray(references) * 2 + attributes).tolist()
    groups[:7] = [-1] * 7  # unknown attribute: counts for accuracy, not for groups
    groups = [g if g != 5 else 4 for g in groups]  # group 5 left empty
    predictions = [r if rng.random() < 0.7 else int(rng.integers(0, 3)) for r in references]
    weights = {g: float(rng.random()) + 0.1 for g in range(6)}
    result = metric.compute(predictions=predictions, references=references, groups=groups, group_weights=weights)
    expected, per_group = brute_force(predictions, references, groups, weights)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value), key
    for g, value in per_group.items():
        assert result[f"group_{g}_accuracy"] == pytest.approx(value)
        assert result[f"group_{g}_count"] == sum(x == g for x in groups)
    assert "group_5_accuracy" not in result and "group_5_count" not in result


def test_batched_add_batch_equals_one_shot(metric):
    predictions, references, groups = [0, 1, 1, 0, 1, 0], [0, 1, 0, 0, 1, 1], [0, 3, 1, 0, 2, 2]
    one_shot = metric.compute(predictions=predictions, references=references, groups=groups)
    metric.add_batch(predictions=predictions[:4], references=references[:4], groups=groups[:4])
    metric.add_batch(predictions=predictions[4:], references=references[4:], groups=groups[4:])
    assert metric.compute() == one_shot
    assert one_shot["worst_group_accuracy"] == 0.0  # group 1: one example, wrong
    assert one_shot["group_2_accuracy"] == 0.5


def test_empty_and_unknown_groups_never_crash(metric):
    result = metric.compute(predictions=[0, 1], references=[0, 0], groups=[-1, -1])
    assert result["accuracy"] == 0.5
    assert result["worst_class_accuracy"] == 0.5
    assert math.isnan(result["worst_group_accuracy"])
    result = metric.compute(predictions=[0, 1], references=[0, 1], groups=[0, 3], num_groups=4)
    assert result["group_1_count"] == 0 and result["group_2_count"] == 0
    assert "group_1_accuracy" not in result
    assert result["worst_group_accuracy"] == 1.0


def test_loads_offline_by_absolute_path():
    import evaluate

    path = metric_path("worst_group_accuracy")
    assert path.startswith("/")
    module = evaluate.load(path)
    assert module.compute(predictions=[1], references=[1], groups=[2])["group_2_accuracy"] == 1.0


def test_unknown_metric_name_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="no metric 'nope'"):
        metric_path("nope")


def test_probabilities_are_refused_and_groups_may_be_left_out(metric):
    with pytest.raises(ValueError, match=r"predictions must be class indices; got non-integer floats such as \[0.9\]"):
        metric.compute(predictions=[0.9, 1.0], references=[1, 1], groups=[0, 1])
    assert metric.compute(predictions=[1.0, 0.0], references=[1, 1], groups=[0, 1])["accuracy"] == 0.5
    result = metric.compute(predictions=[1, 0, 1], references=[1, 1, 0])  # no groups: classes only
    assert result["worst_class_accuracy"] == 0.0 and result["accuracy"] == pytest.approx(1 / 3)
    assert math.isnan(result["worst_group_accuracy"])


# ----------------------------------------------------------------------------- overlapping groups, ECE, classes
def brute_force_overlapping(predictions, references, memberships, num_groups):
    """Per group: the accuracy over every example that belongs to it (an example counts in each of its groups)."""
    per_group, counts = {}, {}
    for g in range(num_groups):
        idx = [i for i, groups in enumerate(memberships) if g in groups]
        counts[g] = len(idx)
        if idx:
            per_group[g] = sum(predictions[i] == references[i] for i in idx) / len(idx)
    return per_group, counts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_overlapping_groups_match_brute_force_in_every_form(metric, seed):
    rng = np.random.default_rng(seed)
    n, num_groups = 250, 12
    references = rng.integers(0, 2, n).tolist()
    predictions = [r if rng.random() < 0.75 else 1 - r for r in references]
    matrix = rng.random((n, num_groups)) < rng.uniform(0.02, 0.4, num_groups)  # each group its own frequency
    matrix[:, [3, 7]] = False  # two empty groups
    matrix[:5] = False  # examples in no group at all
    memberships = [sorted(np.flatnonzero(row).tolist()) for row in matrix]
    per_group, counts = brute_force_overlapping(predictions, references, memberships, num_groups)
    assert len(per_group) == num_groups - 2 and max(len(m) for m in memberships) >= 3  # really overlapping

    as_lists = metric.compute(predictions=predictions, references=references, groups=memberships,
                              num_groups=num_groups)
    as_matrix = metric.compute(predictions=predictions, references=references, groups=matrix.astype(np.int64))
    with_duplicates = metric.compute(predictions=predictions, references=references,
                                     groups=[m + m[:1] for m in memberships], num_groups=num_groups)
    for result in (as_lists, as_matrix, with_duplicates):
        assert result["worst_group_accuracy"] == pytest.approx(min(per_group.values()))
        assert result["mean_group_accuracy"] == pytest.approx(sum(per_group.values()) / len(per_group))
        assert result["accuracy"] == pytest.approx(np.mean(np.asarray(predictions) == np.asarray(references)))
        for g in range(num_groups):
            assert result[f"group_{g}_count"] == counts[g]
            if g in per_group:
                assert result[f"group_{g}_accuracy"] == pytest.approx(per_group[g])
            else:  # empty: reported as absent, never in the worst or the mean
                assert f"group_{g}_accuracy" not in result


def test_overlapping_groups_batched_equals_one_shot_and_worst_is_not_the_exclusive_one(metric):
    predictions = [1, 1, 0, 0, 1, 0]
    references = [1, 0, 0, 1, 1, 0]
    memberships = [[0, 2], [1], [0, 1], [], [2], [0]]
    one_shot = metric.compute(predictions=predictions, references=references, groups=memberships)
    metric.add_batch(predictions=predictions[:3], references=references[:3], groups=memberships[:3])
    metric.add_batch(predictions=predictions[3:], references=references[3:],
                     groups=np.asarray([[0, 0, 0], [0, 0, 1], [1, 0, 0]]))
    assert metric.compute() == one_shot
    # group 0 = examples 0, 2, 5 (all right); group 1 = 1, 2 (one wrong); group 2 = 0, 4 (all right)
    assert one_shot["group_0_accuracy"] == 1.0 and one_shot["group_0_count"] == 3
    assert one_shot["group_1_accuracy"] == 0.5 and one_shot["worst_group_accuracy"] == 0.5
    assert one_shot["group_2_count"] == 2


def test_membership_matrix_of_ids_is_refused(metric):
    with pytest.raises(ValueError, match="read as a multi-hot membership matrix.*list of lists"):
        metric.compute(predictions=[0, 1], references=[0, 1], groups=np.asarray([[0, 2], [1, 3]]))


def test_expected_calibration_error_by_hand_and_class_balanced_accuracy(metric):
    probabilities = np.asarray([
        [0.9, 0.05, 0.05],  # conf 0.9  -> bin (13/15, 14/15], right
        [0.92, 0.04, 0.04],  # conf 0.92 -> the same bin, wrong
        [0.2, 0.5, 0.3],  # conf 0.5  -> bin (7/15, 8/15], right
        [0.4, 0.35, 0.25],  # conf 0.4 = 6/15 exactly -> bin (5/15, 6/15], wrong
        [0.1, 0.1, 0.8],  # conf 0.8 = 12/15 exactly -> bin (11/15, 12/15], right
    ])
    references = [0, 1, 1, 2, 2]
    predictions = probabilities.argmax(-1)
    result = metric.compute(predictions=predictions, references=references, probabilities=probabilities)
    # bins: 2/5 * |0.5 - 0.91| + 1/5 * |1 - 0.5| + 1/5 * |0 - 0.4| + 1/5 * |1 - 0.8|
    assert result["expected_calibration_error"] == pytest.approx(0.384)
    # per-class recall: class 0 1/1, class 1 1/2, class 2 1/2
    assert result["class_balanced_accuracy"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert result["accuracy"] == pytest.approx(3 / 5) and result["worst_class_accuracy"] == 0.5
    # with 2 bins: (0, 0.5] holds 0.4 (wrong) and 0.5 (right, on the edge), (0.5, 1] the other three
    two = metric.compute(predictions=predictions, references=references, probabilities=probabilities, ece_bins=2)
    expected = 2 / 5 * abs(1 / 2 - 0.45) + 3 / 5 * abs(2 / 3 - (0.9 + 0.92 + 0.8) / 3)
    assert two["expected_calibration_error"] == pytest.approx(expected)
    assert "expected_calibration_error" not in metric.compute(predictions=predictions, references=references)


def test_probabilities_that_are_not_are_refused(metric):
    with pytest.raises(ValueError, match="pass softmax\\(logits\\)"):
        metric.compute(predictions=[0, 1], references=[0, 1], probabilities=[[2.0, -1.0], [0.1, 3.0]])
    with pytest.raises(ValueError, match="not the argmax"):
        metric.compute(predictions=[1, 1], references=[0, 1], probabilities=[[0.8, 0.2], [0.3, 0.7]])
    metric.add_batch(predictions=[0], references=[0], probabilities=[[0.6, 0.4]])
    metric.add_batch(predictions=[1], references=[0])
    with pytest.raises(ValueError, match="for 1 of 2 examples"):
        metric.compute()
