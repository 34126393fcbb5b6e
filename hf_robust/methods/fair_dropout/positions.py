"""Where FairDropout can sit in each model family, and what an export folds its evaluation-time mask into.

One table, `POSITIONS`, keyed by the adapter's family (`hf_robust.models.families.FAMILIES`), as peft keeps its
per-model-type target-module tables. Each entry finds the family's named positions in a model and gives the
family's default position and the positions the label-free selection tries:

- `hf_resnet`, `timm_resnet`: `dp2`..`dp5` (after residual stage 1..4); default `dp4`; selection `dp4`, `dp3`;
- `hf_vit`, `timm_vit`, `clip_zero_shot`: `block{i}` (after transformer block i, in the residual stream) and
  `pooled` (the classifier's input); default `pooled`; selection: the default;
- `hf_text`: `pooled` and `fc` (a new projection before the classifier); default `fc`; selection `fc`, `pooled`;
- `mnist_cnn`: `conv1`..`conv4` (after each conv block) and `hidden`; default `conv3`; selection `conv3`, `hidden`.

The defaults are the paper's choices (Nanfack and Belilovsky, "FairDropout: Using Example-Tied Dropout to Enhance
Generalization of Minority Groups", arXiv:2502.06695): after the third residual stage of a ResNet, on a new
projection before a text classifier. The paper tunes the position by worst-class accuracy over {dp2..dp5}
(ResNet-50) and {logits, fc} (BERT); two candidates per family keep the selection grid at 2 positions x the
(p_gen, p_mem) pairs. A family without an entry (a custom model) has no position.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ...models.adapter import ModelAdapter, UnsupportedModelError, active_module
from ...models.families import hf_vit_blocks, last_block, timm_model, timm_stages


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


@dataclass(frozen=True)
class FamilyPositions:
    """FairDropout's entry for one model family: `find(adapter)` -> {name: position}; `default`: where
    FairDropout goes when no position is named; `selection`: the candidates of the label-free selection (each
    alone; empty: the default). Names a model lacks are left out of both."""

    find: Callable[[ModelAdapter], dict[str, FairDropoutPosition]]
    default: tuple[str, ...] = ()
    selection: tuple[str, ...] = ()


def natural_order(name: str):
    """Sort key: `dp2` < `dp10`, `block2` < `block10`."""
    digits = "".join(ch for ch in name if ch.isdigit())
    return (name.rstrip("0123456789"), int(digits) if digits else -1)


# ---------------------------------------------------------------------------------------------- shared shapes
_RESIDUAL_STREAM = (
    "a transformer block's output is the residual stream, read by LayerNorms that normalise over all neurons, so "
    "its eval-time mask cannot be folded into stock weights; use the 'pooled' position for an exportable model"
)


def _classifier_input(classifier: nn.Module, num_features: int | None, projection: bool = False) -> FairDropoutPosition:
    """On the features the classifier reads (folded into the classifier's columns on export)."""
    return FairDropoutPosition(classifier, "input", "features", num_features, projection=projection,
                               consumers=(classifier,))


def _transformer(blocks, width: int | None, classifier: nn.Module | None, pooled_width: int | None):
    """`block{i}`: after each transformer block (tokens, not foldable); `pooled`: the classifier's input."""
    positions = {f"block{i}": FairDropoutPosition(block, "output", "tokens", width, fold_error=_RESIDUAL_STREAM)
                 for i, block in enumerate(blocks)}
    if classifier is not None:
        positions["pooled"] = _classifier_input(classifier, pooled_width)
    return positions


def _first_conv(module: nn.Module | None) -> nn.Module | None:
    if module is None:
        return None
    return next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)


def _residual_stages(stages, widths, classifier, next_stage_convs: Callable[[nn.Module], tuple], stage_name):
    """`dp{i+2}`: after residual stage i (its last block). An export folds the mask into the first block of the
    next stage (its first conv and its downsampling shortcut conv), or after the last stage into the classifier
    (behind the global average pool); an identity shortcut cannot take it."""
    positions = {}
    for i, stage in enumerate(stages):
        last = i == len(stages) - 1
        consumers, fold_error = (), None
        if last and classifier is None:
            fold_error = f"no classifier reads the output of {stage_name(i)}"
        elif last:
            consumers = (classifier,)
        else:
            first_conv, shortcut_conv = next_stage_convs(stages[i + 1])
            if shortcut_conv is None:
                fold_error = (f"the block after {stage_name(i)} adds its input through an identity shortcut (no "
                              "downsampling conv), so the mask cannot be folded into a weight")
            else:
                consumers = (first_conv, shortcut_conv)
        positions[f"dp{i + 2}"] = FairDropoutPosition(last_block(stage), "output", "channels", widths[i],
                                                      consumers=consumers, fold_error=fold_error)
    return positions


# ---------------------------------------------------------------------------------------------- families
def _hf_text(adapter: ModelAdapter):
    classifier = adapter.classifier_module
    width = active_module(classifier).in_features
    # `fc`: FairDropout on a new linear projection inserted before the classifier; with no nonlinearity in
    # between, projection + mask + classifier fold into one Linear on export
    return {"pooled": _classifier_input(classifier, width), "fc": _classifier_input(classifier, width, projection=True)}


