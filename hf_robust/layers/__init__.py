"""Reusable layers (timm `layers/` style: one block per file, a functional and a module form).

`hf_robust.layers.fair_dropout` holds the functional form `fair_dropout(x, example_idx, ...)`; the package
exports the module form and the mask helpers (not the function, which would hide the submodule's name).
"""

from .fair_dropout import FairDropout, eval_scale, fair_dropout_mask

__all__ = ["FairDropout", "eval_scale", "fair_dropout_mask"]
