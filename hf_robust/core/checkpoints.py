"""Model weights and per-stage outputs on disk: what a stage saves and a resumed run restores, a saved model
folder (`erm_checkpoint`) loaded into the run's model, and the weights of a Trainer checkpoint an interrupted
training stage resumes from. `CheckpointIO` is a mixin of `RobustTrainer`.

Every load of saved weights into the model goes through `load_saved_weights`: every key matched, or a
`RunSetupError`. transformers 5 writes a model's weights in the layout of its original checkpoints
(`save_pretrained` reverts the renamings `from_pretrained` applies: a ViT's `vit.layers.0.attention.q_proj.weight`
is saved as `vit.encoder.layer.0.attention.attention.query.weight`), while its Trainer resumes with
`load_state_dict(..., strict=False)` under the model's own names: the renamed weights are not loaded, a log line
says so, and the run goes on from the weights the new process started with. `saved_names` maps the saved names
back (the same reversal `save_pretrained` applies, read off the model itself).
"""

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


def saved_names(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, str], set[str]]:
    """({name save_pretrained writes: the model's own state_dict key} for every weight it renames, {saved names of
    weights it converts otherwise (fused, split, ...), which do not map back one to one}).

    transformers' own reversal (`revert_weight_conversion`, what `save_pretrained` applies) is run on the model's
    state dict (or `state`, one from `model.state_dict()`); a renamed weight keeps its tensor object, which names
    its key in the model."""
    try:
        from transformers import PreTrainedModel
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without weight conversions saves the model's own names
        return {}, set()
    if not isinstance(model, PreTrainedModel):
        return {}, set()
    own = dict(model.state_dict() if state is None else state)
    key_of = {id(tensor): key for key, tensor in own.items()}
    renamed, converted = {}, set()
    for saved, tensor in revert_weight_conversion(model, dict(own)).items():
        key = key_of.get(id(tensor))
        if key is None:
            converted.add(saved)
        elif key != saved:
            renamed[saved] = key
    return renamed, converted


def load_saved_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str, consequence: str,
                       remedy: str) -> None:
    """Load `state` (saved weights, under save_pretrained's names or the model's own) into `model`, every key of the
    model matched, or a RunSetupError naming the missing and unexpected keys: "`source` does not hold ...:
    `consequence`. `remedy`". Keys that save_pretrained leaves out may be absent: a weight tied to (sharing the
    storage of) a loaded one, and the model's `_keys_to_ignore_on_save`."""
    own = model.state_dict()
    renamed, converted = saved_names(model, own)
    unmappable = sorted(k for k in state if k in converted and k not in own)
    if unmappable:
        raise RunSetupError(
            f"{source} holds weights that transformers converted when saving (e.g. {unmappable[:3]}), which "
            f"hf_robust cannot map back onto {type(model).__name__}'s weights: {consequence}. {remedy}"
        )
    state = {renamed.get(key, key): tensor for key, tensor in state.items()}
    ignored = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    loaded = {(own[k].data_ptr(), own[k].shape) for k in state if k in own and own[k].numel()}
    missing = [k for k in own if k not in state and k not in ignored
               and not (own[k].numel() and (own[k].data_ptr(), own[k].shape) in loaded)]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise RunSetupError(
            f"{source} does not hold the weights of this {type(model).__name__}: {len(missing)} of its weights are "
            f"missing (e.g. {missing[:3]}) and {len(unexpected)} saved ones are not the model's (e.g. "
            f"{unexpected[:3]}): {consequence}. {remedy}"
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shapes that differ
        raise RunSetupError(f"{source} does not fit this {type(model).__name__}: {error}: {consequence}. {remedy}") from error


def read_weights(folder: Path) -> dict[str, torch.Tensor] | None:
    """The weights of a save_pretrained folder (`model.safetensors`, or the shards its index names), on the CPU;
    None if it has neither."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    state = {}
    for name in files:
        state.update(load_file(str(folder / name), device="cpu"))
    return state


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
        otherwise its `.safetensors` files are loaded (models with modules added by hf_robust), the key names
        transformers saves under mapped back onto the model's (`load_saved_weights`)."""
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
        load_saved_weights(model, state, f"erm_checkpoint {folder}", "it cannot be this run's starting model",
                           "Pass a checkpoint saved from a model of the same architecture and config.")

    # ------------------------------------------------------------------ Trainer checkpoints (resume, best model)
    def _load_saved_checkpoint(self, folder: Path, model: nn.Module | None, what: str) -> bool:
        """Load the weights of the Trainer checkpoint `folder` into the model with every key matched (see the
        module's docstring); False where transformers' own loading is left to do it (FSDP, DeepSpeed, SageMaker,
        peft adapters, a checkpoint without safetensors weights)."""
        from transformers.trainer_utils import _is_peft_model
        from transformers.utils import is_sagemaker_mp_enabled

        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or is_sagemaker_mp_enabled() or _is_peft_model(target):
            return False
        state = read_weights(folder)
        if state is None:
            return False
        load_saved_weights(
            target, state, f"{what} {folder}", "training would go on from weights that were never loaded",
            "Resume with the model the run was started with (same architecture and config), or start a new run "
            "(another output_dir, or no resume_from_checkpoint).",
        )
        return True

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Trainer's resume of an interrupted training stage, with every weight loaded (or a RunSetupError)."""
        if not self._load_saved_checkpoint(Path(resume_from_checkpoint), model, "The checkpoint"):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        """`load_best_model_at_end`'s load, with every weight loaded (or a RunSetupError)."""
        if not self._load_saved_checkpoint(Path(self.state.best_model_checkpoint), None, "The best checkpoint"):
            super()._load_best_model()

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
