"""evaluate modules shipped with hf_robust (installed as hf_robust.resources.metrics)."""
