from __future__ import annotations

from dataclasses import dataclass, field

from .base_config import RobustConfig
from .dfr_config import DFRConfig


@dataclass
class FairDropoutTrainingConfig(RobustConfig):
    r"""
    Configuration of [`FairDropoutTrainer`] ("FairDropout: Using Example-Tied Dropout to Enhance Generalization of
    Minority Groups", after the example-tied dropout of Maini et al., ICML 2023): ERM with FairDropout layers
    injected into the model.

    The training itself uses the usual parameters (`num_train_epochs`, `learning_rate`, ...).

    Parameters that control FairDropout (see `hf_robust.fair_dropout.FairDropoutConfig`):
        fair_dropout_positions (`list[str]` or `None`, *optional*):
            Position names from the model's adapter: ResNet `dp2`..`dp5` (after stage 1..4), BERT-style `pooled`
            (the classifier's input) or `fc` (a new linear projection before the classifier), ViT `block{i}` or
            `pooled`. Default: `dp4` for ResNets (after the third stage, the paper's CelebA run), `fc` for text
            encoders, `pooled` for ViTs. The paper tunes the position by worst-class validation accuracy.
        p_gen (`float`, *optional*, defaults to `0.2`):
            Fraction of generalising (always-on) neurons at each position: the first `round(p_gen * C)`.
            `p_gen=1` is plain ERM.
        p_mem (`float`, *optional*, defaults to `0.2`):
            Probability that a memorising neuron is kept for a training example (a fixed, example-tied choice).
            The paper's CelebA run uses p_gen = p_mem = 0.2; its appendix tunes p_gen in {0.2, 0.4, 0.5} with
            p_mem = 0.1.
        fair_dropout_seed (`int` or `None`, *optional*):
            Seed of the example-tied masks. Default: `seed`.
        rescale_generalising (`bool`, *optional*, defaults to `False`):
            At evaluation, scale the generalising neurons by the mean activation mass of training (the authors'
            "drop" mode, corrected); by default the memorising neurons are zeroed and nothing else changes.

    Parameters that control the output:
        export_model (`bool`, *optional*, defaults to `True`):
            Besides the model with its `fair_dropout_config.json` (reload it with
            `hf_robust.fair_dropout.load_fair_dropout`), save into `output_dir/exported` the stock model with the
            evaluation-time masks folded into its weights (plain `from_pretrained`, the same predictions). Skipped,
            with a warning, for positions that cannot be folded (ViT blocks).
    """

    fair_dropout_positions: list[str] | None = field(
        default=None,
        metadata={"help": "FairDropout positions (ResNet dp2..dp5, BERT pooled/fc, ViT block{i}/pooled); default: "
                          "the adapter's (ResNet dp4, BERT fc, ViT pooled)."},
    )
    p_gen: float = field(default=0.2, metadata={"help": "Fraction of generalising (always-on) neurons."})
    p_mem: float = field(default=0.2, metadata={"help": "Keep probability of a memorising neuron per example."})
    fair_dropout_seed: int | None = field(default=None, metadata={"help": "Seed of the masks (default: seed)."})
    rescale_generalising: bool = field(
        default=False, metadata={"help": "At evaluation, scale generalising neurons to the training activation mass."}
    )
    export_model: bool = field(
        default=True, metadata={"help": "Also save the stock model with the masks folded in (output_dir/exported)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.fair_dropout_positions, str):
            self.fair_dropout_positions = [self.fair_dropout_positions]
        if self.fair_dropout_positions is not None:  # "dp3,dp4" (one flag value) or ["dp3", "dp4"]
            self.fair_dropout_positions = [
                p.strip() for entry in self.fair_dropout_positions for p in str(entry).split(",") if p.strip()
            ]
        self.fair_dropout_config()  # validates p_gen, p_mem and the positions list

    def fair_dropout_config(self):
        """The `FairDropoutConfig` these arguments describe."""
        from ..fair_dropout import FairDropoutConfig

        return FairDropoutConfig(
            positions=self.fair_dropout_positions, p_gen=self.p_gen, p_mem=self.p_mem,
            seed=self.seed if self.fair_dropout_seed is None else self.fair_dropout_seed,
            rescale_generalising=self.rescale_generalising,
        )


@dataclass
class FairDropoutDFRConfig(DFRConfig, FairDropoutTrainingConfig):
    r"""
    Configuration of [`FairDropoutDFRTrainer`]: FairDropout training ([`FairDropoutTrainingConfig`]), then DFR's
    last-layer retraining on the FairDropout model's evaluation-mode features ([`DFRConfig`]: held-out half of
    `heldout_split`, class-balanced subsets by default, L1 logistic regression head).

    `erm_checkpoint` here names a folder saved by [`FairDropoutTrainer`] (weights + `fair_dropout_config.json`
    with the same positions and p values): the FairDropout stage loads it instead of training.
    """
