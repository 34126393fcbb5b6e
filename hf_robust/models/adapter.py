"""What several methods need to know of a model's layout, and `get_adapter`, which finds it.

An adapter answers, for a model:
- `classifier`: its last linear layer (`z = W h + b`), and `penultimate`: the features `h` that layer reads;
- `cam_layer`: where class activation maps are taken (xGradCAM), and how to read its activation as a
  (B, C, H, W) map; `cam_method`: how a class activation map is made for the model — `"attention_rollout"`
  (gradient-weighted attention rollout, for ViT-like transformers that return attention maps) or `"xgradcam"`
  at `cam_layer` — and `patch_grid`, the (h, w) grid of patches the map lives on where it is known in advance;
- `embedding_layer` for text models (token attributions);
- `input_kind`: `"image"` or `"text"`.

Which families exist and how each one is read is the table in `hf_robust.models.families`. What one method
alone knows of an architecture lives in that method's package, in a table keyed by `ModelAdapter.family`:
FairDropout's positions (`hf_robust.methods.fair_dropout.positions`), the embedding counterfactual
distillation matches (`hf_robust.methods.counterfactual.embedding`).

peft-wrapped models (LoRA, ...) and DDP/accelerate wrappers are looked through. A model no family knows gets an
error that names the arguments that describe it (`classifier=`, `target_layer=`, `input_kind=`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

# Set (to True) on a model whose forward consumes an `example_idx` keyword (per-example behaviour in training,
# e.g. example-tied dropout): the trainers then pass `example_idx` into the model's inputs instead of dropping it.
EXAMPLE_IDX_FLAG = "_hf_robust_uses_example_idx"

INPUT_KINDS = ("image", "text")

# attributes that moved out of the adapter into the one method that uses them: where they are now
_MOVED = {
    "positions": "hf_robust.methods.fair_dropout.positions.positions_for(adapter)",
    "fair_dropout_positions": "hf_robust.methods.fair_dropout.positions.positions_for(adapter)",
    "fair_dropout_position": "hf_robust.methods.fair_dropout.positions.get_position(adapter, name)",
    "default_positions": "hf_robust.methods.fair_dropout.positions.default_positions(adapter)",
    "selection_positions": "hf_robust.methods.fair_dropout.positions.selection_positions(adapter)",
    "image_embedding": "hf_robust.methods.counterfactual.embedding.image_embedding(adapter, inputs)",
    "capture_image_embedding": "hf_robust.methods.counterfactual.embedding.capture_image_embedding(adapter)",
    "image_embedding_module": "hf_robust.methods.counterfactual.embedding.embedding_module(adapter)",
}


class UnsupportedModelError(ValueError):
    """hf_robust cannot find, in this model, a piece a method needs."""


# ---------------------------------------------------------------------------------------------- wrappers
def unwrap_model(model: nn.Module) -> nn.Module:
    """Look through DDP/accelerate wrappers and peft: the model whose layout the adapters know."""
    while hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module) and not hasattr(model, "config"):
        model = model.module
    with contextlib.suppress(ImportError):
        from peft import PeftModel

        if isinstance(model, PeftModel):
            model = model.get_base_model()
    return model


def active_module(module: nn.Module) -> nn.Module:
    """The module doing the work inside peft wrappers: the trained copy of a `modules_to_save` layer, or
    the base layer of a LoRA layer."""
    to_save = getattr(module, "modules_to_save", None)
    if isinstance(to_save, nn.ModuleDict) and len(to_save):
        names = getattr(module, "active_adapters", None) or [getattr(module, "active_adapter", next(iter(to_save)))]
        name = names[0] if isinstance(names, (list, tuple)) else names
        return to_save[name] if name in to_save else next(iter(to_save.values()))
    base = getattr(module, "base_layer", None)
    return base if isinstance(base, nn.Module) else module


def is_lora_layer(module: nn.Module | None) -> bool:
    """A peft LoRA-style layer: a frozen `base_layer` plus a trained low-rank update added to its output."""
    return module is not None and isinstance(getattr(module, "base_layer", None), nn.Module) and (
        hasattr(module, "lora_A") or hasattr(module, "lora_B")
    )


# ---------------------------------------------------------------------------------------------- module lookup
def submodule(root: nn.Module | None, path: str) -> nn.Module | None:
    """`root.<path>` (dotted attribute path) if it is a module, else None."""
    module = root
    for part in path.split("."):
        if module is None or not hasattr(module, part):
            return None
        module = getattr(module, part)
    return module if isinstance(module, nn.Module) else None


def first_submodule(root: nn.Module | None, *paths: str) -> nn.Module | None:
    """The first of `paths` that names a module of `root`."""
    for path in paths:
        module = submodule(root, path)
        if module is not None:
            return module
    return None


def last_linear(module: nn.Module | None) -> nn.Module | None:
    """The last nn.Linear inside `module` (itself if it is one), peft wrappers kept so that hooks see them. A
    peft layer counts as one Linear: its own parts (LoRA's `lora_A`/`lora_B`) are never the classifier."""
    if module is None:
        return None
    if isinstance(active_module(module), nn.Linear):
        return module
    found = None
    for child in module.children():
        hit = last_linear(child)
        if hit is not None:
            found = hit
    return found


# ---------------------------------------------------------------------------------------------- the adapter
@dataclass
class ModelAdapter:
    """Architecture knowledge for one model that several methods share. Build it with `get_adapter(model)`.

    `family` is the key of the family tables (`hf_robust.models.families.FAMILIES`, and the per-family tables of
    the methods); `name` is how messages call the model's kind (the family with its HF model type, or whether a
    timm model is wrapped: `hf_bert`, `hf_deit`, `timm_wrapper_resnet`).
    """

    model: nn.Module
    family: str
    input_kind: str
    classifier_module: nn.Module | None
    cam_module: nn.Module | None = None
    cam_layout: str = "channels"
    num_prefix_tokens: int = 0
    embedding_module: nn.Module | None = None
    main_input_name: str = "pixel_values"
    cam_method: str = "xgradcam"
    patch_grid: tuple[int, int] | None = None
    name: str = ""

    def __post_init__(self):
        self.name = self.name or self.family

    def __getattr__(self, attribute: str):
        # only reached for attributes the adapter does not have
        if attribute in _MOVED:
            raise AttributeError(
                f"ModelAdapter.{attribute} moved to the method that uses it: {_MOVED[attribute]}."
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {attribute!r}")

    # -- pieces the methods ask for; each raises a clear error when the family does not have it
    def require(self, *pieces: str) -> None:
        """Fail before training when the model lacks a piece a method needs ('classifier', 'cam_layer', ...)."""
        for piece in pieces:
            getattr(self, piece)

    @property
    def classifier(self) -> nn.Linear:
        """The last linear layer, as an `nn.Linear` (inside peft wrappers, the copy being trained)."""
        if self.classifier_module is None:
            raise UnsupportedModelError(
                f"hf_robust found no classifier (last linear layer) in {type(self.model).__name__}: pass "
                "classifier='<module name>' to get_adapter() (e.g. classifier='head.fc')."
            )
        layer = active_module(self.classifier_module)
        if not isinstance(layer, nn.Linear):
            raise UnsupportedModelError(
                f"The classifier of {type(self.model).__name__} is a {type(layer).__name__}, expected nn.Linear."
            )
        return layer

    @property
    def linear_head(self) -> nn.Linear:
        """The classifier as the exact map from features to logits (`W h + b`), for the methods that read or
        rewrite it (GradTune, DFR): not a LoRA-wrapped classifier, whose output adds a low-rank update."""
        layer = self.classifier
        if is_lora_layer(self.classifier_module):
            raise UnsupportedModelError(
                f"The classifier of {type(self.model).__name__} is wrapped by LoRA (its logits are W h + b plus a "
                "low-rank update), so it cannot be read or rewritten as one linear layer. Train the classifier "
                "in full: name it in peft's `modules_to_save` (e.g. LoraConfig(..., modules_to_save=['classifier'])) "
                "and leave it out of `target_modules` (no 'all-linear')."
            )
        return layer

    @property
    def cam_layer(self) -> nn.Module:
        if self.cam_module is None:
            what = "text models use token attributions" if self.input_kind == "text" else "it is unknown"
            raise UnsupportedModelError(
                f"hf_robust has no CAM target layer for {type(self.model).__name__} ({what}): pass "
                "target_layer='<module name>' (the last convolutional stage of a CNN, or the first norm of the "
                "last transformer block of a ViT) to get_adapter()."
            )
        return self.cam_module

    @property
    def embedding_layer(self) -> nn.Module:
        if self.embedding_module is None:
            raise UnsupportedModelError(
                f"{type(self.model).__name__} has no input token embeddings: token attributions need a text model "
                "(with `get_input_embeddings()`)."
            )
        return self.embedding_module

    # -- activations
    def activation_to_map(self, activation: torch.Tensor) -> torch.Tensor:
        """The CAM layer's output as a (B, C, H, W) map (ViT tokens: prefix tokens dropped, patch grid)."""
        if isinstance(activation, (tuple, list)):
            activation = activation[0]
        if self.cam_layout == "channels":
            return activation
        tokens = activation[:, self.num_prefix_tokens :]
        if self.patch_grid is not None and self.patch_grid[0] * self.patch_grid[1] == tokens.shape[1]:
            height, width = self.patch_grid
        else:
            height = width = math.isqrt(tokens.shape[1])
            if height * width != tokens.shape[1]:
                raise UnsupportedModelError(
                    f"Cannot lay {tokens.shape[1]} patch tokens out on the patch grid {self.patch_grid} or a square "
                    "one; pass target_layer= to a layer with a (B, C, H, W) output."
                )
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)

    @contextlib.contextmanager
    def capture_penultimate(self) -> Iterator[dict[str, torch.Tensor]]:
        """Within the block, every forward stores the classifier's input `h` in the yielded dict['features']."""
        store: dict[str, torch.Tensor] = {}

        def hook(module, args):
            store["features"] = args[0]

        handle = self.classifier_module.register_forward_pre_hook(hook) if self.classifier_module is not None else None
        if handle is None:
            self.require("classifier")
        try:
            yield store
        finally:
            handle.remove()

    def penultimate(self, model_inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(features h, logits) for a batch, from one forward pass; logits == classifier(h)."""
        with self.capture_penultimate() as store:
            outputs = self.model(**model_inputs)
        logits = outputs.logits if hasattr(outputs, "logits") else outputs
        features = store["features"]
        if features.ndim > 2 and features.shape[1:].numel() != self.classifier.in_features:
            raise UnsupportedModelError(
                f"The classifier of {type(self.model).__name__} runs on every token (features of shape "
                f"{tuple(features.shape)}) and the logits are picked or pooled after it, as in decoder models "
                "(GPT-2, Llama `score`): hf_robust needs a classifier on one feature vector per example. Use an "
                "encoder classifier (BERT-style), or pass classifier= naming a layer that sees pooled features."
            )
        return features.flatten(1), logits

    def enable_attention_maps(self) -> None:
        """Make the model return attention maps that carry gradients (`output_attentions=True` needs eager
        attention; SDPA and flash kernels return none). Fails clearly for a model without them."""
        if self.cam_method != "attention_rollout":
            raise UnsupportedModelError(
                f"{type(self.model).__name__} ({self.name}) has no attention maps for attention rollout; its CAM "
                f"method is {self.cam_method!r}."
            )
        config = getattr(self.model, "config", None)
        if getattr(config, "_attn_implementation", "eager") != "eager":
            self.model.set_attn_implementation("eager")


def __getattr__(name: str):
    # FairDropout's position type was defined here before it moved to the method's package
    if name == "FairDropoutPosition":
        import warnings

        warnings.warn("hf_robust.models.adapter.FairDropoutPosition moved to "
                      "hf_robust.methods.fair_dropout.positions.FairDropoutPosition.", DeprecationWarning, stacklevel=2)
        from ..methods.fair_dropout.positions import FairDropoutPosition

        return FairDropoutPosition
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_adapter(
    model: nn.Module,
    *,
    classifier: str | None = None,
    target_layer: str | None = None,
    input_kind: str | None = None,
) -> ModelAdapter:
    """The adapter for `model` (peft and DDP wrappers are looked through).

    Args:
        classifier: name of the last linear layer (as in `model.named_modules()` of the unwrapped model), for
            models hf_robust does not know or to override its choice.
        target_layer: name of the CAM target layer, likewise.
        input_kind: `"image"` or `"text"`, for a model hf_robust does not know; by default read from the inputs
            its forward takes (`input_ids` / `pixel_values`), else its `main_input_name`, else `"image"`.
    """
    from .families import custom_adapter, find_adapter

    if input_kind is not None and input_kind not in INPUT_KINDS:
        raise ValueError(f"input_kind={input_kind!r}: expected one of {INPUT_KINDS}.")
    base = unwrap_model(model)
    adapter = find_adapter(base)
    if adapter is None:
        if classifier is None and target_layer is None:
            raise UnsupportedModelError(
                f"hf_robust has no adapter for {type(base).__name__}: it knows HF BERT-style encoders, HF ViT, "
                "HF ResNet and timm ResNet/ViT models (raw or in TimmWrapperForImageClassification). For another "
                "model pass classifier='<name of its last nn.Linear>' (needed by every method) and "
                "target_layer='<name of its CAM layer>' (needed by MaskTune) to get_adapter() (and input_kind= "
                "if its forward takes neither input_ids nor pixel_values)."
            )
        adapter = custom_adapter(base, input_kind)
    elif input_kind is not None and input_kind != adapter.input_kind:
        raise UnsupportedModelError(
            f"input_kind={input_kind!r}, but {type(base).__name__} ({adapter.name}) is a model of "
            f"{adapter.input_kind} inputs."
        )
    adapter.model = base
    modules = dict(base.named_modules())
    for argument, name, attribute in (("classifier", classifier, "classifier_module"),
                                      ("target_layer", target_layer, "cam_module")):
        if name is None:
            continue
        if name not in modules:
            raise UnsupportedModelError(
                f"{argument}={name!r} is not a module of {type(base).__name__}; some valid names: "
                f"{[n for n in modules if n][-8:]}."
            )
        setattr(adapter, attribute, modules[name])
    return adapter
