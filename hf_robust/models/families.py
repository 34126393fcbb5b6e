"""The model families hf_robust knows, as one table: family name -> how to recognise a model of it, and how to
build its `ModelAdapter`.

The first family (in table order) that recognises a model builds its adapter; a builder returns None for a
model of its family that lacks a piece (the model is then treated as a custom one). A method that knows more of
an architecture than the adapter holds keeps its own table keyed by the same family names, as peft keeps its
per-model-type tables: FairDropout's positions (`hf_robust.methods.fair_dropout.positions.POSITIONS`), the
embedding counterfactual distillation matches (`hf_robust.methods.counterfactual.embedding.EMBEDDINGS`).

Families:
- `timm_vit`, `timm_resnet`: timm ViTs and ResNets, raw or inside transformers'
  `TimmWrapperForImageClassification`;
- `clip_zero_shot`: a CLIP image tower with a zero-shot head (`hf_robust.models.clip.CLIPZeroShotClassifier`);
- `mnist_cnn`: MaskTune's biased-MNIST CNN (`hf_robust.models.mnist_cnn`);
- `hf_resnet`: transformers' `ResNetForImageClassification`;
- `hf_vit`: transformers' ViT-like image classifiers (ViT, DeiT, DINOv2, ...: patch embeddings, then blocks);
- `hf_text`: transformers' encoder text classifiers (BERT, RoBERTa, DistilBERT, ... with a `classifier` or
  `score` head).
Any other model is `custom`: `get_adapter(model, classifier=..., target_layer=..., input_kind=...)`.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .adapter import ModelAdapter, UnsupportedModelError, first_submodule, last_linear, submodule


@dataclass(frozen=True)
class Family:
    """One entry of `FAMILIES`: `recognises(model)`, and `build(model, family)` -> the adapter (or None)."""

    recognises: Callable[[nn.Module], bool]
    build: Callable[[nn.Module, str], ModelAdapter | None]


# ---------------------------------------------------------------------------------------------- structure
def model_type(model: nn.Module) -> str | None:
    """The transformers `config.model_type` of `model`, None for a model without a transformers config."""
    return getattr(getattr(model, "config", None), "model_type", None)


def timm_model(model: nn.Module) -> nn.Module | None:
    """The timm model of `model`: the one inside a `TimmWrapperForImageClassification`, `model` itself if it
    is a raw timm model, else None."""
    kind = model_type(model)
    if kind == "timm_wrapper" and isinstance(getattr(model, "timm_model", None), nn.Module):
        return model.timm_model
    if kind is None and hasattr(model, "pretrained_cfg") and hasattr(model, "forward_head"):
        return model
    return None


def timm_stages(timm: nn.Module) -> list[nn.Module] | None:
    """The four residual stages `layer1`..`layer4` of a timm ResNet, None for another timm model."""
    stages = [getattr(timm, f"layer{i}", None) for i in range(1, 5)]
    return stages if all(isinstance(stage, nn.Module) for stage in stages) else None


def hf_vit_blocks(model: nn.Module) -> Sequence[nn.Module] | None:
    """The transformer blocks of a transformers ViT-like classifier, in order."""
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return first_submodule(backbone, "encoder.layer", "encoder.layers", "layers")


def last_block(stage: nn.Module) -> nn.Module:
    """The module whose output is a residual stage's output: its last block. (Hooks go there, not on the stage:
    timm's activation checkpointing calls the blocks one by one, never the stage.)"""
    if isinstance(stage, nn.Sequential) and len(stage):
        return stage[-1]
    return stage


def _patch_grid(config) -> tuple[int, int] | None:
    """(h, w) patches of a ViT-like config (`image_size`, `patch_size`), if it has them."""
    image, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if image is None or patch is None:
        return None
    image = tuple(image) if isinstance(image, (list, tuple)) else (image, image)
    patch = tuple(patch) if isinstance(patch, (list, tuple)) else (patch, patch)
    return image[0] // patch[0], image[1] // patch[1]


