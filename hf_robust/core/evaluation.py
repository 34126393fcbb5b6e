"""Group metrics of an evaluation: the `worst_group_accuracy` metric and the exact mean loss from the gathered
logits, and the per-split report kept in `results.json` (`RobustTrainer.evaluate`)."""

from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset
from transformers.trainer_utils import EvalPrediction

from ..data.core import group_names

REPORTED_METRICS = ("accuracy", "worst_group_accuracy", "mean_group_accuracy", "worst_class_accuracy", "loss")


def group_metrics(metric, eval_pred: EvalPrediction) -> dict[str, float]:
    """`metric` (the `worst_group_accuracy` evaluate module) on the argmax of the logits, and the mean
    cross-entropy over every example once. `eval_pred.label_ids` is (labels, groups, example_idx)."""
    labels, groups, _ = eval_pred.label_ids
    logits = eval_pred.predictions
    logits = logits[0] if isinstance(logits, tuple) else logits
    metrics = metric.compute(
        predictions=np.asarray(logits).argmax(-1), references=np.asarray(labels), groups=np.asarray(groups)
    )
    if len(labels):  # from the gathered logits: exact under N processes (see RobustTrainer.prediction_step)
        log_probs = torch.as_tensor(np.asarray(logits), dtype=torch.float64).log_softmax(-1)
        targets = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        metrics["loss"] = float(-log_probs.gather(1, targets[:, None]).mean())
    return metrics


def split_report(metrics: dict, prefix: str, dataset: Dataset) -> dict:
    """The `prefix`ed metrics of one split as reported: the overall ones, the number of examples, and each
    group's accuracy and count under the group's name."""
    names = group_names(dataset)
    strip = {k[len(prefix) + 1 :]: v for k, v in metrics.items() if k.startswith(prefix + "_")}
    report = {k: strip[k] for k in REPORTED_METRICS if k in strip}
    report["num_examples"] = len(dataset)
    report["groups"] = {}
    for key, value in strip.items():
        if key.startswith("group_") and key.endswith("_accuracy"):
            g = int(key[len("group_") : -len("_accuracy")])
            name = names[g] if g < len(names) else f"group_{g}"
            report["groups"][name] = {"accuracy": value, "count": int(strip.get(f"group_{g}_count", 0))}
    return report
