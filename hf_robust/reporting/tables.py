"""Plain-text report of a run: the per-group table the main job prints."""

from __future__ import annotations


def _pct(value) -> str:
    return "   –  " if value is None or value != value else f"{100 * value:5.1f}%"


def format_group_table(runs: dict[str, dict[str, dict]]) -> str:
    """Per split and group, the accuracy of each run side by side (e.g. ERM | MaskTune), then the aggregate
    rows. `runs` maps a run name to its split reports, as in results.json's `splits`/`stages`."""
    names = list(runs)
    splits = list(dict.fromkeys(split for run in runs.values() for split in run))
    width = max([len("worst-group accuracy")] + [len(g) + 2 for run in runs.values() for r in run.values() for g in r.get("groups", {})])
    header = f"{'':{width}}  {'n':>6}  " + "  ".join(f"{n:>10}" for n in names)
    lines = []
    for split in splits:
        lines += ["", f"== {split} ==", header]
        groups = list(dict.fromkeys(g for run in runs.values() for g in run.get(split, {}).get("groups", {})))
        for group in groups:
            count = next((run[split]["groups"][group]["count"] for run in runs.values() if group in run.get(split, {}).get("groups", {})), "")
            cells = [_pct(run.get(split, {}).get("groups", {}).get(group, {}).get("accuracy")) for run in runs.values()]
            lines.append(f"  {group:{width - 2}}  {count:>6}  " + "  ".join(f"{c:>10}" for c in cells))
        for key, label in (("accuracy", "accuracy"), ("worst_group_accuracy", "worst-group accuracy"), ("worst_class_accuracy", "worst-class accuracy")):
            cells = [_pct(run.get(split, {}).get(key)) for run in runs.values()]
            lines.append(f"{label:{width}}  {'':>6}  " + "  ".join(f"{c:>10}" for c in cells))
    return "\n".join(lines).lstrip("\n")
