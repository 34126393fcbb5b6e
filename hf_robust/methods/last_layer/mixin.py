"""Deprecated: the names of the former `LastLayerMixin` module, now at their own places.

The mixin became a component (`retraining.LastLayerRetraining`, with a `LastLayerRule` per method); this module
only forwards the old names, with a DeprecationWarning naming the new module:

- `hf_robust.methods.last_layer.scores`: `split_heldout`, `last_layer_gradient_norms`, `worst_class_accuracy`,
  `LastLayerData`;
- `hf_robust.methods.last_layer.linear_head`: `train_linear_head`, `HeadTrainingResult`, `write_head`;
- `hf_robust.methods.last_layer.retraining`: `LastLayerMixin` (an alias of `LastLayerRetraining`);
- `hf_robust.methods.gradtune.rule`: `select_by_gradient_norm`;
- `hf_robust.methods.dfr.rule`: `balanced_subsets`, `fit_logistic_l1`, `worst_group_accuracy`.
"""

from __future__ import annotations

import warnings
from importlib import import_module

_MOVED = {
    **dict.fromkeys(("split_heldout", "last_layer_gradient_norms", "worst_class_accuracy", "LastLayerData"),
                    "hf_robust.methods.last_layer.scores"),
    **dict.fromkeys(("train_linear_head", "HeadTrainingResult", "write_head"),
                    "hf_robust.methods.last_layer.linear_head"),
    "LastLayerMixin": "hf_robust.methods.last_layer.retraining",
    "select_by_gradient_norm": "hf_robust.methods.gradtune.rule",
    **dict.fromkeys(("balanced_subsets", "fit_logistic_l1", "worst_group_accuracy"), "hf_robust.methods.dfr.rule"),
}

__all__ = sorted(_MOVED)


def __getattr__(name):
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"{__name__}.{name} moved to {_MOVED[name]}; the old path will be removed.", DeprecationWarning,
                  stacklevel=2)
    return getattr(import_module(_MOVED[name]), name)
