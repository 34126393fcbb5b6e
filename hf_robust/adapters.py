"""What each architecture family exposes to the methods — the one place that knows model layouts.

An adapter answers, for a model:
- `classifier`: its last linear layer (`z = W h + b`), and `penultimate`: the features `h` that layer reads;
- `cam_layer`: where class activation maps are taken (xGradCAM for MaskTune, the CNN path of counterfactual
  distillation), and how to read its activation as a (B, C, H, W) map;
- `fair_dropout_positions`: the named places FairDropout can sit (SPEC 4.3);
- `embedding_layer` for text models (token attributions).

Families: HF BERT-style encoders (BERT, RoBERTa, DistilBERT, ... with a `classifier` head), HF ViT, HF ResNet,
timm ResNets and ViTs (raw, or inside transformers' `TimmWrapperForImageClassification`). peft-wrapped models
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
    """

    module: nn.Module
    where: str
    layout: str
    num_features: int | None = None


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
    """The last nn.Linear inside `module` (itself if it is one), peft wrappers kept so that hooks see them."""
    if module is None:
        return None
    if isinstance(active_module(module), nn.Linear):
        return module
    found = None
    for child in module.modules():
        if child is not module and isinstance(active_module(child), nn.Linear):
            found = child
    return found


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
    main_input_name: str = "pixel_values"

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
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise UnsupportedModelError(
                f"Cannot lay {tokens.shape[1]} patch tokens out on a square grid; pass target_layer= to a layer "
                "with a (B, C, H, W) output."
            )
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)

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
        return store["features"].flatten(1), logits


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
            f"block{i}": FairDropoutPosition(block, "output", "tokens", dim) for i, block in enumerate(blocks)
        }
        if classifier is not None:
            positions["pooled"] = FairDropoutPosition(classifier, "input", "features", dim)
        return ModelAdapter(
            model=model,
            family=f"{family_prefix}vit",
            input_kind="image",
            classifier_module=classifier,
            cam_module=_first(blocks[-1], "norm1"),
            cam_layout="tokens",
            num_prefix_tokens=int(timm_model.num_prefix_tokens),
            positions=positions,
        )
    # A ResNet-like timm model: layer1..layer4
    stages = [getattr(timm_model, f"layer{i}", None) for i in range(1, 5)]
    if all(isinstance(stage, nn.Module) for stage in stages):
        info = {entry["module"]: entry["num_chs"] for entry in getattr(timm_model, "feature_info", [])}
        positions = {
            f"dp{i + 2}": FairDropoutPosition(stage, "output", "channels", info.get(f"layer{i + 1}"))
            for i, stage in enumerate(stages)
        }
        return ModelAdapter(
            model=model,
            family=f"{family_prefix}resnet",
            input_kind="image",
            classifier_module=classifier,
            cam_module=stages[-1],
            positions=positions,
        )
    return None


def _hf_adapter(model: nn.Module) -> ModelAdapter | None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        return None
    if model_type == "timm_wrapper" and hasattr(model, "timm_model"):
        return _timm_adapter(model, model.timm_model, "timm_wrapper_")
    if model_type == "resnet" and _get(model, "resnet.encoder.stages") is not None:
        stages = model.resnet.encoder.stages
        sizes = list(getattr(config, "hidden_sizes", [None] * len(stages)))
        positions = {
            f"dp{i + 2}": FairDropoutPosition(stage, "output", "channels", sizes[i]) for i, stage in enumerate(stages)
        }
        return ModelAdapter(
            model=model,
            family="hf_resnet",
            input_kind="image",
            classifier_module=_last_linear(getattr(model, "classifier", None)),
            cam_module=stages[-1],
            positions=positions,
        )
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    embeddings = _get(backbone, "embeddings") if backbone is not None else None
    if embeddings is not None and hasattr(embeddings, "patch_embeddings"):  # ViT-like
        blocks = _first(backbone, "encoder.layer", "encoder.layers", "layers")
        if blocks is None:
            return None
        classifier = _last_linear(getattr(model, "classifier", None))
        dim = getattr(config, "hidden_size", None)
        positions = {f"block{i}": FairDropoutPosition(b, "output", "tokens", dim) for i, b in enumerate(blocks)}
        if classifier is not None:
            positions["pooled"] = FairDropoutPosition(classifier, "input", "features", dim)
        return ModelAdapter(
            model=model,
            family=f"hf_{model_type}",
            input_kind="image",
            classifier_module=classifier,
            cam_module=_first(blocks[-1], "layernorm_before", "norm1", "layer_norm1"),
            cam_layout="tokens",
            num_prefix_tokens=1,
            positions=positions,
        )
    if hasattr(model, "get_input_embeddings") and getattr(config, "is_encoder_decoder", False) is False:
        head = getattr(model, "classifier", None) or getattr(model, "score", None)
        classifier = _last_linear(head)
        if classifier is None:
            return None
        dim = active_module(classifier).in_features
        positions = {
            "pooled": FairDropoutPosition(classifier, "input", "features", dim),
            # `fc`: FairDropout on a new linear projection inserted before the classifier (SPEC 4.3)
            "fc": FairDropoutPosition(classifier, "input", "features", dim),
        }
        return ModelAdapter(
            model=model,
            family=f"hf_{model_type}",
            input_kind="text",
            classifier_module=classifier,
            embedding_module=model.get_input_embeddings(),
            positions=positions,
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
