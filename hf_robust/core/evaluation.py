"""Group metrics of an evaluation: the `worst_group_accuracy` metric and the exact mean loss from the gathered
logits, and the per-split report kept in `results.json` (`RobustTrainer.evaluate`).

A split with overlapping groups (the column `overlapping_groups`, e.g. WILDS' CivilComments: 8 identities x
toxic / non-toxic) is evaluated over them: its batches carry the padded group ids (`evaluation_meta`), gathered
over processes like the labels, and the metric counts each example in every group it belongs to."""

from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset
from transformers.trainer_utils import EvalPrediction

from ..data.core import group_names
from ..data.overlapping import OVERLAPPING_GROUPS, group_lists, overlapping_group_names

REPORTED_METRICS = ("accuracy", "worst_group_accuracy", "mean_group_accuracy", "worst_class_accuracy",
                    "class_balanced_accuracy", "expected_calibration_error", "loss")
# batch keys that are hf_robust's bookkeeping, never model inputs
EVALUATION_KEYS = ("group", OVERLAPPING_GROUPS)


def evaluation_meta(inputs: dict) -> tuple:
    """What `prediction_step` hands the metric besides the logits: (labels, group, example_idx), plus the padded
    overlapping group ids when the batch has them."""
    meta = (inputs["labels"], inputs["group"], inputs["example_idx"])
    return meta + (inputs[OVERLAPPING_GROUPS],) if OVERLAPPING_GROUPS in inputs else meta


def group_metrics(metric, eval_pred: EvalPrediction) -> dict[str, float]:
    """`metric` (the `worst_group_accuracy` evaluate module) on the argmax of the logits, with the softmax
    probabilities for the calibration error, and the mean cross-entropy over every example once.
    `eval_pred.label_ids` is `evaluation_meta`'s tuple: (labels, groups, example_idx[, overlapping group ids])."""
    labels, groups, _, *overlapping = eval_pred.label_ids
    logits = eval_pred.predictions
    logits = np.asarray(logits[0] if isinstance(logits, tuple) else logits)
    groups = group_lists(overlapping[0]) if overlapping else np.asarray(groups)
    probabilities = None
    if len(labels) and np.isfinite(logits).all():  # a model with NaN logits is reported, not a crash here
        probabilities = torch.as_tensor(logits, dtype=torch.float64).softmax(-1).numpy()
    metrics = metric.compute(
        predictions=logits.argmax(-1), references=np.asarray(labels), groups=groups, probabilities=probabilities
    )
    if len(labels):  # from the gathered logits: exact under N processes (see RobustTrainer.prediction_step)
        log_probs = torch.as_tensor(logits, dtype=torch.float64).log_softmax(-1)
        targets = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        metrics["loss"] = float(-log_probs.gather(1, targets[:, None]).mean())
    return metrics


def split_report(metrics: dict, prefix: str, dataset: Dataset) -> dict:
    """The `prefix`ed metrics of one split as reported: the overall ones, the number of examples, and each
    group's accuracy and count under the group's name (the overlapping groups' names when the split has them)."""
    names = overlapping_group_names(dataset) if OVERLAPPING_GROUPS in dataset.column_names else group_names(dataset)
    strip = {k[len(prefix) + 1 :]: v for k, v in metrics.items() if k.startswith(prefix + "_")}
    report = {k: strip[k] for k in REPORTED_METRICS if k in strip}
    report["num_examples"] = len(dataset)
    if OVERLAPPING_GROUPS in dataset.column_names:
        report["overlapping_groups"] = True  # an example counts in every group it belongs to
    report["groups"] = {}
    for key, value in strip.items():
        if key.startswith("group_") and key.endswith("_accuracy"):
            g = int(key[len("group_") : -len("_accuracy")])
            name = names[g] if g < len(names) else f"group_{g}"
            report["groups"][name] = {"accuracy": value, "count": int(strip.get(f"group_{g}_count", 0))}
    return report
