"""What each architecture family exposes to the methods — the one place that knows model layouts.

An adapter answers, for a model:
- `classifier`: its last linear layer (`z = W h + b`), and `penultimate`: the features `h` that layer reads;
- `cam_layer`: where class activation maps are taken (xGradCAM for MaskTune, the CNN path of counterfactual
  distillation), and how to read its activation as a (B, C, H, W) map;
- `fair_dropout_positions`: the named places FairDropout can sit (SPEC 4.3);
- `embedding_layer` for text models (token attributions);
- `cam_method`: how a class activation map is made for the model — `"attention_rollout"` (gradient-weighted
  attention rollout, for transformers ViT-like models that return attention maps) or `"xgradcam"` at
  `cam_layer` — and `patch_grid`, the (h, w) grid of patches the map lives on where it is known in advance;
- `image_embedding`: the image embedding counterfactual distillation matches between student and teacher (for
  a CLIP zero-shot classifier the projected, unnormalised CLIP embedding; otherwise the penultimate features).

Families: HF BERT-style encoders (BERT, RoBERTa, DistilBERT, ... with a `classifier` head), HF ViT, HF ResNet,
MaskTune's biased-MNIST CNN (`hf_robust.models.mnist_cnn`),
timm ResNets and ViTs (raw, or inside transformers' `TimmWrapperForImageClassification`), CLIP image towers
with a zero-shot head (`hf_robust.models.clip.CLIPZeroShotClassifier`). peft-wrapped models
(LoRA, ...) are looked through. Anything else gets an error that names what is missing and the argument that
supplies it (`classifier=`, `target_layer=`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn


# Set (to True) on a model whose forward pre-hook consumes `example_idx` (FairDropout): the trainers then pass
# `example_idx` into the model's inputs instead of dropping it.
EXAMPLE_IDX_FLAG = "_hf_robust_uses_example_idx"


class UnsupportedModelError(ValueError):
    """hf_robust cannot find, in this model, a piece a method needs."""


@dataclass
class FairDropoutPosition:
    """Where FairDropout can act: on the `output` of `module`, or on the `input` of `module` (the classifier).

    `layout` says which axis holds the neurons: `channels` (B, C, H, W), `tokens` (B, T, D), `features` (B, D).
    `projection`: FairDropout acts on a NEW linear projection (D -> D) inserted there (BERT's `fc`).
    `consumers`: the layers that read these neurons on their input axis (weight dim 1: the next stage's first
    convs, or the classifier after a channel-wise pooling), into which an export folds the eval-time mask;
    `fold_error` says why a position cannot be folded (a residual stream, a LayerNorm, an identity shortcut).
    """

    module: nn.Module
    where: str
    layout: str
    num_features: int | None = None
    projection: bool = False
    consumers: tuple[nn.Module, ...] = ()
    fold_error: str | None = None


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


def _get(root: nn.Module, path: str) -> nn.Module | None:
    module = root
    for part in path.split("."):
        if not hasattr(module, part):
            return None
        module = getattr(module, part)
    return module if isinstance(module, nn.Module) else None


def _first(root: nn.Module, *paths: str) -> nn.Module | None:
    for path in paths:
        module = _get(root, path)
        if module is not None:
            return module
    return None


def _last_linear(module: nn.Module | None) -> nn.Module | None:
    """The last nn.Linear inside `module` (itself if it is one), peft wrappers kept so that hooks see them. A
    peft layer counts as one Linear: its own parts (LoRA's `lora_A`/`lora_B`) are never the classifier."""
    if module is None:
        return None
    if isinstance(active_module(module), nn.Linear):
        return module
    found = None
    for child in module.children():
        hit = _last_linear(child)
        if hit is not None:
            found = hit
    return found


def is_lora_layer(module: nn.Module | None) -> bool:
    """A peft LoRA-style layer: a frozen `base_layer` plus a trained low-rank update added to its output."""
    return module is not None and isinstance(getattr(module, "base_layer", None), nn.Module) and (
        hasattr(module, "lora_A") or hasattr(module, "lora_B")
    )


@dataclass
class ModelAdapter:
    """Architecture knowledge for one model. Build it with `get_adapter(model)`."""

    model: nn.Module
    family: str
    input_kind: str
    classifier_module: nn.Module | None
    cam_module: nn.Module | None = None
    cam_layout: str = "channels"
    num_prefix_tokens: int = 0
    embedding_module: nn.Module | None = None
    positions: dict[str, FairDropoutPosition] = field(default_factory=dict)
    # where FairDropout goes when no position is named (the paper's choices: after the third residual stage
    # of a ResNet, on a new projection before a text classifier)
    default_positions: tuple[str, ...] = ()
    # the positions FairDropout's label-free selection tries (each alone) when none is named; empty: the default.
    # The paper tunes the position by worst-class accuracy over {dp2..dp5} (ResNet-50) and {logits, fc} (BERT); two
    # per family keeps the grid at 2 positions x the (p_gen, p_mem) pairs
    selection_positions: tuple[str, ...] = ()
    main_input_name: str = "pixel_values"
    cam_method: str = "xgradcam"
    patch_grid: tuple[int, int] | None = None
    # whose OUTPUT is the image embedding distilled by counterfactual distillation (default: classifier input)
    image_embedding_module: nn.Module | None = None

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
                f"{type(self.model).__name__} has no input token embeddings: token attributions need a text model."
            )
        return self.embedding_module

    @property
    def fair_dropout_positions(self) -> dict[str, FairDropoutPosition]:
        return dict(self.positions)

    def fair_dropout_position(self, name: str) -> FairDropoutPosition:
        if name not in self.positions:
            raise UnsupportedModelError(
                f"Unknown FairDropout position {name!r} for {type(self.model).__name__} ({self.family}): valid "
                f"positions are {sorted(self.positions, key=_natural)}."
            )
        return self.positions[name]

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

    @contextlib.contextmanager
    def capture_image_embedding(self) -> Iterator[dict[str, torch.Tensor]]:
        """Within the block, every forward stores the image embedding in the yielded dict['embedding']."""
        store: dict[str, torch.Tensor] = {}
        if self.image_embedding_module is None:
            self.require("classifier")

            def read_input(module, args):
                store["embedding"] = args[0]

            handle = self.classifier_module.register_forward_pre_hook(read_input)
        else:

            def read_output(module, args, output):
                store["embedding"] = output[0] if isinstance(output, (tuple, list)) else output

            handle = self.image_embedding_module.register_forward_hook(read_output)
        try:
            yield store
        finally:
            handle.remove()

    def image_embedding(self, model_inputs: dict) -> torch.Tensor:
        """The image embedding (B, D) of a batch (one forward of `self.model`)."""
        with self.capture_image_embedding() as store:
            self.model(**model_inputs)
        return store["embedding"].flatten(1)

    def enable_attention_maps(self) -> None:
        """Make the model return attention maps that carry gradients (`output_attentions=True` needs eager
        attention; SDPA and flash kernels return none). Fails clearly for a model without them."""
        if self.cam_method != "attention_rollout":
            raise UnsupportedModelError(
                f"{type(self.model).__name__} ({self.family}) has no attention maps for attention rollout; its CAM "
                f"method is {self.cam_method!r}."
            )
        config = getattr(self.model, "config", None)
        if getattr(config, "_attn_implementation", "eager") != "eager":
            self.model.set_attn_implementation("eager")


_TRANSFORMER_FOLD_ERROR = (
    "a transformer block's output is the residual stream, read by LayerNorms that normalise over all neurons, so "
    "its eval-time mask cannot be folded into stock weights; use the 'pooled' position for an exportable model"
)


def _stage_consumers(next_stage_convs: list[nn.Module | None], classifier: nn.Module | None, is_last: bool,
                     stage_name: str):
    """(consumers, fold_error) of a ResNet stage's output: the first block of the next stage (its first conv and
    its shortcut conv), or the classifier after the global average pool."""
    if is_last:
        if classifier is None:
            return (), f"no classifier reads the output of {stage_name}"
        return (classifier,), None
    first_conv, shortcut_conv = next_stage_convs
    if shortcut_conv is None:
        return (), (
            f"the block after {stage_name} adds its input through an identity shortcut (no downsampling conv), so "
            "the mask cannot be folded into a weight"
        )
    return (first_conv, shortcut_conv), None


def _last_block(stage: nn.Module) -> nn.Module:
    """The module whose output is a ResNet stage's output: its last block. (Hooks go there, not on the stage:
    timm's activation checkpointing calls the blocks one by one, never the stage.)"""
    if isinstance(stage, nn.Sequential) and len(stage):
        return stage[-1]
    return stage


def _first_conv(module: nn.Module | None) -> nn.Module | None:
    if module is None:
        return None
    return next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)


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


