"""Model weights and per-stage outputs on disk: what a stage saves and a resumed run restores, and a saved model
folder (`erm_checkpoint`) loaded into the run's model. `CheckpointIO` is a mixin of `RobustTrainer`."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from .files import atomic_write_bytes, atomic_write_json, publish


class RunSetupError(ValueError):
    """A run that cannot start as asked (a resume or a checkpoint that does not fit it), raised before training."""


class CheckpointIO:
    """Saving and loading of the model's state and of the stages' tensors and JSON (process 0 writes, every
    process waits for it)."""

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

    def checkpoint_refusal(self, folder: Path, model: nn.Module) -> str | None:
        """Why the saved model folder `folder` must not be loaded as the plain weights of `model` (None: it may).
        Asks every method's checkpoint check (`MethodSpec.checkpoint_check`): a folder may hold layers that only
        its method's trainer rebuilds."""
        from ..methods.registry import checkpoint_refusal

        return checkpoint_refusal(folder, model, type(self).__name__)

    def load_checkpoint_weights(self, folder: Path, via_from_pretrained: bool = True) -> None:
        """Load a saved model folder (e.g. `erm_checkpoint`) into the model, every key matched or a clear error.

        With `via_from_pretrained` and a `config.json` there, the folder is read by the model class's own
        `from_pretrained` (which maps the key names of transformers' checkpoint layouts onto the modules);
        otherwise its `.safetensors` files are loaded as they are (models with modules added by hf_robust)."""
        from safetensors.torch import load_file

        model = self.accelerator.unwrap_model(self.model)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise RunSetupError(f"erm_checkpoint {folder} holds no .safetensors weights.")
        refusal = self.checkpoint_refusal(folder, model)
        if refusal:
            raise RunSetupError(refusal)
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

            data = save({k: v.contiguous().cpu() for k, v in tensors.items()})
            atomic_write_bytes(stage_dir / f"{name}.safetensors", data)
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