def _hf_prefix_tokens(embeddings: nn.Module) -> int:
    """Tokens before the patches in an HF ViT-like sequence: CLS, DeiT's distillation token, register tokens."""
    count = 1
    if isinstance(getattr(embeddings, "distillation_token", None), torch.Tensor):
        count += 1
    registers = getattr(embeddings, "register_tokens", None)
    if isinstance(registers, torch.Tensor) and registers.ndim == 3:
        count += registers.shape[1]
    return count


def _hf_vit_embeddings(model: nn.Module) -> nn.Module | None:
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    embeddings = submodule(backbone, "embeddings")
    return embeddings if embeddings is not None and hasattr(embeddings, "patch_embeddings") else None


# ---------------------------------------------------------------------------------------------- builders
# The CAM layer of a ViT: the first norm of the last block (HF ViT `layernorm_before`, timm `norm1`, CLIP
# `layer_norm1`). The last block's output does not reach the logits through the patch tokens (only the CLS
# token is read after it); the input of its attention does.
_BLOCK_NORMS = ("layernorm_before", "norm1", "layer_norm1")


def _vit(model, family, name, blocks, classifier, num_prefix_tokens, cam_method="xgradcam", patch_grid=None):
    """The adapter of a ViT-like image classifier: every ViT family differs only in where these pieces are."""
    return ModelAdapter(
        model=model, family=family, name=name, input_kind="image", classifier_module=classifier,
        cam_module=first_submodule(blocks[-1], *_BLOCK_NORMS), cam_layout="tokens",
        num_prefix_tokens=num_prefix_tokens, cam_method=cam_method, patch_grid=patch_grid,
    )


def _timm_classifier(timm: nn.Module) -> nn.Module | None:
    with contextlib.suppress(Exception):
        return last_linear(timm.get_classifier())
    return None


def _timm_name(model: nn.Module, kind: str) -> str:
    return f"timm_wrapper_{kind}" if model_type(model) == "timm_wrapper" else f"timm_{kind}"


def _is_timm_vit(model: nn.Module) -> bool:
    timm = timm_model(model)
    return (timm is not None and isinstance(getattr(timm, "blocks", None), nn.Sequential | nn.ModuleList)
            and hasattr(timm, "num_prefix_tokens"))


def _timm_vit(model, family):
    timm = timm_model(model)
    return _vit(model, family, _timm_name(model, "vit"), timm.blocks, _timm_classifier(timm),
                int(timm.num_prefix_tokens))


def _timm_resnet(model, family):
    timm = timm_model(model)
    stages = timm_stages(timm)
    if stages is None:
        return None
    return ModelAdapter(
        model=model, family=family, name=_timm_name(model, "resnet"), input_kind="image",
        classifier_module=_timm_classifier(timm),
        cam_module=last_block(stages[-1]),  # a hook on the stage never fires under gradient checkpointing
    )


def _clip_zero_shot(model, family):
    return _vit(model, family, family, model.vision_model.encoder.layers, model.classifier, 1,
                cam_method="attention_rollout", patch_grid=_patch_grid(model.config.vision_config))


def _mnist_cnn(model, family):
    # the CAM layer: the last conv block (its ReLU), 8x8 at 28x28 (the authors' backbone[-3])
    return ModelAdapter(model=model, family=family, input_kind="image",
                        classifier_module=last_linear(model.classifier), cam_module=model.conv4)


def _hf_resnet(model, family):
    return ModelAdapter(model=model, family=family, input_kind="image",
                        classifier_module=last_linear(getattr(model, "classifier", None)),
                        cam_module=model.resnet.encoder.stages[-1])


def _hf_vit(model, family):
    blocks = hf_vit_blocks(model)
    if blocks is None:
        return None
    return _vit(model, family, f"hf_{model_type(model)}", blocks, last_linear(getattr(model, "classifier", None)),
                _hf_prefix_tokens(_hf_vit_embeddings(model)),
                cam_method="attention_rollout" if hasattr(model, "set_attn_implementation") else "xgradcam",
                patch_grid=_patch_grid(model.config))


