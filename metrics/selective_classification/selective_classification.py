"""Selective classification: the error a classifier makes on the examples it chooses to answer.

A classifier with a confidence score abstains below a threshold. Coverage is the fraction answered, selective
risk the error rate on them. Thresholds are set for target coverages — on the same inputs, or given (e.g.
calibrated on a validation split, as MaskTune and SelectiveNet do). The area under the risk-coverage curve
(AURC, Geifman et al. 2018) summarises every threshold at once.
"""

import datasets
import evaluate
import numpy as np

_CITATION = """\
@inproceedings{geifman2017selective,
  title={Selective Classification for Deep Neural Networks},
  author={Geifman, Yonatan and El-Yaniv, Ran},
  booktitle={NeurIPS},
  year={2017}
}
"""

_DESCRIPTION = """\
Coverage and selective risk (error among answered examples) at target coverages, the thresholds that reach
them, and the area under the risk-coverage curve (AURC).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class.
    references (`list` of `int`): true class.
    confidences (`list` of `float`): the score thresholded to abstain (higher = more confident).
    coverages (`list` of `float`, *optional*, defaults to [1.0, 0.95, 0.9, 0.85, 0.8]): target coverages.
    thresholds (`dict` or `list` of `float`, *optional*): one threshold per target coverage (keys as in
        `coverages`), e.g. calibrated on validation with `selection_thresholds`. Default: thresholds that
        reach each target coverage on these inputs.
Returns:
    accuracy, aurc, and for each target coverage c (as a percentage p = round(100 c)): threshold_at_{p},
    coverage_at_{p} (the coverage actually reached) and risk_at_{p} (selective error; NaN if nothing is covered).
Examples:
    >>> metric = evaluate.load("/abs/path/to/metrics/selective_classification")
    >>> metric.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0], confidences=[0.9, 0.8, 0.3, 0.6],
    ...                coverages=[1.0, 0.5])
    {'accuracy': 0.75, 'aurc': 0.0625, 'threshold_at_100': 0.3, 'coverage_at_100': 1.0, 'risk_at_100': 0.25, 'threshold_at_50': 0.8, 'coverage_at_50': 0.5, 'risk_at_50': 0.0}
"""


def selection_thresholds(confidences, coverages):
    """Thresholds that keep (at least) each target fraction of `confidences`: answer iff confidence >= t."""
    confidences = np.sort(np.asarray(confidences, dtype=np.float64))[::-1]
    thresholds = {}
    for coverage in coverages:
        keep = max(1, int(np.ceil(coverage * len(confidences) - 1e-9)))
        thresholds[coverage] = float(confidences[keep - 1])
    return thresholds


def risk_coverage_curve(correct, confidences):
    """(coverage, risk) when answering the k most confident examples, k = 1..n (ties broken by order)."""
    order = np.argsort(-np.asarray(confidences, dtype=np.float64), kind="stable")
    errors = np.cumsum(1.0 - np.asarray(correct, dtype=np.float64)[order])
    answered = np.arange(1, len(order) + 1)
    return answered / len(order), errors / answered


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SelectiveClassification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                    "confidences": datasets.Value("float64"),
                }
            ),
            reference_urls=["https://arxiv.org/abs/1705.08500"],
        )

    def _compute(self, predictions, references, confidences, coverages=(1.0, 0.95, 0.9, 0.85, 0.8), thresholds=None):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        confidences = np.asarray(confidences, dtype=np.float64)
        correct = predictions == references
        result = {"accuracy": float(correct.mean()) if len(correct) else float("nan")}
        _, risks = risk_coverage_curve(correct, confidences)
        result["aurc"] = float(risks.mean()) if len(risks) else float("nan")
        if thresholds is None:
            thresholds = selection_thresholds(confidences, coverages)
        elif not isinstance(thresholds, dict):
            thresholds = dict(zip(coverages, thresholds))
        for coverage in coverages:
            threshold = float(thresholds[coverage])
            answered = confidences >= threshold
            tag = round(100 * coverage)
            result[f"threshold_at_{tag}"] = threshold
            result[f"coverage_at_{tag}"] = float(answered.mean()) if len(answered) else float("nan")
            result[f"risk_at_{tag}"] = float(1 - correct[answered].mean()) if answered.any() else float("nan")
        return result
