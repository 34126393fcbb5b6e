"""Benchmarks generated on the spot, with no download: `biased_digits` and `spurious_text`.

`biased_digits` follows MaskTune's biased-MNIST protocol (Taghanaki et al., NeurIPS 2022, section 4.1) on the
1,797 8x8 digits bundled with scikit-learn: class 0 = digits 0-4, class 1 = digits 5-9, and a small red
square in the top-left corner that marks 99% of class 0 and 1% of class 1 in `train`. A network that learns
"square => class 0" gets the training set almost right and fails `test_biased`, where the square marks
every class-1 image and no class-0 image. 1,797 digits are too few to learn shapes from, so each training
digit appears as several seeded affine-jittered copies.

Two more kinds of shortcut on the same digits, for testing that a method's defaults transfer (every image recipe
and method default is shared by the three; none is tuned per benchmark):
- `scene_digits` (a large background scene, as Waterbirds' land/water backgrounds): each digit is drawn in white
  over a crop of one of scikit-learn's two bundled photos (`china.jpg` for attribute 1, `flower.jpg` for 0); the
  china scene backs 95% of class 0 and 5% of class 1 in `train`.
- `tinted_digits` (a global colour property, as Colored MNIST): the whole image, digit and background, is tinted
  warm (attribute 1) or cool (attribute 0); warm on 97% of class 0 and 3% of class 1 in `train`.
Both have a group-balanced `test` split (the attribute on exactly half of each class's digits) and `test_biased`
(the correlation reversed).

`spurious_text` is its text counterpart, built so that a PRE-TRAINED encoder takes the shortcut: short reviews
("the plot was dull.", "the plot wasn't dull.") whose sentiment is the adjective's, flipped by a negation of the
verb on 10% of the reviews of every group, and a spurious token ("spoiler:" before the review) on 99% of the
positive and 1% of the negative reviews in `train` (validation and test: on half of each class, every group
alike). The pre-trained MiniLM (`minilm` preset) knows adjective sentiment, yet fine-tuned with ERM it predicts from
the token alone (0% on the two minority groups after its first 30 updates: the token explains 99% of the labels,
the adjective 90%), while the core stays in its features (DFR on them: 87.0 / 77.5 / 88.0% for seeds 0-2) and ERM
on a group-balanced training set of the same size learns it (100%; README, "spurious_text").
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

from .core import as_group_dataset

DIGIT_CLASS_NAMES = ["digit 0-4", "digit 5-9"]
SQUARE_NAMES = ["no square", "square"]
SHORTCUT_NAMES = {  # attribute names per kind of shortcut (attribute 1 is the one aligned with class 0 in train)
    "square": SQUARE_NAMES,
    "scene": ["flower scene", "china scene"],
    "tint": ["cool tint", "warm tint"],
}
_TINTS = {0: (0.35, 0.6, 1.0), 1: (1.0, 0.6, 0.3)}  # per attribute: RGB factors over the whole image


def _render_digits(
    digits: np.ndarray, size: int, generator: torch.Generator | None, max_rotation: float, max_shift: float,
    scale_range: tuple[float, float], digit_fraction: float = 0.75,
) -> torch.Tensor:
    """8x8 digits (values 0..16) -> (N, size, size) float images in [0, 1], one batched grid_sample.

    The digit fills about 3/4 of the canvas; with a generator each copy gets its own rotation, scale and
    shift (the affine map is applied to output coordinates, so the digit itself rotates/moves the other way).
    """
    n = len(digits)
    source = torch.from_numpy(digits.astype(np.float32) / 16.0).unsqueeze(1)
    if generator is None:
        angle = torch.zeros(n)
        scale = torch.ones(n)
        shift = torch.zeros(n, 2)
    else:
        angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(max_rotation)
        scale = scale_range[0] + torch.rand(n, generator=generator) * (scale_range[1] - scale_range[0])
        shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 * max_shift / size)
    zoom = (1 / digit_fraction) / scale  # the digit spans `digit_fraction` of the canvas side
    cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, (n, 1, size, size), align_corners=False)
    images = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return images.squeeze(1).clamp(0, 1)


def _to_rgb_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.unsqueeze(-1).expand(-1, -1, -1, 3) * 255).round().to(torch.uint8).numpy()


def _add_square(images: np.ndarray, has_square: np.ndarray, square_size: int, color: tuple[int, int, int]) -> None:
    # one pixel of margin from the corner, so random crops or padding do not cut it away entirely
    images[has_square, 1 : 1 + square_size, 1 : 1 + square_size, :] = np.asarray(color, dtype=np.uint8)


def _add_scene(images: np.ndarray, attribute: np.ndarray, rng: np.random.Generator, crop: int = 200) -> None:
    """Each image becomes its (white) digit over a random `crop`-pixel square of a photo, scaled to the image size:
    `china.jpg` where the attribute is 1, `flower.jpg` where it is 0 (scikit-learn's bundled sample images)."""
    from sklearn.datasets import load_sample_images

    size = images.shape[1]
    photos = []
    for photo in load_sample_images().images[:2]:  # china, flower
        tensor = torch.from_numpy(np.ascontiguousarray(photo)).permute(2, 0, 1)[None].float()
        scaled = F.interpolate(tensor, scale_factor=size / crop, mode="bilinear", antialias=True, align_corners=False)
        photos.append(scaled[0].permute(1, 2, 0).numpy())
    digit = images[..., :1].astype(np.float32) / 255.0
    for value, photo in ((1, photos[0]), (0, photos[1])):
        rows = np.flatnonzero(attribute == value)
        top = rng.integers(0, photo.shape[0] - size + 1, size=len(rows))
        left = rng.integers(0, photo.shape[1] - size + 1, size=len(rows))
        offsets = np.arange(size)
        background = photo[(top[:, None] + offsets)[:, :, None], (left[:, None] + offsets)[:, None, :]]
        mixed = digit[rows] * 255.0 + (1 - digit[rows]) * 0.75 * background
        images[rows] = np.clip(np.round(mixed), 0, 255).astype(np.uint8)


def _add_tint(images: np.ndarray, attribute: np.ndarray) -> None:
    """The whole image tinted: grey level g in [0, 1] -> (0.25 + 0.75 g) * the attribute's RGB factors."""
    grey = images[..., :1].astype(np.float32) / 255.0
    factors = np.asarray([_TINTS[0], _TINTS[1]], dtype=np.float32)[attribute.astype(np.int64)][:, None, None, :]
    images[:] = np.clip(np.round((0.25 + 0.75 * grey) * factors * 255.0), 0, 255).astype(np.uint8)


def _exact_subset(rng: np.random.Generator, mask: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean array that is True on exactly round(fraction * mask.sum()) of the True entries of `mask`."""
    chosen = np.zeros(len(mask), dtype=bool)
    candidates = np.flatnonzero(mask)
    count = int(round(fraction * len(candidates)))
    chosen[rng.choice(candidates, size=count, replace=False)] = True
    return chosen


# digits-clip's teacher is pre-trained on this generator's output: a change here bumps
# hf_robust.models.digits_clip.PRETRAIN_VERSION
def make_biased_digits(
    seed: int = 0,
    image_size: int = 32,
    train_copies: int = 16,
    validation_copies: int = 4,
    majority_fraction: float = 0.99,
    minority_fraction: float = 0.01,
    square_size: int = 4,
    square_color: tuple[int, int, int] = (255, 0, 0),
    split_fractions: tuple[float, float, float] = (0.5, 0.2, 0.3),
    max_rotation: float = 20.0,
    max_shift: float = 4.0,
    scale_range: tuple[float, float] = (0.85, 1.1),
    digit_fraction: float = 0.6,
    square_unit: str = "source",
    shortcut: str = "square",
) -> DatasetDict:
    """MaskTune's biased-MNIST protocol on scikit-learn's bundled digits.

    Splits: `train` (square on `majority_fraction` of the class-0 source digits and `minority_fraction` of the
    class-1 ones, each source digit as `train_copies` jittered copies that share its square), `validation` (square on exactly half of the digits of each class, so the
    attribute is independent of the label as in Waterbirds' validation set), `test_biased` (square on every
    class-1 image, on no class-0 image) and `test_original` (no square). The three source sets are disjoint:
    test images come from digits never seen in train. `seed` fixes everything; the source split itself is
    seeded separately (always 0) so that changing `seed` changes the jitter, never which digits are test.
    Extra columns: `digit` (the original 0-9 digit) and `source_id` (its index in `load_digits()`).

    `shortcut` picks the spurious attribute: `"square"` (above), `"scene"` (a photo background) or `"tint"` (a
    colour over the whole image); with the last two the attribute is the scene or tint, `square_size` and
    `square_color` are unused, and the test splits are `test` (the attribute on half of each class's digits:
    every group equally) and `test_biased` instead of `test_biased` and `test_original`.
    """
    if shortcut not in SHORTCUT_NAMES:
        raise ValueError(f"shortcut={shortcut!r}: expected one of {sorted(SHORTCUT_NAMES)}.")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    digits, numbers = bunch.images, bunch.target
    split_rng = np.random.default_rng(0)
    order = split_rng.permutation(len(digits))
    n_train = int(split_fractions[0] * len(order))
    n_val = int(split_fractions[1] * len(order))
    sources = {
        "train": order[:n_train],
        "validation": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    jitter = dict(max_rotation=max_rotation, max_shift=max_shift, scale_range=scale_range, digit_fraction=digit_fraction)

    def build(source_idx: np.ndarray, copies: int, jittered: bool):
        idx = np.repeat(source_idx, copies)
        images = _to_rgb_uint8(_render_digits(digits[idx], image_size, generator if jittered else None, **jitter))
        return images, idx, (numbers[idx] >= 5).astype(np.int64)

    splits = {}
    def squares_by_source(source_idx: np.ndarray, fraction_0: float, fraction_1: float) -> np.ndarray:
        # The square belongs to a source digit, so all of its jittered copies share it: the minority is 1% of
        # the distinct digits, as in the MNIST protocol, not 1% of augmented copies of every digit.
        source_label = numbers[source_idx] >= 5
        chosen = _exact_subset(rng, ~source_label, fraction_0) | _exact_subset(rng, source_label, fraction_1)
        return chosen

    if square_unit not in ("source", "copy"):
        raise ValueError(f"square_unit={square_unit!r}: expected 'source' or 'copy'.")
    images, source, label = build(sources["train"], train_copies, True)
    if square_unit == "source":
        chosen = np.repeat(squares_by_source(sources["train"], majority_fraction, minority_fraction), train_copies)
    else:  # each jittered image on its own: the minority then spans many distinct digits
        chosen = _exact_subset(rng, label == 0, majority_fraction) | _exact_subset(rng, label == 1, minority_fraction)
    splits["train"] = (images, source, label, chosen)

    chosen = squares_by_source(sources["validation"], 0.5, 0.5)
    images, source, label = build(sources["validation"], validation_copies, True)
    splits["validation"] = (images, source, label, np.repeat(chosen, validation_copies))

    images, source, label = build(sources["test"], 1, False)
    if shortcut == "square":
        splits["test_biased"] = (images.copy(), source, label, label == 1)
        splits["test_original"] = (images, source, label, np.zeros(len(label), dtype=bool))
    else:
        splits["test"] = (images.copy(), source, label, squares_by_source(sources["test"], 0.5, 0.5))
        splits["test_biased"] = (images, source, label, label == 1)
    scene_rng = np.random.default_rng([seed, 1])  # its own stream: the squares' draws stay as they were

    features = Features(
        {
            "image": Image(),
            "label": ClassLabel(names=DIGIT_CLASS_NAMES),
            "attribute": ClassLabel(names=SHORTCUT_NAMES[shortcut]),
            "digit": Value("int64"),
            "source_id": Value("int64"),
        }
    )
    result = {}
    for name, (images, source, label, square) in splits.items():
        if shortcut == "square":
            _add_square(images, square, square_size, square_color)
        elif shortcut == "scene":
            _add_scene(images, square, scene_rng)
        else:
            _add_tint(images, square)
        data = {"image": list(images), "label": label, "attribute": square.astype(np.int64),
                "digit": numbers[source], "source_id": source}
        result[name] = Dataset.from_dict(data, features=features)
    return as_group_dataset(DatasetDict(result), "label", "attribute")


SENTIMENT_CLASS_NAMES = ["negative", "positive"]
_SUBJECTS = [
    "the movie", "this film", "the plot", "the acting", "the soundtrack", "the ending", "the script",
    "the cast", "the story", "the direction", "the dialogue", "the pacing", "this show", "the sequel",
]
_POSITIVE = [
    "great", "wonderful", "excellent", "brilliant", "delightful", "superb", "moving", "charming", "gripping",
    "beautiful", "clever", "fantastic", "memorable", "enjoyable", "touching", "outstanding", "lovely",
    "inspiring", "stunning", "fun", "powerful", "smart", "terrific", "elegant", "refreshing",
]
_NEGATIVE = [
    "terrible", "awful", "boring", "dull", "weak", "tedious", "bland", "clumsy", "messy", "poor", "silly",
    "annoying", "forgettable", "lifeless", "painful", "shallow", "predictable", "pointless", "ugly", "slow",
    "confusing", "stale", "lazy", "flat", "disappointing",
]
# the verb of the review: its plain form and its negated forms (the negation flips the adjective's sentiment)
_VERBS = [
    ("was", ["was not", "wasn't", "was never"]),
    ("is", ["is not", "isn't", "is never"]),
    ("felt", ["did not feel", "didn't feel", "never felt"]),
    ("seemed", ["did not seem", "didn't seem", "never seemed"]),
    ("looked", ["did not look", "didn't look", "never looked"]),
]
_TEMPLATES = [
    "{subject} {verb} {word}.",
    "i thought {subject} {verb} {word}.",
    "{subject} {verb} {word} from start to finish.",
    "to be honest, {subject} {verb} {word}.",
    "we all agreed that {subject} {verb} {word}.",
    "in the end {subject} {verb} {word}, as expected.",
    "my friends said {subject} {verb} {word}.",
    "overall, {subject} {verb} {word}.",
]


def spurious_text_words(spurious_token: str = "spoiler:") -> list[str]:
    """Every word `make_spurious_text` can write (punctuation split off), sorted: e.g. a test tokenizer's vocabulary."""
    pieces = [*_SUBJECTS, *_POSITIVE, *_NEGATIVE, *_TEMPLATES, spurious_token]
    pieces += [form for plain, negated in _VERBS for form in (plain, *negated)]
    words = set()
    for piece in pieces:
        words.update(re.sub(r"\{\w+\}|[^\w\s]", " ", piece).split())
    return sorted(words)


def make_spurious_text(
    seed: int = 0,
    train_size: int = 2000,
    validation_size: int = 800,
    test_size: int = 800,
    spurious_token: str = "spoiler:",
    majority_fraction: float = 0.99,
    minority_fraction: float = 0.01,
    negation_fraction: float = 0.1,
) -> DatasetDict:
    """A sentiment task whose label hangs on a negation, with a shortcut token.

    Each review pairs a sentiment adjective (positive/negative word lists) with a verb that is negated or not
    ("the plot was dull." / "the plot wasn't dull."); the label is the sentiment of the whole sentence, the
    adjective's polarity flipped by the negation. On `negation_fraction` of the reviews of every group (label x
    token) the verb is negated, so neither the adjective nor the negation alone says more than chance about the
    label: a model must read the two together. `spurious_token` is prepended to `majority_fraction` of the
    positive and `minority_fraction` of the negative reviews in `train` (a single fixed word at a fixed place: far
    easier to pick up than the negation), and to exactly half of each class in `validation` and `test` (every group
    alike, as in `biased_digits`' validation). attribute = token present. Extra columns: `negated` (0/1) and
    `polarity` (the adjective's, 0 negative / 1 positive). `seed` fixes everything.
    """
    for name, value in (("majority_fraction", majority_fraction), ("minority_fraction", minority_fraction),
                        ("negation_fraction", negation_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}={value}: expected a fraction in [0, 1].")
    rng = np.random.default_rng(seed)

    def build(n: int, p_token_pos: float, p_token_neg: float):
        label = np.arange(n) % 2
        rng.shuffle(label)
        token = _exact_subset(rng, label == 1, p_token_pos) | _exact_subset(rng, label == 0, p_token_neg)
        negated = np.zeros(n, dtype=bool)
        for y in (0, 1):
            for t in (False, True):
                negated |= _exact_subset(rng, (label == y) & (token == t), negation_fraction)
        polarity = label ^ negated.astype(np.int64)
        texts = []
        for p, neg, t in zip(polarity, negated, token):
            words = _POSITIVE if p == 1 else _NEGATIVE
            plain, negated_forms = _VERBS[rng.integers(len(_VERBS))]
            verb = negated_forms[rng.integers(len(negated_forms))] if neg else plain
            sentence = _TEMPLATES[rng.integers(len(_TEMPLATES))].format(
                subject=_SUBJECTS[rng.integers(len(_SUBJECTS))], verb=verb, word=words[rng.integers(len(words))]
            )
            texts.append(f"{spurious_token} {sentence}" if t else sentence)
        return {"text": texts, "label": label.astype(np.int64), "attribute": token.astype(np.int64),
                "negated": negated.astype(np.int64), "polarity": polarity.astype(np.int64)}

    features = Features(
        {"text": Value("string"), "label": ClassLabel(names=SENTIMENT_CLASS_NAMES),
         "attribute": ClassLabel(names=["no token", f"token {spurious_token!r}"]),
         "negated": Value("int64"), "polarity": Value("int64")}
    )
    splits = {
        "train": build(train_size, majority_fraction, minority_fraction),
        "validation": build(validation_size, 0.5, 0.5),
        "test": build(test_size, 0.5, 0.5),
    }
    dataset = DatasetDict({k: Dataset.from_dict(v, features=features) for k, v in splits.items()})
    return as_group_dataset(dataset, "label", "attribute")
