"""GradTune (Kenfack et al., "GradTune: Last-Layer Fine-Tuning for Group Robustness without Group Annotation"):
the last layer retrained on held-out examples drawn by their gradient norm (`config`, `trainer`)."""
