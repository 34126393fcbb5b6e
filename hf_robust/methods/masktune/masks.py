"""MaskTune's per-example masks: how they are computed, and how they are stored.

Computed (Taghanaki et al., "MaskTune: Mitigating Spurious Correlations by Forcing to Explore", NeurIPS 2022,
arXiv:2210.00055), one batch at a time:
- `image_masks`: XGrad-CAM for the predicted class at the adapter's CAM layer, brought to the input size
  (`cam_at_input_size`), thresholded at `mean + k * std` of the image's positive values;
- `token_masks`: gradient x input on the token embeddings for text (beyond the paper);
- `random_window_masks`: RandMask, the paper's random baseline.

Stored: a `MaskStore` holds one boolean mask per example, keyed by `example_idx` — pixels at the model's input
resolution for images, token positions for text — packed 8 to a byte (a 224x224 mask takes 6.3 kB, 32x32 takes
128 bytes). It plugs into `GroupDataCollator(example_transform=...)`: masked pixels become black (0) in the uint8
image before any augmentation and normalisation; masked tokens become the tokenizer's mask token.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...data.core import DataValidationError
from ...explain.cam import normalize_per_image, threshold_masks, token_attributions, upsample, xgradcam
from ...models.adapter import UnsupportedModelError

# ----------------------------------------------------------------------------- storing the masks
_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(masks: torch.Tensor) -> torch.Tensor:
    """(N, ...) bool -> (N, ceil(numel/8)) uint8, most significant bit first."""
    flat = masks.flatten(1).to(torch.uint8)
    pad = (-flat.shape[1]) % 8
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return (flat.view(flat.shape[0], -1, 8) * _BITS.to(flat.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_bits`: (N, bytes) uint8 -> (N, *shape) bool."""
    numel = 1
    for size in shape:
        numel *= size
    bits = (packed[..., None] & _BITS.to(packed.device)) > 0
    return bits.flatten(1)[:, :numel].view(packed.shape[0], *shape)


class MaskStore:
    """Boolean masks of one shape (e.g. (H, W) or (T,)) for a set of examples, keyed by `example_idx`."""

    def __init__(self, masks: torch.Tensor, example_idx: torch.Tensor):
        if masks.shape[0] != example_idx.shape[0]:
            raise ValueError(f"{masks.shape[0]} masks for {example_idx.shape[0]} example indices.")
        order = torch.argsort(example_idx)
        self.example_idx = example_idx[order].long().cpu()
        self.shape = tuple(masks.shape[1:])
        self.packed = pack_bits(masks[order].bool()).cpu()

    def __len__(self) -> int:
        return len(self.example_idx)

    def positions(self, example_idx: torch.Tensor) -> torch.Tensor:
        example_idx = example_idx.long().cpu()
        pos = torch.searchsorted(self.example_idx, example_idx).clamp(max=len(self.example_idx) - 1)
        missing = self.example_idx[pos] != example_idx
        if missing.any():
            raise KeyError(f"No mask for example_idx {example_idx[missing][:5].tolist()}.")
        return pos

    def __getitem__(self, example_idx: torch.Tensor) -> torch.Tensor:
        """Masks (B, *shape) bool for a batch of example indices."""
        return unpack_bits(self.packed[self.positions(example_idx)], self.shape)

    def masks(self) -> torch.Tensor:
        """All masks, ordered by example_idx."""
        return unpack_bits(self.packed, self.shape)

    def masked_fraction(self) -> torch.Tensor:
        """Fraction of masked entries per example (ordered by example_idx)."""
        return self.masks().flatten(1).float().mean(1)

    def union(self, other: MaskStore) -> MaskStore:
        """Masks of both stores OR-ed (MaskTune's accumulative masking)."""
        if other.shape != self.shape or not torch.equal(other.example_idx, self.example_idx):
            raise ValueError("Can only combine masks of the same examples and shape.")
        return MaskStore(self.masks() | other.masks(), self.example_idx)

    # -- as collator transforms
    def apply_to_pixels(self, pixels: torch.Tensor, example_idx: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) with every masked pixel black."""
        keep = ~self[example_idx].to(pixels.device)
        if keep.shape[-2:] != pixels.shape[-2:]:
            raise ValueError(f"Masks of size {tuple(keep.shape[-2:])} for images of size {tuple(pixels.shape[-2:])}.")
        return pixels * keep[:, None].to(pixels.dtype)

    def token_transform(self, mask_token_id: int):
        """A transform for input_ids (B, T): masked positions (T <= the stored length) -> `mask_token_id`."""

        def apply(input_ids: torch.Tensor, example_idx: torch.Tensor) -> torch.Tensor:
            masked = self[example_idx][:, : input_ids.shape[1]].to(input_ids.device)
            if masked.shape[1] < input_ids.shape[1]:
                masked = torch.nn.functional.pad(masked, (0, input_ids.shape[1] - masked.shape[1]))
            return torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)

        return apply

    # -- persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"packed": self.packed, "example_idx": self.example_idx, "shape": torch.tensor(self.shape)}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> MaskStore:
        store = cls.__new__(cls)
        store.packed = state["packed"]
        store.example_idx = state["example_idx"]
        store.shape = tuple(int(s) for s in state["shape"].tolist())
        return store

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file(self.state_dict(), str(path))

    @classmethod
    def load(cls, path: str | Path) -> MaskStore:
        from safetensors.torch import load_file

        return cls.from_state_dict(load_file(str(path)))


# ----------------------------------------------------------------------------- computing the masks
def image_masks(model, adapter, pixel_values: torch.Tensor, k: float = 2.0) -> torch.Tensor:
    """MaskTune's masks for a batch of images: (B, H, W) bool at the input resolution."""
    if pixel_values.ndim != 4:
        raise DataValidationError(
            f"Image masking needs pixel_values of shape (B, C, H, W); got a tensor of shape {tuple(pixel_values.shape)}."
        )
    cam, _ = xgradcam(model, adapter, {"pixel_values": pixel_values})
    if cam.shape[-2] * cam.shape[-1] == 1:
        raise UnsupportedModelError(
            f"The CAM layer of {type(adapter.model).__name__} gives a 1x1 map for {tuple(pixel_values.shape[-2:])} "
            "inputs: it cannot point at any region, so MaskTune would mask nothing. Use larger inputs (e.g. the "
            "model's pre-training resolution) or cam_target_layer= an earlier layer with a larger map."
        )
    return threshold_masks(cam_at_input_size(cam, tuple(pixel_values.shape[-2:])), k)


