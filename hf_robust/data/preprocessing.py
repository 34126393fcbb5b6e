"""Batches for the Trainer: images and text in, model inputs plus `labels`, `group`, `example_idx` out (and the
padded `overlapping_groups` ids of a split that has overlapping evaluation groups, `hf_robust.data.overlapping`).

Image geometry and normalisation come from the model's own image processor or timm data config (size,
resize/crop rule, mean, std, interpolation), never from constants written here. Images go through three
steps, in this order, so that per-example edits happen in pixel space before augmentation (MaskTune's masks
blacken pixels of the image the model sees, then training augmentation applies):

    decode + deterministic resize/crop -> uint8 (B, 3, H, W) -> [example_transform] -> [augmentation] -> normalise

Text is tokenised per batch; `example_transform` then sees (input_ids, example_idx) and may replace tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .overlapping import OVERLAPPING_GROUPS, padded_group_ids

ExampleTransform = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ImagePreprocessing:
    """Deterministic geometry + normalisation of a model's input, read off its processor or timm config."""

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_shortest_edge: int | None = None  # resize so the shorter side has this length, then center-crop `size`
    interpolation: str = "bilinear"
    rescale_factor: float = 1 / 255

    @classmethod
    def from_timm_config(cls, data_config: dict) -> ImagePreprocessing:
        _, height, width = data_config["input_size"]
        crop_pct = data_config.get("crop_pct") or 1.0
        shortest = int(np.floor(min(height, width) / crop_pct)) if crop_pct < 1.0 else None
        interpolation = data_config.get("interpolation", "bilinear")
        return cls(
            size=(int(height), int(width)),
            mean=tuple(data_config["mean"]),
            std=tuple(data_config["std"]),
            resize_shortest_edge=shortest,
            interpolation="bicubic" if interpolation == "bicubic" else "bilinear",
        )

    @classmethod
    def from_image_processor(cls, processor) -> ImagePreprocessing:
        if hasattr(processor, "data_config"):  # transformers' TimmWrapperImageProcessor
            return cls.from_timm_config(processor.data_config)
        size = getattr(processor, "size", None) or {}
        crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
        shortest = None
        if "height" in size and "width" in size:
            target = (size["height"], size["width"])
        elif "shortest_edge" in size:
            shortest = size["shortest_edge"]
            crop_pct = getattr(processor, "crop_pct", None)
            if crop_pct is not None and shortest < 384:  # ConvNext-style processors (HF ResNet)
                target = (shortest, shortest)
                shortest = int(shortest / crop_pct)
            elif crop:
                target = (crop["height"], crop["width"])
            else:
                target = (shortest, shortest)
        else:
            raise ValueError(f"Cannot read an input size from {type(processor).__name__}.size={size!r}.")
        if crop and shortest is None:
            target = (crop["height"], crop["width"])
            shortest = min(size.get("height", target[0]), size.get("width", target[1]))
        mean = processor.image_mean if getattr(processor, "do_normalize", True) else (0.0, 0.0, 0.0)
        std = processor.image_std if getattr(processor, "do_normalize", True) else (1.0, 1.0, 1.0)
        resample = getattr(processor, "resample", None)
        return cls(
            size=(int(target[0]), int(target[1])),
            mean=tuple(float(m) for m in mean),
            std=tuple(float(s) for s in std),
            resize_shortest_edge=shortest,
            interpolation="bicubic" if "BICUBIC" in str(resample).upper() or resample == 3 else "bilinear",
            rescale_factor=float(getattr(processor, "rescale_factor", 1 / 255)) if getattr(processor, "do_rescale", True) else 1.0,
        )

    @classmethod
    def for_model(cls, model: nn.Module, processor=None) -> ImagePreprocessing:
        """From `processor` if given, else from the timm config of a timm model (raw or TimmWrapper)."""
        if processor is not None and not hasattr(processor, "tokenize"):
            return cls.from_image_processor(processor)
        from ..models.adapter import unwrap_model

        base = unwrap_model(model)
        config = getattr(base, "config", None)
        if getattr(config, "model_type", None) == "timm_wrapper":
            import timm

            data_config = timm.data.resolve_data_config(dict(config.pretrained_cfg or {}), model=None, verbose=False)
            inner = getattr(base, "timm_model", None)
            image_size = getattr(getattr(inner, "patch_embed", None), "img_size", None)
            if image_size is not None:  # a timm ViT built for another resolution than its pretrained_cfg says
                data_config["input_size"] = (3, *image_size)
            return cls.from_timm_config(data_config)
        if hasattr(base, "pretrained_cfg"):
            import timm

            data_config = timm.data.resolve_model_data_config(base)
            image_size = getattr(getattr(base, "patch_embed", None), "img_size", None)
            if image_size is not None:  # a timm ViT built for another resolution keeps its pretrained_cfg size
                data_config["input_size"] = (3, *image_size)
            return cls.from_timm_config(data_config)
        raise ValueError(
            f"No image preprocessing known for {type(base).__name__}: pass its image processor as "
            "processing_class (e.g. AutoImageProcessor.from_pretrained(<model id>))."
        )

    # -- the three steps
    def to_uint8(self, images: list) -> torch.Tensor:
        """Decode, resize and center-crop to the model's input size: uint8 (B, 3, H, W)."""
        tensors = [torch.from_numpy(_rgb_uint8(image)).permute(2, 0, 1) for image in images]
        if all(t.shape[1:] == tensors[0].shape[1:] for t in tensors):
            return self._geometry(torch.stack(tensors))
        return torch.cat([self._geometry(t.unsqueeze(0)) for t in tensors])

    def _geometry(self, batch: torch.Tensor) -> torch.Tensor:
        height, width = batch.shape[-2:]
        if (height, width) == self.size:
            return batch
        if self.resize_shortest_edge is not None:
            scale = self.resize_shortest_edge / min(height, width)
            new = (max(round(height * scale), self.size[0]), max(round(width * scale), self.size[1]))
        else:
            new = self.size
        resized = F.interpolate(batch.float(), size=new, mode=self.interpolation, antialias=True, align_corners=False)
        top, left = (new[0] - self.size[0]) // 2, (new[1] - self.size[1]) // 2
        cropped = resized[..., top : top + self.size[0], left : left + self.size[1]]
        return cropped.round().clamp(0, 255).to(torch.uint8)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return (batch.float() * self.rescale_factor - mean) / std


