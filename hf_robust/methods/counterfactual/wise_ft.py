"""WiSE-FT: weight-space ensembles of a zero-shot and a fine-tuned model.

Wortsman et al., "Robust fine-tuning of zero-shot models" (CVPR 2022): theta(alpha) = (1 - alpha) * theta_zero_shot
+ alpha * theta_fine_tuned, for two models of the same architecture where the fine-tuned one started from the
zero-shot one (its head included). alpha = 0 is the zero-shot model, alpha = 1 the fine-tuned one, both exactly.
Counterfactual distillation (Xiao et al., CVPR 2023) compares with it and reports that it barely helps models
fine-tuned their way. Inspired by github.com/mlfoundations/wise-ft; written here.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def interpolate_state_dicts(zero_shot: dict, fine_tuned: dict, alpha: float) -> dict:
    """Floating-point entries lerp'ed (exact at alpha 0 and 1); other entries (integer buffers) from fine_tuned."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha}: WiSE-FT mixes with a coefficient in [0, 1] (0 = zero-shot, 1 = fine-tuned).")
    missing = sorted(set(fine_tuned) - set(zero_shot))
    extra = sorted(set(zero_shot) - set(fine_tuned))
    if missing or extra:
        raise ValueError(
            f"WiSE-FT needs two models of the same architecture: keys only in the fine-tuned model {missing[:5]}, "
            f"only in the zero-shot model {extra[:5]}."
        )
    lora = [key for key in fine_tuned if ".lora_A." in key or ".lora_B." in key]
    if lora:  # lerp'ing A and B apart gives W0 + B1((1 - a) A0 + a A1) s, not the mix of the two weights
        raise ValueError(
            f"WiSE-FT of LoRA state dicts ({lora[0]!r}, ...) would interpolate A and B separately, which is not the "
            "interpolation of the weights: merge the adapters first (peft's merge_and_unload), or call wise_ft() "
            "with the peft models, which merges copies of them."
        )
    mixed = {}
    for key, tuned in fine_tuned.items():
        start = zero_shot[key]
        if start.shape != tuned.shape:
            raise ValueError(
                f"WiSE-FT: {key!r} has shape {tuple(start.shape)} in the zero-shot model and {tuple(tuned.shape)} in "
                "the fine-tuned one; the two models must share an architecture (same number of classes too)."
            )
        if tuned.is_floating_point():
            mixed[key] = torch.lerp(start.to(tuned.device, tuned.dtype), tuned, alpha)
        else:
            mixed[key] = tuned.clone()
    return mixed


def wise_ft(zero_shot_model: nn.Module, fine_tuned_model: nn.Module, alpha: float = 0.5) -> nn.Module:
    """A new model (a copy of `fine_tuned_model`) with weights (1 - alpha) * zero-shot + alpha * fine-tuned.
    peft (LoRA) models are merged first (on copies): the result is then the merged base model."""
    zero_shot_model, fine_tuned_model = _merged(zero_shot_model), _merged(fine_tuned_model)
    mixed = interpolate_state_dicts(zero_shot_model.state_dict(), fine_tuned_model.state_dict(), alpha)
    model = copy.deepcopy(fine_tuned_model)
    model.load_state_dict(mixed)
    return model


def _merged(model: nn.Module) -> nn.Module:
    """A merged copy of a peft model (adapters folded into the weights); any other model as it is."""
    if hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        return copy.deepcopy(model).merge_and_unload()
    return model
