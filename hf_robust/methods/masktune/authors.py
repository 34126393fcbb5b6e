"""Two details of the MaskTune authors' fine-tuning (github.com/aliasgharkhani/Masktune, `src/methods/base_method.py`),
as options of `MaskTuneTrainer` (`MaskTuneConfig`):

- `finetune_continue_optimizer`: every fine-tuning starts from the optimizer state (SGD momentum buffers, Adam
  moments) of the training before it: round 1 and each selection candidate from the ERM stage's last step, round
  i + 1 from round i, with the fine-tuning's own learning rate. Each training stage saves its final state
  (`optimizer_state.pt` in its stage folder), so a resumed run continues the same state. (hf_robust's default is a
  fresh optimizer per stage.)
- `mask_erm_model="best_validation_accuracy"`: round 1 masks with the ERM epoch of best accuracy on the health
  split (labels only; the first of equal ones, as the authors' strict `>`), while the LAST ERM epoch is fine-tuned,
  as the authors mask with their `best_erm_model` and fine-tune their `last_erm_model`. Each epoch is scored at its
  end without moving the training's random state; the best epoch's weights are kept in `erm/best_epoch/`.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

from ...core.checkpoints import RunSetupError
from ...core.files import atomic_write_bytes
from ...data.core import DataValidationError

OPTIMIZER_STATE = "optimizer_state.pt"  # a training stage's last optimizer state (finetune_continue_optimizer)
BEST_EPOCH = "best_epoch"  # erm/best_epoch/: the ERM epoch of best validation accuracy (mask_erm_model)


class AuthorsFinetuning:
    """The mixin of `MaskTuneTrainer` that implements the two options (see the module docstring)."""

    def _check_authors_options(self) -> None:
        """Refuse, before any training, the authors' fine-tuning options where the run cannot honour them."""
        checkpoint = self.args.erm_checkpoint
        if self.args.mask_erm_model == "best_validation_accuracy":
            if checkpoint is not None:
                raise DataValidationError(
                    f"mask_erm_model='best_validation_accuracy' picks an epoch of the ERM stage's training, and "
                    f"erm_checkpoint={checkpoint!r} gives one trained model: train the ERM stage here (drop "
                    "erm_checkpoint) or use mask_erm_model='last'.")
            if self.health_dataset() is None:
                raise DataValidationError(
                    f"mask_erm_model='best_validation_accuracy' scores each ERM epoch on the {self.args.health_split!r} "
                    f"eval split, and eval_dataset has none: pass eval_dataset={{{self.args.health_split!r}: ...}} "
                    "(or set health_split), or use mask_erm_model='last'.")
        if self.args.finetune_continue_optimizer and checkpoint is not None \
                and not (Path(checkpoint) / "optimizer.pt").is_file():
            raise DataValidationError(
                f"finetune_continue_optimizer=True continues the ERM training's optimizer state, and erm_checkpoint="
                f"{checkpoint!r} has no optimizer.pt: pass a Trainer checkpoint folder (checkpoint-<step>, saved "
                "without save_only_model), train the ERM stage here, or set finetune_continue_optimizer=False.")

    def train_erm_with_options(self, stage_dir: Path, run) -> None:
        """Run the ERM stage (`run()`): with `mask_erm_model="best_validation_accuracy"` its epochs are scored (and the
        best one kept), with `finetune_continue_optimizer` its last optimizer state is saved for round 1 (from
        `erm_checkpoint`: the checkpoint's `optimizer.pt`)."""
        epochs = ErmEpochs(self, stage_dir) if self.args.mask_erm_model == "best_validation_accuracy" else None
        if epochs is not None:
            self.add_callback(epochs)
        try:
            run()
        finally:
            if epochs is not None:
                self.remove_callback(epochs)
        if self.args.finetune_continue_optimizer:
            checkpoint = self.args.erm_checkpoint
            self._save_optimizer_state(stage_dir, read_optimizer_state(Path(checkpoint) / "optimizer.pt")
                                       if checkpoint else None)
        if epochs is not None:
            self.erm_epochs = epochs.record()
            if not self.erm_epochs["validation_accuracy"]:
                raise RunSetupError("mask_erm_model='best_validation_accuracy': the ERM stage ended without a "
                                    "finished epoch to choose from (max_steps shorter than an epoch?).")

    def _save_optimizer_state(self, stage_dir: Path, state: dict | None = None) -> None:
        """The optimizer state of the training that just ended in `stage_dir` (or `state`), for the next
        fine-tuning (`finetune_continue_optimizer`); written by the main process (every process holds the same
        state: the gradients are all-reduced)."""
        if self.is_world_process_zero():
            buffer = io.BytesIO()
            torch.save(state if state is not None else self.optimizer.state_dict(), buffer)
            atomic_write_bytes(stage_dir / OPTIMIZER_STATE, buffer.getvalue())
        self.accelerator.wait_for_everyone()

    def carry_optimizer_state(self, source: Path, stage_dir: Path) -> None:
        """With `finetune_continue_optimizer`, make the optimizer state saved in `source` (a selection candidate's
        folder) `stage_dir`'s, for the next round to continue."""
        if self.args.finetune_continue_optimizer:
            stage_dir.mkdir(parents=True, exist_ok=True)
            self._save_optimizer_state(stage_dir, read_optimizer_state(source / OPTIMIZER_STATE))

    def create_optimizer(self, *args, **kwargs):
        """The Trainer's optimizer; with `finetune_continue_optimizer`, a fine-tuning's starts from the per-parameter
        state (e.g. momentum buffers) of the training before it, with the fine-tuning's own learning rate and
        hyper-parameters. (A resumed stage then loads its checkpoint's state over it, as the Trainer does.)"""
        optimizer = super().create_optimizer(*args, **kwargs)
        source, self._continue_optimizer_from = self._continue_optimizer_from, None
        if source is None:
            return optimizer
        raw = getattr(optimizer, "optimizer", optimizer)
        saved = read_optimizer_state(source / OPTIMIZER_STATE)
        current = raw.state_dict()
        shapes = [len(group["params"]) for group in current["param_groups"]]
        if [len(group["params"]) for group in saved["param_groups"]] != shapes:
            raise RunSetupError(f"finetune_continue_optimizer: the optimizer state in {source} has parameter groups of "
                                f"{[len(g['params']) for g in saved['param_groups']]} parameters, this fine-tuning's "
                                f"optimizer {shapes}: the model or the parameter grouping changed.")
        params = [p for group in raw.param_groups for p in group["params"]]
        for index, state in saved["state"].items():
            for name, value in state.items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape != params[int(index)].shape:
                    raise RunSetupError(f"finetune_continue_optimizer: {source / OPTIMIZER_STATE} has {name} of shape "
                                        f"{tuple(value.shape)} for parameter {index}, whose shape is "
                                        f"{tuple(params[int(index)].shape)}.")
        current["state"] = saved["state"]
        raw.load_state_dict(current)
        return optimizer

    def _record_erm_epoch(self, stage_dir: Path, epoch: int, record: dict) -> dict:
        """Score the model at the end of ERM epoch `epoch` on the health split (labels only, the training's random
        state untouched) and keep its weights in `erm/best_epoch/` when it beats every earlier epoch (the first of
        equal ones stays, as the authors' strict `>`). A replayed epoch (a resume) replaces its own and later
        entries."""
        with _preserved_rng():
            accuracy = float(self.validation_summary()["accuracy"])
        scores = {e: a for e, a in record["validation_accuracy"].items() if int(e) < epoch}
        best_before = max(scores.values()) if scores else None
        scores[str(epoch)] = accuracy
        if best_before is None or accuracy > best_before:
            self.save_model_state(stage_dir / BEST_EPOCH)
            best = epoch
        else:  # an earlier epoch (whose weights are in best_epoch/: a replay repeats the epochs it replaces)
            best = int(max(scores, key=lambda e: (scores[e], -int(e))))
        record = {"validation_accuracy": scores, "best_epoch": best, "split": self.args.health_split}
        self.save_stage_json(stage_dir, "erm_epochs", record)
        return record

    @contextlib.contextmanager
    def _round_one_mask_weights(self):
        """The model's weights during the round-1 masks: the ERM epoch of best validation accuracy with
        `mask_erm_model="best_validation_accuracy"` (the trained weights restored after), else unchanged."""
        if self.args.mask_erm_model != "best_validation_accuracy" or self.masktune_kept_erm:
            yield
            return
        model = self.accelerator.unwrap_model(self.model)
        kept = {name: value.detach().clone() for name, value in model.state_dict().items()}
        self.load_model_state(self.stage_dir("erm") / BEST_EPOCH)
        try:
            yield
        finally:
            model.load_state_dict(kept)


