from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...core.config import RobustConfig
from ..dfr.config import DFRConfig


@dataclass
class FairDropoutTrainingConfig(RobustConfig):
    r"""
    Configuration of [`FairDropoutTrainer`] ("FairDropout: Using Example-Tied Dropout to Enhance Generalization of
    Minority Groups", after the example-tied dropout of Maini et al., ICML 2023): ERM with FairDropout layers
    injected into the model.

    The training itself uses the usual parameters (`num_train_epochs`, `learning_rate`, ...).

    Parameters that control FairDropout (see `hf_robust.methods.fair_dropout.inject.FairDropoutConfig`):
        fair_dropout_positions (`list[str]` or `None`, *optional*):
            Position names of the model's family (`hf_robust.methods.fair_dropout.positions`): ResNet `dp2`..`dp5`
            (after stage 1..4), BERT-style `pooled` (the classifier's input) or `fc` (a new linear projection
            before the classifier), ViT `block{i}` or `pooled`. Default: `dp4` for ResNets (after the third
            stage, the paper's CelebA run), `fc` for text encoders, `pooled` for ViTs. The paper tunes the position
            by worst-class validation accuracy.
        p_gen (`float` or `None`, *optional*):
            Fraction of generalising (always-on) neurons at each position: the first `round(p_gen * C)`.
            `p_gen=1` is plain ERM. Default: chosen by the selection (below); 0.2 when it is off.
        p_mem (`float` or `None`, *optional*):
            Probability that a memorising neuron is kept for a training example (a fixed, example-tied choice).
            The paper's CelebA run uses p_gen = p_mem = 0.2; its appendix tunes p_gen in {0.2, 0.4, 0.5} with
            p_mem = 0.1. Default: chosen by the selection (below); 0.2 when it is off.
        fairdropout_selection (`str`, *optional*, defaults to `"auto"`):
            `"auto"`: when `p_gen` and `p_mem` are both unset, train one model per candidate — plain ERM (`p_gen=1`)
            and, at each candidate position, each (`selection_p_gen[i]`, `selection_p_mem[i]`) pair — from the
            same initial weights, and keep the one with the best validation worst-CLASS accuracy (labels only; the
            FairDropout paper tunes position, p_gen, learning rate and weight decay this way, as does GradTune). The
            ERM candidate is also the health check's reference. It costs one full training per candidate: 1 + 2
            positions x 2 pairs = 5 by default (FairDropout cannot share an ERM stage; set `fair_dropout_positions`
            to search the pairs only: 3). `"off"`: one training with the given (or 0.2/0.2) values.
        selection_p_gen, selection_p_mem (`list[float]`, *optional*, defaults to `[0.5, 0.2]` and `[0.1, 0.2]`):
            The FairDropout candidates, as pairs: the appendix's tuned p_gen 0.5 with p_mem 0.1, and the paper's
            CelebA 0.2 / 0.2.
        selection_positions (`list[str]` or `None`, *optional*):
            Positions the selection tries, each alone, when `fair_dropout_positions` is unset. Default: the
            family's two (ResNet `dp4`, `dp3`; BERT-style `fc`, `pooled`; MNIST CNN `conv3`, `hidden`; ViT
            `pooled` only). The paper searches {dp2, dp3, dp4, dp5} on ResNet-50 and {logits, fc} on BERT; we keep
            two per family to bound the cost.
        fair_dropout_seed (`int` or `None`, *optional*):
            Seed of the example-tied masks. Default: `seed`.
        rescale_generalising (`bool`, *optional*, defaults to `False`):
            At evaluation, scale the generalising neurons by the mean activation mass of training (the authors'
            "drop" mode, corrected); by default the memorising neurons are zeroed and nothing else changes.

    Parameters that control the output:
        export_model (`bool`, *optional*, defaults to `True`):
            Besides the model with its `fair_dropout_config.json` (reload it with
            `hf_robust.methods.fair_dropout.inject.load_fair_dropout`), save into `output_dir/exported` the stock model with the
            evaluation-time masks folded into its weights (plain `from_pretrained`, the same predictions). Skipped,
            with a warning, for positions that cannot be folded (ViT blocks).
    """

    # the stock export is an extra output of the final save: it changes no stage's outputs
    UNRECORDED_FIELDS: ClassVar[tuple[str, ...]] = ("export_model",)

    fair_dropout_positions: list[str] | None = field(
        default=None,
        metadata={"help": "FairDropout positions (ResNet dp2..dp5, BERT pooled/fc, ViT block{i}/pooled); default: "
                          "the family's (ResNet dp4, BERT fc, ViT pooled)."},
    )
    p_gen: float | None = field(
        default=None, metadata={"help": "Fraction of generalising (always-on) neurons (default: selected; 0.2)."}
    )
    p_mem: float | None = field(
        default=None, metadata={"help": "Keep probability of a memorising neuron per example (default: selected; 0.2)."}
    )
    fairdropout_selection: str = field(
        default="auto", metadata={"help": "'auto': choose p_gen/p_mem (ERM among the candidates) on validation; 'off'."}
    )
    selection_p_gen: list[float] = field(default_factory=lambda: [0.5, 0.2], metadata={"help": "Candidate p_gen values."})
    selection_p_mem: list[float] = field(default_factory=lambda: [0.1, 0.2], metadata={"help": "Candidate p_mem values."})
    selection_positions: list[str] | None = field(
        default=None,
        metadata={"help": "Positions the selection tries, each alone, when fair_dropout_positions is unset (default: "
                          "the family's: ResNet dp4,dp3; BERT fc,pooled; MNIST CNN conv3,hidden; ViT pooled)."},
    )
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
        if isinstance(self.selection_positions, str):
            self.selection_positions = [self.selection_positions]
        if self.selection_positions is not None:
            self.selection_positions = [
                p.strip() for entry in self.selection_positions for p in str(entry).split(",") if p.strip()
            ] or None
        if self.fairdropout_selection not in ("auto", "off"):
            raise ValueError(f"fairdropout_selection={self.fairdropout_selection!r}: expected 'auto' or 'off'.")
        if len(self.selection_p_gen) != len(self.selection_p_mem) or not self.selection_p_gen:
            raise ValueError(
                f"selection_p_gen={self.selection_p_gen} and selection_p_mem={self.selection_p_mem}: expected lists of "
                "the same (non-zero) length, one (p_gen, p_mem) candidate per position in them."
            )
        for p_gen, p_mem in zip(self.selection_p_gen, self.selection_p_mem):
            self.fair_dropout_config(p_gen, p_mem)
        self.fair_dropout_config()  # validates p_gen, p_mem and the positions list

    @property
    def selects_fair_dropout(self) -> bool:
        """Whether the run chooses p_gen / p_mem on validation (both unset, selection on)."""
        return self.fairdropout_selection == "auto" and self.p_gen is None and self.p_mem is None

    def fair_dropout_config(self, p_gen: float | None = None, p_mem: float | None = None):
        """The `FairDropoutConfig` these arguments describe (with the given p values, else the set ones; unset:
        the first selection candidate when selecting, else 0.2)."""
        from .inject import FairDropoutConfig

        return FairDropoutConfig(
            positions=self.fair_dropout_positions, p_gen=p_gen if p_gen is not None else self._p("p_gen"),
            p_mem=p_mem if p_mem is not None else self._p("p_mem"),
            seed=self.seed if self.fair_dropout_seed is None else self.fair_dropout_seed,
            rescale_generalising=self.rescale_generalising,
        )

    def _p(self, name: str) -> float:
        value = getattr(self, name)
        if value is not None:
            return value
        if self.selects_fair_dropout:
            return getattr(self, f"selection_{name}")[0]
        return 0.2


@dataclass
class FairDropoutDFRConfig(DFRConfig, FairDropoutTrainingConfig):
    r"""
    Configuration of [`FairDropoutDFRTrainer`]: FairDropout training ([`FairDropoutTrainingConfig`]), then DFR's
    last-layer retraining on the FairDropout model's evaluation-mode features ([`DFRConfig`]: held-out half of
    `heldout_split`, class-balanced subsets by default, L1 logistic regression head).

    `erm_checkpoint` here names a folder saved by [`FairDropoutTrainer`] (weights + `fair_dropout_config.json`
    with the same positions and p values): the FairDropout stage loads it instead of training.
    """
