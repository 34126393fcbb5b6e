"""Tiny CLIP models for the counterfactual-distillation tests (no download): a word-level CLIP tokenizer, a
random `CLIPModel` from a config (text config with bos/eos ids inside the vocabulary) and its zero-shot
classifier for the `biased_digits` labels."""

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from hf_robust.models.clip import CLIPZeroShotClassifier
from hf_robust.models.digits_clip import DIGIT_WORDS, word_tokenizer

WORDS = ["a", "photo", "of", "the", "digit", "number", "red", "square", *DIGIT_WORDS]
CLASS_NAMES = [DIGIT_WORDS[:5], DIGIT_WORDS[5:]]


def tiny_clip(seed: int = 0, projection_dim: int = 16, image_size: int = 32, patch_size: int = 8):
    """(CLIPModel, tokenizer, image processor), random weights, eager attention."""
    tokenizer = word_tokenizer(WORDS)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=patch_size),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    model.set_attn_implementation("eager")
    processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                                   image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return model, tokenizer, processor


def tiny_clip_classifier(seed: int = 0, templates="simple", **kwargs):
    """(CLIPZeroShotClassifier for the two biased_digits classes, image processor)."""
    clip, tokenizer, processor = tiny_clip(seed, **kwargs)
    model = CLIPZeroShotClassifier.from_clip(clip, tokenizer, CLASS_NAMES, templates)
    model.config.id2label = {0: "digit 0-4", 1: "digit 5-9"}
    model.config.label2id = {"digit 0-4": 0, "digit 5-9": 1}
    return model, processor
