"""Raw timm classifiers as transformers models: `maybe_wrap_timm` puts a `timm.create_model(...)` model inside
transformers' `TimmWrapperForImageClassification`, so it takes `pixel_values`/`labels`, computes its loss and
saves/loads with `save_pretrained` / `from_pretrained` like any transformers model."""

from __future__ import annotations

import logging

import torch
from torch import nn

from .adapter import UnsupportedModelError

logger = logging.getLogger(__name__)


def maybe_wrap_timm(model: nn.Module, model_args: dict | None = None) -> nn.Module:
    """A raw timm classifier -> transformers' TimmWrapperForImageClassification around the same module, so it
    takes `pixel_values`/`labels`, computes its loss and saves/loads like any transformers model. Any other
    model is returned as it is.

    `model_args`: the keyword arguments the timm model was created with beyond its architecture's defaults
    (saved in the config, so that `from_pretrained` rebuilds the same model); a ViT's `img_size` is found by
    itself. A model that `from_pretrained` would not rebuild gets a warning naming what differs."""
    if type(model).__name__ == "PeftModel" or hasattr(model, "peft_config"):
        base = model.get_base_model() if hasattr(model, "get_base_model") else None
        if base is not None and not hasattr(base, "config") and hasattr(base, "pretrained_cfg"):
            raise UnsupportedModelError(
                "peft was applied to a raw timm model: its saved folder would not load with from_pretrained. Wrap "
                "the timm model first, then apply peft: get_peft_model(maybe_wrap_timm(timm_model), lora_config) "
                "(maybe_wrap_timm from hf_robust.models.timm_wrap)."
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
