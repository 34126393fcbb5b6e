"""The module paths of the layout before the one-package-per-method redesign, kept importable.

`import hf_robust.adapters` (or `from hf_robust.trainer.masktune_trainer import MaskTuneTrainer`, or unpickling a
`training_args.bin` saved before) gets the module at its new place: the same module object, so patches and
`isinstance` checks see one class. A DeprecationWarning names the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

MOVED = {
    "hf_robust.trainer": "hf_robust.methods",
    "hf_robust.trainer.base_config": "hf_robust.core.config",
    "hf_robust.trainer.base_trainer": "hf_robust.core.trainer",
    "hf_robust.trainer.health": "hf_robust.core.health",
    "hf_robust.files": "hf_robust.core.files",
    "hf_robust.run_folder": "hf_robust.core.run_folder",
    "hf_robust.sync_norm": "hf_robust.core.sync_norm",
    "hf_robust.preprocessing": "hf_robust.data.preprocessing",
    "hf_robust.adapters": "hf_robust.models.adapter",
    "hf_robust.mnist_cnn": "hf_robust.models.mnist_cnn",
    "hf_robust.clip": "hf_robust.models.clip",
    "hf_robust.digits_clip": "hf_robust.models.digits_clip",
    "hf_robust.cam": "hf_robust.explain.cam",
    "hf_robust.rollout": "hf_robust.explain.rollout",
    "hf_robust.masking": "hf_robust.methods.masktune.masks",
    "hf_robust.selective": "hf_robust.methods.masktune.selective",
    "hf_robust.trainer.masktune_config": "hf_robust.methods.masktune.config",
    "hf_robust.trainer.masktune_trainer": "hf_robust.methods.masktune.trainer",
    "hf_robust.trainer.last_layer_config": "hf_robust.methods.last_layer.config",
    "hf_robust.trainer.last_layer": "hf_robust.methods.last_layer.mixin",
    "hf_robust.trainer.gradtune_config": "hf_robust.methods.gradtune.config",
    "hf_robust.trainer.gradtune_trainer": "hf_robust.methods.gradtune.trainer",
    "hf_robust.trainer.dfr_config": "hf_robust.methods.dfr.config",
    "hf_robust.trainer.dfr_trainer": "hf_robust.methods.dfr.trainer",
    "hf_robust.trainer.fairdropout_config": "hf_robust.methods.fair_dropout.config",
    "hf_robust.trainer.fairdropout_trainer": "hf_robust.methods.fair_dropout.trainer",
    "hf_robust.fair_dropout": "hf_robust.methods.fair_dropout.inject",
    "hf_robust.layers": "hf_robust.methods.fair_dropout",
    "hf_robust.layers.fair_dropout": "hf_robust.methods.fair_dropout.layer",
    "hf_robust.trainer.counterfactual_config": "hf_robust.methods.counterfactual.config",
    "hf_robust.trainer.counterfactual_trainer": "hf_robust.methods.counterfactual.trainer",
    "hf_robust.counterfactual": "hf_robust.methods.counterfactual.counterfactuals",
    "hf_robust.weight_ensembles": "hf_robust.methods.counterfactual.wise_ft",
    "hf_robust.modelcard": "hf_robust.reporting.modelcard",
    "hf_robust.plots": "hf_robust.reporting.plots",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        parent = any(name.startswith(fullname + ".") for name in MOVED)  # hf_robust.trainer, hf_robust.layers
        return importlib.util.spec_from_loader(fullname, self, is_package=parent)

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {MOVED[spec.name]}; the old path will be removed.",
                      DeprecationWarning, stacklevel=3)
        target = importlib.import_module(MOVED[spec.name])
        if spec.submodule_search_locations is None:
            return target
        # an old package (hf_robust.trainer, hf_robust.layers): a module of its own name that reads the new
        # package's names, so that `from hf_robust.layers import fair_dropout` finds the old submodule path
        proxy = types.ModuleType(spec.name, target.__doc__)
        proxy.__getattr__ = lambda name: getattr(target, name)
        proxy.__all__ = getattr(target, "__all__", [])
        return proxy

    def exec_module(self, module):
        pass


def install() -> None:
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Alias())