def _natural(name: str):
    digits = "".join(ch for ch in name if ch.isdigit())
    return (name.rstrip("0123456789"), int(digits) if digits else -1)


def _timm_adapter(model: nn.Module, timm_model: nn.Module, family_prefix: str) -> ModelAdapter | None:
    classifier = None
    with contextlib.suppress(Exception):
        classifier = _last_linear(timm_model.get_classifier())
    # A ViT-like timm model: transformer blocks and prefix tokens
    blocks = getattr(timm_model, "blocks", None)
    if isinstance(blocks, nn.Sequential | nn.ModuleList) and hasattr(timm_model, "num_prefix_tokens"):
        dim = getattr(timm_model, "embed_dim", None)
        positions = {
            f"block{i}": FairDropoutPosition(block, "output", "tokens", dim, fold_error=_TRANSFORMER_FOLD_ERROR)
            for i, block in enumerate(blocks)
        }
        if classifier is not None:
            positions["pooled"] = FairDropoutPosition(classifier, "input", "features", dim, consumers=(classifier,))
        return ModelAdapter(
            model=model,
            family=f"{family_prefix}vit",
            input_kind="image",
            classifier_module=classifier,
            cam_module=_first(blocks[-1], "norm1"),
            cam_layout="tokens",
            num_prefix_tokens=int(timm_model.num_prefix_tokens),
            positions=positions,
            default_positions=("pooled",) if classifier is not None else (),
        )
    # A ResNet-like timm model: layer1..layer4
    stages = [getattr(timm_model, f"layer{i}", None) for i in range(1, 5)]
    if all(isinstance(stage, nn.Module) for stage in stages):
        info = {entry["module"]: entry["num_chs"] for entry in getattr(timm_model, "feature_info", [])}
        positions = {}
        for i, stage in enumerate(stages):
            following = stages[i + 1][0] if i < 3 else None
            consumers, fold_error = _stage_consumers(
                [getattr(following, "conv1", None), _first_conv(getattr(following, "downsample", None))],
                classifier, i == 3, f"layer{i + 1}",
            )
            positions[f"dp{i + 2}"] = FairDropoutPosition(
                _last_block(stage), "output", "channels", info.get(f"layer{i + 1}"), consumers=consumers,
                fold_error=fold_error,
            )
        return ModelAdapter(
            model=model,
            family=f"{family_prefix}resnet",
            input_kind="image",
            classifier_module=classifier,
            cam_module=_last_block(stages[-1]),  # a hook on the stage never fires under gradient checkpointing
            positions=positions,
            default_positions=("dp4",),
            selection_positions=("dp4", "dp3"),
        )
    return None


