from __future__ import annotations

from dataclasses import dataclass, field

from ...core.config import RobustConfig


@dataclass
class ReweightConfig(RobustConfig):
    r"""
    Configuration of [`ReweightTrainer`]: ERM on a balanced objective. Training uses the usual parameters.

    Parameters of the balancing:
        balance_by (`str`, *optional*, defaults to `"group"`):
            `"group"`: every group weighs the same (needs the group of every training example, refused before
            training otherwise); `"class"`: every class weighs the same (no group labels).
        balance_mode (`str`, *optional*, defaults to `"reweight"`):
            `"reweight"`: each example's loss is weighted by `N / (K * n_k)` (n_k: the size of its group or class,
            K: the number of those present, N: the training size; the weights average 1 over the train split);
            `"resample"`: examples are drawn with replacement with probability proportional to `1 / n_k`, seeded
            per epoch (`hf_robust.core.sampling`: the same draw on every process and after a resume), `N` per epoch.
    """

    balance_by: str = field(default="group", metadata={"help": "'group' (uses group labels) or 'class'."})
    balance_mode: str = field(default="reweight", metadata={"help": "'reweight' the loss or 'resample' the data."})

    _MODES = ("reweight", "resample")

    def __post_init__(self):
        super().__post_init__()
        if self.balance_by not in ("group", "class"):
            raise ValueError(f"balance_by={self.balance_by!r}: expected 'group' or 'class'.")
        if self.balance_mode not in self._MODES:
            raise ValueError(f"balance_mode={self.balance_mode!r}: expected one of {list(self._MODES)}.")
        if self.balanced_sampling != "none":
            raise ValueError(
                f"balanced_sampling={self.balanced_sampling!r} would balance a second time: leave it 'none' and set "
                "balance_by / balance_mode (balance_mode='resample' is the same sampler)."
            )


@dataclass
class SUBGConfig(RobustConfig):
    r"""
    Configuration of [`SUBGTrainer`] (Idrissi et al., "Simple data balancing achieves competitive
    worst-group-accuracy", CLeaR 2022, arXiv:2110.14503). Training uses the usual parameters, on the subsample.

    Parameters of the subsampling:
        balance_by (`str`, *optional*, defaults to `"group"`):
            `"group"`: SUBG, every group subsampled to the size of the smallest group (needs the group of every
            training example, refused before training otherwise); `"class"`: SUBY, every class to the smallest
            class (no group labels).
        subg_epochs (`float` or `None`, *optional*):
            Epochs over the subsample. Default: as many optimizer steps as `num_train_epochs` over the whole train
            split would take (or `max_steps` when set): the subsample can be a hundredth of the data, and the
            recipe's epochs over it would be a handful of steps (the paper tunes the epochs per dataset; the same
            step budget as ERM is the choice that needs no tuning).
    """

    balance_by: str = field(default="group", metadata={"help": "'group' (SUBG, uses group labels) or 'class' (SUBY)."})
    subg_epochs: float | None = field(
        default=None, metadata={"help": "Epochs over the subsample (default: ERM's number of optimizer steps)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.balance_by not in ("group", "class"):
            raise ValueError(f"balance_by={self.balance_by!r}: expected 'group' or 'class'.")
        if self.subg_epochs is not None and self.subg_epochs <= 0:
            raise ValueError(f"subg_epochs={self.subg_epochs}: expected a positive number of epochs (or unset).")
