from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...core.config import ErmCheckpointArguments, RobustConfig

MASK_ERM_MODELS = ("last", "best_validation_accuracy")


@dataclass
class MaskTuneConfig(ErmCheckpointArguments, RobustConfig):
    r"""
    Configuration of [`MaskTuneTrainer`] (Taghanaki et al., "MaskTune: Mitigating Spurious Correlations by
    Forcing to Explore", NeurIPS 2022).

    The ERM stage uses the usual training parameters (`num_train_epochs`, `learning_rate`, ...).

    Parameters that control the masks:
        mask_method (`str`, *optional*, defaults to `"xgradcam"`):
            `"xgradcam"`: MaskTune's masks (the ERM model's explanation, thresholded). `"random"`: RandMask, the
            paper's random-masking baseline (Figure 2, appendix Table 6): one square window per image, its side
            uniform in `random_mask_min_side..random_mask_max_side`, its place uniform inside the image, drawn
            afresh each iteration; images only.
        random_mask_min_side (`int`, *optional*, defaults to `2`), random_mask_max_side (`int` or `None`,
        *optional*): the window sides of RandMask, in input pixels (default maximum: half the image side).
        mask_threshold_std (`float` or `None`, *optional*):
            Per image, pixels whose normalised xGradCAM value exceeds `mean + k * std` of the image's positive
            values are masked (k = this value; the paper found k = 2 best among 0..3). Default: chosen by the
            selection stage from `selection_thresholds`; 2 when the selection is off.
        masktune_iterations (`int` or `None`, *optional*):
            Rounds of masking + one-epoch fine-tuning (paper appendix, Table 5). Default: with
            `masktune_selection="auto"`, chosen on validation (labels only) up to `selection_max_iterations`:
            round i + 1 runs only if round i improved on round i - 1's worst-class accuracy (ties: accuracy),
            and the run keeps the last round that improved (the paper proposes to stop the accumulative rounds by
            monitoring an accuracy; the masks of round 1 can miss part of a shortcut, which round 2 then masks);
            1 when the selection is off (the paper's MaskTune).
        accumulative_masking (`bool`, *optional*, defaults to `True`):
            With several iterations, keep earlier masks and add the new ones (CAMs of later rounds are then
            computed on the already-masked images). The paper's Table 5: accumulative rounds remove two shortcuts,
            non-accumulative ones do not. (The authors' code defaults to non-accumulative; no effect with 1 round.)
        min_masked_tokens (`int`, *optional*, defaults to `1`):
            Text only: mask at least this many of the highest-attribution tokens of an example (if positive).

    Parameters that control the fine-tuning:
        erm_checkpoint (`str` or `None`, *optional*):
            Folder of a trained model (`save_pretrained` layout) to start from instead of training ERM.
        finetune_learning_rate (`float` or `None`, *optional*):
            Learning rate of the one-epoch fine-tuning on the masked set (constant). Default: the ERM stage's
            final learning rate; if ERM's schedule ends at 0 (linear/cosine), a tenth of `learning_rate`.
        finetune_batch_size (`int` or `None`, *optional*):
            Per-device batch size of the fine-tuning epoch. Default: `per_device_train_batch_size`.
        finetune_continue_optimizer (`bool`, *optional*, defaults to `False`):
            Start each fine-tuning with the optimizer state (e.g. SGD momentum buffers) of the training it follows:
            round 1 (and every selection candidate) the ERM stage's last step, round i + 1 round i's, as the
            authors' code runs (aliasgharkhani/Masktune, `src/methods/base_method.py`). The learning rate and the
            other hyper-parameters stay the fine-tuning's own. Each training stage saves its state
            (`optimizer_state.pt`), so a resumed run continues the same state. With `erm_checkpoint`, the folder
            must hold the `optimizer.pt` of a Trainer checkpoint. Default `False`: a fresh optimizer per stage.
        mask_erm_model (`str`, *optional*, defaults to `"last"`):
            The ERM model whose CAMs make the round-1 masks: `"last"` (the model that is fine-tuned) or
            `"best_validation_accuracy"`: the ERM epoch with the best accuracy on `health_split` (labels only; the
            first of equal ones), as the authors' code masks with its best ERM checkpoint. Needs a trained ERM stage
            (not `erm_checkpoint`) and the `health_split` eval split; later rounds mask with the previous round.
        finetune_freeze_norm_statistics (`bool`, *optional*, defaults to `True`):
            Keep BatchNorm layers in evaluation mode during the fine-tuning: they normalise with the ERM model's
            running statistics and keep them (their affine weights still train). One epoch on masked images
            otherwise re-estimates the statistics without the masked-out (spurious) features, which then
            stand out MORE on unmasked test images (on `biased_digits` this undid most of the fine-tuning's
            gain). No effect on models without BatchNorm (LayerNorm, GroupNorm).

    Parameters of the label-free selection (stage `select`, after ERM; `RobustTrainer.run_candidates`):
        masktune_selection (`str`, *optional*, defaults to `"auto"`):
            `"auto"`: the knobs left unset (`finetune_learning_rate`, `finetune_batch_size`, `mask_threshold_std`)
            are chosen from the grids below by worst-CLASS accuracy on the `health_split` eval split (labels
            only, never groups; ties by accuracy) among one-epoch fine-tunings of the same ERM model, and the ERM
            model itself is a candidate: when it wins, the run keeps it and says that MaskTune did not help on
            validation. Setting all three knobs skips the selection (`masktune_iterations` unset is still chosen
            after it, round by round). `"off"`: no selection (the paper's defaults for unset knobs: ERM's final
            learning rate, the ERM batch size, k = 2, one round).
        selection_learning_rate_factors (`list[float]`, *optional*, defaults to `[0.1, 1.0]`):
            Fine-tuning learning rates tried, as factors of `learning_rate` (ERM's peak learning rate).
        selection_batch_size_divisors (`list[int]`, *optional*, defaults to `[4]`):
            Fine-tuning batch sizes tried, as `per_device_train_batch_size // d` (more updates in the one epoch).
        selection_thresholds (`list[float]`, *optional*, defaults to `[2.0]`):
            Values of k tried (the masks are computed once per value).
        selection_max_iterations (`int`, *optional*, defaults to `3`):
            Most masking rounds when `masktune_iterations` is chosen (the paper's Table 5 goes to 3).

    Parameters that control selective classification (paper section 2.2):
        selective_coverages (`list[float]`, *optional*, defaults to `[1.0, 0.95, 0.9, 0.85, 0.8]`):
            Target coverages; thresholds are calibrated on `selective_calibration_split`.
        selective_calibration_split (`str`, *optional*, defaults to `"validation"`):
            Evaluation split on which the abstention thresholds are set.
        cam_examples_per_group (`int`, *optional*, defaults to `2`):
            Examples per group shown in the CAM overlay plot.
    """

    # the CAM plot's size changes no stage's outputs: not among the settings a resume must match
    UNRECORDED_FIELDS: ClassVar[tuple[str, ...]] = ("cam_examples_per_group",)

    mask_method: str = field(default="xgradcam", metadata={"help": "'xgradcam' (MaskTune) or 'random' (RandMask)."})
    random_mask_min_side: int = field(default=2, metadata={"help": "RandMask: smallest window side (pixels)."})
    random_mask_max_side: int | None = field(
        default=None, metadata={"help": "RandMask: largest window side (pixels; default half the image side)."}
    )
    mask_threshold_std: float | None = field(
        default=None, metadata={"help": "k in the per-image threshold mean + k*std (default: selected; 2 without selection)."}
    )
    masktune_iterations: int | None = field(
        default=None, metadata={"help": "Rounds of masking + one-epoch fine-tuning (default: chosen on validation "
                                        "up to selection_max_iterations; 1 without selection)."}
    )
    accumulative_masking: bool = field(default=True, metadata={"help": "Add each round's masks to earlier ones."})
    min_masked_tokens: int = field(default=1, metadata={"help": "Text: mask at least this many top tokens."})
    finetune_learning_rate: float | None = field(
        default=None, metadata={"help": "LR of the masked fine-tuning (default: ERM's final LR)."}
    )
    finetune_batch_size: int | None = field(
        default=None, metadata={"help": "Per-device batch size of the fine-tuning (default: per_device_train_batch_size)."}
    )
    finetune_continue_optimizer: bool = field(
        default=False, metadata={"help": "Continue the optimizer state of the ERM stage (round 1) / previous round."}
    )
    mask_erm_model: str = field(
        default="last", metadata={"help": "ERM model of the round-1 masks: 'last' or 'best_validation_accuracy'."}
    )
    finetune_freeze_norm_statistics: bool = field(
        default=True, metadata={"help": "Keep BatchNorm running statistics of the ERM model during fine-tuning."}
    )
    masktune_selection: str = field(
        default="auto", metadata={"help": "'auto': choose the unset fine-tuning knobs on validation (labels only); 'off'."}
    )
    selection_learning_rate_factors: list[float] = field(
        default_factory=lambda: [0.1, 1.0], metadata={"help": "Fine-tuning LRs tried, as factors of learning_rate."}
    )
    selection_batch_size_divisors: list[int] = field(
        default_factory=lambda: [4], metadata={"help": "Fine-tuning batch sizes tried: per_device_train_batch_size // d."}
    )
    selection_thresholds: list[float] = field(
        default_factory=lambda: [2.0], metadata={"help": "Mask thresholds k tried."}
    )
    selection_max_iterations: int = field(
        default=3, metadata={"help": "Most masking rounds when masktune_iterations is chosen on validation."}
    )
    selective_coverages: list[float] = field(
        default_factory=lambda: [1.0, 0.95, 0.9, 0.85, 0.8], metadata={"help": "Target coverages."}
    )
    selective_calibration_split: str = field(
        default="validation", metadata={"help": "Split on which abstention thresholds are calibrated."}
    )
    cam_examples_per_group: int = field(default=2, metadata={"help": "Examples per group in the CAM plot."})

    def __post_init__(self):
        super().__post_init__()
        if self.mask_method not in ("xgradcam", "random"):
            raise ValueError(f"mask_method={self.mask_method!r}: expected 'xgradcam' or 'random'.")
        if self.random_mask_min_side < 1 or (self.random_mask_max_side is not None
                                             and self.random_mask_max_side < self.random_mask_min_side):
            raise ValueError(f"random_mask_min_side={self.random_mask_min_side}, random_mask_max_side="
                             f"{self.random_mask_max_side}: expected 1 <= min <= max.")
        if self.mask_erm_model not in MASK_ERM_MODELS:
            raise ValueError(f"mask_erm_model={self.mask_erm_model!r}: expected one of {MASK_ERM_MODELS}.")
        if self.masktune_iterations is not None and self.masktune_iterations < 1:
            raise ValueError(f"masktune_iterations={self.masktune_iterations}: expected 1 or more.")
        if self.selection_max_iterations < 1:
            raise ValueError(f"selection_max_iterations={self.selection_max_iterations}: expected 1 or more.")
        if self.finetune_batch_size is not None and self.finetune_batch_size < 1:
            raise ValueError(f"finetune_batch_size={self.finetune_batch_size}: expected a positive batch size.")
        if self.masktune_selection not in ("auto", "off"):
            raise ValueError(f"masktune_selection={self.masktune_selection!r}: expected 'auto' or 'off'.")
        if not self.selection_learning_rate_factors or any(f <= 0 for f in self.selection_learning_rate_factors):
            raise ValueError(f"selection_learning_rate_factors={self.selection_learning_rate_factors}: expected positive values.")
        if not self.selection_batch_size_divisors or any(d < 1 for d in self.selection_batch_size_divisors):
            raise ValueError(f"selection_batch_size_divisors={self.selection_batch_size_divisors}: expected integers >= 1.")
        if not self.selection_thresholds or any(k < 0 for k in self.selection_thresholds):
            raise ValueError(f"selection_thresholds={self.selection_thresholds}: expected values >= 0.")
        if self.mask_threshold_std is not None and self.mask_threshold_std < 0:
            raise ValueError(f"mask_threshold_std={self.mask_threshold_std}: expected a value >= 0.")
        if any(not 0 < c <= 1 for c in self.selective_coverages):
            raise ValueError(f"selective_coverages={self.selective_coverages}: each must be in (0, 1].")
