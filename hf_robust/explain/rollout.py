"""Gradient-weighted attention rollout: class activation maps for Vision Transformers.

Chefer, Gur and Wolf, "Generic Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder
Transformers" (ICCV 2021), the CAM that counterfactual distillation (Xiao et al., CVPR 2023) masks patches by.
For attention maps A_l (B, heads, T, T) and the gradients of the target logit with respect to them:

    R = I;  for each block l:  R <- R + mean_heads(clamp(dA_l * A_l, min=0)) @ R

The relevance of the patches for the target is the CLS row of R over the patch tokens, laid out on the patch
grid and divided by its per-image maximum. Batched, one forward and one backward for the whole batch.
Inspired by github.com/hila-chefer/Transformer-MM-Explainability and `get_MMCAM` of
github.com/Coxy7/robust-finetuning; written here.

- `rollout_relevance(attentions, gradients)`: the functional core, for attention maps a caller already has
  (counterfactual distillation reuses the maps of its training forward);
- `patch_relevance_map(...)`: CLS row -> (B, h, w) patch grid, normalised by the per-image max;
- `gradient_weighted_rollout(model, model_inputs, target)`: all of it from a model that returns attentions
  (transformers ViT-like models with eager attention: `output_attentions=True`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def rollout_relevance(attentions: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor]) -> torch.Tensor:
    """The relevance matrix R (B, T, T) after every block, from per-block attention maps and their gradients
    (each (B, heads, T, T), in forward order)."""
    if len(attentions) != len(gradients) or not attentions:
        raise ValueError(f"Got {len(attentions)} attention maps and {len(gradients)} gradients; expected equal, >= 1.")
    batch, _, tokens, _ = attentions[0].shape
    relevance = torch.eye(tokens, device=attentions[0].device, dtype=torch.float32).expand(batch, tokens, tokens)
    for attention, gradient in zip(attentions, gradients):
        weighted = (gradient.float() * attention.float()).clamp(min=0).mean(1)
        relevance = relevance + weighted @ relevance
    return relevance


def normalize_by_max(cam: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Divide each map by its maximum (the authors' normalisation; maps are non-negative)."""
    flat = cam.flatten(1)
    return (flat / (flat.amax(1, keepdim=True) + eps)).view_as(cam)


def patch_relevance_map(relevance: torch.Tensor, num_prefix_tokens: int = 1, grid: tuple[int, int] | None = None):
    """The CLS row of R over the patch tokens, as a (B, h, w) map normalised by the per-image max."""
    patches = relevance[:, 0, num_prefix_tokens:]
    if grid is None:
        side = math.isqrt(patches.shape[1])
        if side * side != patches.shape[1]:
            raise ValueError(f"{patches.shape[1]} patch tokens do not make a square grid: pass grid=(h, w).")
        grid = (side, side)
    return normalize_by_max(patches.reshape(patches.shape[0], *grid))


def gradient_weighted_rollout(
    model: nn.Module,
    model_inputs: dict,
    target: torch.Tensor | None = None,
    num_prefix_tokens: int = 1,
    grid: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cam (B, h, w) in [0, 1], logits (B, K)) for `target` (class per example; default the predicted class).

    `model` must return `attentions` with `output_attentions=True` (transformers ViT/CLIP with
    `attn_implementation="eager"`). It runs in eval mode (restored afterwards); no parameter `.grad` changes.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            outputs = model(**model_inputs, output_attentions=True)
            attentions = getattr(outputs, "attentions", None)
            if not attentions or any(a is None for a in attentions):
                raise ValueError(
                    f"{type(model).__name__} returned no attention maps: attention rollout needs "
                    "attn_implementation='eager' (model.set_attn_implementation('eager'))."
                )
            logits = outputs.logits
            if target is None:
                target = logits.argmax(-1)
            score = logits.gather(1, target[:, None]).sum()
            gradients = torch.autograd.grad(score, attentions)
    finally:
        model.train(was_training)
    relevance = rollout_relevance([a.detach() for a in attentions], gradients)
    return patch_relevance_map(relevance, num_prefix_tokens, grid), logits.detach()
