"""Files that ship with the library: the `evaluate` metric modules (repo `metrics/`) and the model card
templates (repo `model_cards/`). Both are installed as package data, so nothing needs the repo checkout."""

from importlib import resources
from pathlib import Path


def metric_path(name: str) -> str:
    """Absolute path of the evaluate module `name`, for `evaluate.load(metric_path(name))`."""
    path = Path(str(resources.files("hf_robust.resources.metrics") / name))
    if not (path / f"{name}.py").is_file():
        raise FileNotFoundError(f"hf_robust ships no metric {name!r} (looked in {path}).")
    return str(path)


def model_card_template(name: str = "robust_model_card.md") -> str:
    """Absolute path of a model card template."""
    return str(resources.files("hf_robust.resources.model_cards") / name)


def load_metric(name: str = "worst_group_accuracy", **kwargs):
    """`evaluate.load` of a metric shipped with hf_robust, by absolute path: offline, no Hub lookup."""
    import evaluate

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(metric_path(name), **kwargs)