def _hf_vit(adapter: ModelAdapter):
    width = getattr(adapter.model.config, "hidden_size", None)
    return _transformer(hf_vit_blocks(adapter.model), width, adapter.classifier_module, width)


def _timm_vit(adapter: ModelAdapter):
    timm = timm_model(adapter.model)
    width = getattr(timm, "embed_dim", None)
    return _transformer(timm.blocks, width, adapter.classifier_module, width)


def _clip_zero_shot(adapter: ModelAdapter):
    # the blocks carry the vision tower's width; the classifier reads the projected CLIP embedding
    config = adapter.model.config
    return _transformer(adapter.model.vision_model.encoder.layers, config.vision_config.hidden_size,
                        adapter.classifier_module, config.projection_dim)


def _hf_resnet(adapter: ModelAdapter):
    stages = adapter.model.resnet.encoder.stages
    widths = list(getattr(adapter.model.config, "hidden_sizes", [None] * len(stages)))

    def next_stage_convs(layers):
        block = layers[0]
        return _first_conv(getattr(block, "layer", None)), _first_conv(getattr(block, "shortcut", None))

    return _residual_stages([stage.layers for stage in stages], widths, adapter.classifier_module,
                            next_stage_convs, lambda i: f"stage {i + 1}")


def _timm_resnet(adapter: ModelAdapter):
    timm = timm_model(adapter.model)
    channels = {entry["module"]: entry["num_chs"] for entry in getattr(timm, "feature_info", [])}

    def next_stage_convs(stage):
        block = stage[0]
        return getattr(block, "conv1", None), _first_conv(getattr(block, "downsample", None))

    return _residual_stages(timm_stages(timm), [channels.get(f"layer{i}") for i in range(1, 5)],
                            adapter.classifier_module, next_stage_convs, lambda i: f"layer{i + 1}")


def _mnist_cnn(adapter: ModelAdapter):
    model = adapter.model
    convs = [model.conv1, model.conv2, model.conv3, model.conv4]
    width = [conv[0].out_channels for conv in convs]
    flattened = ("the last block's map is flattened into the head's first Linear (channels x positions), so a "
                 "channel mask is not one weight column")
    return {
        # after each conv block's ReLU (channels); the next block's conv reads it (through a max-pool after
        # conv2, which keeps a zeroed channel zero)
        **{f"conv{i + 1}": FairDropoutPosition(convs[i], "output", "channels", width[i], consumers=(convs[i + 1][0],))
           for i in range(3)},
        "conv4": FairDropoutPosition(convs[3], "output", "channels", width[3], fold_error=flattened),
        # the hidden features the classifier reads (as a ResNet's pooled features)
        "hidden": _classifier_input(adapter.classifier_module, active_module(adapter.classifier_module).in_features),
    }


_RESNET_CHOICE = {"default": ("dp4",), "selection": ("dp4", "dp3")}

POSITIONS: dict[str, FamilyPositions] = {
    "hf_resnet": FamilyPositions(_hf_resnet, **_RESNET_CHOICE),
    "timm_resnet": FamilyPositions(_timm_resnet, **_RESNET_CHOICE),
    "hf_vit": FamilyPositions(_hf_vit, default=("pooled",)),
    "timm_vit": FamilyPositions(_timm_vit, default=("pooled",)),
    "clip_zero_shot": FamilyPositions(_clip_zero_shot, default=("pooled",)),
    "hf_text": FamilyPositions(_hf_text, default=("fc",), selection=("fc", "pooled")),
    "mnist_cnn": FamilyPositions(_mnist_cnn, default=("conv3",), selection=("conv3", "hidden")),
}


# ---------------------------------------------------------------------------------------------- queries
def positions_for(adapter: ModelAdapter) -> dict[str, FairDropoutPosition]:
    """The FairDropout positions of the adapter's model, by name (none for a family without an entry)."""
    entry = POSITIONS.get(adapter.family)
    return entry.find(adapter) if entry is not None else {}


def get_position(adapter: ModelAdapter, name: str) -> FairDropoutPosition:
    """The position `name` of the adapter's model; an unknown name raises an error listing the valid ones."""
    positions = positions_for(adapter)
    if name not in positions:
        raise UnsupportedModelError(
            f"Unknown FairDropout position {name!r} for {type(adapter.model).__name__} ({adapter.name}): valid "
            f"positions are {sorted(positions, key=natural_order)}."
        )
    return positions[name]


def default_positions(adapter: ModelAdapter) -> tuple[str, ...]:
    """Where FairDropout goes in this model when no position is named (empty: the family has no default)."""
    entry = POSITIONS.get(adapter.family)
    if entry is None:
        return ()
    present = positions_for(adapter)
    return tuple(name for name in entry.default if name in present)


def selection_positions(adapter: ModelAdapter) -> tuple[str, ...]:
    """The positions the label-free selection tries (each alone) when none is named: the family's candidates,
    else its default."""
    entry = POSITIONS.get(adapter.family)
    present = positions_for(adapter)
    candidates = tuple(name for name in (entry.selection if entry else ()) if name in present)
    return candidates or default_positions(adapter)
