"""hf_robust: keep fine-tuned models from leaning on spurious correlations.

Methods as `transformers.Trainer` subclasses and model hooks, judged by worst-group accuracy. The layout
(ARCHITECTURE.md): `core` (the stage engine, no method), `models`, `explain`, `data`, `reporting`, and
`methods/<name>/` one package per method, listed once in `hf_robust.methods.registry`. Names are imported lazily
so that `import hf_robust` (and the CLI's --help) stays fast.
"""


from . import _compat
from ._lazy import lazy_exports
from .methods.registry import trainer_exports

__version__ = "0.1.0.dev0"

_compat.install()  # the module paths before the redesign (hf_robust.trainer, hf_robust.adapters, ...) still import

_EXPORTS = {
    "RobustConfig": "hf_robust.core.config",
    "RobustTrainer": "hf_robust.core.trainer",
    "HubPushError": "hf_robust.core.report",
    "Stage": "hf_robust.core.stages",
    **trainer_exports(),
    "get_adapter": "hf_robust.models.adapter",
    "ModelAdapter": "hf_robust.models.adapter",
    "UnsupportedModelError": "hf_robust.models.adapter",
    "load_benchmark": "hf_robust.data",
    "as_group_dataset": "hf_robust.data",
    "DataValidationError": "hf_robust.data",
    "GroupDataCollator": "hf_robust.data.preprocessing",
    "ImagePreprocessing": "hf_robust.data.preprocessing",
    "load_model": "hf_robust.models.presets",
    "load_metric": "hf_robust.resources",
    "infer_groups": "hf_robust.inference",
    "InferredGroups": "hf_robust.inference",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


__getattr__ = lazy_exports(__name__, globals(), _EXPORTS)


def __dir__():
    return __all__
