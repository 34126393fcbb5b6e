"""The worst-group accuracy evaluate module, checked against a brute-force computation."""

import math

import numpy as np
import pytest

from hf_robust.resources import load_metric, metric_path


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
    return load_metric("worst_group_accuracy")


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
