"""The image embedding counterfactual distillation matches between the student and the frozen teacher.

Xiao et al., "Masked Images Are Counterfactual Samples for Robust Fine-tuning" (CVPR 2023, arXiv:2303.03052)
distil the image features of the pre-trained model. Which module's output that is depends on the model family:
`EMBEDDINGS` maps a family (`hf_robust.models.families.FAMILIES`) to that module; a family without an entry
uses the classifier's input (the penultimate features). For a CLIP zero-shot classifier the entry is the
projected CLIP image embedding before its normalisation (the zero-shot head reads it normalised).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ...models.adapter import ModelAdapter

EMBEDDINGS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "clip_zero_shot": lambda model: model.visual_projection,  # hf_robust.models.clip.CLIPZeroShotClassifier
}


def embedding_module(adapter: ModelAdapter) -> nn.Module | None:
    """The module whose OUTPUT is the image embedding, or None: the embedding is the classifier's input."""
    find = EMBEDDINGS.get(adapter.family)
    return find(adapter.model) if find is not None else None


@contextlib.contextmanager
def capture_image_embedding(adapter: ModelAdapter) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every forward stores the image embedding in the yielded dict['embedding']."""
    store: dict[str, torch.Tensor] = {}
    module = embedding_module(adapter)
    if module is None:
        adapter.require("classifier")

        def read_input(module, args):
            store["embedding"] = args[0]

        handle = adapter.classifier_module.register_forward_pre_hook(read_input)
    else:

        def read_output(module, args, output):
            store["embedding"] = output[0] if isinstance(output, (tuple, list)) else output

        handle = module.register_forward_hook(read_output)
    try:
        yield store
    finally:
        handle.remove()


def image_embedding(adapter: ModelAdapter, model_inputs: dict) -> torch.Tensor:
    """The image embedding (B, D) of a batch (one forward of `adapter.model`)."""
    with capture_image_embedding(adapter) as store:
        adapter.model(**model_inputs)
    return store["embedding"].flatten(1)
