"""Model card templates shipped with hf_robust (installed as hf_robust.resources.model_cards)."""
