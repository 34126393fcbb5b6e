"""`LastLayerArguments`: the configuration of the last-layer stages shared by GradTune, DFR and FairDropout-DFR.

A dataclass mixin, not a config of its own: a method's config lists it before `RobustConfig`
(`class GradTuneConfig(LastLayerArguments, RobustConfig)`), so its fields reach the command line through
`HfArgumentParser` like every other field. Kept apart from the stages (`retraining`) so that building a parser
imports no more than transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...core.config import ErmCheckpointArguments

LAST_LAYER_OPTIMIZERS = ("sgd", "adamw")
LAST_LAYER_SCHEDULERS = ("cosine", "linear", "constant")


@dataclass
class LastLayerArguments(ErmCheckpointArguments):
    r"""
    Parameters of the last-layer stages (`heldout` -> `scores` -> `select` -> `last_layer`, see
    `hf_robust.methods.last_layer.retraining`).

    Parameters that control the ERM stage:
        erm_checkpoint (`str` or `None`, *optional*):
            Folder of a trained model (`save_pretrained` layout) to start from instead of training ERM.

    Parameters that control the held-out set:
        heldout_split (`str`, *optional*, defaults to `"validation"`):
            Evaluation split (a key of `eval_dataset`) the held-out set is drawn from, unless the trainer gets a
            `heldout_dataset=`.
        heldout_fraction (`float`, *optional*, defaults to `0.5`):
            Seeded fraction of that split used to build the fine-tuning set; the rest is the model-selection
            half, judged by worst-CLASS accuracy (no group labels).

    Parameters that control the last-layer training (on cached penultimate features, backbone frozen):
        last_layer_epochs (`int`, *optional*, defaults to `500`):
            Epochs over the fine-tuning set (GradTune, appendix B).
        last_layer_batch_size (`int` or `None`, *optional*):
            Default: 32 for images, 16 for text (GradTune, Table 3).
        last_layer_optimizer (`str` or `None`, *optional*):
            `"sgd"` (momentum `last_layer_momentum`) or `"adamw"`. Default: SGD for images, AdamW for text.
        last_layer_learning_rate (`float` or `None`, *optional*):
            Default: 3e-3 for images, 1e-5 for text.
        last_layer_lr_scheduler (`str` or `None`, *optional*):
            `"cosine"`, `"linear"` (both decay to 0 over all steps) or `"constant"`. Default: cosine for images,
            linear for text.
        last_layer_weight_decay (`float`, *optional*, defaults to `1e-4`):
            On the weight matrix (not the bias).
        last_layer_momentum (`float`, *optional*, defaults to `0.9`):
            SGD momentum.
        last_layer_balance (`str`, *optional*, defaults to `"class"`):
            `"class"` draws each epoch's examples with equal total weight per class (GradTune's class-balanced
            sampler); `"none"` shuffles.
        reset_last_layer (`bool`, *optional*, defaults to `False`):
            Start from a zero head instead of the ERM head (GradTune's "retraining" ablation, Table 5).
        last_layer_model_selection (`str`, *optional*, defaults to `"last"`):
            `"last"` keeps the head of the last epoch (the paper); `"worst_class"` keeps, among the heads
            evaluated every `last_layer_eval_epochs`, the one with the best worst-class accuracy on the
            model-selection half.
        last_layer_eval_epochs (`int`, *optional*, defaults to `25`):
            How often the head is evaluated on the model-selection half (recorded in the stage's history).
    """

    heldout_split: str = field(
        default="validation", metadata={"help": "Eval split the held-out set is drawn from."}
    )
    heldout_fraction: float = field(
        default=0.5, metadata={"help": "Seeded fraction of that split held out; the rest selects models."}
    )
    last_layer_epochs: int = field(default=500, metadata={"help": "Epochs of last-layer training."})
    last_layer_batch_size: int | None = field(
        default=None, metadata={"help": "Batch size of last-layer training (default 32 images / 16 text)."}
    )
    last_layer_optimizer: str | None = field(
        default=None, metadata={"help": "sgd or adamw (default sgd for images, adamw for text)."}
    )
    last_layer_learning_rate: float | None = field(
        default=None, metadata={"help": "Last-layer learning rate (default 3e-3 images / 1e-5 text)."}
    )
    last_layer_lr_scheduler: str | None = field(
        default=None, metadata={"help": "cosine, linear or constant (default cosine images / linear text)."}
    )
    last_layer_weight_decay: float = field(default=1e-4, metadata={"help": "Weight decay of the head's weight."})
    last_layer_momentum: float = field(default=0.9, metadata={"help": "SGD momentum of last-layer training."})
    last_layer_balance: str = field(
        default="class", metadata={"help": "'class': class-balanced sampling of the fine-tuning set; 'none'."}
    )
    reset_last_layer: bool = field(
        default=False, metadata={"help": "Retrain the head from zero instead of fine-tuning the ERM head."}
    )
    last_layer_model_selection: str = field(
        default="last",
        metadata={"help": "'last' epoch, or 'worst_class': best worst-class accuracy on the selection half."},
    )
    last_layer_eval_epochs: int = field(
        default=25, metadata={"help": "Evaluate the head on the model-selection half every this many epochs."}
    )

    def __post_init__(self):
        if hasattr(super(), "__post_init__"):  # the TrainingArguments of the config this is mixed into
            super().__post_init__()
        if not 0 < self.heldout_fraction <= 1:
            raise ValueError(f"heldout_fraction={self.heldout_fraction}: expected a fraction in (0, 1].")
        if self.last_layer_epochs < 1:
            raise ValueError(f"last_layer_epochs={self.last_layer_epochs}: expected 1 or more.")
        if self.last_layer_batch_size is not None and self.last_layer_batch_size < 1:
            raise ValueError(f"last_layer_batch_size={self.last_layer_batch_size}: expected 1 or more.")
        if self.last_layer_optimizer is not None and self.last_layer_optimizer not in LAST_LAYER_OPTIMIZERS:
            raise ValueError(
                f"last_layer_optimizer={self.last_layer_optimizer!r}: expected one of {LAST_LAYER_OPTIMIZERS}."
            )
        if self.last_layer_lr_scheduler is not None and self.last_layer_lr_scheduler not in LAST_LAYER_SCHEDULERS:
            raise ValueError(
                f"last_layer_lr_scheduler={self.last_layer_lr_scheduler!r}: expected one of {LAST_LAYER_SCHEDULERS}."
            )
        if self.last_layer_learning_rate is not None and self.last_layer_learning_rate <= 0:
            raise ValueError(f"last_layer_learning_rate={self.last_layer_learning_rate}: expected a positive value.")
        if self.last_layer_weight_decay < 0:
            raise ValueError(f"last_layer_weight_decay={self.last_layer_weight_decay}: expected a value >= 0.")
        if self.last_layer_balance not in ("class", "none"):
            raise ValueError(f"last_layer_balance={self.last_layer_balance!r}: expected 'class' or 'none'.")
        if self.last_layer_model_selection not in ("last", "worst_class"):
            raise ValueError(
                f"last_layer_model_selection={self.last_layer_model_selection!r}: expected 'last' or 'worst_class'."
            )
        if self.last_layer_model_selection == "worst_class" and self.heldout_fraction == 1:
            raise ValueError(
                "last_layer_model_selection='worst_class' needs a model-selection half, but heldout_fraction=1 "
                "holds out the whole split: use heldout_fraction < 1."
            )
        if self.last_layer_eval_epochs < 1:
            raise ValueError(f"last_layer_eval_epochs={self.last_layer_eval_epochs}: expected 1 or more.")
