"""The health check every run ends with: is the method's model worse than the model it started from?

A method can make a model worse than its own ERM stage — a fine-tuning epoch that wipes out the core features,
a last layer that predicts one class for everything — and a run that only reports test metrics (which a user may
not have, or may not look at) would not notice. So every run compares, on the validation split and with the
labels only (never group labels), its final model with its reference (the ERM stage, or the model it started
from):

- accuracy, worst-class accuracy (a model-selection criterion that needs no group labels), balanced accuracy,
  and the share of each class among the predictions and the labels;
- `status`:
  - `collapsed`: a class is almost never predicted (its share of the predictions below `collapse_ratio` times its
    share of the labels), or balanced accuracy at chance (at most 1/K + `chance_margin`);
  - `worse_than_erm`: worst-class accuracy more than `margin` below the reference's;
  - `ok` otherwise.

The pure functions here need no trainer; `RobustTrainer.run_health_check` computes the predictions (sharded over
processes, gathered by `example_idx`: N processes give the 1-process verdict) and applies `on_worse`.
"""

from __future__ import annotations

import numpy as np

HEALTH_STATUSES = ("ok", "worse_than_erm", "collapsed", "unknown")
ON_WORSE_CHOICES = ("keep", "warn", "fallback_to_erm", "error")


class HealthCheckError(RuntimeError):
    """A run whose final model failed its health check, with `on_worse="error"`."""


def prediction_summary(predictions, labels, num_classes: int, finite=None) -> dict:
    """Label-only statistics of a model's predictions on a split (plain floats, JSON-ready). `finite`: per example,
    whether the model's outputs were finite (NaN/inf outputs make a broken model, whatever their argmax)."""
    predictions = np.asarray(predictions, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    per_class = []
    for c in range(num_classes):
        members = labels == c
        per_class.append(float((predictions[members] == c).mean()) if members.any() else None)
    present = [a for a in per_class if a is not None]
    return {
        "num_examples": int(n),
        "accuracy": float((predictions == labels).mean()) if n else float("nan"),
        "worst_class_accuracy": float(min(present)) if present else float("nan"),
        "balanced_accuracy": float(np.mean(present)) if present else float("nan"),
        "class_accuracy": per_class,
        "prediction_share": [float((predictions == c).mean()) if n else 0.0 for c in range(num_classes)],
        "label_share": [float((labels == c).mean()) if n else 0.0 for c in range(num_classes)],
        "nonfinite_share": float(1 - np.asarray(finite, dtype=bool).mean()) if finite is not None and n else 0.0,
    }


def selection_score(summary: dict) -> tuple[float, float]:
    """What the label-free selection maximises: worst-class accuracy, then accuracy; a model with non-finite
    outputs ranks below every other."""
    if summary.get("nonfinite_share", 0.0) > 0:
        return (-1.0, -1.0)
    return (summary["worst_class_accuracy"], summary["accuracy"])


def assess(
    method: dict,
    reference: dict | None,
    class_names: list[str] | None = None,
    reference_name: str = "ERM",
    margin: float = 0.02,
    collapse_ratio: float = 0.1,
    chance_margin: float = 0.02,
) -> tuple[str, str]:
    """(status, reason) for the method's `prediction_summary` against its reference's (None: no comparison)."""
    num_classes = len(method["label_share"])
    names = class_names or [str(c) for c in range(num_classes)]
    if method.get("nonfinite_share", 0.0) > 0:
        return "collapsed", f"{100 * method['nonfinite_share']:.1f}% of the validation outputs are NaN or infinite"
    for c, (pred, label) in enumerate(zip(method["prediction_share"], method["label_share"])):
        if label > 0 and pred < collapse_ratio * label:
            return "collapsed", (
                f"class {names[c]!r} is {100 * label:.1f}% of the validation labels but only {100 * pred:.1f}% of "
                f"the predictions: the model (almost) never predicts it"
            )
    chance = 1.0 / max(num_classes, 1)
    if method["balanced_accuracy"] <= chance + chance_margin:
        return "collapsed", (
            f"balanced accuracy {100 * method['balanced_accuracy']:.1f}% is at chance ({100 * chance:.1f}% for "
            f"{num_classes} classes)"
        )
    if reference is not None:
        drop = reference["worst_class_accuracy"] - method["worst_class_accuracy"]
        if drop > margin + 1e-9:  # (a drop of exactly the margin, in float, is within it)
            return "worse_than_erm", (
                f"validation worst-class accuracy fell from {100 * reference['worst_class_accuracy']:.1f}% "
                f"({reference_name}) to {100 * method['worst_class_accuracy']:.1f}%, more than the "
                f"{100 * margin:.0f}-point margin"
            )
        return "ok", (
            f"validation worst-class accuracy {100 * method['worst_class_accuracy']:.1f}% vs "
            f"{100 * reference['worst_class_accuracy']:.1f}% for {reference_name} (margin {100 * margin:.0f} points)"
        )
    return "ok", f"validation worst-class accuracy {100 * method['worst_class_accuracy']:.1f}%; no reference model"


def format_health(health: dict) -> str:
    """One line for the end of a run's table and the log."""
    status = health.get("status", "unknown")
    action = health.get("action")
    line = f"health: {status} — {health.get('reason', '')}"
    if action and action != "kept":
        line += f" ({action})"
    return line


def format_selection(selection: dict) -> str:
    """One line on the label-free selection: what was chosen among how many candidates, and its score."""
    records = selection["candidates"]
    chosen = records[selection["chosen"]]
    knobs = ", ".join(f"{k}={v}" for k, v in chosen["knobs"].items())
    line = (f"selection: {knobs} chosen among {len(records)} candidates by validation worst-class accuracy "
            f"({100 * chosen['validation']['worst_class_accuracy']:.1f}%, labels only)")
    if selection.get("note"):
        line += f" — {selection['note']}"
    return line
