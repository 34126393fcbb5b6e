"""Where a model looks: class activation maps for CNNs (`cam`) and attention rollout for transformers (`rollout`)."""
