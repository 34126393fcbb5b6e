"""FairDropout (Nanfack and Belilovsky, "FairDropout: Using Example-Tied Dropout to Enhance Generalization of
Minority Groups", arXiv:2502.06695): the layer (`layer`), where it can sit in each model family (`positions`),
putting it into a model and taking it out (`inject`), the training configs (`config`) and trainers (`trainer`:
FairDropout, FairDropout-DFR)."""

from .layer import FairDropout, eval_scale, fair_dropout_mask

__all__ = ["FairDropout", "eval_scale", "fair_dropout_mask"]
