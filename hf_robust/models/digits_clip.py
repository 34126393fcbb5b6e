"""`digits-clip`: a small CLIP "pre-trained" here, on UNBIASED digits, for the embedded counterfactual demo.

Counterfactual distillation needs a robust pre-trained image-text model, and no CLIP weights can be
downloaded in the demo's setting. This module makes one in one to two minutes on a CPU and caches it:

- data: `biased_digits` generated with the square on HALF of the source digits of each class (seed
  `PRETRAIN_DATA_SEED`): the square says nothing about the digit. Only the `train` source digits are used, so
  the validation and test digits of `biased_digits` stay unseen;
- model: a `transformers.CLIPModel` from a tiny config (32x32 images, 8x8 patches) with a word-level CLIP
  tokenizer over the prompt vocabulary, trained contrastively to match each image with the caption of its
  digit ("a photo of the number seven.", a random prompt template per step);
- saved with `save_pretrained` (model, tokenizer, image processor) under
  `$HF_HOME/hf_robust/models/digits-clip-<hash>`, written once (file lock + atomic rename), so it loads
  through the same code path as `openai/clip-vit-base-patch32`.

`load_digits_clip(label_names)` then builds the zero-shot classifier: a label such as "digit 0-4" becomes the
class whose names are "zero" ... "four" (all averaged into its head row).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.files import publish

logger = logging.getLogger(__name__)

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_TEMPLATES = [
    "a photo of the number {}.", "a drawing of the digit {}.", "a handwritten {}.", "the digit {}.",
    "a picture of a {}.", "a blurry photo of the number {}.", "a pixelated {}.", "a small drawing of a {}.",
]
PRETRAIN_DATA_SEED = 1000
# the version of the pre-training code and of the data it reads: part of the cache key, so a change that alters the
# teacher's weights (here, or in `hf_robust.data.embedded.make_biased_digits`) must bump it
PRETRAIN_VERSION = 1
# image tower, text tower and schedule of the pre-training; part of the cache key
PRETRAIN_SETTINGS = dict(
    image_size=32, patch_size=8, vision_hidden=64, vision_layers=4, text_hidden=64, text_layers=2, heads=4,
    projection_dim=64, train_copies=8, epochs=10, batch_size=128, learning_rate=2e-3, weight_decay=0.05, seed=0,
)
# OpenAI CLIP's image normalisation
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def word_tokenizer(words: list[str]):
    """A CLIP tokenizer (BPE, lower case) whose merges turn each of `words` into one token; anything else
    falls back to characters."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges: list[tuple[str, str]] = []
    characters = sorted({ch for word in words for ch in word} | set("abcdefghijklmnopqrstuvwxyz0123456789.,-'"))
    for ch in characters:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    for word in sorted(set(words)):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:  # merge left to right: every prefix becomes a token
            pair = (symbols[0], symbols[1])
            if pair not in merges:
                merges.append(pair)
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
            vocab.setdefault(symbols[0], len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges)


def _vocabulary() -> list[str]:
    words = set(DIGIT_WORDS)
    for template in DIGIT_TEMPLATES:
        words.update(re.findall(r"[a-z]+", template.lower()))
    return sorted(words)


def digits_clip_config(settings: dict, vocab_size: int):
    from transformers import CLIPConfig

    s = settings
    text = dict(vocab_size=vocab_size, hidden_size=s["text_hidden"], intermediate_size=2 * s["text_hidden"],
                num_hidden_layers=s["text_layers"], num_attention_heads=s["heads"], max_position_embeddings=24,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=s["vision_hidden"], intermediate_size=2 * s["vision_hidden"],
                  num_hidden_layers=s["vision_layers"], num_attention_heads=s["heads"], image_size=s["image_size"],
                  patch_size=s["patch_size"])
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=s["projection_dim"])


def _image_processor(size: int):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=CLIP_MEAN, image_std=CLIP_STD)


