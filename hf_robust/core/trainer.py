"""`RobustTrainer`: ERM with group-aware evaluation, and the stage machinery every hf_robust method builds on.

A method is a list of named *stages* (ERM -> masks -> fine-tune, ERM -> scores -> select -> last layer, ...).
Each stage writes its outputs atomically into `output_dir/stages/<name>/` and a completion marker last; a
run started with `resume_from_checkpoint` skips every finished stage (restoring its outputs instead) and
resumes a training stage from its last checkpoint. Per-example outputs (CAMs, gradient norms, features) are
computed by `compute_per_example`, a sequential pass sharded over processes whose results are gathered and
ordered by `example_idx`, so N processes give exactly the result of one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader, SequentialSampler, WeightedRandomSampler
from transformers import Trainer
from transformers.trainer_utils import EvalPrediction, get_last_checkpoint

from ..models.adapter import EXAMPLE_IDX_FLAG, UnsupportedModelError, get_adapter, unwrap_model
from ..data.core import DataValidationError, check_classes, group_names, validate_group_dataset
from .files import publish
from .run_folder import (
    OutputDirError,
    OutputDirLock,
    is_disk_full,
    is_finished_run,
    normalise_permissions,
    refuse_finished_run,
    remove_leftovers,
    swap_in,
    unwritable_output_dir,
)
from ..data.preprocessing import GroupDataCollator, ImagePreprocessing
from .config import RobustConfig
from .health import HealthCheckError, assess, format_health, prediction_summary, selection_score

STAGES_DIR = "stages"
# what a push leaves out: the stages' outputs, the Trainer's checkpoints, temporary files
HUB_IGNORE_PATTERNS = ("_*", "checkpoint-*", f"{STAGES_DIR}/*", f"{STAGES_DIR}/**")
logger = logging.getLogger(__name__)

STAGE_MARKER = "stage.json"
INITIAL_STAGE = "initial"  # the model as given to a method without an ERM stage, for the health check
STAGE_SETTINGS = "settings.json"  # what an interrupted training stage was started with
RESULTS_NAME = "results.json"


class RunSetupError(ValueError):
    """A run that cannot start as asked (a resume or a checkpoint that does not fit it), raised before training."""


class HubPushError(RuntimeError):
    """Pushing to the Hub failed; everything was saved locally first."""


class OutputWriteError(OSError):
    """The final save failed for lack of space (or quota); the output folder keeps what it held before."""


# output folders this process holds, with the number of trainers holding each: one process may run several
# trainers into one folder one after another (a notebook, a resume); another process may not
_HELD_OUTPUT_DIRS: dict[Path, list] = {}


def _hold_output_dir(folder: Path) -> None:
    key = folder.resolve()
    if key not in _HELD_OUTPUT_DIRS:
        _HELD_OUTPUT_DIRS[key] = [OutputDirLock(folder).acquire(), 0]
    _HELD_OUTPUT_DIRS[key][1] += 1


def _release_output_dir(folder: Path) -> None:
    key = folder.resolve()
    held = _HELD_OUTPUT_DIRS.get(key)
    if held is not None:
        held[1] -= 1
        if held[1] <= 0:
            del _HELD_OUTPUT_DIRS[key]
            held[0].release()


def _model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@dataclass
class Stage:
    """One step of a method. `run(stage_dir, resume)` computes and writes the stage's outputs; `load(stage_dir)`
    restores them when a resumed run skips the finished stage."""

    name: str
    run: Callable[[Path, bool], None]
    load: Callable[[Path], None] | None = None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    publish(tmp, path)



def atomic_write_json(path: Path, obj, strict: bool = False) -> None:
    """`strict`: standard JSON, an undefined value (NaN, e.g. the worst group of data without groups) as null."""
    if strict:
        obj = _finite_or_none(obj)
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default, allow_nan=not strict)
    atomic_write_bytes(Path(path), text.encode())


def _finite_or_none(value):
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return str(value)


@contextlib.contextmanager
def frozen_norm_statistics(model: nn.Module):
    """Within the block, BatchNorm layers of `model` stay in evaluation mode even when the Trainer calls
    `model.train()`: they normalise with, and keep, their running statistics (their affine weights still train).
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in layers]

    def eval_only(self, mode: bool = True):
        return nn.Module.train(self, False)

    for layer in layers:
        layer.train = eval_only.__get__(layer)
        layer.training = False
    try:
        yield layers
    finally:
        for layer, mode in zip(layers, modes):
            del layer.train
            layer.training = mode


def maybe_wrap_timm(model: nn.Module, model_args: dict | None = None) -> nn.Module:
    """A raw timm classifier -> transformers' TimmWrapperForImageClassification around the same module, so it
    takes `pixel_values`/`labels`, computes its loss and saves/loads like any transformers model.

    `model_args`: the keyword arguments the timm model was created with beyond its architecture's defaults
    (saved in the config, so that `from_pretrained` rebuilds the same model); a ViT's `img_size` is found by
    itself. A model that `from_pretrained` would not rebuild gets a warning naming what differs."""
    if type(model).__name__ == "PeftModel" or hasattr(model, "peft_config"):
        base = model.get_base_model() if hasattr(model, "get_base_model") else None
        if base is not None and not hasattr(base, "config") and hasattr(base, "pretrained_cfg"):
            raise UnsupportedModelError(
                "peft was applied to a raw timm model: its saved folder would not load with from_pretrained. Wrap "
                "the timm model first, then apply peft: get_peft_model(maybe_wrap_timm(timm_model), lora_config) "
                "(maybe_wrap_timm from hf_robust.core.trainer)."
            )
    if hasattr(model, "config") or not (hasattr(model, "pretrained_cfg") and hasattr(model, "forward_head")):
        return model
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    pretrained_cfg = {k: v for k, v in dict(model.pretrained_cfg).items() if k != "num_classes"}
    architecture = pretrained_cfg.get("architecture", type(model).__name__.lower())
    model_args = dict(model_args or {})
    image_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if image_size is not None and "img_size" not in model_args:
        model_args["img_size"] = list(image_size)
    config = TimmWrapperConfig(
        architecture=architecture, num_labels=model.num_classes, pretrained_cfg=pretrained_cfg,
        model_args=model_args or None,
    )
    _warn_if_not_rebuilt(model, architecture, model_args)
    with torch.device("meta"):
        wrapper = TimmWrapperForImageClassification(config)
    wrapper.timm_model = model
    return wrapper


