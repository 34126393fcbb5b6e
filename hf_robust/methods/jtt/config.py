from __future__ import annotations

from dataclasses import dataclass, field

from ...core.config import ErmCheckpointArguments, RobustConfig


@dataclass
class JTTConfig(ErmCheckpointArguments, RobustConfig):
    r"""
    Configuration of [`JTTTrainer`] (Liu et al., "Just Train Twice: Improving Group Robustness without Training
    Group Information", ICML 2021, arXiv:2107.09044). Both trainings use the usual parameters (`learning_rate`,
    `weight_decay`, ...); no group labels are used in training.

    Parameters of the identification model (the `erm` stage):
        jtt_identification_epochs (`float` or `None`, *optional*, defaults to `1`):
            T, the epochs of the identification ERM model; `None`: `num_train_epochs`. The identification model must
            stop before it memorises the minority examples (the paper tunes T: 1 epoch on CelebA, 2 on MultiNLI and
            CivilComments, 60 of 300 on Waterbirds). 1 epoch, the paper's shortest: on `biased_digits` the 5-epoch
            ERM model misclassifies 3 of the 14,368 training examples, the 1-epoch one exactly its 144 minority
            examples.
        erm_checkpoint (`str` or `None`, *optional*):
            A trained model folder used as the identification model instead of training one.

    Parameters of the retraining (the `retrain` stage, from the same initial weights as the `erm` stage):
        jtt_upweight (`int`, *optional*, defaults to `20`):
            lambda: every example of the error set appears this many times in the retraining set (upsampling, as
            the paper; its values: 100 Waterbirds, 50 CelebA, 6 MultiNLI and CivilComments). 20 here: on the
            image benchmarks it brings an error set of a few percent of train close to half the retraining set.
        jtt_retrain_epochs (`float` or `None`, *optional*):
            Epochs of the retraining, over the upsampled set. Default: `num_train_epochs`.
        jtt_upweight_grid (`list[int]` or `None`, *optional*):
            lambda values to choose among: one retraining each (from the same initial weights), the one with the
            best validation worst-CLASS accuracy kept (labels only: `RobustTrainer.run_candidates`; the paper
            chooses on worst-group accuracy, which needs validation group labels). Unset: `jtt_upweight` alone.
    """

    jtt_identification_epochs: float | None = field(
        default=1.0, metadata={"help": "T: epochs of the identification ERM model (None: num_train_epochs)."}
    )
    jtt_upweight: int = field(
        default=20, metadata={"help": "lambda: each error-set example appears this many times when retraining."}
    )
    jtt_retrain_epochs: float | None = field(
        default=None, metadata={"help": "Epochs of the retraining over the upsampled set (default: num_train_epochs)."}
    )
    jtt_upweight_grid: list[int] | None = field(
        default=None, metadata={"help": "lambda values chosen among on validation worst-class accuracy (labels only)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if int(self.jtt_upweight) != self.jtt_upweight or self.jtt_upweight < 1:
            raise ValueError(f"jtt_upweight={self.jtt_upweight}: expected a whole number >= 1 (copies per example).")
        self.jtt_upweight = int(self.jtt_upweight)
        if self.jtt_upweight_grid is not None:
            if not self.jtt_upweight_grid or any(int(v) != v or v < 1 for v in self.jtt_upweight_grid):
                raise ValueError(f"jtt_upweight_grid={self.jtt_upweight_grid}: expected whole numbers >= 1.")
            self.jtt_upweight_grid = [int(v) for v in self.jtt_upweight_grid]
        for name in ("jtt_identification_epochs", "jtt_retrain_epochs"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}={value}: expected a positive number of epochs (or unset).")
