from __future__ import annotations

from dataclasses import dataclass, field

from ...core.config import RobustConfig
from ..last_layer.config import LastLayerArguments


@dataclass
class GradTuneConfig(LastLayerArguments, RobustConfig):
    r"""
    Configuration of [`GradTuneTrainer`] (Kenfack et al., "GradTune: Last-Layer Fine-Tuning for Group Robustness
    without Group Annotation").

    The ERM stage uses the usual training parameters (`num_train_epochs`, `learning_rate`, ...;
    `balanced_sampling="class"` is the paper's ERM baseline). The held-out set and the last-layer training are
    set by [`LastLayerArguments`] (`heldout_fraction=0.5`, `last_layer_epochs=500`, SGD lr 3e-3 cosine for
    images / AdamW lr 1e-5 linear for text, weight decay 1e-4, class-balanced sampling, `reset_last_layer`,
    `erm_checkpoint`, ...).

    Parameters that control the fine-tuning set:
        finetune_set_size (`int`, *optional*, defaults to `500`):
            M', the number of held-out examples the last layer is fine-tuned on (capped by the held-out size).
        top_k (`int` or `None`, *optional*):
            How many of them are the largest gradient norms; the other M' - k are drawn without replacement from
            the rest with probability proportional to their norm. Default: `round(0.8 * M')` (k = 400 of 500).
    """

    finetune_set_size: int = field(default=500, metadata={"help": "M': size of the fine-tuning set."})
    top_k: int | None = field(
        default=None, metadata={"help": "Largest-norm examples in it (default 0.8 M'); the rest drawn by norm."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.finetune_set_size < 1:
            raise ValueError(f"finetune_set_size={self.finetune_set_size}: expected 1 or more.")
        if self.top_k is not None and not 0 <= self.top_k <= self.finetune_set_size:
            raise ValueError(
                f"top_k={self.top_k}: expected a value between 0 and finetune_set_size={self.finetune_set_size}."
            )