def _hf_adapter(model: nn.Module) -> ModelAdapter | None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        return None
    if model_type == "timm_wrapper" and hasattr(model, "timm_model"):
        return _timm_adapter(model, model.timm_model, "timm_wrapper_")
    if model_type == "clip_zero_shot":  # hf_robust.models.clip.CLIPZeroShotClassifier
        vision_config = config.vision_config
        blocks = model.vision_model.encoder.layers
        dim = config.projection_dim
        positions = {
            f"block{i}": FairDropoutPosition(b, "output", "tokens", vision_config.hidden_size,
                                             fold_error=_TRANSFORMER_FOLD_ERROR)
            for i, b in enumerate(blocks)
        }
        positions["pooled"] = FairDropoutPosition(model.classifier, "input", "features", dim, consumers=(model.classifier,))
        return ModelAdapter(
            model=model,
            family="clip_zero_shot",
            input_kind="image",
            classifier_module=model.classifier,
            cam_module=blocks[-1].layer_norm1,
            cam_layout="tokens",
            num_prefix_tokens=1,
            positions=positions,
            default_positions=("pooled",),
            cam_method="attention_rollout",
            patch_grid=_patch_grid(vision_config),
            # f = the projected CLIP image embedding before normalisation (the head reads it normalised)
            image_embedding_module=model.visual_projection,
        )
    if model_type == "hf_robust_mnist_cnn":  # hf_robust.models.mnist_cnn: MaskTune's biased-MNIST CNN
        convs = [model.conv1, model.conv2, model.conv3, model.conv4]
        width = [c[0].out_channels for c in convs]
        flatten_error = ("the last block's map is flattened into the head's first Linear (channels x positions), so a "
                         "channel mask is not one weight column")
        positions = {
            # after each conv block's ReLU (channels); the next block's conv reads it (through a max-pool after
            # conv2, which keeps a zeroed channel zero)
            **{f"conv{i + 1}": FairDropoutPosition(convs[i], "output", "channels", width[i],
                                                  consumers=(convs[i + 1][0],)) for i in range(3)},
            "conv4": FairDropoutPosition(convs[3], "output", "channels", width[3], fold_error=flatten_error),
            # the hidden features the classifier reads (as a ResNet's pooled features)
            "hidden": FairDropoutPosition(model.classifier, "input", "features", model.classifier.in_features,
                                          consumers=(model.classifier,)),
        }
        return ModelAdapter(
            model=model,
            family="mnist_cnn",
            input_kind="image",
            classifier_module=_last_linear(model.classifier),
            cam_module=model.conv4,  # the last conv block (its ReLU): 8x8 at 28x28, the authors' backbone[-3]
            positions=positions,
            default_positions=("conv3",),
            selection_positions=("conv3", "hidden"),
        )
    if model_type == "clip":
        raise UnsupportedModelError(
            "A CLIPModel is an image-text model, not a classifier: build its zero-shot classifier with "
            "hf_robust.models.clip.CLIPZeroShotClassifier.from_clip(clip_model, tokenizer, class_names) (or "
            "hf_robust.models.clip.load_clip_zero_shot(name_or_path, class_names))."
        )
    if model_type == "resnet" and _get(model, "resnet.encoder.stages") is not None:
        stages = model.resnet.encoder.stages
        sizes = list(getattr(config, "hidden_sizes", [None] * len(stages)))
        classifier = _last_linear(getattr(model, "classifier", None))
        positions = {}
        for i, stage in enumerate(stages):
            following = stages[i + 1].layers[0] if i + 1 < len(stages) else None
            consumers, fold_error = _stage_consumers(
                [_first_conv(getattr(following, "layer", None)), _first_conv(getattr(following, "shortcut", None))],
                classifier, following is None, f"stage {i + 1}",
            )
            positions[f"dp{i + 2}"] = FairDropoutPosition(
                _last_block(stage.layers), "output", "channels", sizes[i], consumers=consumers, fold_error=fold_error
            )
        return ModelAdapter(
            model=model,
            family="hf_resnet",
            input_kind="image",
            classifier_module=classifier,
            cam_module=stages[-1],
            positions=positions,
            default_positions=("dp4",) if "dp4" in positions else (),
            selection_positions=tuple(p for p in ("dp4", "dp3") if p in positions),
        )
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    embeddings = _get(backbone, "embeddings") if backbone is not None else None
    if embeddings is not None and hasattr(embeddings, "patch_embeddings"):  # ViT-like
        blocks = _first(backbone, "encoder.layer", "encoder.layers", "layers")
        if blocks is None:
            return None
        classifier = _last_linear(getattr(model, "classifier", None))
        dim = getattr(config, "hidden_size", None)
        positions = {
            f"block{i}": FairDropoutPosition(b, "output", "tokens", dim, fold_error=_TRANSFORMER_FOLD_ERROR)
            for i, b in enumerate(blocks)
        }
        if classifier is not None:
            positions["pooled"] = FairDropoutPosition(classifier, "input", "features", dim, consumers=(classifier,))
        return ModelAdapter(
            model=model,
            family=f"hf_{model_type}",
            input_kind="image",
            classifier_module=classifier,
            cam_module=_first(blocks[-1], "layernorm_before", "norm1", "layer_norm1"),
            cam_layout="tokens",
            num_prefix_tokens=_hf_prefix_tokens(embeddings),
            positions=positions,
            default_positions=("pooled",) if classifier is not None else (),
            cam_method="attention_rollout" if hasattr(model, "set_attn_implementation") else "xgradcam",
            patch_grid=_patch_grid(config),
        )
    if hasattr(model, "get_input_embeddings") and getattr(config, "is_encoder_decoder", False) is False:
        head = getattr(model, "classifier", None) or getattr(model, "score", None)
        classifier = _last_linear(head)
        if classifier is None:
            return None
        dim = active_module(classifier).in_features
        positions = {
            "pooled": FairDropoutPosition(classifier, "input", "features", dim, consumers=(classifier,)),
            # `fc`: FairDropout on a new linear projection inserted before the classifier (SPEC 4.3); with no
            # nonlinearity in between, projection + mask + classifier fold into one Linear on export
            "fc": FairDropoutPosition(classifier, "input", "features", dim, projection=True, consumers=(classifier,)),
        }
        return ModelAdapter(
            model=model,
            family=f"hf_{model_type}",
            input_kind="text",
            classifier_module=classifier,
            embedding_module=model.get_input_embeddings(),
            positions=positions,
            default_positions=("fc",),
            selection_positions=("fc", "pooled"),
            main_input_name="input_ids",
        )
    return None


