"""GradTune (Kenfack et al., "GradTune: Last-Layer Fine-Tuning for Group Robustness without Group Annotation"):
fine-tune the last layer of an ERM model on the held-out examples it finds hardest, measured by the norm of their
last-layer gradient — no group labels needed.

Stages: `erm` (or `erm_checkpoint`) -> `heldout` -> `scores` -> `select` -> `last_layer` (the shared machinery of
`hf_robust.methods.last_layer`, see `retraining` there for each stage), with GradTune's rule (`rule.GradTuneRule`):
- scores: per held-out example, `||softmax(z) - onehot(y)|| * sqrt(||h||^2 + 1)`, the exact L2 norm of the
  cross-entropy gradient w.r.t. the last layer (W, b), from one inference pass that also caches `h`.
- select: the M' = 500 examples of the fine-tuning set: the top k = 400 norms, plus 100 drawn without
  replacement from the rest with probability proportional to the norm (the paper's section 4.1, appendix B).
- last_layer: the ERM head fine-tuned (not reset, unless `reset_last_layer`) for 500 epochs on the cached
  features of that set with class-balanced sampling (SGD lr 3e-3 cosine / AdamW lr 1e-5 linear, wd 1e-4), then
  written into the model.

The paper has no public code; the details it leaves open are fixed here and documented where they are made
(`rule.select_by_gradient_norm`, `hf_robust.methods.last_layer.linear_head.train_linear_head`).
"""

from __future__ import annotations

from ..last_layer.trainer import LastLayerTrainer
from .config import GradTuneConfig
from .rule import GradTuneRule


# the paper the model card cites
PAPER = {
    "title": "GradTune: Last-Layer Fine-Tuning for Group Robustness without Group Annotation",
    "url": "https://github.com/patrikken/GradTune",
    "citation": (
        "@inproceedings{kenfack2025gradtune,\n"
        "  title={GradTune: Last-Layer Fine-Tuning for Group Robustness without Group Annotation},\n"
        "  author={Kenfack, Patrik Joslin and A{\\\"i}vodji, Ulrich and Kahou, Samira Ebrahimi},\n"
        "  year={2025}\n}"
    ),
}


class GradTuneTrainer(LastLayerTrainer):
    """ERM, then GradTune: see the module docstring. Args as [`RobustTrainer`], with a [`GradTuneConfig`], plus
    `heldout_dataset` (default: the `heldout_split` entry of `eval_dataset`, "validation")."""

    _tag_names = ["hf_robust", "gradtune"]
    _config_class = GradTuneConfig
    _name = "GradTune"
    _paper = PAPER
    _summary = (
        "GradTune trains ERM, scores every example of a held-out half of the validation set by the norm of its "
        "last-layer gradient (high for the examples the shortcut gets wrong), and fine-tunes only the last layer "
        "on the highest-norm examples plus a norm-proportional sample of the rest, with class-balanced sampling. "
        "It uses no group labels."
    )

    def last_layer_rule(self) -> GradTuneRule:
        return GradTuneRule.from_args(self.args)
