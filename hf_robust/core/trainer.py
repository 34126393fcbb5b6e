"""`RobustTrainer`: ERM with group-aware evaluation, and the base every hf_robust method builds on.

The trainer itself checks the model and the data before anything is built, collates batches (augmentation for
training only), computes the loss, evaluates every split by group (worst-group accuracy) and saves the run. Its
mixins hold the rest, each in its own module:

- `stages.StageEngine`: a method is a list of named, resumable stages (`stages()`, `train()`, `train_stage`);
- `checkpoints.CheckpointIO`: the model's state and the stages' outputs on disk, `erm_checkpoint` loading;
- `selection.HealthAndSelection`: the health check every run ends with, and the label-free selection;
- `per_example.PerExamplePass`: per-example outputs over processes (`compute_per_example`);
- `report.RunReport`: results.json, plots, the model card and the push to the Hub.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

import torch
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_utils import EvalPrediction

from ..data.core import DataValidationError, check_classes, validate_group_dataset
from ..data.preprocessing import GroupDataCollator, ImagePreprocessing
from ..models.adapter import EXAMPLE_IDX_FLAG, get_adapter, unwrap_model
from ..models.timm_wrap import maybe_wrap_timm
from .checkpoints import RunSetupError
from .config import RobustConfig
from .evaluation import EVALUATION_KEYS, evaluation_meta, group_metrics, split_report
from .per_example import PerExamplePass
from .report import HubPushError, RunReport
from .run_folder import hold_output_dir, is_disk_full, release_output_dir, swap_in, unwritable_output_dir
from .sampling import balanced_sampler
from .selection import HealthAndSelection
from .stages import INITIAL_STAGE, Stage, StageEngine

# the public names of this module before its mixins moved out (methods and user code import them from here)
__all__ = ["HubPushError", "INITIAL_STAGE", "OutputWriteError", "RobustTrainer", "RunSetupError", "Stage"]

logger = logging.getLogger(__name__)


class OutputWriteError(OSError):
    """The final save failed for lack of space (or quota); the output folder keeps what it held before."""


def _model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


class RobustTrainer(StageEngine, HealthAndSelection, PerExamplePass, RunReport, Trainer):
    """Trainer for ERM that evaluates every split by worst-group accuracy, and the base of every method.

    Args:
        model: a transformers model (BERT-style encoder, ViT, ResNet, TimmWrapper...), a timm model, or either
            wrapped by peft.
        args: a [`RobustConfig`].
        train_dataset: a split in the hf_robust data model (see `hf_robust.data.as_group_dataset`).
        eval_dataset: a split or a dict of named splits; each is reported as `eval_<split>_<metric>`.
        processing_class: the tokenizer (text) or image processor (images; optional for timm models, whose data
            config is used).
        dataset_name, model_name_or_path: for the model card.
    """

    _tag_names = ["hf_robust", "erm"]
    _name = "ERM"
    _config_class = RobustConfig  # each method's trainer names its config class
    _paper: dict | None = None
    _summary = (
        "Empirical risk minimisation: plain fine-tuning, the baseline that spurious correlations hurt. Its worst "
        "group shows how much the model leans on the shortcut."
    )
    # adapter pieces the method needs (checked before any training), e.g. ("cam_layer",) for class activation maps
    _requires: tuple[str, ...] = ()
    # input kinds the method accepts
    _input_kinds: tuple[str, ...] = ("image", "text", "text_pair")

    @classmethod
    def _resolve_args(cls, args):
        """The method's default config when `args` is None; a TypeError when it is not the method's config."""
        if args is None:
            return cls._config_class(output_dir=f"{cls._name.lower().replace('-', '_')}_output")
        if not isinstance(args, cls._config_class):
            raise TypeError(f"{cls.__name__} needs a {cls._config_class.__name__} (or a subclass), got "
                            f"{type(args).__name__}.")
        return args

    def __init__(
        self,
        model: nn.Module,
        args: RobustConfig | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class=None,
        data_collator=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        dataset_name: str | None = None,
        model_name_or_path: str | None = None,
        **kwargs,
    ):
        args = self._resolve_args(args)
        model = maybe_wrap_timm(model)
        if args.world_size > 1:  # BatchNorm over the global batch, as one process computes it
            from .sync_norm import sync_batch_norm

            unsynced = sync_batch_norm(model)
            if unsynced:
                logger.warning(
                    "BatchNorm-like layers %s are not synchronised across the %d processes: this run will differ "
                    "from a one-process run.", unsynced[:3], args.world_size,
                )
        self.adapter = get_adapter(model, classifier=args.classifier_layer, target_layer=args.cam_target_layer)
        self.adapter.require("classifier", *self._requires)
        self.input_kind = self._validate_datasets(model, train_dataset, eval_dataset)
        self.adapter.require(*self.required_adapter_pieces(self.input_kind))
        self.dataset_name = dataset_name or "custom"
        self.model_name_or_path = model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", None)

        if data_collator is None:
            image_preprocessing = None
            if self.input_kind == "image":
                image_preprocessing = ImagePreprocessing.for_model(model, processing_class)
            data_collator = GroupDataCollator(
                self.input_kind,
                image_preprocessing=image_preprocessing,
                tokenizer=processing_class if self.input_kind != "image" else None,
                max_length=args.max_length,
            )
        if isinstance(data_collator, GroupDataCollator):
            # evaluation, CAMs, masks and cached features never see augmentation; training gets the config's,
            # or the one the given collator was built with
            augmentation = args.train_augmentation
            if data_collator.augmentation != "none":
                if augmentation not in ("none", data_collator.augmentation):
                    raise ValueError(
                        f"The data_collator augments with {data_collator.augmentation!r} but train_augmentation is "
                        f"{augmentation!r}: set one of them."
                    )
                augmentation = data_collator.augmentation
            data_collator = data_collator.with_options(augmentation="none")
            self.train_collator = data_collator.with_options(augmentation=augmentation)
        else:
            self.train_collator = data_collator
        self.eval_collator = data_collator
        try:  # (transformers' Trainer creates it: an unwritable folder is refused here, before any training)
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise unwritable_output_dir(Path(args.output_dir), error) from error
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics or self._compute_group_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            **kwargs,
        )
        # losses here are per-batch means; the Trainer must not rescale them by token counts
        self.model_accepts_loss_kwargs = False
        self._metric = None
        self.eval_results: dict[str, dict] = {}
        self.stage_results: dict[str, dict[str, dict]] = {}
        self.stage_log_history: dict[str, list] = {}
        self.finished_stages: list[str] = []
        self.skipped_stages: list[str] = []
        self._train_output = None
        self._uses_erm_baseline = False  # set by erm_baseline_stage(): the health check's reference is ERM
        self.health: dict = {}
        self._holds_output_dir = False
        self._wrote_finished_run = False
        self._staging_dir: Path | None = None  # where the final save writes (a temporary folder in the target)
        self._final_output_dir: Path | None = None  # the folder it is for (names in the card)

    # ------------------------------------------------------------------ validation
    def required_adapter_pieces(self, input_kind: str) -> tuple[str, ...]:
        """Adapter pieces the method needs for data of this kind, checked before anything else is built."""
        return ()

    def _validate_datasets(self, model, train_dataset, eval_dataset) -> str:
        config = getattr(unwrap_model(model), "config", None)
        num_labels = getattr(config, "num_labels", None) or self.adapter.classifier.out_features
        splits = {}
        if train_dataset is not None:
            splits["train_dataset"] = train_dataset
        if isinstance(eval_dataset, dict):
            splits.update({f"eval_dataset[{k!r}]": v for k, v in eval_dataset.items()})
        elif eval_dataset is not None:
            splits["eval_dataset"] = eval_dataset
        kinds = {name: validate_group_dataset(split, name, num_labels=num_labels) for name, split in splits.items()}
        if train_dataset is not None and num_labels:
            check_classes(train_dataset, "train_dataset", num_labels)
        found = set(kinds.values())
        if len(found) > 1:
            raise DataValidationError(f"The splits have different input kinds: {kinds}.")
        kind = found.pop() if found else self.adapter.input_kind
        model_kind = "image" if self.adapter.input_kind == "image" else "text"
        if ("image" if kind == "image" else "text") != model_kind:
            raise DataValidationError(
                f"The data has {kind} inputs but {type(unwrap_model(model)).__name__} is a {model_kind} model."
            )
        if kind not in self._input_kinds:
            raise DataValidationError(
                f"{type(self).__name__} ({self._name}) works on {' / '.join(self._input_kinds)} inputs; the data has "
                f"{kind} inputs."
            )
        return kind

    # ------------------------------------------------------------------ batches and loss
    def model_inputs(self, inputs: dict) -> dict:
        """The batch minus hf_robust's bookkeeping columns (`example_idx` stays for models that use it)."""
        uses_idx = getattr(unwrap_model(self.model), EXAMPLE_IDX_FLAG, False)
        return {k: v for k, v in inputs.items() if k not in EVALUATION_KEYS and (uses_idx or k != "example_idx")}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**self.model_inputs(inputs))
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        meta = evaluation_meta(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = model(**self.model_inputs(inputs))
        loss = outputs["loss"].detach() if outputs.get("loss") is not None else None
        if not prediction_loss_only and self.compute_metrics == self._compute_group_metrics:
            # the loss is computed there from the gathered logits: exact under N processes, where a batch mean
            # taken here would count the duplicates that pad the last batch
            loss = None
        return loss, None if prediction_loss_only else outputs["logits"].detach(), meta

    def get_train_dataloader(self) -> DataLoader:
        eval_collator, self.data_collator = self.data_collator, self.train_collator
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = eval_collator

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """transformers' schedulers, or with `lr_step_epochs` a step schedule: the learning rate times
        `lr_step_gamma` after every `lr_step_epochs` epochs of optimizer steps."""
        if self.args.lr_step_epochs is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        epochs = self.args.num_train_epochs if self.args.max_steps <= 0 else None
        steps_per_epoch = num_training_steps / epochs if epochs else len(self.get_train_dataloader())
        steps_per_step = max(1.0, steps_per_epoch * self.args.lr_step_epochs)
        gamma = self.args.lr_step_gamma
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer if optimizer is not None else self.optimizer,
            lambda step: gamma ** int((step + 1e-9) // steps_per_step),
        )
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def _get_train_sampler(self, train_dataset=None):
        if self.args.balanced_sampling == "none":
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return balanced_sampler(dataset, self.args.balanced_sampling, seed=self.args.seed)

    # ------------------------------------------------------------------ evaluation and results
    @property
    def metric(self):
        if self._metric is None:
            import evaluate

            from ..resources import metric_path

            self._metric = evaluate.load(metric_path("worst_group_accuracy"), keep_in_memory=True)
        return self._metric

    def _compute_group_metrics(self, eval_pred: EvalPrediction) -> dict[str, float]:
        return group_metrics(self.metric, eval_pred)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        dataset = self.eval_dataset[eval_dataset] if isinstance(eval_dataset, str) else eval_dataset
        if dataset is None:
            dataset = self.eval_dataset
        if isinstance(dataset, Dataset):
            split = metric_key_prefix[len("eval_") :] if metric_key_prefix.startswith("eval_") else metric_key_prefix
            self.eval_results[split] = split_report(metrics, metric_key_prefix, dataset)
        return metrics

    def record_stage_results(self, stage: str) -> None:
        """Keep the current evaluation results under `stage` (e.g. the ERM model before a method changes it)."""
        self.stage_results[stage] = copy.deepcopy(self.eval_results)

    def results(self) -> dict:
        selection = self.selection_record()
        if selection is not None:
            chosen = selection["candidates"][selection["chosen"]]["knobs"]
            helped, note = self.selection_outcome(chosen)
            selection = {**selection, "chosen_knobs": chosen, "method_helped": helped, "note": note}
        return {
            "method": self._name,
            "trainer": type(self).__name__,
            "model": self.model_name_or_path,
            "dataset": self.dataset_name,
            **self.data_provenance(),
            "seed": self.args.seed,
            "num_processes": self.args.world_size,
            "splits": self.eval_results,
            "stages": self.stage_results,
            "finished_stages": self.finished_stages,
            "skipped_stages": self.skipped_stages,
            "health": self.health,
            **({"selection": selection} if selection is not None else {}),
            **{k: v for hook in self.run_hooks() for k, v in hook.results().items()},
        }

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Save the model; a call from user code (not a checkpoint) also writes results.json, plots and the
        model card, evaluating the model first if it was not evaluated since its training. Pushing happens only
        in `push_to_hub`.

        From user code, everything is written into a temporary folder inside `output_dir` and swapped in when
        all of it is written (`hf_robust.core.run_folder.swap_in`): a failure (e.g. a full disk, `OutputWriteError`)
        leaves the folder as it was. The run's lock on `output_dir` is released afterwards."""
        if _internal_call or self._staging_dir is not None:
            super().save_model(output_dir, _internal_call=True)
            if not _internal_call:
                self.write_report(output_dir)
            return
        if not self.eval_results and self.eval_dataset is not None:
            self.evaluate()
        target = Path(output_dir or self.args.output_dir)
        own = target.resolve() == Path(self.args.output_dir).resolve()
        if own:
            self.claim_output_dir(resume=True)  # a model saved without train(): the folder is this run's too
        elif self.is_world_process_zero():
            hold_output_dir(target)
        try:
            self._save_final(target)
        finally:
            if own:
                self.release_output_dir()
            elif self.is_world_process_zero():
                release_output_dir(target)

    def _save_final(self, target: Path) -> None:
        from .run_folder import new_staging_dir

        staging = [str(new_staging_dir(target)) if self.is_world_process_zero() else None]
        if self.args.world_size > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(staging)
        self._staging_dir, self._final_output_dir = Path(staging[0]), target
        try:
            self.save_model(staging[0])  # the whole save, subclasses' additions included, into the staging folder
            if self.is_world_process_zero():
                swap_in(self._staging_dir, target)
                self._wrote_finished_run = True
        except Exception as error:
            if self.is_world_process_zero():
                shutil.rmtree(self._staging_dir, ignore_errors=True)
            if is_disk_full(error):
                needed = _model_bytes(self.accelerator.unwrap_model(self.model))
                free = shutil.disk_usage(target).free
                raise OutputWriteError(
                    f"No space left on the device of {target} while saving the model, results.json, card and plots "
                    f"(they need about {needed / 2**20:.0f} MiB for the weights alone, plus a few MiB; "
                    f"{free / 2**20:.0f} MiB are free now). Nothing in {target} was changed: free some space (or "
                    "pick another --output_dir) and resume the run (--resume_from_checkpoint true): its finished "
                    "stages are kept."
                ) from error
            raise
        finally:
            self._staging_dir = self._final_output_dir = None
        self.accelerator.wait_for_everyone()