def pretrain_digits_clip(settings: dict | None = None, log_every: int = 0):
    """(CLIPModel, tokenizer, image processor) trained contrastively on unbiased digits (see the module doc), on
    one thread: float reductions differ with the thread count, and the teacher should be the same anywhere."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pretrain({**PRETRAIN_SETTINGS, **(settings or {})}, log_every)
    finally:
        torch.set_num_threads(threads)


def _pretrain(s: dict, log_every: int):
    from transformers import CLIPModel

    from ..data import load_benchmark
    from ..data.preprocessing import ImagePreprocessing

    data = load_benchmark("biased_digits", seed=PRETRAIN_DATA_SEED, majority_fraction=0.5, minority_fraction=0.5,
                          train_copies=s["train_copies"])["train"]
    tokenizer = word_tokenizer(_vocabulary())
    processor = _image_processor(s["image_size"])
    preprocessing = ImagePreprocessing.from_image_processor(processor)
    pixels = preprocessing.normalize(preprocessing.to_uint8(data["image"]))
    digits = torch.tensor(data["digit"])

    generator = torch.Generator().manual_seed(s["seed"])
    torch.manual_seed(s["seed"])
    model = CLIPModel(digits_clip_config(s, len(tokenizer)))
    model.train()
    prompts = [[template.format(word) for word in DIGIT_WORDS] for template in DIGIT_TEMPLATES]
    tokens = [tokenizer(p, padding=True, return_tensors="pt") for p in prompts]
    steps_per_epoch = math.ceil(len(pixels) / s["batch_size"])
    total = steps_per_epoch * s["epochs"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=s["learning_rate"], weight_decay=s["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / (0.05 * total)) * 0.5 * (1 + math.cos(math.pi * step / total))
    )
    step = 0
    for _ in range(s["epochs"]):
        order = torch.randperm(len(pixels), generator=generator)
        for start in range(0, len(order), s["batch_size"]):
            batch = order[start : start + s["batch_size"]]
            # one random prompt per digit and step: the text tower sees every template
            chosen = torch.randint(len(prompts), (10,), generator=generator)
            text_ids = [tokens[t]["input_ids"][d] for d, t in enumerate(chosen.tolist())]
            width = max(len(t) for t in text_ids)
            input_ids = torch.stack([F.pad(t, (0, width - len(t)), value=1) for t in text_ids])
            mask = torch.stack([F.pad(tokens[t]["attention_mask"][d], (0, width - len(tokens[t]["attention_mask"][d])))
                                for d, t in enumerate(chosen.tolist())])
            image = F.normalize(model.get_image_features(pixel_values=pixels[batch]).pooler_output, dim=-1)
            text = F.normalize(model.get_text_features(input_ids=input_ids, attention_mask=mask).pooler_output, dim=-1)
            logits = model.logit_scale.exp().clamp(max=100) * image @ text.T
            loss = F.cross_entropy(logits, digits[batch])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            if log_every and step % log_every == 0:
                logger.warning("digits-clip pre-training step %d/%d: loss %.4f", step, total, loss.item())
    model.eval()
    return model, tokenizer, processor


def digits_clip_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of the pre-trained digits CLIP, trained and saved on first use (once, across processes)."""
    from filelock import FileLock
    from huggingface_hub.constants import HF_HOME

    # the recipe is the key: settings, prompts, constants, and the version of the code that makes the data and
    # trains (PRETRAIN_VERSION: bump it with any change to that code, or to biased_digits' generator)
    recipe = {"settings": PRETRAIN_SETTINGS, "templates": DIGIT_TEMPLATES, "data_seed": PRETRAIN_DATA_SEED,
              "words": DIGIT_WORDS, "mean": CLIP_MEAN, "std": CLIP_STD, "version": PRETRAIN_VERSION}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else Path(HF_HOME) / "hf_robust" / "models"
    target = root / f"digits-clip-{key}"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".digits-clip-{key}.lock")):
        if (target / "config.json").exists():  # another process made it while we waited
            return target
        logger.warning("Pre-training the digits CLIP teacher once (one to two minutes on a CPU); cached in %s", target)
        with torch.random.fork_rng(devices=[]):
            model, tokenizer, processor = pretrain_digits_clip()
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".digits-clip-"))
        try:
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            processor.save_pretrained(str(tmp))
            publish(tmp, target)  # mkdtemp's 0700 would hide a shared HF_HOME's copy from other users
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def digit_class_names(label_names: list[str]) -> list[str | list[str]]:
    """Zero-shot names for `biased_digits`-style labels: "digit 0-4" -> ["zero", ..., "four"], "3" -> "three";
    any other label is kept as it is."""
    names: list[str | list[str]] = []
    for label in label_names:
        span = re.search(r"(\d)\s*-\s*(\d)", label)
        single = re.fullmatch(r"\D*(\d)\D*", label)
        if span:
            names.append(DIGIT_WORDS[int(span.group(1)) : int(span.group(2)) + 1])
        elif single:
            names.append(DIGIT_WORDS[int(single.group(1))])
        else:
            names.append(label)
    return names


def load_digits_clip(label_names: list[str], cache_dir: str | os.PathLike | None = None):
    """(CLIPZeroShotClassifier, image processor): the digits CLIP as a zero-shot classifier for `label_names`."""
    from .clip import load_clip_zero_shot

    model, processor = load_clip_zero_shot(str(digits_clip_path(cache_dir)), digit_class_names(label_names),
                                           DIGIT_TEMPLATES)
    model.config.id2label = dict(enumerate(label_names))
    model.config.label2id = {name: i for i, name in enumerate(label_names)}
    model.config._name_or_path = "digits-clip"
    return model, processor
