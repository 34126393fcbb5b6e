"""Registering hf_robust's own model classes with transformers' Auto classes, so that `from_pretrained` and
`AutoModelForImageClassification` load a saved one by its `model_type`."""

from __future__ import annotations


def register_image_classifier(config_class, model_class) -> None:
    """`AutoConfig` and `AutoModelForImageClassification` learn `config_class.model_type` (once per process)."""
    from transformers import AutoConfig, AutoModelForImageClassification

    try:
        AutoConfig.register(config_class.model_type, config_class)
        AutoModelForImageClassification.register(config_class, model_class)
    except ValueError:  # already registered (module reloaded)
        pass
