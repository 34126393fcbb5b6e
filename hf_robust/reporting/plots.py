"""Report plots (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path, tight: bool = True) -> Path:
    if tight:
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


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
    return _save(fig, path)


def plot_risk_coverage(curves: dict[str, dict[str, dict]], path: str | Path) -> Path:
    """Selective risk against coverage, one panel per split, one line per selective classifier.

    `curves` maps a classifier name to {split: {"coverage": [...], "risk": [...]}}.
    """
    plt = _pyplot()
    splits = list(dict.fromkeys(split for per_split in curves.values() for split in per_split))
    fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 3.4), squeeze=False)
    for ax, split in zip(axes[0], splits):
        for name, per_split in curves.items():
            if split in per_split:
                curve = per_split[split]
                ax.plot(np.asarray(curve["coverage"]) * 100, np.asarray(curve["risk"]) * 100, label=name)
        ax.set_xlabel("coverage (%)")
        ax.set_ylabel("selective risk (%)")
        ax.set_title(split)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_cam_overlays(images, maps: dict, masks, labels: list[str], path: str | Path) -> Path:
    """One row per example: the image, each model's CAM over it, and the mask MaskTune applied.

    `images` uint8 (N, 3, H, W); `maps` {model name: (N, H, W) in [0, 1]}; `masks` (N, H, W) bool.
    """
    plt = _pyplot()
    columns = 2 + len(maps)
    fig, axes = plt.subplots(len(images), columns, figsize=(1.6 * columns, 1.6 * len(images)), squeeze=False)
    for i, image in enumerate(images):
        picture = image.permute(1, 2, 0).numpy()
        axes[i][0].imshow(picture)
        axes[i][0].set_ylabel(labels[i], fontsize=6)
        for j, (name, cam) in enumerate(maps.items(), start=1):
            axes[i][j].imshow(picture)
            axes[i][j].imshow(cam[i].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            if i == 0:
                axes[i][j].set_title(f"{name} CAM", fontsize=7)
        masked = picture * (~masks[i].numpy())[..., None]
        axes[i][-1].imshow(masked.astype(np.uint8))
        if i == 0:
            axes[i][0].set_title("image", fontsize=7)
            axes[i][-1].set_title("masked", fontsize=7)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    return _save(fig, path)


def plot_gradient_norms(
    norms, groups, selected, path: str | Path, group_names: list[str] | None = None, labels=None,
    label_names: list[str] | None = None, bins: int = 30, title: str | None = None,
) -> Path:
    """Per-group histograms of the held-out examples' last-layer gradient norms (GradTune's Figure 2), the
    examples chosen for the fine-tuning set stacked in a darker colour, one panel per group.

    `norms` (N,), `groups` (N,) (-1 = unknown: panels per class from `labels` instead), `selected` (N,) bool.
    The bins are shared, so the panels compare.
    """
    plt = _pyplot()
    norms, groups, selected = np.asarray(norms, float), np.asarray(groups), np.asarray(selected, bool)
    if (groups >= 0).all():
        keys, names = groups, list(group_names or [])
    else:
        keys, names = np.asarray(labels), [f"{n} (group unknown)" for n in (label_names or [])]
    present = sorted(set(keys.tolist()))
    edges = np.histogram_bin_edges(norms, bins=bins)
    fig, axes = plt.subplots(1, len(present), figsize=(3.2 * len(present), 3.0), squeeze=False, sharey=True)
    for ax, key in zip(axes[0], present):
        members = keys == key
        chosen, rest = norms[members & selected], norms[members & ~selected]
        ax.hist([chosen, rest], bins=edges, stacked=True, color=["tab:red", "lightgray"],
                label=[f"selected ({len(chosen)})", f"not selected ({len(rest)})"])
        ax.set_title(names[key] if key < len(names) else f"group {key}", fontsize=8)
        ax.set_xlabel("last-layer gradient norm")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("held-out examples")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_counterfactual_grid(images, cam, counterfactuals: dict, labels: list[str], path: str | Path,
                             threshold: float | None = None) -> Path:
    """Counterfactual distillation's images: one row per example with the original, the student's CAM over it
    (patch grid, max-normalised; patches above the object-mask threshold hatched) and the counterfactual of every
    (mask, refill) strategy.

    `images` uint8 (N, 3, H, W); `cam` (N, h, w) in [0, 1]; `counterfactuals` {(mask, refill): uint8 (N, 3, H, W)}.
    """
    plt = _pyplot()
    columns = 2 + len(counterfactuals)
    fig, axes = plt.subplots(len(images), columns, figsize=(1.25 * columns, 1.35 * len(images)), squeeze=False)
    height, width = images.shape[-2:]
    for i, image in enumerate(images):
        picture = image.permute(1, 2, 0).numpy()
        axes[i][0].imshow(picture)
        axes[i][0].set_ylabel(labels[i], fontsize=6)
        axes[i][1].imshow(picture)
        axes[i][1].imshow(cam[i].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1, extent=(-0.5, width - 0.5, height - 0.5, -0.5),
                          interpolation="nearest")
        if threshold is not None:  # the patches `object` masks: CAM above the threshold, hatched
            h, w = cam.shape[-2:]
            for r, c in zip(*np.nonzero(cam[i].numpy() > threshold)):
                axes[i][1].add_patch(plt.Rectangle((c * width / w - 0.5, r * height / h - 0.5), width / w, height / h,
                                                   fill=False, hatch="///", edgecolor="white", linewidth=0))
        for j, ((mask, refill), batch) in enumerate(counterfactuals.items(), start=2):
            axes[i][j].imshow(batch[i].permute(1, 2, 0).numpy())
            if i == 0:
                axes[i][j].set_title(f"{mask}\n{refill}", fontsize=6)
        if i == 0:
            axes[i][0].set_title("original", fontsize=6)
            axes[i][1].set_title("student CAM", fontsize=6)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    return _save(fig, path)


def plot_selection(selection: dict, path: str | Path, title: str | None = None) -> Path:
    """The label-free selection's candidates: validation worst-class accuracy and accuracy of each (labels only),
    the chosen one marked."""
    plt = _pyplot()
    records = selection["candidates"]
    short = {"finetune_learning_rate": "lr", "finetune_batch_size": "batch", "mask_threshold_std": "k",
             "iterations": "rounds", "distill_weight": "beta"}
    labels = []
    for record in records:
        knobs = record["knobs"]
        labels.append("\n".join(f"{short.get(k, k)}={v:g}" if isinstance(v, float) else f"{short.get(k, k)}={v}"
                                for k, v in knobs.items() if k != "finetune") or "unchanged\n(no fine-tuning)")
    x = np.arange(len(records))
    worst = [100 * r["validation"]["worst_class_accuracy"] for r in records]
    accuracy = [100 * r["validation"]["accuracy"] for r in records]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.3 * len(records)), 3.8))
    bars = ax.bar(x - 0.2, worst, 0.4, label="worst-class accuracy (selects)")
    ax.bar(x + 0.2, accuracy, 0.4, label="accuracy (breaks ties)", alpha=0.6)
    bars[selection["chosen"]].set_edgecolor("black")
    bars[selection["chosen"]].set_linewidth(2)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylim(0, 100)
    ax.set_ylabel(f"{selection.get('split', 'validation')} (%)")
    ax.set_title(title or "label-free selection (chosen: outlined)")
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def plot_inferred_minority(panels: dict[str, dict], path: str | Path) -> Path:
    """Examples of inferred minorities, one row of panels per rule: each image with its CAM over it, or each text's
    top tokens by attribution (bars).

    `panels` maps a rule's title to {"captions": [str] per example, "images": uint8 (N, 3, H, W) or None,
    "maps": (N, H, W) in [0, 1] or None, "tokens": [[(token, score), ...] per example] or None}. A rule with no
    example gets a row that says so.
    """
    plt = _pyplot()
    panels = panels or {"no rule ran": {"captions": []}}
    columns = max(1, max(len(p.get("captions") or []) for p in panels.values()))
    text = any(p.get("tokens") for p in panels.values())
    width, height = (2.6, 2.1) if text else (1.5, 1.9)
    fig = plt.figure(figsize=(max(6.0, width * columns), height * len(panels)), layout="constrained")
    for subfigure, (title, panel) in zip(np.atleast_1d(fig.subfigures(len(panels), 1)), panels.items()):
        subfigure.suptitle(title, fontsize=8, fontweight="bold")
        axes = np.atleast_1d(subfigure.subplots(1, columns))
        captions = panel.get("captions") or []
        images, maps, tokens = panel.get("images"), panel.get("maps"), panel.get("tokens")
        for column, ax in enumerate(axes):
            ax.set_xticks([])
            ax.set_yticks([])
            if column >= len(captions):
                ax.axis("off")
                if column == 0:
                    ax.text(0.0, 0.5, "(the set is empty)", fontsize=8)
                continue
            if images is not None:
                ax.imshow(images[column].permute(1, 2, 0).numpy())
                if maps is not None:
                    ax.imshow(maps[column].numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
            elif tokens is not None:
                pairs = list(tokens[column] or [])[::-1]
                ax.barh(np.arange(len(pairs)), [s for _, s in pairs], color="tab:red")
                ax.set_yticks(np.arange(len(pairs)), [t for t, _ in pairs], fontsize=7)
                ax.tick_params(axis="x", labelsize=6)
            ax.set_title(captions[column], fontsize=6)
    return _save(fig, path, tight=False)
