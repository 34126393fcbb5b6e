from __future__ import annotations

from dataclasses import dataclass, field

from ...core.config import RobustConfig


@dataclass
class GroupDROConfig(RobustConfig):
    r"""
    Configuration of [`GroupDROTrainer`] (Sagawa et al., "Distributionally Robust Neural Networks for Group
    Shifts", ICLR 2020, arXiv:1911.08731). Training uses the usual parameters (`num_train_epochs`,
    `learning_rate`, `weight_decay` — the paper's point is that group DRO needs strong regularisation: a large L2
    penalty or early stopping — ...). It needs the group of every training example.

    Parameters of the group weights:
        group_dro_eta (`float`, *optional*, defaults to `0.01`):
            Step size of the exponentiated-gradient update of the group weights q (the paper's eta_q = 0.01, used
            for all its datasets).
        group_dro_adjustment (`float`, *optional*, defaults to `0.0`):
            The generalisation adjustment C: `C / sqrt(n_g)` (n_g: the group's training size) is added to each group's
            loss, favouring the small groups (the paper's section 5; C chosen in 0..5 there). 0: plain group DRO.
    """

    group_dro_eta: float = field(default=0.01, metadata={"help": "Step size eta of the group weights' update."})
    group_dro_adjustment: float = field(
        default=0.0, metadata={"help": "Group adjustment C: C / sqrt(n_g) added to each group's loss (0: none)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.group_dro_eta >= 0:
            raise ValueError(f"group_dro_eta={self.group_dro_eta}: expected a step size >= 0.")
        if not self.group_dro_adjustment >= 0:
            raise ValueError(f"group_dro_adjustment={self.group_dro_adjustment}: expected C >= 0.")
