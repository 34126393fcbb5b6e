"""GradTune (Kenfack et al.): fine-tune the last layer of an ERM model on the held-out examples it finds hardest,
measured by the norm of their last-layer gradient — no group labels needed.

Stages: `erm` (or `erm_checkpoint`) -> `heldout` -> `scores` -> `select` -> `last_layer` (the shared machinery of
`hf_robust.methods.last_layer.mixin`, see there for each stage).
- scores: per held-out example, `||softmax(z) - onehot(y)|| * sqrt(||h||^2 + 1)`, the exact L2 norm of the
  cross-entropy gradient w.r.t. the last layer (W, b), from one inference pass that also caches `h`.
- select: the M' = 500 examples of the fine-tuning set: the top k = 400 norms, plus 100 drawn without
  replacement from the rest with probability proportional to the norm (paper section 4.1, appendix B).
- last_layer: the ERM head fine-tuned (not reset, unless `reset_last_layer`) for 500 epochs on the cached
  features of that set with class-balanced sampling (SGD lr 3e-3 cosine / AdamW lr 1e-5 linear, wd 1e-4), then
  written into the model.

The paper has no public code; SPEC section 4.2 fixes the details it leaves open.
"""

from __future__ import annotations

from ...data.core import DataValidationError
from ...core.trainer import RobustTrainer, Stage
from .config import GradTuneConfig
from ..last_layer.mixin import LastLayerMixin


class GradTuneTrainer(LastLayerMixin, RobustTrainer):
    """ERM, then GradTune: see the module docstring. Args as [`RobustTrainer`], with a [`GradTuneConfig`], plus
    `heldout_dataset` (default: the `heldout_split` entry of `eval_dataset`, "validation")."""

    _tag_names = ["hf_robust", "gradtune"]
    _config_class = GradTuneConfig
    _name = "GradTune"
    _paper = {
        "title": "GradTune: Last-Layer Fine-Tuning for Group Robustness without Group Annotation",
        "url": "https://github.com/patrikken/GradTune",
        "citation": (
            "@inproceedings{kenfack2025gradtune,\n"
            "  title={GradTune: Last-Layer Fine-Tuning for Group Robustness without Group Annotation},\n"
            "  author={Kenfack, Patrik Joslin and A{\\\"i}vodji, Ulrich and Kahou, Samira Ebrahimi},\n"
            "  year={2025}\n}"
        ),
    }
    _summary = (
        "GradTune trains ERM, scores every example of a held-out half of the validation set by the norm of its "
        "last-layer gradient (high for the examples the shortcut gets wrong), and fine-tunes only the last layer "
        "on the highest-norm examples plus a norm-proportional sample of the rest, with class-balanced sampling. "
        "It uses no group labels."
    )

    def __init__(self, model, args: GradTuneConfig | None = None, *pargs, heldout_dataset=None, **kwargs):
        super().__init__(model, args, *pargs, **kwargs)
        if self.train_dataset is None and self.args.erm_checkpoint is None:
            raise DataValidationError("GradTuneTrainer needs a train_dataset for its ERM stage (or an erm_checkpoint).")
        self.setup_last_layer(heldout_dataset)

    def stages(self) -> list[Stage]:
        return [self.erm_baseline_stage(), *self.gradtune_stages()]
