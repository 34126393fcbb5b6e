"""Counterfactual distillation (Xiao et al., "Masked Images Are Counterfactual Samples for Robust Fine-tuning",
CVPR 2023, arXiv:2303.03052): counterfactual images (`counterfactuals`), the image embedding it distils, per
model family (`embedding`), the trainer and its config, and WiSE-FT (`wise_ft`) that it is compared with."""
