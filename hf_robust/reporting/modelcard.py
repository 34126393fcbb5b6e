"""Model cards with worst-group accuracy in `model-index`, from the template in `model_cards/`."""

from __future__ import annotations

import math
from pathlib import Path

from ..resources import model_card_template


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.1f}%"


def _summary_rows(splits: dict) -> list[dict]:
    keys = ("accuracy", "worst_group_accuracy", "mean_group_accuracy", "worst_class_accuracy")
    return [{"split": name, **{k: _fmt(report.get(k)) for k in keys}} for name, report in splits.items()]


def _selection(selection: dict | None) -> dict | None:
    if not selection or not selection.get("candidates"):
        return None
    from ..core.health import format_selection

    return {"line": format_selection(selection)[len("selection: "):]}


def build_model_card(
    *,
    model_name: str,
    results: dict,
    trainer_class: str,
    method_name: str,
    method_summary: str,
    tags: list[str],
    paper: dict | None,
    dataset_name: str,
    base_model: str | None,
    task_type: str,
    hyperparameters: dict,
    usage: str,
    plot_files: list[str],
    baseline_name: str | None = None,
):
    """A `huggingface_hub.ModelCard` whose `model-index` holds accuracy and worst-group accuracy per split."""
    import torch
    import transformers
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from .. import __version__

    from ..models.presets import PRESETS

    # a local folder or a dataset generated here is named by its folder name and linked nowhere
    local_dataset = Path(dataset_name).exists()
    dataset_name = Path(dataset_name).name if local_dataset else dataset_name
    # a Hub link only for what can be on the Hub: not a local folder, not a preset built by hf_robust
    hub_base_model = base_model if base_model and base_model not in PRESETS and not Path(base_model).exists() else None
    splits = results.get("splits", {})
    revision = (results.get("dataset_revision") or {}).get("revision")
    fingerprint = (results.get("dataset_fingerprint") or {}).get("train")
    source = f" (Hub revision `{revision}`)" if revision else ""
    source = source or (f" (datasets fingerprint `{fingerprint}`)" if fingerprint else "")
    eval_results = []
    for split, report in splits.items():
        for metric in ("worst_group_accuracy", "accuracy", "mean_group_accuracy"):
            value = report.get(metric)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            eval_results.append(
                EvalResult(
                    task_type=task_type,
                    dataset_type=dataset_name,
                    dataset_name=dataset_name,
                    dataset_split=split,
                    dataset_revision=revision,
                    metric_type=metric,
                    metric_name=metric.replace("_", " ").capitalize(),
                    metric_value=round(float(value), 4),
                )
            )
    card_data = ModelCardData(
        model_name=model_name,
        base_model=hub_base_model,
        datasets=[dataset_name] if "/" in dataset_name and not local_dataset else None,
        library_name="transformers",
        tags=tags,
        eval_results=eval_results or None,
        metrics=["accuracy", "worst_group_accuracy"],
    )
    group_rows = [
        {"split": split, "group": name, "count": g.get("count"), "accuracy": _fmt(g.get("accuracy"))}
        for split, report in splits.items()
        for name, g in report.get("groups", {}).items()
    ]
    baseline = results.get("stages", {}).get(baseline_name) if baseline_name else None
    return ModelCard.from_template(
        card_data,
        template_path=model_card_template(),
        model_name=model_name,
        base_model=base_model,
        base_model_url=f"https://huggingface.co/{hub_base_model}" if hub_base_model else None,
        dataset_name=dataset_name + source,
        method_name=method_name,
        method_summary=method_summary,
        paper_title=(paper or {}).get("title"),
        paper_url=(paper or {}).get("url"),
        paper_citation=(paper or {}).get("citation"),
        summary_rows=_summary_rows(splits),
        baseline_rows=_summary_rows(baseline) if baseline else None,
        baseline_name=baseline_name,
        group_rows=group_rows,
        health=results.get("health") or None,
        selection=_selection(results.get("selection")),
        plot_files=plot_files,
        usage=usage,
        trainer_class=trainer_class,
        hyperparameters=sorted(hyperparameters.items()),
        hf_robust_version=__version__,
        transformers_version=transformers.__version__,
        torch_version=torch.__version__,
    )
