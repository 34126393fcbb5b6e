"""hf_robust: keep fine-tuned models from leaning on spurious correlations.

Methods as `transformers.Trainer` subclasses and model hooks, judged by worst-group accuracy. Names are
imported lazily so that `import hf_robust` (and the CLI's --help) stays fast.
"""

from importlib import import_module

__version__ = "0.1.0.dev0"

_EXPORTS = {
    "RobustConfig": "hf_robust.trainer",
    "RobustTrainer": "hf_robust.trainer",
    "HubPushError": "hf_robust.trainer",
    "Stage": "hf_robust.trainer",
    "MaskTuneConfig": "hf_robust.trainer",
    "MaskTuneTrainer": "hf_robust.trainer",
    "GradTuneConfig": "hf_robust.trainer",
    "GradTuneTrainer": "hf_robust.trainer",
    "DFRConfig": "hf_robust.trainer",
    "DFRTrainer": "hf_robust.trainer",
    "FairDropoutTrainingConfig": "hf_robust.trainer",
    "FairDropoutDFRConfig": "hf_robust.trainer",
    "FairDropoutTrainer": "hf_robust.trainer",
    "FairDropoutDFRTrainer": "hf_robust.trainer",
    "FairDropout": "hf_robust.layers",
    "FairDropoutConfig": "hf_robust.fair_dropout",
    "inject_fair_dropout": "hf_robust.fair_dropout",
    "remove_fair_dropout": "hf_robust.fair_dropout",
    "load_fair_dropout": "hf_robust.fair_dropout",
    "export_fair_dropout": "hf_robust.fair_dropout",
    "CounterfactualDistillConfig": "hf_robust.trainer",
    "CounterfactualDistillTrainer": "hf_robust.trainer",
    "CLIPZeroShotClassifier": "hf_robust.clip",
    "load_clip_zero_shot": "hf_robust.clip",
    "wise_ft": "hf_robust.weight_ensembles",
    "MaskStore": "hf_robust.masking",
    "SelectiveClassifier": "hf_robust.selective",
    "get_adapter": "hf_robust.adapters",
    "ModelAdapter": "hf_robust.adapters",
    "UnsupportedModelError": "hf_robust.adapters",
    "load_benchmark": "hf_robust.data",
    "as_group_dataset": "hf_robust.data",
    "DataValidationError": "hf_robust.data",
    "GroupDataCollator": "hf_robust.preprocessing",
    "ImagePreprocessing": "hf_robust.preprocessing",
    "load_model": "hf_robust.models",
    "load_metric": "hf_robust.resources",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_robust' has no attribute {name!r}")


def __dir__():
    return __all__