def read_optimizer_state(path: Path) -> dict:
    """An optimizer's `state_dict()` saved by torch.save (a stage's `optimizer_state.pt`, a Trainer checkpoint's
    `optimizer.pt`), on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=True)


@contextlib.contextmanager
def _preserved_rng():
    """Run a block without moving the random state a training draws from (torch CPU and CUDA, numpy, random):
    an evaluation's DataLoader draws its base seed from torch's generator."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class ErmEpochs(TrainerCallback):
    """A Trainer callback for the ERM stage with `mask_erm_model="best_validation_accuracy"`: each epoch's
    validation accuracy, and the best epoch's weights in `erm/best_epoch/` (`MaskTuneTrainer._record_erm_epoch`)."""

    def __init__(self, trainer: AuthorsFinetuning, stage_dir: Path):
        self.trainer, self.stage_dir = trainer, stage_dir
        path = stage_dir / "erm_epochs.json"
        # a resumed ERM stage keeps the epochs it scored before (those it replays are scored again)
        self._record = json.loads(path.read_text()) if path.is_file() else {"validation_accuracy": {},
                                                                             "best_epoch": None}

    def record(self) -> dict:
        return self._record

    def on_epoch_end(self, args, state, control, **kwargs):
        epoch = int(round(state.epoch))
        self._record = self.trainer._record_erm_epoch(self.stage_dir, epoch, self._record)
