"""Counterfactual images: mask patches by a CAM (or at random) and refill them from other images of the batch.

Xiao et al., "Masked Images Are Counterfactual Samples for Robust Fine-tuning" (CVPR 2023), section 3.2.
Masks live on the patch grid (a ViT's patches, a CNN's CAM cells) and act on whole patches of the input:

- `object`: patches whose CAM (normalised by its per-image max) is above `threshold`; `context`: the others;
  `random`: each patch independently with probability `probability`.
- Refill, in the model's input space (`pixel_values`): `none` sets masked pixels to 0 (for normalised inputs
  the dataset-mean colour, so every masked patch carries no image content); `single` copies the same patches
  of ONE other image of the batch; `multi` draws, for every masked patch, its own other image. A donor is
  never the image itself.

Donors can come from a pool larger than the images being edited (`pool`, `offset`): in a distributed run the
pool is the global batch gathered from every process, so N processes make the counterfactuals one process
would. Draws use an explicit `torch.Generator` (on the CPU, so results do not depend on the device).
Inspired by `utils/masking.py` of github.com/Coxy7/robust-finetuning; written here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MASK_STRATEGIES = ("object", "context", "random")
REFILL_STRATEGIES = ("none", "single", "multi")


def patch_masks(
    strategy: str,
    cam: torch.Tensor | None = None,
    threshold: float = 0.3,
    probability: float = 0.5,
    grid: tuple[int, int] | None = None,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, h, w) bool: the patches to mask. `cam` (B, h, w), normalised per image, for `object`/`context`;
    `grid` and `batch_size` for `random` (drawn with `generator`)."""
    if strategy in ("object", "context"):
        if cam is None:
            raise ValueError(f"mask strategy {strategy!r} needs a CAM.")
        above = cam > threshold
        return above if strategy == "object" else ~above
    if strategy == "random":
        if grid is None or batch_size is None:
            raise ValueError("mask strategy 'random' needs grid=(h, w) and batch_size.")
        return torch.rand(batch_size, *grid, generator=generator) < probability
    raise ValueError(f"Unknown mask strategy {strategy!r}: expected one of {MASK_STRATEGIES}.")


def draw_donors(
    strategy: str, pool_size: int, grid: tuple[int, int], generator: torch.Generator | None = None
) -> torch.Tensor | None:
    """(pool_size, h, w) long: for every image of the pool and every patch, the pool index of its donor —
    never itself. `single`: one donor per image (the same for all its patches); `multi`: one per patch;
    `none`: None. A pool of one image has no other image: None (the caller falls back to `none`)."""
    if strategy == "none" or pool_size < 2:
        if strategy not in REFILL_STRATEGIES:
            raise ValueError(f"Unknown refill strategy {strategy!r}: expected one of {REFILL_STRATEGIES}.")
        return None
    own = torch.arange(pool_size).view(-1, 1, 1)
    if strategy == "single":
        shift = torch.randint(1, pool_size, (pool_size, 1, 1), generator=generator).expand(-1, *grid)
    elif strategy == "multi":
        shift = torch.randint(1, pool_size, (pool_size, *grid), generator=generator)
    else:
        raise ValueError(f"Unknown refill strategy {strategy!r}: expected one of {REFILL_STRATEGIES}.")
    return (own + shift) % pool_size  # a shift in 1..N-1 never lands on the image itself


def _to_pixels(grid_values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour upsampling of a (B, h, w) patch-grid tensor to (B, 1, H, W), patch-aligned."""
    height, width = size
    h, w = grid_values.shape[-2:]
    if height % h == 0 and width % w == 0:
        return grid_values.repeat_interleave(height // h, 1).repeat_interleave(width // w, 2)[:, None]
    upsampled = F.interpolate(grid_values[:, None].float(), size=size, mode="nearest")
    return upsampled.round().to(grid_values.dtype)


def refill(
    pixel_values: torch.Tensor,
    mask: torch.Tensor,
    donors: torch.Tensor | None = None,
    pool: torch.Tensor | None = None,
) -> torch.Tensor:
    """The counterfactual images: `pixel_values` (B, C, H, W) with the masked patches (`mask`, (B, h, w) bool)
    taken from `pool[donors]` (`donors` (B, h, w), indices into `pool`, default `pixel_values` itself), or set
    to 0 when `donors` is None."""
    size = tuple(pixel_values.shape[-2:])
    pixel_mask = _to_pixels(mask.to(pixel_values.device), size)
    if donors is None:
        return pixel_values.masked_fill(pixel_mask, 0.0)
    pool = pixel_values if pool is None else pool
    index = _to_pixels(donors.to(pixel_values.device), size).expand(-1, pixel_values.shape[1], -1, -1)
    source = pool.gather(0, index)
    return torch.where(pixel_mask, source, pixel_values)


def make_counterfactuals(
    pixel_values: torch.Tensor,
    mask_strategy: str = "object",
    refill_strategy: str = "single",
    cam: torch.Tensor | None = None,
    threshold: float = 0.3,
    probability: float = 0.5,
    grid: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
    pool: torch.Tensor | None = None,
    offset: int = 0,
    pool_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(counterfactual images, patch mask (B, h, w), donors (B, h, w) pool indices or None).

    `pool` (N, C, H, W) holds `pixel_values` at rows `offset .. offset+B` (default: the batch itself). Random
    draws are made for the whole pool and the batch's rows taken, so every process of a distributed run
    draws the same numbers. Without refilling no pixels of the pool are needed: `pool_size=N` (and `offset`)
    place the batch in it for the random masks."""
    batch = pixel_values.shape[0]
    if pool is None and pool_size is not None and refill_strategy != "none":
        raise ValueError(f"refill_strategy={refill_strategy!r} needs the donor images: pass pool=, not pool_size=.")
    pool = pixel_values if pool is None else pool
    rows_total = pool_size if pool_size is not None else pool.shape[0]
    if offset < 0 or offset + batch > rows_total:
        raise ValueError(f"The batch's rows {offset}..{offset + batch} are not inside the pool of {rows_total}.")
    if grid is None:
        if cam is None:
            raise ValueError("make_counterfactuals needs grid=(h, w) when there is no CAM.")
        grid = tuple(cam.shape[-2:])
    rows = slice(offset, offset + batch)
    if mask_strategy == "random":
        mask = patch_masks("random", grid=grid, batch_size=rows_total, probability=probability, generator=generator)[rows]
    else:
        mask = patch_masks(mask_strategy, cam=cam, threshold=threshold)
    donors = draw_donors(refill_strategy, rows_total, grid, generator)
    if donors is not None:
        donors = donors[rows]
    mask = mask.to(pixel_values.device)
    return refill(pixel_values, mask, donors, pool), mask, donors
