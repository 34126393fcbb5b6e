"""`biased_mnist`: MaskTune's biased-MNIST protocol on the real MNIST digits.

Taghanaki et al., "MaskTune: Mitigating Spurious Correlations by Forcing to Explore" (NeurIPS 2022,
arXiv:2210.00055), section 4.1, Figure 2 and appendix Tables 5-6; the protocol as the authors' code builds it
(github.com/aliasgharkhani/Masktune: `src/datasets/mnist_rgb.py`, `src/utils/data_preprocess.py`,
`src/methods/mnist_train.py`), written here:

- class 0 = digits 0-4, class 1 = digits 5-9; 28x28 grey digits as RGB (the three channels equal);
- `train` + `validation`: the 60,000 training digits with a 4x4 red (255, 0, 0) square in the top-left corner
  (rows 0-3, columns 0-3) on 99% of class 0 and on 1% of class 1; `validation` is a seeded 12,000 of them (the
  same biased distribution, as the authors do), `train` the other 48,000;
- `test_biased`: the 10,000 test digits with the square on every 5-9 and on no 0-4 (the correlation reversed);
- `test_original`: the raw 10,000 test digits;
- `num_squares=2` (appendix Table 5) adds the authors' second square, top-right, blue (0, 0, 255), on the same
  images as the first.

attribute = the square(s) present; group = label * 2 + attribute. Extra columns: `digit` (0-9) and `source_idx`
(the row of the digit in the MNIST split it comes from).

Departures from the authors' code, each because their choice is arbitrary or unseeded:
- the squares go on a SEEDED random 99% / 1% of each class (exactly `round(fraction * class size)` digits); the
  authors' go on the first 99% / 1% of each class in file order;
- the validation digits are a seeded draw (theirs: `numpy.random.default_rng()` without a seed), and both
  splits keep MNIST's file order (theirs are re-listed from image folders, class by class).
"""

from __future__ import annotations

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

from .core import DataValidationError, as_group_dataset
from .embedded import DIGIT_CLASS_NAMES, _exact_subset

SQUARE_COLORS = ((255, 0, 0), (0, 0, 255))  # top-left red; top-right blue (the authors' color[2 - channel])


def _images(split: Dataset, name: str) -> np.ndarray:
    """(N, H, W) uint8 grey digits of one MNIST split (RGB inputs are reduced to their first channel)."""
    arrays = [np.asarray(image) for image in split["image"]]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DataValidationError(f"biased_mnist: split {name!r} has images of several shapes {sorted(shapes)[:3]}; "
                                  "expected MNIST's 28x28.")
    images = np.stack(arrays)
    if images.ndim == 4:
        images = images[..., 0]
    return images.astype(np.uint8)


def _add_squares(images: np.ndarray, chosen: np.ndarray, num_squares: int, square_size: int) -> None:
    """Paint the squares in place on `images[chosen]` ((N, H, W, 3) uint8), at the image corners as the authors."""
    images[chosen, :square_size, :square_size] = np.asarray(SQUARE_COLORS[0], dtype=np.uint8)
    if num_squares == 2:
        images[chosen, :square_size, -square_size:] = np.asarray(SQUARE_COLORS[1], dtype=np.uint8)


def make_biased_mnist(
    raw: DatasetDict,
    seed: int = 0,
    num_squares: int = 1,
    validation_fraction: float = 0.2,
    majority_fraction: float = 0.99,
    minority_fraction: float = 0.01,
    square_size: int = 4,
) -> DatasetDict:
    """The biased-MNIST DatasetDict (module docstring) from `raw`, MNIST in the layout of the Hub's `ylecun/mnist`
    (`train` and `test` splits with `image` and `label` 0-9).

    Args:
        seed: fixes which training digits carry the square and which form `validation`.
        num_squares: 1 (red, top-left) or 2 (and blue, top-right; paper appendix Table 5).
        validation_fraction: share of the training digits held out as `validation` (0.2: 12,000 of 60,000).
        majority_fraction, minority_fraction: share of class 0 / class 1 training digits with the square(s).
    """
    if num_squares not in (1, 2):
        raise ValueError(f"num_squares={num_squares}: expected 1 or 2.")
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction={validation_fraction}: expected a value in (0, 1).")
    missing = [s for s in ("train", "test") if s not in raw]
    if missing:
        raise DataValidationError(f"biased_mnist: the MNIST copy lacks the split(s) {missing} (found {list(raw)}); "
                                  "expected ylecun/mnist's 'train' and 'test'.")
    for name in ("train", "test"):
        absent = [c for c in ("image", "label") if c not in raw[name].column_names]
        if absent:
            raise DataValidationError(f"biased_mnist: split {name!r} lacks {absent} (columns "
                                      f"{raw[name].column_names}); expected ylecun/mnist's 'image' and 'label'.")
    rng = np.random.default_rng(seed)
    features = Features({
        "image": Image(),
        "label": ClassLabel(names=DIGIT_CLASS_NAMES),
        "attribute": ClassLabel(names=["no square", "square" if num_squares == 1 else "squares"]),
        "digit": Value("int64"),
        "source_idx": Value("int64"),
    })

    def build(grey: np.ndarray, digits: np.ndarray, squared: np.ndarray, rows: np.ndarray) -> Dataset:
        rgb = np.repeat(grey[rows, :, :, None], 3, axis=3)
        _add_squares(rgb, squared[rows], num_squares, square_size)
        return Dataset.from_dict(
            {"image": list(rgb), "label": (digits[rows] >= 5).astype(np.int64),
             "attribute": squared[rows].astype(np.int64), "digit": digits[rows].astype(np.int64),
             "source_idx": rows.astype(np.int64)},
            features=features,
        )

    grey, digits = _images(raw["train"], "train"), np.asarray(raw["train"]["label"], dtype=np.int64)
    if grey.shape[1] < 2 * square_size or grey.shape[2] < 2 * square_size:
        raise DataValidationError(f"biased_mnist: images of {grey.shape[1:]} pixels are too small for "
                                  f"{square_size}x{square_size} corner squares.")
    label = digits >= 5
    squared = _exact_subset(rng, ~label, majority_fraction) | _exact_subset(rng, label, minority_fraction)
    validation = np.zeros(len(digits), dtype=bool)
    validation[rng.choice(len(digits), size=int(round(validation_fraction * len(digits))), replace=False)] = True
    splits = {
        "train": build(grey, digits, squared, np.flatnonzero(~validation)),
        "validation": build(grey, digits, squared, np.flatnonzero(validation)),
    }
    grey, digits = _images(raw["test"], "test"), np.asarray(raw["test"]["label"], dtype=np.int64)
    everything = np.arange(len(digits))
    splits["test_biased"] = build(grey, digits, digits >= 5, everything)
    splits["test_original"] = build(grey, digits, np.zeros(len(digits), dtype=bool), everything)
    return as_group_dataset(DatasetDict(splits), "label", "attribute")
