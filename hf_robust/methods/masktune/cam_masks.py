"""MaskTune's masks from a model's explanations: XGrad-CAM regions of images, gradient x input tokens of texts."""

from __future__ import annotations

import torch

from ...data.core import DataValidationError
from ...explain.cam import normalize_per_image, threshold_masks, token_attributions, upsample, xgradcam
from ...models.adapter import UnsupportedModelError


def image_masks(model, adapter, pixel_values: torch.Tensor, k: float = 2.0) -> torch.Tensor:
    """MaskTune's masks for a batch of images: (B, H, W) bool at the input resolution."""
    if pixel_values.ndim != 4:
        raise DataValidationError(
            f"Image masking needs pixel_values of shape (B, C, H, W); got a tensor of shape {tuple(pixel_values.shape)}."
        )
    cam, _ = xgradcam(model, adapter, {"pixel_values": pixel_values})
    if cam.shape[-2] * cam.shape[-1] == 1:
        raise UnsupportedModelError(
            f"The CAM layer of {type(adapter.model).__name__} gives a 1x1 map for {tuple(pixel_values.shape[-2:])} "
            "inputs: it cannot point at any region, so MaskTune would mask nothing. Use larger inputs (e.g. the "
            "model's pre-training resolution) or cam_target_layer= an earlier layer with a larger map."
        )
    return threshold_masks(cam_at_input_size(cam, tuple(pixel_values.shape[-2:])), k)


def cam_at_input_size(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Min-max normalised, bilinearly upsampled to `size`, normalised again: the maps the `grad-cam` package
    (the authors' code) returns, whose upsampling moves the extremes slightly off 0 and 1."""
    return normalize_per_image(upsample(normalize_per_image(cam), size))


def token_masks(model, adapter, model_inputs: dict, special_ids: list[int], k: float = 2.0, min_tokens: int = 1):
    """Masks over token positions (B, T) bool: tokens whose gradient x input attribution exceeds the threshold,
    and at least the `min_tokens` best positive ones; never padding or special tokens."""
    scores, _ = token_attributions(model, adapter, model_inputs)
    input_ids = model_inputs["input_ids"]
    valid = model_inputs.get("attention_mask", torch.ones_like(input_ids)).bool()
    valid &= ~torch.isin(input_ids, torch.tensor(special_ids, device=input_ids.device))
    masks = threshold_masks(scores, k, valid)
    if min_tokens > 0:
        ranked = torch.where(valid & (scores > 0), scores, torch.full_like(scores, -float("inf")))
        top = ranked.topk(min(min_tokens, scores.shape[1]), dim=1)
        chosen = torch.zeros_like(masks).scatter(1, top.indices, top.values > -float("inf"))
        masks |= chosen
    return masks
