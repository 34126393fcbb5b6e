"""Report plots (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_group_accuracies(runs: dict[str, dict[str, dict]], path: str | Path, title: str | None = None) -> Path:
    """Per-group accuracy bars, one panel per split, one bar colour per run (e.g. ERM vs the method).

    `runs` maps a run name to its split reports ({split: {"groups": {name: {"accuracy", "count"}}, ...}}).
    The worst group of each run is outlined, and its accuracy is in the legend.
    """
    plt = _pyplot()
    splits = list(dict.fromkeys(split for run in runs.values() for split in run))
    fig, axes = plt.subplots(1, len(splits), figsize=(4.5 * len(splits), 3.6), squeeze=False)
    width = 0.8 / max(len(runs), 1)
    for ax, split in zip(axes[0], splits):
        names = list(dict.fromkeys(g for run in runs.values() for g in run.get(split, {}).get("groups", {})))
        x = np.arange(len(names))
        for i, (run_name, run) in enumerate(runs.items()):
            report = run.get(split, {})
            groups = report.get("groups", {})
            acc = [100 * groups[n]["accuracy"] if n in groups else np.nan for n in names]
            worst = report.get("worst_group_accuracy")
            label = f"{run_name} (worst {100 * worst:.0f}%)" if worst is not None and worst == worst else run_name
            bars = ax.bar(x + (i - (len(runs) - 1) / 2) * width, acc, width, label=label)
            if worst is not None and worst == worst:
                for bar, a in zip(bars, acc):
                    if a == a and abs(a - 100 * worst) < 1e-9:
                        bar.set_edgecolor("black")
                        bar.set_linewidth(1.5)
        ax.set_xticks(x, [n.replace(",", ",\n") for n in names], fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(split)
        ax.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
