"""Batched class activation maps and token attributions, on the device, with no per-image Python loop.

- `xgradcam`: XGrad-CAM (Fu et al., BMVC 2020, "Axiom-based Grad-CAM"), the explainer MaskTune uses: for the
  target logit z and the activation A of the adapter's CAM layer, channel weights
  `w_c = sum_hw(dz/dA_c * A_c) / (sum_hw(A_c) + eps)` and `cam = relu(sum_c w_c A_c)`. ViT tokens are laid
  out on the patch grid by the adapter. One forward and one backward for the whole batch; the backward
  runs only through the layers after the CAM layer (its output is detached into a leaf), so it costs a
  fraction of a training step.
- `token_attributions`: gradient x input on the input embeddings, summed over the embedding dimension: the
  text counterpart used to mask tokens.
- `normalize_per_image`, `upsample`, `threshold_masks`: MaskTune's post-processing (per-image min-max,
  bilinear upsampling to the input, threshold mean + k * std over the positive values).

Neither the model's train/eval mode nor any parameter's `.grad` is changed for the caller.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..models.adapter import ModelAdapter


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _leaf_output(module: nn.Module, store: dict):
    """Replace `module`'s output by a detached leaf that requires grad (kept in store['act'])."""

    def hook(mod, args, output):
        tensor = output[0] if isinstance(output, (tuple, list)) else output
        leaf = tensor.detach().requires_grad_(True)
        store["act"] = leaf
        if isinstance(output, tuple):
            return (leaf, *output[1:])
        if isinstance(output, list):
            return [leaf, *output[1:]]
        return leaf

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _target_logits(logits: torch.Tensor, target: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if target is None:
        target = logits.argmax(-1)  # MaskTune: the predicted class, not the label
    return logits.gather(1, target[:, None]).sum(), target


def xgradcam(
    model: nn.Module,
    adapter: ModelAdapter,
    model_inputs: dict,
    target: torch.Tensor | None = None,
    eps: float = 1e-7,
) -> tuple[torch.Tensor, torch.Tensor]:
    """XGrad-CAM maps (B, h, w) at the adapter's CAM layer, and the logits (B, K).

    `target`: class per example; default the predicted class (argmax logit).
    """
    layer = adapter.cam_layer
    store: dict = {}
    with _eval_mode(model), torch.enable_grad(), _leaf_output(layer, store):
        outputs = model(**model_inputs)
        logits = outputs.logits if hasattr(outputs, "logits") else outputs
        score, target = _target_logits(logits, target)
        (grad,) = torch.autograd.grad(score, store["act"])
    activation = adapter.activation_to_map(store["act"].detach())
    gradient = adapter.activation_to_map(grad)
    weights = (gradient * activation).sum((2, 3)) / (activation.sum((2, 3)) + eps)
    cam = F.relu(torch.einsum("bc,bchw->bhw", weights, activation))
    return cam, logits.detach()


def token_attributions(
    model: nn.Module, adapter: ModelAdapter, model_inputs: dict, target: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient x input on the token embeddings, summed over the embedding dimension: (B, T), and the logits."""
    store: dict = {}
    with _eval_mode(model), torch.enable_grad(), _leaf_output(adapter.embedding_layer, store):
        outputs = model(**model_inputs)
        logits = outputs.logits if hasattr(outputs, "logits") else outputs
        score, target = _target_logits(logits, target)
        (grad,) = torch.autograd.grad(score, store["act"])
    return (grad * store["act"].detach()).sum(-1), logits.detach()


def normalize_per_image(cam: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Min-max normalise each map to [0, 1] (a constant map becomes all zeros)."""
    flat = cam.flatten(1)
    low = flat.min(1, keepdim=True).values
    high = flat.max(1, keepdim=True).values
    return ((flat - low) / (high - low + eps)).view_as(cam)


def upsample(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of (B, h, w) maps to (B, H, W)."""
    return F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def threshold_masks(scores: torch.Tensor, k: float = 2.0, valid: torch.Tensor | None = None) -> torch.Tensor:
    """True where a score exceeds `mean + k * std` of the example's POSITIVE scores (population std).

    Works on (B, H, W) maps and (B, T) token scores alike; `valid` (same shape, bool) restricts which entries
    count and can be masked (e.g. no padding or special tokens). An example with no positive score gets no mask.
    """
    flat = scores.flatten(1)
    positive = flat > 0
    if valid is not None:
        positive &= valid.flatten(1)
    count = positive.sum(1, keepdim=True).clamp(min=1)
    values = torch.where(positive, flat, torch.zeros_like(flat))
    mean = values.sum(1, keepdim=True) / count
    var = (torch.where(positive, flat - mean, torch.zeros_like(flat)) ** 2).sum(1, keepdim=True) / count
    tau = mean + k * var.sqrt()
    return ((flat > tau) & positive).view_as(scores)