def _warn_if_not_rebuilt(model: nn.Module, architecture: str, model_args: dict) -> None:
    """Warn when `timm.create_model(architecture, **model_args)` has other parameter shapes than `model`."""
    import timm

    try:
        with torch.device("meta"):
            rebuilt = timm.create_model(architecture, pretrained=False, num_classes=model.num_classes, **model_args)
    except Exception as error:  # an architecture timm does not register under that name
        logger.warning("timm cannot rebuild %r (%s): the saved model may not reload.", architecture, error)
        return
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if mine != theirs:
        differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))[:3]
        logger.warning(
            "This timm model differs from timm.create_model(%r, **%s) (e.g. %s): the saved folder will not reload "
            "with from_pretrained. Pass the arguments it was created with: maybe_wrap_timm(model, model_args={...}), "
            "or wrap it yourself in TimmWrapperForImageClassification.", architecture, model_args, differ,
        )


class EpochSeededWeightedSampler(WeightedRandomSampler):
    """`WeightedRandomSampler` whose draw is a pure function of (seed, epoch).

    The Trainer calls `set_epoch(epoch)` before each epoch (accelerate forwards it through its batch-sampler
    shards), so epoch k draws the same indices in an uninterrupted run, in a resumed one (which does not replay
    the finished epochs) and on every process. Iterating without `set_epoch` moves to the next epoch's draw.
    """

    def __init__(self, weights, num_samples: int, seed: int):
        super().__init__(weights, num_samples, replacement=True)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(2, dtype=np.uint32)
        self.generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        yield from super().__iter__()
        self.epoch += 1


