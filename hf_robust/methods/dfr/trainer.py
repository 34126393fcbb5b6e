"""DFR, Deep Feature Reweighting (Kirichenko et al., ICLR 2023): retrain the last layer of an ERM model on a
balanced subset of held-out data — the group-aware baseline of GradTune, on the same machinery.

Stages: `erm` (or `erm_checkpoint`) -> `heldout` -> `scores` -> `select` -> `last_layer`
(`hf_robust.methods.last_layer.mixin`).
- select: `dfr_num_subsets` subsets of the held-out half, each with as many examples of every group as the
  smallest group has (`dfr_balance="group"`, the paper; uses the held-out split's group labels) or of every
  class (`dfr_balance="class"`, no group labels).
- last_layer: by default the paper's head: L1-regularised logistic regression (liblinear) on standardised
  cached features, one per subset, coefficients averaged, C chosen from the paper's grid by worst-group
  (worst-class without groups) accuracy on the model-selection half, the standardisation folded into the
  model's classifier. `dfr_head="sgd"` uses GradTune's SGD head training instead.

Written from the paper's description (the authors' code, github.com/PolinaKirichenko/deep_feature_reweighting,
fixes the same recipe: standardisation, liblinear L1, the C grid, averaged retrainings).
"""

from __future__ import annotations

from ...data.core import DataValidationError
from ...core.trainer import RobustTrainer, Stage
from .config import DFRConfig
from ..last_layer.mixin import LastLayerMixin


class DFRTrainer(LastLayerMixin, RobustTrainer):
    """ERM, then DFR: see the module docstring. Args as [`RobustTrainer`], with a [`DFRConfig`], plus
    `heldout_dataset` (default: the `heldout_split` entry of `eval_dataset`, "validation")."""

    _tag_names = ["hf_robust", "dfr"]
    _config_class = DFRConfig
    _name = "DFR"
    _paper = {
        "title": "Last Layer Re-Training is Sufficient for Robustness to Spurious Correlations",
        "url": "https://arxiv.org/abs/2204.02937",
        "citation": (
            "@inproceedings{kirichenko2023last,\n"
            "  title={Last Layer Re-Training is Sufficient for Robustness to Spurious Correlations},\n"
            "  author={Kirichenko, Polina and Izmailov, Pavel and Wilson, Andrew Gordon},\n"
            "  booktitle={The Eleventh International Conference on Learning Representations},\n  year={2023}\n}"
        ),
    }
    _summary = (
        "DFR (Deep Feature Reweighting) trains ERM, then retrains only the last layer, on the frozen features of "
        "a group-balanced (or class-balanced) subset of held-out data, with L1-regularised logistic regression: "
        "the core features the backbone already learned get the weight the shortcut had."
    )

    def __init__(self, model, args: DFRConfig | None = None, *pargs, heldout_dataset=None, **kwargs):
        super().__init__(model, args, *pargs, **kwargs)
        if self.train_dataset is None and self.args.erm_checkpoint is None:
            raise DataValidationError("DFRTrainer needs a train_dataset for its ERM stage (or an erm_checkpoint).")
        self.setup_last_layer(heldout_dataset)  # also refuses dfr_balance='group' without group labels

    def stages(self) -> list[Stage]:
        return [self.erm_baseline_stage(), *self.dfr_stages()]
