from __future__ import annotations

from dataclasses import dataclass, field

from ...core.config import RobustConfig
from ..last_layer.config import LastLayerArguments


@dataclass
class DFRConfig(LastLayerArguments, RobustConfig):
    r"""
    Configuration of [`DFRTrainer`] (Kirichenko et al., "Last Layer Re-Training is Sufficient for Robustness to
    Spurious Correlations", ICLR 2023), and the base of FairDropout-DFR's config.

    The ERM stage uses the usual training parameters; the held-out set (`heldout_split`, `heldout_fraction`) and,
    for `dfr_head="sgd"`, the head training come from [`LastLayerArguments`].

    Parameters that control the retraining set:
        dfr_balance (`str`, *optional*, defaults to `"class"`):
            `"group"`: subsets of the held-out half with as many examples of every group as its smallest group
            (the paper's DFR; needs group labels on the held-out split). `"class"`: the same per class (no group
            labels anywhere).
        dfr_num_subsets (`int`, *optional*, defaults to `10`):
            Balanced subsets drawn; one head is fitted on each and the heads are averaged (the paper averages
            the weights of its retrainings).

    Parameters that control the head:
        dfr_head (`str`, *optional*, defaults to `"logistic_l1"`):
            `"logistic_l1"`: the paper's head, L1-regularised logistic regression (liblinear) on standardised
            features, retrained from scratch, the standardisation folded into the model's classifier.
            `"sgd"`: the SGD head of GradTune's last-layer stage (`last_layer_*` settings; `reset_last_layer`
            to start from zero).
        dfr_regularization (`list[float]`, *optional*, defaults to `[1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01]`):
            Inverse L1 strengths C tried (the paper's grid); the one with the best accuracy of the worst group
            (`dfr_balance="group"`) or class (`"class"`) on the model-selection half is kept.
    """

    dfr_balance: str = field(
        default="class", metadata={"help": "'group' (paper; needs group labels) or 'class' balanced subsets."}
    )
    dfr_num_subsets: int = field(default=10, metadata={"help": "Balanced subsets; their heads are averaged."})
    dfr_head: str = field(
        default="logistic_l1", metadata={"help": "'logistic_l1' (paper) or 'sgd' (GradTune's head training)."}
    )
    dfr_regularization: list[float] = field(
        default_factory=lambda: [1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01],
        metadata={"help": "Inverse L1 strengths C tried on the model-selection half."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.dfr_balance not in ("group", "class"):
            raise ValueError(f"dfr_balance={self.dfr_balance!r}: expected 'group' or 'class'.")
        if self.dfr_head not in ("logistic_l1", "sgd"):
            raise ValueError(f"dfr_head={self.dfr_head!r}: expected 'logistic_l1' or 'sgd'.")
        if self.dfr_num_subsets < 1:
            raise ValueError(f"dfr_num_subsets={self.dfr_num_subsets}: expected 1 or more.")
        if not self.dfr_regularization or any(c <= 0 for c in self.dfr_regularization):
            raise ValueError(f"dfr_regularization={self.dfr_regularization}: expected positive values.")
