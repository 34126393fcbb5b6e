"""FairDropout: example-tied dropout, the layer (functional `fair_dropout` and module `FairDropout`).

Papers: Nanfack and Belilovsky, "FairDropout: Using Example-Tied Dropout to Enhance Generalization of Minority
Groups" (arXiv:2502.06695; the method and its name), after the example-tied dropout of Maini et al., "Can Neural
Network Memorization Be Localized?" (ICML 2023, arXiv:2307.09542). Inspired by the authors' `ExampleTiedDropout`
(github.com/pratyushmaini/localizing-memorization, models/dropout.py), rewritten:

- the first `round(p_gen * C)` neurons (channels of a (B, C, H, W) map, the last axis of (B, T, D) tokens or
  (B, D) features) are *generalising*: always on;
- each other neuron is *memorising*: in training it is kept for an example with probability `p_mem`, by a
  mask that is a pure function of (seed, example_idx, neuron) — a counter-based integer hash evaluated
  vectorised on the input's device. The authors' layer reseeds the global RNG once per example in a Python
  loop, caches a (num_examples, C, H, W) table on the CPU and moves masks to CUDA; this one touches no RNG,
  stores nothing, runs on any device and any layout, and gives the same mask every epoch, on every process,
  after a resume and when activation checkpointing recomputes the layer;
- in evaluation the memorising neurons are zero.

Scaling (checked against the authors' code): kept memorising neurons are NOT rescaled in training (the mask
is 0/1, as in `ExampleTiedDropout`'s train mode), and the generalising neurons pass unchanged. At evaluation
the memorising neurons are dropped; optionally (`rescale_generalising=True`) the generalising neurons are
multiplied by the ratio of the neurons active on average in training to the generalising ones,
`(g + (C - g) * p_mem) / g` — the mass-preserving form of the authors' "drop" mode, whose factor
`(p_fixed + p_mem) / p_fixed` counts `p_mem` as a fraction of all neurons although it is drawn from the
memorising ones only. The eval-time operation is always `x * scale` with a fixed per-neuron `scale` vector
(`eval_scale`), exactly what `hf_robust.methods.fair_dropout.inject.export_fair_dropout` folds into the next layer.
`p_gen = 1` makes the layer the identity (= ERM).
"""

from __future__ import annotations

import functools
import zlib

import torch
from torch import nn

