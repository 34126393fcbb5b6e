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


_RULE_NAMES = {
    "error_set": ("error set", "JTT, [arXiv:2107.09044](https://arxiv.org/abs/2107.09044)", "misclassifies"),
    "gradient_norm": ("gradient norm", "GradTune", "selects by the largest last-layer gradient norm"),
}


def _share(value) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}%" if value == 0 or value >= 0.001 else f"{100 * value:.2g}%"


def group_inference_section(report: dict | None, plot_file: str | None = None) -> str | None:
    """The card's "Which examples look like the minority?" section from results.json's `group_inference`: what
    each rule found, precision and recall per group (when groups are known), and the examples (the plot, and for
    text the top tokens)."""
    if not report:
        return None
    lines = ["## Which examples look like the minority?", "",
             "Two label-free rules point to the examples the ERM model (the run's `erm` stage) treats as a minority:"]
    table, classes, texts = [], [], []
    for rule, (name, source, verb) in _RULE_NAMES.items():
        entry = report.get(rule)
        if not entry:
            continue
        if "skipped" in entry:
            lines.append(f"- **{name}** ({source}): not computed, {entry['skipped']}.")
            continue
        lines.append(f"- **{name}** ({source}): the `{entry['split']}` examples it {verb}"
                     f"{'' if entry['part'] == 'all' else ' (' + entry['part'] + ')'}: **{entry['size']}** of "
                     f"{entry['examples_scored']} ({_share(entry['fraction'])}).")
        for group, row in (entry.get("per_group") or {}).items():
            table.append(f"| {name} | {group} | {row['count']} | {row['in_set']} | {_share(row['precision'])} | "
                         f"{_share(row['recall'])} |")
        if not entry.get("per_group"):
            classes += [f"| {name} | {c} | {row['count']} | {row['in_set']} |"
                        for c, row in entry.get("per_class", {}).items()]
        for example in entry.get("examples", []):
            if example.get("top_tokens"):
                tokens = ", ".join(f"`{t}`" for t, _ in example["top_tokens"])
                texts.append(f"- {name}: label {example['label']}, predicted {example['prediction']}"
                             f"{'' if example['group'] is None else ' (' + str(example['group']) + ')'}: {tokens}")
    if table:
        lines += ["", "Against the true groups (precision: share of the set in the group; recall: share of the "
                  "group in the set):", "", "| rule | group | examples | in set | precision | recall |",
                  "| --- | --- | --- | --- | --- | --- |", *table]
    if classes:
        lines += ["", "The data has no group labels, so precision and recall per group cannot be computed; the sets by "
                  "class:", "", "| rule | class | examples | in set |", "| --- | --- | --- | --- |", *classes]
    if texts:
        lines += ["", "Examples from each set, with the tokens the model's prediction rests on most (gradient x "
                  "input):", "", *texts]
    if plot_file:
        lines += ["", "Examples from each set with where the model looks (XGrad-CAM or top tokens, for its "
                  "prediction): a shortcut shared by the set shows here.", "", f"![inferred minority]({plot_file})"]
    return "\n".join(lines)


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
    card = ModelCard.from_template(
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
    section = group_inference_section(
        results.get("group_inference"), next((p for p in plot_files if p.endswith("group_inference.png")), None)
    )
    if section:  # before "How to use" (the end of the results part of the template), else at the end
        marker = "\n## How to use"
        card.text = (card.text.replace(marker, f"\n{section}\n{marker}", 1) if marker in card.text
                     else f"{card.text.rstrip()}\n\n{section}\n")
    return card
