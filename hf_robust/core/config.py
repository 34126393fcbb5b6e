from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from transformers import TrainingArguments


@dataclass
class RobustConfig(TrainingArguments):
    r"""
    Configuration of [`RobustTrainer`] (ERM with group-aware evaluation) and the base of every hf_robust method.

    Parameters that control the data:
        max_length (`int`, *optional*, defaults to `128`):
            Maximum number of tokens of a text input (longer inputs are truncated).
        train_augmentation (`str`, *optional*, defaults to `"none"`):
            Training-time image augmentation: `"none"`, `"flip"` or `"crop_flip"` (random resized crop + flip).
            Applied after a method's per-example edits of the images (e.g. masks).
        balanced_sampling (`str`, *optional*, defaults to `"none"`):
            `"class"` draws training examples with equal total weight per class (a class-balanced ERM baseline);
            `"group"` does the same per group and therefore uses group labels (only for baselines that may).

    Parameters that control the learning-rate schedule:
        lr_step_epochs (`float` or `None`, *optional*):
            A step schedule, which transformers' `lr_scheduler_type`s lack: the learning rate is multiplied by
            `lr_step_gamma` every this many epochs (e.g. 0.5 every 25 epochs on MNIST). When set, it
            replaces `lr_scheduler_type` for the training stages (warm-up is not applied).
        lr_step_gamma (`float`, *optional*, defaults to `0.5`):
            The factor of the step schedule.

    Parameters that locate model parts (for models hf_robust's adapters do not know):
        classifier_layer (`str` or `None`, *optional*):
            Name of the last linear layer.
        cam_target_layer (`str` or `None`, *optional*):
            Name of the layer whose activations class activation maps are computed from.

    Parameters that control the output folder:
        overwrite_output_dir (`bool`, *optional*, defaults to `False`):
            Let a new run replace the finished run (`results.json`) in `output_dir`. Without it such a run is refused
            before training (resume it with `resume_from_checkpoint`, or pick another folder). The old run is kept
            until the new one has written all its final files, which are then swapped in.

    Parameters that control the report:
        save_plots (`bool`, *optional*, defaults to `True`):
            Write the per-group accuracy plot (and method plots) into `output_dir/plots`.
        group_inference (`str`, *optional*, defaults to `"on"`):
            `"on"`: a run with an ERM stage reports which examples its ERM model points to as the minority, by two
            label-free rules (its training errors, and its largest held-out gradient norms): their precision and
            recall per group when groups are known, and always examples with where the model looks
            (`hf_robust.inference`; results.json, the card, `plots/group_inference.png`). `"off"` skips it.

    Parameters of the health check every run ends with (`hf_robust.core.health`): the final model against
    the model the method started from (its ERM stage, or the model given), on `health_split` with labels only:
        on_worse (`str`, *optional*, defaults to `"warn"`):
            What a run does when its model `collapsed` or is `worse_than_erm`: `"warn"` keeps the method's model
            and says so (a logged warning, `results.json`, the top of the model card, the script's table);
            `"keep"` the same without the logged warning; `"fallback_to_erm"` replaces the final model by the
            reference model (recorded as such); `"error"` raises `HealthCheckError` before anything is saved.
        health_margin (`float`, *optional*, defaults to `0.02`):
            A drop of validation worst-class accuracy larger than this (2 points) is `worse_than_erm`.
        health_split (`str`, *optional*, defaults to `"validation"`):
            The eval split the check runs on (absent: the status is `unknown`). A method that trains on part of it
            checks on the part it did not train on.

    Every `transformers.TrainingArguments` parameter applies. `remove_unused_columns` defaults to `False`: the
    collator needs `group` and `example_idx`.

    Every finished stage records the run's settings (`RobustTrainer.run_settings`), and a resume must match them:
    each field of this class and its subclasses counts, but those a class names in `UNRECORDED_FIELDS` (settings
    that change no stage's outputs: where and how the run is saved, shown and judged at the end).
    """

    UNRECORDED_FIELDS: ClassVar[tuple[str, ...]] = (
        "save_plots", "on_worse", "health_margin", "health_split", "overwrite_output_dir", "group_inference",
    )

    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Keep every dataset column: hf_robust's collator needs `group` and `example_idx`."},
    )
    max_length: int = field(default=128, metadata={"help": "Maximum tokens per text input."})
    train_augmentation: str = field(
        default="none", metadata={"help": "Image augmentation for training: none, flip or crop_flip."}
    )
    balanced_sampling: str = field(
        default="none",
        metadata={"help": "Sample training examples balanced by 'class' or by 'group' (uses group labels), or 'none'."},
    )
    lr_step_epochs: float | None = field(
        default=None, metadata={"help": "Step schedule: multiply the LR by lr_step_gamma every this many epochs."}
    )
    lr_step_gamma: float = field(default=0.5, metadata={"help": "Factor of the step schedule (lr_step_epochs)."})
    classifier_layer: str | None = field(
        default=None, metadata={"help": "Name of the model's last linear layer, if hf_robust cannot find it."}
    )
    cam_target_layer: str | None = field(
        default=None, metadata={"help": "Name of the CAM target layer, if hf_robust does not know the model."}
    )
    save_plots: bool = field(default=True, metadata={"help": "Write report plots into output_dir/plots."})
    group_inference: str = field(
        default="on", metadata={"help": "'on': report the minority the ERM stage's errors and gradient norms point "
                                        "to (results.json, card, plot); 'off'."}
    )
    on_worse: str = field(
        default="warn",
        metadata={"help": "When the final model is worse than its ERM stage on validation: warn, keep, "
                          "fallback_to_erm or error."},
    )
    health_margin: float = field(
        default=0.02, metadata={"help": "Validation worst-class accuracy drop that counts as worse (0.02 = 2 points)."}
    )
    health_split: str = field(default="validation", metadata={"help": "Eval split of the health check."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace a finished run in output_dir (refused otherwise; the old run stays until the new "
                          "one has saved everything)."},
    )

    @classmethod
    def unrecorded_fields(cls) -> frozenset[str]:
        """The `UNRECORDED_FIELDS` every class of this config's hierarchy names (mixins included)."""
        return frozenset(name for klass in cls.__mro__ for name in vars(klass).get("UNRECORDED_FIELDS", ()))

    def __post_init__(self):
        super().__post_init__()
        if self.dataloader_pin_memory and self.device.type == "cpu":
            # pinning has nothing to pin to on a CPU run; torch warns on every DataLoader otherwise
            self.dataloader_pin_memory = False
        if self.train_augmentation not in ("none", "flip", "crop_flip"):
            raise ValueError(
                f"train_augmentation={self.train_augmentation!r}: expected 'none', 'flip' or 'crop_flip'."
            )
        if self.lr_step_epochs is not None and (self.lr_step_epochs <= 0 or not 0 < self.lr_step_gamma <= 1):
            raise ValueError(f"lr_step_epochs={self.lr_step_epochs}, lr_step_gamma={self.lr_step_gamma}: expected a "
                             "positive number of epochs and a factor in (0, 1].")
        if self.balanced_sampling not in ("none", "class", "group"):
            raise ValueError(f"balanced_sampling={self.balanced_sampling!r}: expected 'none', 'class' or 'group'.")
        if self.on_worse not in ("keep", "warn", "fallback_to_erm", "error"):
            raise ValueError(
                f"on_worse={self.on_worse!r}: expected 'keep', 'warn', 'fallback_to_erm' or 'error'."
            )
        if self.group_inference not in ("on", "off"):
            raise ValueError(f"group_inference={self.group_inference!r}: expected 'on' or 'off'.")
        if not 0 <= self.health_margin < 1:
            raise ValueError(f"health_margin={self.health_margin}: expected a fraction in [0, 1).")
        if self.remove_unused_columns:
            raise ValueError(
                "remove_unused_columns=True would drop `group` and `example_idx`, which hf_robust needs; leave it False "
                "(the collator passes only the model's inputs to the model)."
            )


@dataclass
class ErmCheckpointArguments:
    r"""
    A dataclass mixin for the config of a method that starts from a trained model: listed before `RobustConfig`
    (`class MyConfig(ErmCheckpointArguments, RobustConfig)`), it adds

        erm_checkpoint (`str` or `None`, *optional*):
            Folder of a trained model (`save_pretrained` layout) that the method's first training stage
            (`RobustTrainer.train_or_load_checkpoint`, e.g. the `erm` stage of `erm_baseline_stage`) loads instead
            of training.
    """

    erm_checkpoint: str | None = field(
        default=None, metadata={"help": "Start from this trained model instead of ERM."}
    )


def erm_checkpoint_of(args: TrainingArguments) -> str | None:
    """The `erm_checkpoint` of a config with `ErmCheckpointArguments`; None for any other config."""
    return args.erm_checkpoint if isinstance(args, ErmCheckpointArguments) else None