LAYOUTS = ("channels", "tokens", "features")
_MASK32 = 0xFFFFFFFF
# Multipliers of a 32-bit integer hash (C. Wellons' hash-prospector, "lowbias32" family: bias ~0.11). Both are
# below 2**31, so a 32-bit value times either stays below 2**63: exact in int64 on every device, no overflow.
_MULTIPLIERS = (0x21F0AAAD, 0x735A2D97)
_SEED_SALT = 0x3C6EF372


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective avalanche hash of int64 tensors holding values in [0, 2**32); updates `x` in place."""
    x.bitwise_xor_(x >> 16).mul_(_MULTIPLIERS[0]).bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 15).mul_(_MULTIPLIERS[1]).bitwise_and_(_MASK32)
    return x.bitwise_xor_(x >> 15)


def _mix32_int(x: int) -> int:
    """`_mix32` of one Python integer (for seeds: no tensor op)."""
    x &= _MASK32
    x = ((x ^ (x >> 16)) * _MULTIPLIERS[0]) & _MASK32
    x = ((x ^ (x >> 15)) * _MULTIPLIERS[1]) & _MASK32
    return x ^ (x >> 15)


@functools.lru_cache(maxsize=64)
def _neuron_codes(num_features: int, device: torch.device) -> torch.Tensor:
    # hashed neuron counters, so that neighbouring neurons are unrelated; cached: they depend on C alone
    return _mix32(torch.arange(num_features, device=device, dtype=torch.int64) + 0x9E3779B9)


def position_seed(seed: int, name: str) -> int:
    """The seed of one FairDropout layer: the run's seed mixed with the position's name, so that two positions
    give an example different (independent) masks."""
    return (int(seed) * 0x9E3779B1 + zlib.crc32(name.encode())) & _MASK32


def num_generalising(num_features: int, p_gen: float) -> int:
    """round(p_gen * C), the number of always-on neurons; at least one unless p_gen is 0 (with none, evaluation
    would zero the whole layer)."""
    g = int(round(p_gen * num_features))
    if g == 0 and p_gen > 0 and num_features > 0:
        raise ValueError(
            f"p_gen={p_gen} of {num_features} neurons rounds to 0 generalising neurons: evaluation would drop every "
            f"neuron of this layer. Use p_gen >= {0.5 / num_features:.3g} (one neuron or more)."
        )
    return g


def fair_dropout_mask(
    example_idx: torch.Tensor, num_features: int, p_gen: float, p_mem: float, seed: int = 0
) -> torch.Tensor:
    """The training mask, (B, C) bool on `example_idx`'s device: True = neuron kept for that example.

    Neuron `c` of example `i` is kept if `c < round(p_gen * C)` or `u(seed, i, c) < p_mem`, where `u` is a
    uniform value in [0, 1) read off a 32-bit integer hash of (seed, example index, neuron index). The global
    RNG is never read or advanced.
    """
    if example_idx.ndim != 1:
        raise ValueError(f"example_idx must be a 1-D tensor of example indices, got shape {tuple(example_idx.shape)}.")
    if example_idx.is_floating_point() or example_idx.is_complex() or example_idx.dtype == torch.bool:
        raise TypeError(f"example_idx must hold integers, got {example_idx.dtype}.")
    idx = example_idx.to(torch.int64)
    # per example: the index's low 32 bits mixed with the seed, then its high 32 bits (indices may exceed 2**32)
    state = _mix32((idx & _MASK32) ^ _mix32_int(int(seed) ^ _SEED_SALT))
    state = _mix32(state ^ ((idx >> 32) & _MASK32))
    # per (example, neuron): one more round over the two hashed codes, read as a uniform value in [0, 1)
    bits = _mix32(state[:, None] ^ _neuron_codes(num_features, example_idx.device)[None, :])
    keep = bits < int(round(p_mem * 2**32))
    keep[:, : num_generalising(num_features, p_gen)] = True
    return keep


def eval_scale(num_features: int, p_gen: float, p_mem: float, rescale_generalising: bool = False) -> torch.Tensor:
    """The eval-time per-neuron factor (C,): 0 on memorising neurons; 1 (or the mass-preserving factor
    `(g + (C - g) * p_mem) / g` with `rescale_generalising`) on the g generalising ones."""
    g = num_generalising(num_features, p_gen)
    scale = torch.zeros(num_features)
    factor = (g + (num_features - g) * p_mem) / g if (rescale_generalising and g > 0) else 1.0
    scale[:g] = factor
    return scale


def _neuron_axis_shape(x: torch.Tensor, layout: str) -> tuple[int, tuple[int, ...]]:
    """(number of neurons, shape a (B, C) mask is viewed as to broadcast over `x`)."""
    if layout == "channels":
        if x.ndim < 3:
            raise ValueError(f"FairDropout layout 'channels' expects (B, C, H, W) maps, got shape {tuple(x.shape)}.")
        return x.shape[1], (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
    if layout == "tokens" and x.ndim != 3:
        raise ValueError(f"FairDropout layout 'tokens' expects (B, T, D), got shape {tuple(x.shape)}.")
    if layout == "features" and x.ndim != 2:
        raise ValueError(f"FairDropout layout 'features' expects (B, D), got shape {tuple(x.shape)}.")
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown FairDropout layout {layout!r}: expected one of {LAYOUTS}.")
    return x.shape[-1], (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)


def fair_dropout(
    x: torch.Tensor,
    example_idx: torch.Tensor | None,
    p_gen: float = 0.2,
    p_mem: float = 0.2,
    training: bool = True,
    layout: str = "channels",
    seed: int = 0,
    rescale_generalising: bool = False,
) -> torch.Tensor:
    """Example-tied dropout of `x` (see the module docstring).

    Args:
        x: (B, C, H, W) for `layout="channels"`, (B, T, D) for `"tokens"`, (B, D) for `"features"`.
        example_idx: (B,) integer indices of the examples (the dataset's `example_idx`); required in training.
        p_gen: fraction of generalising (always-on) neurons, `round(p_gen * C)` of them.
        p_mem: probability that a memorising neuron is kept for an example in training.
        training: training (example-tied masks) or evaluation (memorising neurons zero).
        seed: the mask seed; with the same seed, an example always gets the same mask.
        rescale_generalising: at evaluation, scale the generalising neurons to the activation mass of training.
    """
    if p_gen >= 1:
        return x
    num_features, view = _neuron_axis_shape(x, layout)
    if not training:
        scale = eval_scale(num_features, p_gen, p_mem, rescale_generalising).to(device=x.device, dtype=x.dtype)
        return x * scale.view((1,) + view[1:])
    if example_idx is None:
        raise ValueError(
            "FairDropout is in training mode but received no example_idx: its masks are tied to examples. Pass "
            "example_idx=<(B,) tensor of dataset indices> to the model's forward (inject_fair_dropout adds the "
            "argument; hf_robust's trainers pass it), or call model.eval() to evaluate."
        )
    example_idx = torch.as_tensor(example_idx, device=x.device)
    if example_idx.shape != (x.shape[0],):
        raise ValueError(
            f"FairDropout got example_idx of shape {tuple(example_idx.shape)} for a batch of {x.shape[0]}: expected "
            f"one index per example, shape ({x.shape[0]},)."
        )
    mask = fair_dropout_mask(example_idx, num_features, p_gen, p_mem, seed)
    return x * mask.view(view).to(x.dtype)


class FairDropout(nn.Module):
    """Example-tied dropout as a module (see `fair_dropout`); parameter-free.

    In training, `forward(x, example_idx)`; in evaluation `example_idx` is ignored and may be omitted.
    `eval_scale()` is the per-neuron factor evaluation multiplies by (what an export folds into the weights).
    """

    def __init__(
        self,
        p_gen: float = 0.2,
        p_mem: float = 0.2,
        layout: str = "channels",
        seed: int = 0,
        rescale_generalising: bool = False,
    ):
        super().__init__()
        if not 0 < p_gen <= 1:
            raise ValueError(f"p_gen={p_gen}: the fraction of generalising neurons must be in (0, 1].")
        if not 0 <= p_mem <= 1:
            raise ValueError(f"p_mem={p_mem}: the keep probability of memorising neurons must be in [0, 1].")
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}.")
        self.p_gen, self.p_mem, self.layout = float(p_gen), float(p_mem), layout
        self.seed = int(seed) & _MASK32
        self.rescale_generalising = bool(rescale_generalising)

    def forward(self, x: torch.Tensor, example_idx: torch.Tensor | None = None) -> torch.Tensor:
        return fair_dropout(x, example_idx, self.p_gen, self.p_mem, self.training, self.layout, self.seed,
                            self.rescale_generalising)

    def mask(self, example_idx: torch.Tensor, num_features: int) -> torch.Tensor:
        """The (B, C) training mask of these examples (True = kept)."""
        return fair_dropout_mask(example_idx, num_features, self.p_gen, self.p_mem, self.seed)

    def eval_scale(self, num_features: int) -> torch.Tensor:
        return eval_scale(num_features, self.p_gen, self.p_mem, self.rescale_generalising)

    def extra_repr(self) -> str:
        extra = ", rescale_generalising=True" if self.rescale_generalising else ""
        return f"p_gen={self.p_gen}, p_mem={self.p_mem}, layout={self.layout!r}, seed={self.seed}{extra}"
