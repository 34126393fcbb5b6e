"""Trainers: one config + trainer pair per method (TRL style), all built on `RobustTrainer`.

Imported lazily: the configs need only transformers, so a CLI can build its parser without loading the rest.
"""

from importlib import import_module

_EXPORTS = {
    "RobustConfig": ".base_config",
    "RobustTrainer": ".base_trainer",
    "HubPushError": ".base_trainer",
    "RunSetupError": ".base_trainer",
    "Stage": ".base_trainer",
    "MaskTuneConfig": ".masktune_config",
    "MaskTuneTrainer": ".masktune_trainer",
    "GradTuneConfig": ".gradtune_config",
    "GradTuneTrainer": ".gradtune_trainer",
    "DFRConfig": ".dfr_config",
    "DFRTrainer": ".dfr_trainer",
    "LastLayerArguments": ".last_layer_config",
    "LastLayerMixin": ".last_layer",
    "FairDropoutTrainingConfig": ".fairdropout_config",
    "FairDropoutDFRConfig": ".fairdropout_config",
    "FairDropoutTrainer": ".fairdropout_trainer",
    "FairDropoutDFRTrainer": ".fairdropout_trainer",
    "CounterfactualDistillConfig": ".counterfactual_config",
    "CounterfactualDistillTrainer": ".counterfactual_trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