class RobustTrainer(Trainer):
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
    # adapter pieces the method needs (checked before any training): e.g. ("cam_layer",) for MaskTune
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
        return {k: v for k, v in inputs.items() if k != "group" and (uses_idx or k != "example_idx")}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**self.model_inputs(inputs))
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        meta = (inputs["labels"], inputs["group"], inputs["example_idx"])
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
        mode = self.args.balanced_sampling
        if mode == "none":
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        keys = np.asarray(dataset["label" if mode == "class" else "group"])
        if (keys < 0).any():
            raise DataValidationError(
                "balanced_sampling='group' needs a group label on every training example; some are -1. Use "
                "balanced_sampling='class' for data without group labels."
            )
        weights = 1.0 / np.bincount(keys)[keys]
        return EpochSeededWeightedSampler(torch.as_tensor(weights), len(dataset), seed=self.args.seed)

    # ------------------------------------------------------------------ metrics and reports
    @property
    def metric(self):
        if self._metric is None:
            import evaluate

            from ..resources import metric_path

            self._metric = evaluate.load(metric_path("worst_group_accuracy"), keep_in_memory=True)
        return self._metric

    def _compute_group_metrics(self, eval_pred: EvalPrediction) -> dict[str, float]:
        labels, groups, _ = eval_pred.label_ids
        logits = eval_pred.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        metrics = self.metric.compute(
            predictions=np.asarray(logits).argmax(-1), references=np.asarray(labels), groups=np.asarray(groups)
        )
        if len(labels):  # the mean cross-entropy over every example once (see prediction_step)
            log_probs = torch.as_tensor(np.asarray(logits), dtype=torch.float64).log_softmax(-1)
            targets = torch.as_tensor(np.asarray(labels), dtype=torch.long)
            metrics["loss"] = float(-log_probs.gather(1, targets[:, None]).mean())
        return metrics

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        dataset = self.eval_dataset[eval_dataset] if isinstance(eval_dataset, str) else eval_dataset
        if dataset is None:
            dataset = self.eval_dataset
        if isinstance(dataset, Dataset):
            split = metric_key_prefix[len("eval_") :] if metric_key_prefix.startswith("eval_") else metric_key_prefix
            self.eval_results[split] = self._split_report(metrics, metric_key_prefix, dataset)
        return metrics

    @staticmethod
    def _split_report(metrics: dict, prefix: str, dataset: Dataset) -> dict:
        names = group_names(dataset)
        strip = {k[len(prefix) + 1 :]: v for k, v in metrics.items() if k.startswith(prefix + "_")}
        report = {
            k: strip[k]
            for k in ("accuracy", "worst_group_accuracy", "mean_group_accuracy", "worst_class_accuracy", "loss")
            if k in strip
        }
        report["num_examples"] = len(dataset)
        report["groups"] = {}
        for key, value in strip.items():
            if key.startswith("group_") and key.endswith("_accuracy"):
                g = int(key[len("group_") : -len("_accuracy")])
                name = names[g] if g < len(names) else f"group_{g}"
                report["groups"][name] = {"accuracy": value, "count": int(strip.get(f"group_{g}_count", 0))}
        return report

    def record_stage_results(self, stage: str) -> None:
        """Keep the current evaluation results under `stage` (e.g. the ERM model before MaskTune)."""
        self.stage_results[stage] = copy.deepcopy(self.eval_results)

    # the label-free selection's record (`run_candidates`), set by a method's `select` stage
    selection: dict | None = None

    def selection_outcome(self, knobs: dict) -> tuple[bool, str]:
        """(whether the chosen `knobs` are the method, not its unchanged model; the note that says so), for the
        report of a method with a `select` stage."""
        raise NotImplementedError(f"{type(self).__name__} has a selection but no selection_outcome().")

    def selection_record(self) -> dict | None:
        """The selection as reported (results.json, plots/selection.png): `self.selection` unless a method adds
        choices made after its `select` stage."""
        return self.selection

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
            "seed": self.args.seed,
            "num_processes": self.args.world_size,
            "splits": self.eval_results,
            "stages": self.stage_results,
            "finished_stages": self.finished_stages,
            "skipped_stages": self.skipped_stages,
            "health": self.health,
            **({"selection": selection} if selection is not None else {}),
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
            _hold_output_dir(target)
        try:
            self._save_final(target)
        finally:
            if own:
                self.release_output_dir()
            elif self.is_world_process_zero():
                _release_output_dir(target)

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

    def write_report(self, output_dir: str | None = None) -> None:
        if not self.is_world_process_zero():
            return
        output_dir = Path(output_dir or self.args.output_dir)
        plot_files = []
        if self.args.save_plots and self.eval_results:
            from ..reporting.plots import plot_group_accuracies

            runs = {stage: splits for stage, splits in self.stage_results.items()}
            runs[self._name] = self.eval_results
            plot_group_accuracies(runs, output_dir / "plots" / "group_accuracy.png", title=self.dataset_name)
            selection = self.selection_record()
            if selection is not None:
                from ..reporting.plots import plot_selection

                plot_selection(selection, output_dir / "plots" / "selection.png",
                               title=f"{self._name}: label-free selection (candidate 0 = the unchanged model)")
            plot_files = sorted(str(p.relative_to(output_dir)) for p in (output_dir / "plots").glob("*.png"))
        results = self.results()
        card = self.create_model_card_object(results, plot_files, output_dir=output_dir)
        atomic_write_bytes(output_dir / "README.md", str(card).encode())
        atomic_write_json(output_dir / RESULTS_NAME, results, strict=True)  # last: marks a finished report

    def method_hyperparameters(self) -> dict:
        """Hyperparameters shown in the model card: the method's own config fields and the main training ones."""
        from dataclasses import fields

        base = {f.name for f in fields(RobustConfig)}
        mine = {f.name: getattr(self.args, f.name) for f in fields(self.args) if f.name not in base}
        common = (
            "learning_rate", "num_train_epochs", "per_device_train_batch_size", "weight_decay", "lr_scheduler_type",
            "warmup_steps", "seed", "optim", "balanced_sampling", "train_augmentation",
        )
        hyper = {k: getattr(self.args, k) for k in common}
        hyper["world_size"] = self.args.world_size
        hyper.update(mine)
        return {k: v for k, v in hyper.items() if v is not None}

    def usage_snippet(self, repo: str) -> str:
        """The model card's "how to use" code for the saved model."""
        auto = "AutoModelForImageClassification" if self.input_kind == "image" else "AutoModelForSequenceClassification"
        return f'from transformers import {auto}\n\nmodel = {auto}.from_pretrained("{repo}")'

    def create_model_card_object(
        self, results: dict | None = None, plot_files: list[str] | None = None, output_dir: str | Path | None = None
    ):
        """The model card of the model saved in `output_dir` (default: the run's output_dir)."""
        from ..reporting.modelcard import build_model_card

        results = results or self.results()
        if self._staging_dir is not None and output_dir is not None and Path(output_dir) == self._staging_dir:
            output_dir = self._final_output_dir  # the card names the folder it is saved for, not its staging
        repo = self.args.hub_model_id or Path(output_dir or self.args.output_dir).absolute().name
        usage = self.usage_snippet(repo)
        baseline = next(iter(self.stage_results), None)
        return build_model_card(
            model_name=repo.split("/")[-1],
            results=results,
            trainer_class=type(self).__name__,
            method_name=self._name,
            method_summary=self._summary,
            tags=list(dict.fromkeys(self._tag_names + list(getattr(self.model, "model_tags", None) or []))),
            paper=self._paper,
            dataset_name=self.dataset_name,
            base_model=self.model_name_or_path,
            task_type="image-classification" if self.input_kind == "image" else "text-classification",
            hyperparameters=self.method_hyperparameters(),
            usage=usage,
            plot_files=plot_files or [],
            baseline_name=baseline,
        )

    def create_model_card(self, *args, **kwargs) -> None:
        """Trainer calls this on push; hf_robust's card (written by `write_report`) replaces the generic one."""
        self.write_report()

    # ------------------------------------------------------------------ Hub
    def init_hf_repo(self, token=None, private=None) -> None:
        # The Trainer creates the Hub repo at __init__ when push_to_hub=True: with no network that would fail
        # before training. hf_robust creates it in push_to_hub(), after everything is saved locally.
        return None

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # Checkpoints are not pushed while training (hub_strategy is ignored): a run pushes once, at the end.
        return None

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, token=None,
                    revision=None, private=None, **kwargs):
        """Save the model, results, plots and card locally, then upload `output_dir` (no stages/checkpoints).

        Raises `HubPushError` (with what was saved and how to push later) if the upload fails, e.g. offline.
        """
        self.save_model()
        if not self.is_world_process_zero():
            return None
        from huggingface_hub import HfApi

        repo_id = self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        token = token if token is not None else self.args.hub_token
        try:
            api = HfApi()
            repo = api.create_repo(repo_id, token=token, private=private or self.args.hub_private_repo, exist_ok=True)
            return api.upload_folder(
                repo_id=repo.repo_id,
                folder_path=self.args.output_dir,
                commit_message=commit_message,
                token=token,
                revision=revision or self.args.hub_revision,
                run_as_future=not blocking,
                ignore_patterns=list(HUB_IGNORE_PATTERNS),
            )
        except Exception as error:  # offline (OfflineModeIsEnabled is an OSError; httpx errors are not), auth, ...
            raise HubPushError(
                f"Could not push {self.args.output_dir} to the Hub as {repo_id!r}: {type(error).__name__}: {error}. "
                f"The model, results.json, plots and README.md are saved in {self.args.output_dir}; push them "
                f"later with `hf upload {repo_id} {self.args.output_dir} "
                + " ".join(f"--exclude '{p}'" for p in HUB_IGNORE_PATTERNS) + "` (the stages and checkpoints stay local)."
            ) from error

    # ------------------------------------------------------------------ stages
    def stages(self) -> list[Stage]:
        """The method's stages, in order. ERM is the one-stage case."""
        return [Stage("erm", self._run_erm_stage, self.load_model_state)]

    def stage_dir(self, name: str) -> Path:
        return Path(self.args.output_dir) / STAGES_DIR / name

    def stage_finished(self, name: str) -> bool:
        return (self.stage_dir(name) / STAGE_MARKER).is_file()

    def _mark_stage_finished(self, name: str, seconds: float) -> None:
        if self.is_world_process_zero():
            atomic_write_json(
                self.stage_dir(name) / STAGE_MARKER,
                {"stage": name, "method": self._name, "seed": self.args.seed, "seconds": round(seconds, 3),
                 "world_size": self.args.world_size, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                 "settings": self.run_settings()},
            )
            normalise_permissions(self.stage_dir(name))  # safetensors writes its files owner-only
        self.accelerator.wait_for_everyone()

    # settings of the config that change no stage's outputs (where and how a run is saved, logged, shown)
    _SETTINGS_IGNORED = frozenset({"save_plots", "plot_examples", "cam_examples_per_group", "export_model",
                                   "on_worse", "health_margin", "health_split", "overwrite_output_dir"})
    # TrainingArguments settings that change what a stage computes (the per-device batch size enters as the
    # global batch: a run may resume on another number of processes)
    _TRAINING_SETTINGS = (
        "learning_rate", "num_train_epochs", "max_steps", "weight_decay", "lr_scheduler_type", "lr_scheduler_kwargs",
        "lr_step_epochs", "lr_step_gamma", "warmup_steps", "warmup_ratio", "optim", "optim_args", "adam_beta1", "adam_beta2", "adam_epsilon",
        "max_grad_norm", "gradient_accumulation_steps", "seed", "data_seed", "label_smoothing_factor", "bf16", "fp16",
    )

    def run_settings(self) -> dict:
        """What the stages' outputs depend on: the method's own config fields, the training settings, the model,
        the size of the training set. Recorded with every finished stage; a resume must match it."""
        from dataclasses import fields

        from transformers import TrainingArguments

        def plain(value):
            value = getattr(value, "value", value)  # enums (scheduler, optimizer names)
            try:
                return json.loads(json.dumps(value))
            except TypeError:
                return repr(value)

        base = {f.name for f in fields(TrainingArguments)}
        names = [f.name for f in fields(self.args) if f.name not in base and f.name not in self._SETTINGS_IGNORED]
        names += [n for n in self._TRAINING_SETTINGS if hasattr(self.args, n)]
        settings = {name: plain(getattr(self.args, name)) for name in names}
        settings["global_train_batch_size"] = self.args.per_device_train_batch_size * self.args.world_size
        settings["model"] = self.model_name_or_path
        settings["train_examples"] = None if self.train_dataset is None else len(self.train_dataset)
        return settings

    def _check_stage_marker(self, name: str) -> None:
        marker = json.loads((self.stage_dir(name) / STAGE_MARKER).read_text())
        if marker.get("seed") != self.args.seed or marker.get("method") != self._name:
            raise RunSetupError(
                f"{self.stage_dir(name)} holds a finished {marker.get('method')!r} stage {name!r} with seed "
                f"{marker.get('seed')}, but this run is {self._name!r} with seed {self.args.seed}: resume with the "
                "same settings, or use a new output_dir."
            )
        allowed = ()
        if name == INITIAL_STAGE:  # the model as given depends on the model and seed only, not on training settings
            allowed = tuple(k for k in (marker.get("settings") or {}) if k not in ("model", "seed"))
        self._check_settings(marker.get("settings"), f"{self.stage_dir(name)} holds a finished stage {name!r}",
                             "resuming would reuse its outputs", allowed=allowed)

    def _check_settings(self, recorded: dict | None, what: str, consequence: str, allowed: tuple = ()) -> None:
        """Refuse a resume whose settings differ from the `recorded` ones (naming the old and new values), but for
        the `allowed` ones."""
        recorded, current = recorded or {}, self.run_settings()
        changed = sorted(k for k in recorded.keys() & current.keys() if recorded[k] != current[k] and k not in allowed)
        if changed:
            was = ", ".join(f"{k}={recorded[k]!r}" for k in changed)
            now = ", ".join(f"{k}={current[k]!r}" for k in changed)
            raise RunSetupError(
                f"{what} computed with {was}, but this run has {now}: {consequence}. Resume with the same "
                "settings, or start a new run (another output_dir, or no resume_from_checkpoint; "
                "`erm_checkpoint=` reuses a saved ERM model)."
            )

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Run the method's stages. With `resume_from_checkpoint`, finished stages are skipped (their outputs
        restored) and an interrupted training stage continues from its last checkpoint (or the given one)."""
        resume = bool(resume_from_checkpoint)
        self._explicit_checkpoint = resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None
        if self._explicit_checkpoint is not None:
            stage_dirs = {self.stage_dir(stage.name).resolve() for stage in self.stages()}
            if not Path(self._explicit_checkpoint).is_dir() or Path(self._explicit_checkpoint).resolve().parent not in stage_dirs:
                raise RunSetupError(
                    f"resume_from_checkpoint={self._explicit_checkpoint!r} is not a checkpoint folder of this run's "
                    f"stages ({Path(self.args.output_dir) / STAGES_DIR}/<stage>/checkpoint-<step>): pass one of "
                    "them, or resume_from_checkpoint=True for the last checkpoint of the interrupted stage."
                )
        self.claim_output_dir(resume)
        try:
            return self._run_stages(resume)
        except BaseException:
            self.release_output_dir()
            raise

    def _run_stages(self, resume: bool):
        if not resume and self.is_world_process_zero():
            # a finished run's results.json stays until this run's final save replaces it (overwrite_output_dir)
            shutil.rmtree(Path(self.args.output_dir) / STAGES_DIR, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.finished_stages, self.skipped_stages = [], []
        self.eval_results = {}  # an evaluation of the model before this training no longer describes it
        self.health = {}
        stages = self.stages()
        reference = self.health_reference()
        if reference is not None and reference[1] == INITIAL_STAGE and INITIAL_STAGE not in [s.name for s in stages]:
            # the model as given, kept for the health check (and a fallback) of a method without an ERM stage
            stages = [Stage(INITIAL_STAGE, lambda stage_dir, resume: self.save_model_state(stage_dir), None)] + stages
        for stage in stages:
            stage_dir = self.stage_dir(stage.name)
            if resume and self.stage_finished(stage.name):
                self._check_stage_marker(stage.name)
                if stage.load is not None:
                    stage.load(stage_dir)
                self.skipped_stages.append(stage.name)
                self.finished_stages.append(stage.name)
                continue
            start = time.perf_counter()
            self.current_stage = stage.name
            stage.run(stage_dir, resume)
            self._mark_stage_finished(stage.name, time.perf_counter() - start)
            self.finished_stages.append(stage.name)
        self.current_stage = None
        self.run_health_check()
        return self._train_output

    # ------------------------------------------------------------------ the output folder
    def claim_output_dir(self, resume: bool = False) -> None:
        """Make `output_dir` this run's, before anything is written: lock it (another live run's lock is an
        `OutputDirBusyError` naming it), and refuse to start a new run over a finished one unless it is a resume,
        `overwrite_output_dir` is set, or this trainer wrote it. Every process raises the same error."""
        folder = Path(self.args.output_dir)
        error = None
        if self.is_world_process_zero() and not self._holds_output_dir:
            try:
                _hold_output_dir(folder)
                self._holds_output_dir = True
                if not (resume or self.args.overwrite_output_dir or self._wrote_finished_run) and is_finished_run(folder):
                    refuse_finished_run(folder)
                remove_leftovers(folder)  # staging folders of a run that died while saving
            except OutputDirError as caught:
                error = caught
                self.release_output_dir()
        if self.args.world_size > 1:
            from accelerate.utils import broadcast_object_list

            message = [None if error is None else (type(error), str(error))]
            broadcast_object_list(message)
            if message[0] is not None and error is None:
                error = message[0][0](message[0][1])
        if error is not None:
            raise error

    def release_output_dir(self) -> None:
        """Let other runs use `output_dir` (after this run's final save, or when it fails)."""
        if self._holds_output_dir:
            self._holds_output_dir = False
            _release_output_dir(Path(self.args.output_dir))

    def train_stage(self, stage_dir: Path, resume: bool, train_dataset: Dataset | None = None, **arg_overrides):
        """Run the Trainer loop as one stage: checkpoints go to `stage_dir`, a fresh optimizer and scheduler,
        `arg_overrides` (e.g. num_train_epochs=1, learning_rate=...) applied for this stage only."""
        checkpoint = None
        if resume and stage_dir.is_dir():
            explicit = self._explicit_checkpoint
            if explicit and Path(explicit).resolve().parent == stage_dir.resolve():  # a checkpoint of this stage
                checkpoint, self._explicit_checkpoint = explicit, None
            else:
                checkpoint = get_last_checkpoint(str(stage_dir))
        settings_file = stage_dir / STAGE_SETTINGS
        if checkpoint is not None and settings_file.is_file():  # an interrupted stage goes on as it started
            # training longer (more epochs or steps) is a resume transformers allows: only its length changes
            self._check_settings(json.loads(settings_file.read_text()), f"{checkpoint} was",
                                 "its schedule and batches would change midway",
                                 allowed=("num_train_epochs", "max_steps"))
        elif self.is_world_process_zero():
            atomic_write_json(settings_file, self.run_settings())
        overrides = {"output_dir": str(stage_dir), **arg_overrides}
        saved_args = {k: getattr(self.args, k) for k in overrides}
        saved_dataset = self.train_dataset
        saved_batch_size = self._train_batch_size
        for key, value in overrides.items():
            setattr(self.args, key, value)
        self._train_batch_size = self.args.train_batch_size  # Trainer reads its own copy, set in __init__
        if train_dataset is not None:
            self.train_dataset = train_dataset
        self.optimizer, self.lr_scheduler = None, None
        self._unprepare_model()
        try:
            self._train_output = super().train(resume_from_checkpoint=checkpoint)
        finally:
            for key, value in saved_args.items():
                setattr(self.args, key, value)
            self._train_batch_size = saved_batch_size
            self.train_dataset = saved_dataset
        self.stage_log_history[stage_dir.name] = list(self.state.log_history)
        return self._train_output

    def _unprepare_model(self) -> None:
        """Let the next `Trainer.train()` wrap the model for distributed training afresh.

        An evaluation before training (the ERM stage's report, a per-example pass) has accelerate prepare the
        model in evaluation mode, which marks it as prepared without a DDP wrapper; a following train() then
        skips the wrapper and each process trains on its own gradients, silently. Clearing the mark restores
        gradient synchronisation (tests/test_distributed.py evaluates before training to keep this honest).
        """
        model = self.accelerator.unwrap_model(self.model)
        if getattr(model, "_is_accelerate_prepared", False):
            model._is_accelerate_prepared = False
        self.model = self.model_wrapped = model

    def _run_erm_stage(self, stage_dir: Path, resume: bool) -> None:
        self.train_stage(stage_dir, resume)
        self.save_model_state(stage_dir)

    def erm_baseline_stage(self) -> Stage:
        """The `erm` stage of a method that starts from ERM: train it (or load the config's `erm_checkpoint`),
        save it and evaluate it as the "ERM" baseline of the report (kept across a resume). It is also the
        reference of the run's health check."""
        self._uses_erm_baseline = True
        return Stage("erm", self._run_erm_baseline, self._load_erm_baseline)

    def train_or_load_checkpoint(self, stage_dir: Path, resume: bool, load=None) -> None:
        """Train the stage, or load the config's `erm_checkpoint` (with `load`, default
        `load_checkpoint_weights`) instead; then save the model as the stage's state."""
        checkpoint = getattr(self.args, "erm_checkpoint", None)
        if checkpoint:
            (load or self.load_checkpoint_weights)(Path(checkpoint))
        else:
            self.train_stage(stage_dir, resume)
        self.save_model_state(stage_dir)

    def _run_erm_baseline(self, stage_dir: Path, resume: bool) -> None:
        self.train_or_load_checkpoint(stage_dir, resume)
        self.evaluate_stage("ERM", stage_dir)

    def _load_erm_baseline(self, stage_dir: Path) -> None:
        self.load_model_state(stage_dir)
        self.load_stage_results(stage_dir)

    def save_model_state(self, stage_dir: Path) -> None:
        """All parameters and buffers of the (unwrapped) model, atomically, as the stage's output."""
        if self.is_world_process_zero():
            from safetensors.torch import save_model

            stage_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=stage_dir, prefix=".model.", suffix=".safetensors")
            os.close(fd)
            save_model(self.accelerator.unwrap_model(self.model), tmp)
            publish(tmp, stage_dir / "model.safetensors")
        self.accelerator.wait_for_everyone()

    def load_model_state(self, stage_dir: Path, model: nn.Module | None = None) -> None:
        """Restore the weights a stage saved, into the trained model (or into `model`, e.g. a copy)."""
        from safetensors.torch import load_model

        # safetensors refuses "cpu:0", the device of a multi-process CPU run; the load copies into the parameters anyway
        device = "cpu" if self.args.device.type == "cpu" else str(self.args.device)
        target = model if model is not None else self.accelerator.unwrap_model(self.model)
        load_model(target, str(stage_dir / "model.safetensors"), device=device)

    def load_checkpoint_weights(self, folder: Path, via_from_pretrained: bool = True) -> None:
        """Load a saved model folder (e.g. `erm_checkpoint`) into the model, every key matched or a clear error.

        With `via_from_pretrained` and a `config.json` there, the folder is read by the model class's own
        `from_pretrained` (which maps the key names of transformers' checkpoint layouts onto the modules);
        otherwise its `.safetensors` files are loaded as they are (models with modules added by hf_robust)."""
        from safetensors.torch import load_file

        from ..methods.fair_dropout.inject import CONFIG_NAME as FAIR_DROPOUT_CONFIG
        from ..methods.fair_dropout.inject import fair_dropout_modules

        model = self.accelerator.unwrap_model(self.model)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise RunSetupError(f"erm_checkpoint {folder} holds no .safetensors weights.")
        if (folder / FAIR_DROPOUT_CONFIG).is_file() and fair_dropout_modules(model) is None:
            # its weights load into the plain model, but without the FairDropout layers every memorising neuron
            # would stay on (and an added `fc` projection would be dropped): not the model that was trained
            raise RunSetupError(
                f"erm_checkpoint {folder} is a FairDropout model ({FAIR_DROPOUT_CONFIG}), and {type(self).__name__} "
                f"would load it without its FairDropout layers. Pass its stock export instead "
                f"(erm_checkpoint={str(folder / 'exported')!r}, written with export_model=True), or use "
                "--method fairdropout_dfr for DFR on a FairDropout model."
            )
        if via_from_pretrained and (folder / "config.json").is_file() and hasattr(type(model), "from_pretrained"):
            try:
                state = type(model).from_pretrained(str(folder)).state_dict()
            except (TypeError, ValueError, KeyError, AttributeError, OSError) as error:
                raise RunSetupError(
                    f"erm_checkpoint {folder} could not be loaded as a {type(model).__name__} (the model of this run): "
                    f"{type(error).__name__}: {error}. Pass a checkpoint of the same architecture."
                ) from error
        else:
            state = {}
            for file in files:
                state.update(load_file(str(file)))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RunSetupError(
                f"erm_checkpoint {folder} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}."
            )

    def save_stage_tensors(self, stage_dir: Path, tensors: dict[str, torch.Tensor], name: str = "outputs") -> None:
        """Per-example outputs of a stage, atomically (safetensors)."""
        if self.is_world_process_zero():
            from safetensors.torch import save

            atomic_write_bytes(stage_dir / f"{name}.safetensors", save({k: v.contiguous().cpu() for k, v in tensors.items()}))
        self.accelerator.wait_for_everyone()

    @staticmethod
    def load_stage_tensors(stage_dir: Path, name: str = "outputs") -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(stage_dir / f"{name}.safetensors"))

    def save_stage_json(self, stage_dir: Path, name: str, obj) -> None:
        if self.is_world_process_zero():
            atomic_write_json(stage_dir / f"{name}.json", obj)
        self.accelerator.wait_for_everyone()

    @staticmethod
    def load_stage_json(stage_dir: Path, name: str):
        return json.loads((stage_dir / f"{name}.json").read_text())

    def evaluate_stage(self, label: str, stage_dir: Path) -> None:
        """Evaluate the current model on every eval split and keep it as the `label` baseline (e.g. "ERM" before
        a method changes the model); saved in the stage folder so that a resumed run reports it too."""
        if self.eval_dataset is None:
            return
        self.evaluate()
        self.record_stage_results(label)
        self.save_stage_json(stage_dir, "eval_results", {label: self.stage_results[label]})
        self.eval_results = {}

    def load_stage_results(self, stage_dir: Path) -> None:
        path = stage_dir / "eval_results.json"
        if path.is_file():
            self.stage_results.update(json.loads(path.read_text()))

    # ------------------------------------------------------------------ health check
    def health_reference(self) -> tuple[str, str] | None:
        """(label, stage) of the model the final one is compared with by the health check: the ERM stage of a
        method that starts from ERM (`erm_baseline_stage`); None for ERM itself (only the collapse check). A
        method without an ERM stage returns its own (e.g. a comparison stage), or `("the model as given",
        INITIAL_STAGE)`: the model is then saved before training, as the stage `initial`."""
        if self._uses_erm_baseline:
            return ("ERM", "erm")
        return None

    def health_reference_model(self, stage: str, model: nn.Module) -> nn.Module:
        """`model` (a copy of the final model, or the model itself for a fallback) turned into the reference: the
        weights the reference stage saved."""
        self.load_model_state(self.stage_dir(stage), model)
        return model

    def health_dataset(self) -> Dataset | None:
        """The split the health check runs on: the `health_split` eval split (None when there is none)."""
        if isinstance(self.eval_dataset, dict):
            return self.eval_dataset.get(self.args.health_split)
        return None  # one unnamed split may be the test split: it is not used to judge the run

    def _predictions(self, model: nn.Module, dataset: Dataset) -> dict[str, torch.Tensor]:
        def fn(_, batch):
            with torch.no_grad():
                out = model(**{k: v for k, v in self.model_inputs(batch).items() if k != "labels"})
            logits = out.logits if hasattr(out, "logits") else out
            return {"prediction": logits.argmax(-1), "finite": torch.isfinite(logits).all(-1).to(torch.uint8), "labels": batch["labels"]}

        with self.eval_mode(model):  # (compute_per_example puts only the trained model in eval mode)
            return self.compute_per_example(dataset, fn, description="Health check")

    def run_health_check(self) -> dict:
        """Compare the final model with its reference (`health_reference`) on `health_dataset` with labels only,
        record the verdict in `self.health` (results.json, the card, the script's table) and apply `on_worse`."""
        from ..data.core import label_names

        dataset = self.health_dataset()
        split = self.args.health_split
        if dataset is None or len(dataset) == 0:
            self.health = {"status": "unknown", "split": split, "action": "kept",
                           "reason": f"no {split!r} eval split to check the model on (set health_split, or pass "
                                     f"eval_dataset={{{split!r}: ...}})"}
            if self.is_world_process_zero():
                logger.warning("Health check not run: %s.", self.health["reason"])
            return self.health
        final = self.accelerator.unwrap_model(self.model)
        names = label_names(dataset)
        method = self.validation_summary(final, dataset)
        reference, ref_label = None, None
        ref = self.health_reference()
        if ref is not None and (self.stage_dir(ref[1]) / "model.safetensors").is_file():
            ref_label = ref[0]
            ref_model = self.health_reference_model(ref[1], copy.deepcopy(final))
            reference = self.validation_summary(ref_model, dataset)
            del ref_model
        status, reason = assess(method, reference, names, ref_label or "", margin=self.args.health_margin)
        health = {"status": status, "reason": reason, "split": split, "num_examples": len(dataset),
                  "reference": ref_label, "margin": self.args.health_margin, "on_worse": self.args.on_worse,
                  "erm": reference, "method": method, "action": "kept"}
        if status in ("worse_than_erm", "collapsed"):
            if self.args.on_worse == "error":
                self.health = health
                raise HealthCheckError(
                    f"{self._name} health check: {status}: {reason}. Nothing was saved as a finished run (on_worse="
                    "'error'); the stages in output_dir/stages are kept. Try the method's label-free selection (leave "
                    "its knobs unset), other settings, or on_worse='fallback_to_erm' / 'warn'."
                )
            if self.args.on_worse == "fallback_to_erm" and ref_label is not None:
                self.health_reference_model(ref[1], self.accelerator.unwrap_model(self.model))
                health["action"] = f"fell back to the {ref_label} model"
            elif self.args.on_worse == "fallback_to_erm":
                health["action"] = "kept (no reference model to fall back to)"
            if self.args.on_worse != "keep" and self.is_world_process_zero():
                logger.warning("%s: %s", self._name, format_health(health))
        self.health = health
        return health

    # ------------------------------------------------------------------ label-free selection
    def validation_summary(self, model: nn.Module | None = None, dataset: Dataset | None = None) -> dict | None:
        """`prediction_summary` (labels only) of `model` (default: the trained model) on the health split."""
        dataset = dataset if dataset is not None else self.health_dataset()
        if dataset is None or len(dataset) == 0:
            return None
        model = model if model is not None else self.accelerator.unwrap_model(self.model)
        out = self._predictions(model, dataset)
        return prediction_summary(out["prediction"].numpy(), out["labels"].numpy(), self.adapter.classifier.out_features,
                                  finite=out["finite"].numpy())

    def run_candidates(
        self, stage_dir: Path, candidates: list[dict], train: Callable[[dict, Path, bool], None], resume: bool
    ) -> dict:
        """Label-free selection among `candidates` (dicts of knob values), as the GradTune and FairDropout papers
        select: by worst-CLASS accuracy on the validation split (`health_split`; never group labels), ties broken by
        accuracy, then by order (list the unchanged model first: it is kept on an exact tie).

        `train(knobs, folder, resume)` leaves the candidate's model in `self.model`; it is scored, saved into
        `stage_dir/candidate_<i>/` with its record, and marked finished, so a resumed run skips it. Returns
        `{"metric", "split", "candidates": [{"knobs", "validation", "seconds"}], "chosen": i}`; the chosen
        candidate's weights are in `candidate_folder(stage_dir, i)`.
        """
        if self.health_dataset() is None:
            raise DataValidationError(
                f"{self._name} chooses its settings on the {self.args.health_split!r} eval split (labels only), but "
                f"eval_dataset has none: pass eval_dataset={{{self.args.health_split!r}: ...}}, or set the method's "
                "knobs yourself to skip the selection."
            )
        records = []
        for i, knobs in enumerate(candidates):
            folder = self.candidate_folder(stage_dir, i)
            record_file = folder / "candidate.json"
            if resume and record_file.is_file():
                record = json.loads(record_file.read_text())
                if record["knobs"] == json.loads(json.dumps(knobs)):
                    records.append(record)
                    continue
            start = time.perf_counter()
            train(knobs, folder, resume)
            self.save_model_state(folder)
            record = {"knobs": knobs, "validation": self.validation_summary(),
                      "seconds": round(time.perf_counter() - start, 3)}
            self.save_stage_json(folder, "candidate", record)
            records.append(record)
        score = [(*selection_score(r["validation"]), -i) for i, r in enumerate(records)]
        chosen = max(range(len(records)), key=lambda i: score[i])
        return {"metric": "worst_class_accuracy (ties: accuracy)", "split": self.args.health_split,
                "candidates": records, "chosen": chosen}

    @staticmethod
    def candidate_folder(stage_dir: Path, index: int) -> Path:
        return stage_dir / f"candidate_{index}"

    # ------------------------------------------------------------------ distributed per-example pass
    def compute_per_example(
        self,
        dataset: Dataset,
        fn: Callable[[nn.Module, dict], dict[str, torch.Tensor]],
        description: str = "Computing",
        batch_size: int | None = None,
        collator=None,
    ) -> dict[str, torch.Tensor]:
        """Apply `fn(model, batch) -> {name: (B, ...) tensor}` to every example, sharded over processes.

        Returns, on every process, each output concatenated over the whole dataset and ordered by `example_idx`
        (plus `example_idx` itself): exactly what one process computes. Outputs with more than one dimension are
        padded with zeros to the longest across processes along dim 1 (e.g. token-level outputs).
        `fn` receives the unwrapped model (no DDP) in eval mode (its mode is restored afterwards; gradients stay
        enabled for methods that need them, e.g. CAMs) and a batch already on the device.
        """
        loader = DataLoader(
            dataset,
            batch_size=batch_size or self.args.per_device_eval_batch_size,
            sampler=SequentialSampler(dataset),
            collate_fn=collator or self.eval_collator,
            num_workers=self.args.dataloader_num_workers,
        )
        loader = self.accelerator.prepare_data_loader(loader)
        model = self.accelerator.unwrap_model(self.model).to(self.args.device)
        chunks: dict[str, list[torch.Tensor]] = defaultdict(list)
        start = time.perf_counter()
        from tqdm.auto import tqdm

        progress = tqdm(loader, desc=description, disable=not self.is_local_process_zero() or self.args.disable_tqdm)
        with self.eval_mode(model):
            for batch in progress:
                self._gather_batch(chunks, fn(model, self._prepare_inputs(batch)), batch)
        outputs = {}
        for key, values in chunks.items():
            width = max(v.shape[1] for v in values) if values[0].ndim > 1 else None
            if width is not None:
                values = [torch.nn.functional.pad(v, (0, 0) * (v.ndim - 2) + (0, width - v.shape[1])) for v in values]
            outputs[key] = torch.cat(values)
        order = torch.argsort(outputs["example_idx"], stable=True)
        outputs = {k: v[order] for k, v in outputs.items()}
        keep = torch.ones(len(order), dtype=torch.bool)
        keep[1:] = outputs["example_idx"][1:] != outputs["example_idx"][:-1]  # duplicates padded in by sharding
        outputs = {k: v[keep] for k, v in outputs.items()}
        if len(outputs["example_idx"]) != len(dataset):
            raise RuntimeError(
                f"{description}: gathered {len(outputs['example_idx'])} examples for a dataset of {len(dataset)}."
            )
        if self.state is not None and self.is_world_process_zero():
            elapsed = time.perf_counter() - start
            self.log({f"{description.lower().replace(' ', '_')}_seconds": round(elapsed, 3)})
        return outputs

    def _gather_batch(self, chunks: dict, result: dict, batch: dict) -> None:
        result = dict(result)
        result["example_idx"] = batch["example_idx"].to(self.args.device)
        result = {k: self.accelerator.pad_across_processes(v, dim=1) if v.ndim > 1 else v for k, v in result.items()}
        for key, value in self.accelerator.gather_for_metrics(result).items():
            chunks[key].append(value.detach().cpu())

    @contextlib.contextmanager
    def eval_mode(self, model: nn.Module):
        """Temporarily put `model` in eval mode, restoring its previous mode."""
        was_training = model.training
        model.eval()
        try:
            yield model
        finally:
            model.train(was_training)