def cam_at_input_size(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Min-max normalised, bilinearly upsampled to `size`, normalised again: the maps the `grad-cam` package
    (the authors' code) returns, whose upsampling moves the extremes slightly off 0 and 1."""
    return normalize_per_image(upsample(normalize_per_image(cam), size))


def token_masks(model, adapter, model_inputs: dict, special_ids: list[int], k: float = 2.0, min_tokens: int = 1):
    """Masks over token positions (B, T) bool: tokens whose gradient x input attribution exceeds the threshold,
    and at least the `min_tokens` best positive ones; never padding or special tokens."""
    scores, _ = token_attributions(model, adapter, model_inputs)
    input_ids = model_inputs["input_ids"]
    valid = model_inputs.get("attention_mask", torch.ones_like(input_ids)).bool()
    valid &= ~torch.isin(input_ids, torch.tensor(special_ids, device=input_ids.device))
    masks = threshold_masks(scores, k, valid)
    if min_tokens > 0:
        ranked = torch.where(valid & (scores > 0), scores, torch.full_like(scores, -float("inf")))
        top = ranked.topk(min(min_tokens, scores.shape[1]), dim=1)
        chosen = torch.zeros_like(masks).scatter(1, top.indices, top.values > -float("inf"))
        masks |= chosen
    return masks



def random_window_masks(
    example_idx: torch.Tensor, size: tuple[int, int], seed: int = 0, min_side: int = 2, max_side: int | None = None
) -> torch.Tensor:
    """RandMask, MaskTune's random-masking baseline (Taghanaki et al., arXiv:2210.00055, Figure 2 and appendix
    Table 6): one square window per image, its side uniform in `min_side..max_side` (default: half the shorter
    image side, 14 at 28x28: the paper's {2x2, ..., n x n}, n = side / 2), its position uniform among those that
    keep it inside the image. (B, H, W) bool on `example_idx`'s device.

    Each window is a pure function of (seed, example_idx), read off the counter-based hash of FairDropout's masks:
    the same on every process and after resume, no global RNG. The authors' code (torchvision-style `Cutout` with
    lengths 2..14) centres the window anywhere and clips it at the border, so their windows near the edges are
    smaller and their sides even; here every window has its drawn size. A consequence on biased MNIST: a window
    covers the 4x4 corner square for ~0.2% of the images here, ~3% with theirs.
    """
    from ..fair_dropout.layer import _MASK32, _mix32, _mix32_int

    height, width = int(size[0]), int(size[1])
    max_side = min(height, width) // 2 if max_side is None else int(max_side)
    if not 1 <= min_side <= max_side <= min(height, width):
        raise ValueError(f"Random windows of side {min_side}..{max_side} do not fit {height}x{width} images "
                         f"(expected 1 <= min_side <= max_side <= {min(height, width)}).")
    idx = example_idx.to(torch.int64)
    state = _mix32((idx & _MASK32) ^ _mix32_int(int(seed) ^ 0x52414E44))
    state = _mix32(state ^ ((idx >> 32) & _MASK32))

    def uniform_int(counter: int, count: torch.Tensor | int) -> torch.Tensor:
        # a 32-bit hash scaled to 0..count-1 (bits * count < 2**63: exact in int64)
        return (_mix32(state ^ _mix32_int(counter)) * count) >> 32

    side = min_side + uniform_int(1, max_side - min_side + 1)
    top = uniform_int(2, height - side + 1)
    left = uniform_int(3, width - side + 1)
    rows = torch.arange(height, device=idx.device)[None, :, None]
    cols = torch.arange(width, device=idx.device)[None, None, :]
    inside_rows = (rows >= top[:, None, None]) & (rows < (top + side)[:, None, None])
    inside_cols = (cols >= left[:, None, None]) & (cols < (left + side)[:, None, None])
    return inside_rows & inside_cols