def augment_images(batch: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-example random augmentation of a uint8 batch, vectorised: `flip` (horizontal flip with p=0.5) or
    `crop_flip` (random resized crop, scale 0.7-1, aspect 3/4-4/3, then flip), as a batched affine resample.

    `crop_flip` is group DRO's training augmentation (Sagawa et al., arXiv:1911.08731: torchvision's
    RandomResizedCrop(224, scale=(0.7, 1), ratio=(3/4, 4/3)) + RandomHorizontalFlip) with one departure: the crop is
    taken from the image after the deterministic resize / centre crop (so that per-example edits such as MaskTune's
    masks act on the pixels the model sees), not from the original image; for CelebA group DRO also limits the
    ratio to (1, 4/3)."""
    if mode == "none":
        return batch
    n = batch.shape[0]
    flip = (torch.rand(n, generator=generator) < 0.5).float() * -2 + 1
    if mode == "flip":
        return torch.where((flip < 0).view(-1, 1, 1, 1), batch.flip(-1), batch)
    if mode != "crop_flip":
        raise ValueError(f"Unknown train_augmentation {mode!r}: expected 'none', 'flip' or 'crop_flip'.")
    area = 0.7 + 0.3 * torch.rand(n, generator=generator)
    log_ratio = (torch.rand(n, generator=generator) * 2 - 1) * np.log(4 / 3)
    ratio = torch.exp(log_ratio)
    scale_x = torch.sqrt(area * ratio).clamp(max=1.0)
    scale_y = torch.sqrt(area / ratio).clamp(max=1.0)
    shift_x = (torch.rand(n, generator=generator) * 2 - 1) * (1 - scale_x)
    shift_y = (torch.rand(n, generator=generator) * 2 - 1) * (1 - scale_y)
    zeros = torch.zeros(n)
    theta = torch.stack(
        [torch.stack([scale_x * flip, zeros, shift_x], 1), torch.stack([zeros, scale_y, shift_y], 1)], 1
    )
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    out = F.grid_sample(batch.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


def _rgb_uint8(image) -> np.ndarray:
    """A PIL image or an array as (H, W, 3) uint8. Arrays: (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4
    (alpha dropped); floats are read as [0, 1] when at most 1, else as [0, 255]."""
    if hasattr(image, "convert"):
        return np.array(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels first
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"An image array of shape {array.shape}: expected (H, W), (H, W, C) or (C, H, W) with C = 1, 3 or 4."
        )
    array = np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array[..., :3]
    if np.issubdtype(array.dtype, np.floating):
        array = array * 255.0 if array.size and float(np.nanmax(array)) <= 1.0 else array
        return np.clip(np.rint(array), 0, 255).astype(np.uint8)
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"An integer image array has values in [{array.min()}, {array.max()}]: expected 0..255.")
    return array.astype(np.uint8)


class GroupDataCollator:
    """Collate hf_robust rows into model inputs + `labels`, `group`, `example_idx`.

    Args:
        input_kind: 'image', 'text' or 'text_pair'.
        image_preprocessing: for images.
        tokenizer, max_length: for text.
        augmentation: 'none', 'flip' or 'crop_flip' (images; use a separate collator for evaluation).
        example_transform: optional `f(inputs, example_idx) -> inputs` applied before augmentation — uint8
            pixels (B, 3, H, W) for images, input_ids (B, T) for text. MaskTune's masks plug in here.
    """

    def __init__(
        self,
        input_kind: str,
        image_preprocessing: ImagePreprocessing | None = None,
        tokenizer=None,
        max_length: int | None = 128,
        augmentation: str = "none",
        example_transform: ExampleTransform | None = None,
    ):
        if input_kind == "image" and image_preprocessing is None:
            raise ValueError("Image inputs need an ImagePreprocessing.")
        if input_kind in ("text", "text_pair") and tokenizer is None:
            raise ValueError("Text inputs need a tokenizer: pass it as processing_class.")
        self.input_kind = input_kind
        self.image_preprocessing = image_preprocessing
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.augmentation = augmentation
        self.example_transform = example_transform

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        example_idx = torch.tensor([row["example_idx"] for row in rows], dtype=torch.long)
        batch = {
            "labels": torch.tensor([row["label"] for row in rows], dtype=torch.long),
            "group": torch.tensor([row.get("group", -1) for row in rows], dtype=torch.long),
            "example_idx": example_idx,
        }
        if rows and OVERLAPPING_GROUPS in rows[0]:
            batch[OVERLAPPING_GROUPS] = padded_group_ids(rows)
        if self.input_kind == "image":
            pixels = self.image_preprocessing.to_uint8([row["image"] for row in rows])
            if self.example_transform is not None:
                pixels = self.example_transform(pixels, example_idx)
            pixels = augment_images(pixels, self.augmentation)
            batch["pixel_values"] = self.image_preprocessing.normalize(pixels)
        else:
            if self.input_kind == "text_pair":
                texts = ([row["premise"] for row in rows], [row["hypothesis"] for row in rows])
            else:
                texts = ([row["text"] for row in rows],)
            # right padding whatever the tokenizer's default: a token's position then does not depend on the
            # longest text of the batch (MaskTune's text masks are stored by position)
            encoded = self.tokenizer(
                *texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt",
                padding_side="right",
            )
            if self.example_transform is not None:
                encoded["input_ids"] = self.example_transform(encoded["input_ids"], example_idx)
            batch.update(encoded)
        return batch

    def with_options(self, **changes) -> GroupDataCollator:
        """A copy with some options changed (e.g. augmentation='none' for evaluation)."""
        options = dict(
            input_kind=self.input_kind,
            image_preprocessing=self.image_preprocessing,
            tokenizer=self.tokenizer,
            max_length=self.max_length,
            augmentation=self.augmentation,
            example_transform=self.example_transform,
        )
        options.update(changes)
        return GroupDataCollator(**options)