def _is_hf_text(model: nn.Module) -> bool:
    return (model_type(model) is not None and hasattr(model, "get_input_embeddings")
            and getattr(model.config, "is_encoder_decoder", False) is False)


def _hf_text(model, family):
    classifier = last_linear(getattr(model, "classifier", None) or getattr(model, "score", None))
    if classifier is None:
        return None
    return ModelAdapter(model=model, family=family, name=f"hf_{model_type(model)}", input_kind="text",
                        classifier_module=classifier, embedding_module=model.get_input_embeddings(),
                        main_input_name="input_ids")


def _has_model_type(*names: str) -> Callable[[nn.Module], bool]:
    return lambda model: model_type(model) in names


FAMILIES: dict[str, Family] = {
    "timm_vit": Family(_is_timm_vit, _timm_vit),
    "timm_resnet": Family(lambda model: timm_model(model) is not None, _timm_resnet),  # any other timm model
    "clip_zero_shot": Family(_has_model_type("clip_zero_shot"), _clip_zero_shot),
    "mnist_cnn": Family(_has_model_type("hf_robust_mnist_cnn"), _mnist_cnn),
    "hf_resnet": Family(lambda model: model_type(model) == "resnet"
                        and submodule(model, "resnet.encoder.stages") is not None, _hf_resnet),
    "hf_vit": Family(lambda model: model_type(model) is not None and _hf_vit_embeddings(model) is not None, _hf_vit),
    "hf_text": Family(_is_hf_text, _hf_text),
}

# model types that look like a family but are not classifiers: why, and what to use instead
REFUSED = {
    "clip": (
        "A CLIPModel is an image-text model, not a classifier: build its zero-shot classifier with "
        "hf_robust.models.clip.CLIPZeroShotClassifier.from_clip(clip_model, tokenizer, class_names) (or "
        "hf_robust.models.clip.load_clip_zero_shot(name_or_path, class_names))."
    ),
}


def find_adapter(model: nn.Module) -> ModelAdapter | None:
    """The adapter of the first family that recognises `model` (already unwrapped), or None."""
    refused = REFUSED.get(model_type(model))
    if refused:
        raise UnsupportedModelError(refused)
    for family, entry in FAMILIES.items():
        if entry.recognises(model):
            return entry.build(model, family)
    return None


# ---------------------------------------------------------------------------------------------- custom models
_TEXT_INPUTS = ("input_ids", "inputs_embeds")


def infer_input_kind(model: nn.Module) -> str:
    """"text" or "image" for a model no family knows: from the inputs its forward takes (`input_ids` or
    `pixel_values`, the names hf_robust's batches use), else its `main_input_name`, else "image"."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        parameters = {}
    text = any(name in parameters for name in _TEXT_INPUTS)
    image = "pixel_values" in parameters
    if text != image:
        return "text" if text else "image"
    return "text" if getattr(model, "main_input_name", None) in _TEXT_INPUTS else "image"


def custom_adapter(model: nn.Module, input_kind: str | None = None) -> ModelAdapter:
    """The adapter of a model no family knows: its classifier and CAM layer are named by the caller
    (`get_adapter(model, classifier=..., target_layer=...)`); a text model's token embeddings are its
    `get_input_embeddings()` where it has one."""
    kind = input_kind or infer_input_kind(model)
    embeddings = None
    if kind == "text":
        with contextlib.suppress(AttributeError, NotImplementedError):
            found = model.get_input_embeddings()
            embeddings = found if isinstance(found, nn.Module) else None
    return ModelAdapter(model=model, family="custom", input_kind=kind, classifier_module=None,
                        embedding_module=embeddings, main_input_name="input_ids" if kind == "text" else "pixel_values")
