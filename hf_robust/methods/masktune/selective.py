"""Selective classification with MaskTune (paper section 2.2): answer only when the ERM model and the MaskTune
model agree with enough confidence.

The ensemble predicts `argmax_c p_erm(c) * p_masktune(c)` and abstains when `max_c p_erm(c) * p_masktune(c)`
is below a threshold gamma, calibrated on validation to reach a target coverage. The softmax response of one
model (`max_c p(c)`) is the baseline. Numbers come from the `selective_classification` evaluate module.
"""

from __future__ import annotations

import importlib.util
from functools import cache

import torch
from torch import nn

from ...resources import load_metric, metric_path

DEFAULT_COVERAGES = (1.0, 0.95, 0.9, 0.85, 0.8)


@cache
def _metric_module():
    path = f"{metric_path('selective_classification')}/selective_classification.py"
    spec = importlib.util.spec_from_file_location("hf_robust_selective_classification", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def softmax_response(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions, confidences) of one model: argmax and max of its softmax."""
    probabilities = logits.float().softmax(-1)
    confidences, predictions = probabilities.max(-1)
    return predictions, confidences


def ensemble_response(erm_logits: torch.Tensor, masktune_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions, confidences) of the MaskTune ensemble: argmax and max of p_erm * p_masktune."""
    product = erm_logits.float().softmax(-1) * masktune_logits.float().softmax(-1)
    confidences, predictions = product.max(-1)
    return predictions, confidences


def calibrate_thresholds(confidences: torch.Tensor, coverages=DEFAULT_COVERAGES) -> dict[float, float]:
    """gamma per target coverage, from (validation) confidences: answer iff confidence >= gamma."""
    return _metric_module().selection_thresholds(torch.as_tensor(confidences).cpu().numpy(), list(coverages))


def risk_coverage_curve(correct: torch.Tensor, confidences: torch.Tensor):
    """(coverage, selective risk) arrays when answering the k most confident examples, k = 1..n."""
    return _metric_module().risk_coverage_curve(
        torch.as_tensor(correct).cpu().numpy(), torch.as_tensor(confidences).cpu().numpy()
    )


def selective_report(
    splits: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    calibration_split: str,
    coverages=DEFAULT_COVERAGES,
) -> dict[str, dict]:
    """Per split, the selective-classification metrics with thresholds calibrated on `calibration_split`.

    `splits` maps a split name to (predictions, confidences, labels).
    """
    metric = load_metric("selective_classification")
    thresholds = calibrate_thresholds(splits[calibration_split][1], coverages)
    report = {}
    for name, (predictions, confidences, labels) in splits.items():
        report[name] = metric.compute(
            predictions=predictions.tolist(), references=labels.tolist(), confidences=confidences.tolist(),
            coverages=list(coverages), thresholds=thresholds,
        )
    return report


class SelectiveClassifier(nn.Module):
    """The ERM model and the MaskTune model as one selective classifier.

    `forward(**inputs)` returns (predictions, confidences); `predict(threshold=gamma, **inputs)` returns the
    predictions with -1 where it abstains. Calibrate gamma with `calibrate_thresholds` on validation confidences.
    """

    def __init__(self, erm_model: nn.Module, masktune_model: nn.Module):
        super().__init__()
        self.erm_model = erm_model
        self.masktune_model = masktune_model

    @staticmethod
    def _logits(model, inputs):
        outputs = model(**inputs)
        return outputs.logits if hasattr(outputs, "logits") else outputs

    def forward(self, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {k: v for k, v in inputs.items() if k not in ("labels", "group", "example_idx")}
        return ensemble_response(self._logits(self.erm_model, inputs), self._logits(self.masktune_model, inputs))

    @torch.no_grad()
    def predict(self, threshold: float, **inputs) -> torch.Tensor:
        """Predictions with -1 where it abstains, computed in evaluation mode (dropout off, BatchNorm running
        statistics) whatever mode the models were left in by training; their modes are restored after."""
        modes = [module.training for module in self.modules()]
        self.eval()
        try:
            predictions, confidences = self(**inputs)
        finally:
            for module, mode in zip(self.modules(), modes):
                module.training = mode
        return torch.where(confidences >= threshold, predictions, torch.full_like(predictions, -1))
