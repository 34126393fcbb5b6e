from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .counterfactuals import MASK_STRATEGIES, REFILL_STRATEGIES
from ...core.config import RobustConfig

TEACHER_DTYPES = ("float32", "bfloat16", "float16")
PAPER_DISTILL_WEIGHT = 30.0  # the paper fixes beta = 30 for every experiment


@dataclass
class CounterfactualDistillConfig(RobustConfig):
    r"""
    Configuration of [`CounterfactualDistillTrainer`] (Xiao et al., "Masked Images Are Counterfactual Samples for
    Robust Fine-tuning", CVPR 2023).

    The optimisation defaults are the paper's (appendix A.1): AdamW, `learning_rate=3e-5`, `weight_decay=0.1`,
    cosine schedule with warm-up (`warmup_steps=0.02`: the paper's 500 of about 25,000 steps), gradient
    clipping at norm 1 (`max_grad_norm=1.0`), no augmentation (`train_augmentation="none"`).

    Parameters that control the counterfactual images:
        mask_strategy (`str`, *optional*, defaults to `"object"`):
            Which patches to mask: `"object"` (CAM of the student for the label above `cam_threshold`),
            `"context"` (at or below it) or `"random"` (each patch with probability `random_mask_probability`).
        refill_strategy (`str`, *optional*, defaults to `"single"`):
            What goes into masked patches: `"none"` (zeros of the model's input), `"single"` (the same patches of
            one other image of the batch) or `"multi"` (each patch from its own other image).
        cam_threshold (`float`, *optional*, defaults to `0.3`):
            Threshold on the CAM normalised by its per-image maximum (the paper's best object-mask setting).
        random_mask_probability (`float`, *optional*, defaults to `0.5`):
            Masking probability of each patch for `mask_strategy="random"`.
        donor_pool (`str`, *optional*, defaults to `"global"`):
            Where refill donors come from in a distributed run: `"global"` (the batch gathered from every
            process: N processes make the counterfactuals of one) or `"local"` (each process's own batch, as the
            authors' code; no image gather).

    Parameters that control the distillation:
        distill_weight (`float` or `None`, *optional*):
            beta in `CE(student(x), y) + beta * MSE(f_student(x_cf), f_teacher(x_cf))`, f = the image embedding
            (for CLIP the projected embedding, not normalised). The paper fixes beta = 30 for every experiment.
            Default: chosen by the selection (below); 30 when it is off. Setting it skips the selection.
        teacher_model (`str` or `None`, *optional*):
            Folder of a saved teacher (`save_pretrained` layout). Default: a frozen copy of the model the trainer
            starts from (the zero-shot model). A teacher can also be passed to the trainer as `teacher=`.
        teacher_dtype (`str` or `None`, *optional*):
            Run the frozen teacher in this dtype (`"bfloat16"`, `"float16"` or `"float32"`); its embeddings are
            compared in float32. Default: the student's dtype. The teacher only ever runs forward, without
            gradients, so half precision costs it nothing but rounding (about 1e-2 relative in bfloat16) and makes
            its forward 2-4x faster where half-precision matrix units exist (GPUs, CPUs with AMX) at real model
            sizes. The teacher always runs with the fastest attention kernel (SDPA where supported): it needs no
            attention maps, unlike the student.

    Parameters that control the comparisons:
        compare_vanilla (`bool`, *optional*, defaults to `False`):
            Also fine-tune a copy of the starting model with cross-entropy only, on the same schedule and data
            order (the "vanilla fine-tuning" baseline), and report it next to the method.
        wise_ft_alphas (`list[float]`, *optional*, defaults to `[0.25, 0.5, 0.75]`):
            Mixing coefficients at which the WiSE-FT weight-space ensembles of the zero-shot model with the
            fine-tuned model(s) are evaluated (0 = zero-shot, 1 = fine-tuned). Empty: no sweep.
        plot_examples (`int`, *optional*, defaults to `4`):
            Training examples shown in the original / CAM / counterfactual grid plot.

    Parameters of the label-free selection of beta (stage `select`, after `vanilla`;
    `RobustTrainer.run_candidates`):
        counterfactual_selection (`str`, *optional*, defaults to `"auto"`):
            `"auto"`: when `distill_weight` is unset, fine-tune one student per beta of `selection_distill_weights`
            from the same zero-shot model, on the same schedule and data order, and keep the one with the best
            worst-CLASS accuracy on the `health_split` eval split (labels only, never groups; ties by accuracy,
            then by order). With `compare_vanilla`, the vanilla fine-tuning (beta = 0, already trained by the
            `vanilla` stage, not retrained) is the first candidate: when it wins, the run keeps the vanilla
            fine-tuned model and says that counterfactual distillation did not help on validation. The paper fixes
            beta = 30 for every experiment; choosing beta on validation worst-class accuracy is our departure from
            it, the criterion by which GradTune ("GradTune: Last-Layer Fine-Tuning for Group Robustness without
            Group Annotation") and FairDropout ("FairDropout: Using Example-Tied Dropout to Enhance
            Generalization of Minority Groups", arXiv 2502.06695) select their settings. It costs one fine-tuning
            per beta (2 by default). `"off"`: one distillation with `distill_weight` (30 when unset: the paper).
        selection_distill_weights (`list[float]`, *optional*, defaults to `[30.0, 10.0]`):
            The beta candidates, in tie-breaking order: the paper's 30, and one step lower.
    """

    # the grid plot's size changes no stage's outputs: not among the settings a resume must match
    UNRECORDED_FIELDS: ClassVar[tuple[str, ...]] = ("plot_examples",)

    learning_rate: float = field(default=3e-5, metadata={"help": "AdamW learning rate (paper: 3e-5)."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (paper: 0.1)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule (paper: cosine)."})
    warmup_steps: float = field(
        default=0.02, metadata={"help": "Warm-up steps, or a fraction of all steps if < 1 (paper: 500 of ~25k)."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (paper: 1.0)."})
    mask_strategy: str = field(default="object", metadata={"help": f"Patches to mask: one of {MASK_STRATEGIES}."})
    refill_strategy: str = field(default="single", metadata={"help": f"Refill: one of {REFILL_STRATEGIES}."})
    cam_threshold: float = field(default=0.3, metadata={"help": "Threshold on the max-normalised CAM."})
    random_mask_probability: float = field(default=0.5, metadata={"help": "Patch probability for random masks."})
    donor_pool: str = field(default="global", metadata={"help": "Refill donors from the 'global' or 'local' batch."})
    distill_weight: float | None = field(
        default=None,
        metadata={"help": "beta: weight of the embedding MSE (default: selected on validation; paper: 30)."},
    )
    teacher_model: str | None = field(default=None, metadata={"help": "Folder of a saved teacher model."})
    teacher_dtype: str | None = field(
        default=None,
        metadata={"help": "dtype of the frozen teacher: bfloat16, float16 or float32 (default: the student's)."},
    )
    compare_vanilla: bool = field(default=False, metadata={"help": "Also fine-tune a CE-only copy as the baseline."})
    wise_ft_alphas: list[float] = field(
        default_factory=lambda: [0.25, 0.5, 0.75], metadata={"help": "WiSE-FT mixing coefficients to evaluate."}
    )
    plot_examples: int = field(default=4, metadata={"help": "Examples in the counterfactual grid plot."})
    counterfactual_selection: str = field(
        default="auto",
        metadata={"help": "'auto': choose beta (vanilla FT = beta 0 among the candidates) on validation; 'off'."},
    )
    selection_distill_weights: list[float] = field(
        default_factory=lambda: [30.0, 10.0], metadata={"help": "Candidate beta values (paper: 30)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.mask_strategy not in MASK_STRATEGIES:
            raise ValueError(f"mask_strategy={self.mask_strategy!r}: expected one of {MASK_STRATEGIES}.")
        if self.refill_strategy not in REFILL_STRATEGIES:
            raise ValueError(f"refill_strategy={self.refill_strategy!r}: expected one of {REFILL_STRATEGIES}.")
        if self.teacher_dtype is not None and self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype={self.teacher_dtype!r}: expected one of {TEACHER_DTYPES} (or None: the "
                             "student's dtype).")
        if self.donor_pool not in ("global", "local"):
            raise ValueError(f"donor_pool={self.donor_pool!r}: expected 'global' or 'local'.")
        if not 0.0 <= self.cam_threshold < 1.0:
            raise ValueError(f"cam_threshold={self.cam_threshold}: expected a value in [0, 1) (CAMs are max-normalised).")
        if not 0.0 < self.random_mask_probability < 1.0:
            raise ValueError(f"random_mask_probability={self.random_mask_probability}: expected a value in (0, 1).")
        if self.distill_weight is not None and self.distill_weight < 0:
            raise ValueError(f"distill_weight={self.distill_weight}: expected a value >= 0.")
        if self.counterfactual_selection not in ("auto", "off"):
            raise ValueError(f"counterfactual_selection={self.counterfactual_selection!r}: expected 'auto' or 'off'.")
        if not self.selection_distill_weights or any(b <= 0 for b in self.selection_distill_weights):
            raise ValueError(f"selection_distill_weights={self.selection_distill_weights}: expected positive values "
                             "(beta = 0 is the vanilla fine-tuning, a candidate with compare_vanilla).")
        if any(not 0.0 <= a <= 1.0 for a in self.wise_ft_alphas):
            raise ValueError(f"wise_ft_alphas={self.wise_ft_alphas}: each must be in [0, 1].")

    @property
    def selects_distill_weight(self) -> bool:
        """Whether the run chooses beta on validation (`distill_weight` unset, selection on)."""
        return self.counterfactual_selection == "auto" and self.distill_weight is None

    @property
    def fixed_distill_weight(self) -> float:
        """beta without a selection: `distill_weight`, else the paper's 30."""
        return PAPER_DISTILL_WEIGHT if self.distill_weight is None else float(self.distill_weight)
