"""The methods, one package each (config + trainer, TRL style, plus the method's own pieces), listed once in
`registry.METHODS`.

Names are imported lazily: the configs need only transformers, so a CLI can build its parser without loading the
trainers. `hf_robust.trainer` (the layout before this package) is an alias of this module.
"""

from .._lazy import lazy_exports

from .registry import trainer_exports

_EXPORTS = {
    "RobustConfig": "hf_robust.core.config",
    "RobustTrainer": "hf_robust.core.trainer",
    "HubPushError": "hf_robust.core.report",
    "RunSetupError": "hf_robust.core.checkpoints",
    "Stage": "hf_robust.core.stages",
    "LastLayerArguments": "hf_robust.methods.last_layer.config",
    "LastLayerRetraining": "hf_robust.methods.last_layer.retraining",
    "LastLayerRule": "hf_robust.methods.last_layer.retraining",
    "LastLayerMixin": "hf_robust.methods.last_layer.retraining",  # the former name of LastLayerRetraining
    "LastLayerTrainer": "hf_robust.methods.last_layer.trainer",
    **trainer_exports(),
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, globals(), _EXPORTS)
