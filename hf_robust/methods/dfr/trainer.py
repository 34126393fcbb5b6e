"""DFR, Deep Feature Reweighting (Kirichenko et al., "Last Layer Re-Training is Sufficient for Robustness to
Spurious Correlations", ICLR 2023, arXiv:2204.02937): retrain the last layer of an ERM model on a balanced subset
of held-out data — the group-aware baseline of GradTune, on the same machinery.

Stages: `erm` (or `erm_checkpoint`) -> `heldout` -> `scores` -> `select` -> `last_layer`
(`hf_robust.methods.last_layer`), with DFR's rule (`rule.DFRRule`):
- select: `dfr_num_subsets` subsets of the held-out half, each with as many examples of every group as the
  smallest group has (`dfr_balance="group"`, the paper; uses the held-out split's group labels) or of every
  class (`dfr_balance="class"`, no group labels).
- last_layer: by default the paper's head: L1-regularised logistic regression (liblinear) on standardised
  cached features, one per subset, coefficients averaged, C chosen from the paper's grid by worst-group
  (worst-class without groups) accuracy on the model-selection half, the standardisation folded into the
  model's classifier. `dfr_head="sgd"` uses the shared SGD head training (GradTune's) instead.
"""

from __future__ import annotations

from ..last_layer.trainer import LastLayerTrainer
from .config import DFRConfig
from .rule import DFRRule


# the paper the model card cites
PAPER = {
    "title": "Last Layer Re-Training is Sufficient for Robustness to Spurious Correlations",
    "url": "https://arxiv.org/abs/2204.02937",
    "citation": (
        "@inproceedings{kirichenko2023last,\n"
        "  title={Last Layer Re-Training is Sufficient for Robustness to Spurious Correlations},\n"
        "  author={Kirichenko, Polina and Izmailov, Pavel and Wilson, Andrew Gordon},\n"
        "  booktitle={The Eleventh International Conference on Learning Representations},\n  year={2023}\n}"
    ),
}


class DFRTrainer(LastLayerTrainer):
    """ERM, then DFR: see the module docstring. Args as [`RobustTrainer`], with a [`DFRConfig`], plus
    `heldout_dataset` (default: the `heldout_split` entry of `eval_dataset`, "validation"). Refuses
    `dfr_balance="group"` on a held-out split with unknown groups before any training."""

    _tag_names = ["hf_robust", "dfr"]
    _config_class = DFRConfig
    _name = "DFR"
    _paper = PAPER
    _summary = (
        "DFR (Deep Feature Reweighting) trains ERM, then retrains only the last layer, on the frozen features of "
        "a group-balanced (or class-balanced) subset of held-out data, with L1-regularised logistic regression: "
        "the core features the backbone already learned get the weight the shortcut had."
    )

    def last_layer_rule(self) -> DFRRule:
        return DFRRule.from_args(self.args)
