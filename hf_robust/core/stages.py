"""The stage engine of `RobustTrainer`: a method is a list of named stages, each resumable on its own.

A method's `stages()` lists its steps (ERM -> per-example outputs -> fine-tuning, ERM -> scores -> selection ->
last layer, ...). Each stage writes its outputs atomically into `output_dir/stages/<name>/` and a completion marker
(`stage.json`, with the run's settings) last; a run started with `resume_from_checkpoint` skips every finished
stage (restoring its outputs with the stage's `load`) after checking that its settings match, and resumes an
interrupted training stage from its last checkpoint.

`StageEngine` is a mixin of `RobustTrainer` (it uses the Trainer's arguments, accelerator and training loop).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from datasets import Dataset
from transformers import TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from .checkpoints import CheckpointIO, RunSetupError
from .config import erm_checkpoint_of
from .files import atomic_write_json
from .run_folder import (
    OutputDirError,
    hold_output_dir,
    is_finished_run,
    normalise_permissions,
    refuse_finished_run,
    release_output_dir,
    remove_leftovers,
)

STAGES_DIR = "stages"
STAGE_MARKER = "stage.json"
INITIAL_STAGE = "initial"  # the model as given to a method without an ERM stage, for the health check
STAGE_SETTINGS = "settings.json"  # what an interrupted training stage was started with

__all__ = ["INITIAL_STAGE", "STAGES_DIR", "Stage", "StageEngine"]


@dataclass
class Stage:
    """One step of a method. `run(stage_dir, resume)` computes and writes the stage's outputs; `load(stage_dir)`
    restores them when a resumed run skips the finished stage."""

    name: str
    run: Callable[[Path, bool], None]
    load: Callable[[Path], None] | None = None


def _plain(value):
    """`value` as JSON would give it back (enums by their value; what JSON cannot hold, by its repr)."""
    value = getattr(value, "value", value)
    try:
        return json.loads(json.dumps(value))
    except TypeError:
        return repr(value)


class StageEngine(CheckpointIO):
    """Stages, their folders and markers, the settings a resume must match, and the output folder's claim."""

    # TrainingArguments settings that change what a stage computes (the per-device batch size enters as the
    # global batch: a run may resume on another number of processes)
    _TRAINING_SETTINGS = (
        "learning_rate", "num_train_epochs", "max_steps", "weight_decay", "lr_scheduler_type", "lr_scheduler_kwargs",
        "lr_step_epochs", "lr_step_gamma", "warmup_steps", "warmup_ratio", "optim", "optim_args", "adam_beta1",
        "adam_beta2", "adam_epsilon", "max_grad_norm", "gradient_accumulation_steps", "seed", "data_seed",
        "label_smoothing_factor", "bf16", "fp16",
    )

    # ------------------------------------------------------------------ stages and their folders
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

    # ------------------------------------------------------------------ the settings a resume must match
    def run_settings(self) -> dict:
        """What the stages' outputs depend on: the fields the config adds to TrainingArguments (but its
        `unrecorded_fields()`), the training settings, the model, the size of the training set. Recorded with every
        finished stage; a resume must match it."""
        base = {f.name for f in fields(TrainingArguments)}
        unrecorded = type(self.args).unrecorded_fields()
        names = [f.name for f in fields(self.args) if f.name not in base and f.name not in unrecorded]
        names += [n for n in self._TRAINING_SETTINGS if hasattr(self.args, n)]
        settings = {name: _plain(getattr(self.args, name)) for name in names}
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

    # ------------------------------------------------------------------ running the stages
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Run the method's stages. With `resume_from_checkpoint`, finished stages are skipped (their outputs
        restored) and an interrupted training stage continues from its last checkpoint (or the given one)."""
        resume = bool(resume_from_checkpoint)
        self._explicit_checkpoint = resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None
        if self._explicit_checkpoint is not None:
            stage_dirs = {self.stage_dir(stage.name).resolve() for stage in self.stages()}
            explicit = Path(self._explicit_checkpoint)
            if not explicit.is_dir() or explicit.resolve().parent not in stage_dirs:
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
                self._after_stage(stage.name)
                continue
            start = time.perf_counter()
            self.current_stage = stage.name
            stage.run(stage_dir, resume)
            self._mark_stage_finished(stage.name, time.perf_counter() - start)
            self.finished_stages.append(stage.name)
            self._after_stage(stage.name)
        self.current_stage = None
        self.run_health_check()
        return self._train_output

    # ------------------------------------------------------------------ run hooks
    def run_hooks(self) -> list:
        """The registry's run hooks (`hf_robust.methods.registry.RUN_HOOKS`) bound to this trainer, built on first
        use: reports every run carries whatever its method. Each hook has `after_stage(name, stage_dir)` (called on
        every process after each stage, run or restored on resume), `results()` (merged into results.json) and
        `write_plots(output_dir)` (before the card lists the plots)."""
        if getattr(self, "_run_hook_objects", None) is None:
            from ..methods.registry import run_hook_classes

            self._run_hook_objects = [hook(self) for hook in run_hook_classes()]
        return self._run_hook_objects

    def _after_stage(self, name: str) -> None:
        for hook in self.run_hooks():
            hook.after_stage(name, self.stage_dir(name))

    # ------------------------------------------------------------------ the output folder
    def claim_output_dir(self, resume: bool = False) -> None:
        """Make `output_dir` this run's, before anything is written: lock it (another live run's lock is an
        `OutputDirBusyError` naming it), and refuse to start a new run over a finished one unless it is a resume,
        `overwrite_output_dir` is set, or this trainer wrote it. Every process raises the same error."""
        folder = Path(self.args.output_dir)
        error = None
        if self.is_world_process_zero() and not self._holds_output_dir:
            try:
                hold_output_dir(folder)
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
            release_output_dir(Path(self.args.output_dir))

    # ------------------------------------------------------------------ training stages
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
            self._train_output = super().train(resume_from_checkpoint=checkpoint)  # the Trainer's loop
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
        """Train the stage, or load the config's `erm_checkpoint` (`ErmCheckpointArguments`; with `load`, default
        `load_checkpoint_weights`) instead; then save the model as the stage's state."""
        checkpoint = erm_checkpoint_of(self.args)
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

    # ------------------------------------------------------------------ baselines of the report
    def evaluate_stage(self, label: str, stage_dir: Path) -> None:
        """Evaluate the current model on every eval split and keep it as the `label` baseline (e.g. the model
        before a method changes it); saved in the stage folder so that a resumed run reports it too."""
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