def get_adapter(
    model: nn.Module, *, classifier: str | None = None, target_layer: str | None = None
) -> ModelAdapter:
    """The adapter for `model` (peft and DDP wrappers are looked through).

    Args:
        classifier: name of the last linear layer (as in `model.named_modules()` of the unwrapped model), for
            models hf_robust does not know or to override its choice.
        target_layer: name of the CAM target layer, likewise.
    """
    base = unwrap_model(model)
    adapter = _hf_adapter(base)
    if adapter is None and hasattr(base, "pretrained_cfg") and hasattr(base, "forward_head"):
        adapter = _timm_adapter(base, base, "timm_")
    if adapter is None:
        adapter = ModelAdapter(
            model=base, family="custom", input_kind="image", classifier_module=None
        )
        if classifier is None and target_layer is None:
            raise UnsupportedModelError(
                f"hf_robust has no adapter for {type(base).__name__}: it knows HF BERT-style encoders, HF ViT, "
                "HF ResNet and timm ResNet/ViT models (raw or in TimmWrapperForImageClassification). For another "
                "model pass classifier='<name of its last nn.Linear>' (needed by every method) and "
                "target_layer='<name of its CAM layer>' (needed by MaskTune) to get_adapter()."
            )
    adapter.model = base
    modules = dict(base.named_modules())
    for argument, name, attribute in (("classifier", classifier, "classifier_module"), ("target_layer", target_layer, "cam_module")):
        if name is None:
            continue
        if name not in modules:
            raise UnsupportedModelError(
                f"{argument}={name!r} is not a module of {type(base).__name__}; some valid names: "
                f"{[n for n in modules if n][-8:]}."
            )
        setattr(adapter, attribute, modules[name])
    return adapter
