"""The data model, the embedded benchmarks and the Hub loaders (on local copies in the Hub layout)."""

import re

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

from hf_robust.data import (
    DataValidationError,
    as_group_dataset,
    embedded,
    has_negation,
    load_benchmark,
    make_spurious_text,
    validate_group_dataset,
)

RED = np.array([255, 0, 0])


def _has_square(image) -> bool:
    return bool((np.asarray(image)[1:5, 1:5] == RED).all())


# ----------------------------------------------------------------------------- biased_digits
def test_biased_digits_protocol(digits):
    assert set(digits) == {"train", "validation", "test_biased", "test_original"}
    train = digits["train"]
    assert train.features["group"].names == [
        "digit 0-4,no square", "digit 0-4,square", "digit 5-9,no square", "digit 5-9,square"
    ]
    label, attribute, source = (np.asarray(train[c]) for c in ("label", "attribute", "source_id"))
    # the square belongs to a source digit: every jittered copy of a digit shares it
    per_source = {s: set(attribute[source == s]) for s in np.unique(source)}
    assert all(len(v) == 1 for v in per_source.values())
    sources = np.unique(source)
    source_label = np.array([label[source == s][0] for s in sources])
    source_square = np.array([attribute[source == s][0] for s in sources])
    assert source_square[source_label == 0].sum() == round(0.99 * (source_label == 0).sum())
    assert source_square[source_label == 1].sum() == round(0.01 * (source_label == 1).sum())
    assert len(train) == 16 * len(sources)
    # labels follow the digits
    assert (label == (np.asarray(train["digit"]) >= 5)).all()
    assert np.array_equal(np.asarray(train["group"]), label * 2 + attribute)
    assert np.array_equal(np.asarray(train["example_idx"]), np.arange(len(train)))


def test_biased_digits_validation_and_tests(digits):
    val = digits["validation"]
    label, attribute = np.asarray(val["label"]), np.asarray(val["attribute"])
    for c in (0, 1):  # attribute independent of the label: half of each class
        assert abs(attribute[label == c].mean() - 0.5) < 0.02
    biased, original = digits["test_biased"], digits["test_original"]
    assert np.array_equal(np.asarray(biased["attribute"]), np.asarray(biased["label"]))  # square iff class 1
    assert not np.asarray(original["attribute"]).any()
    assert np.array_equal(np.asarray(biased["source_id"]), np.asarray(original["source_id"]))
    # test digits never appear in train or validation
    train_sources = set(digits["train"]["source_id"]) | set(val["source_id"])
    assert not train_sources & set(biased["source_id"])
    assert not set(digits["train"]["source_id"]) & set(val["source_id"])


def test_biased_digits_square_pixels(digits):
    for split in ("train", "test_biased", "test_original"):
        rows = digits[split].select(range(0, len(digits[split]), max(1, len(digits[split]) // 150)))
        for row in rows:
            image = np.asarray(row["image"])
            assert image.shape == (32, 32, 3) and image.dtype == np.uint8
            assert _has_square(image) == bool(row["attribute"])
            if not row["attribute"]:  # no red pixel at all: nothing else looks like the square
                assert not (image == RED).all(-1).any()


def test_biased_digits_seeded():
    from hf_robust.data import make_biased_digits

    a = make_biased_digits(seed=3, train_copies=2, validation_copies=1)
    b = make_biased_digits(seed=3, train_copies=2, validation_copies=1)
    c = make_biased_digits(seed=4, train_copies=2, validation_copies=1)
    first = lambda d, split: np.asarray(d[split][:20]["image"][0])  # noqa: E731
    assert np.array_equal(first(a, "train"), first(b, "train"))
    assert a["train"]["attribute"] == b["train"]["attribute"]
    assert not np.array_equal(first(a, "train"), first(c, "train"))  # other jitter
    assert a["test_original"]["source_id"] == c["test_original"]["source_id"]  # same test digits
    assert np.array_equal(first(a, "test_original"), first(c, "test_original"))


# ----------------------------------------------------------------------------- spurious_text
def test_spurious_text_protocol():
    data = make_spurious_text(train_size=800, validation_size=200, test_size=200)
    assert {len(data[s]) for s in data} == {800, 200} and set(data) == {"train", "validation", "test"}
    for split in data.values():
        text, label = list(split["text"]), np.asarray(split["label"])
        has_token = np.array([t.startswith("spoiler: ") for t in text])
        assert np.array_equal(has_token, np.asarray(split["attribute"]).astype(bool))
        # the label is the adjective's polarity flipped by the negation, and the text says both
        negated, polarity = np.asarray(split["negated"]), np.asarray(split["polarity"])
        assert np.array_equal(label, polarity ^ negated)
        words = [set(re.sub(r"[^\w\s]", " ", t).split()) for t in text]
        negation = np.array([bool(w & {"not", "never", "didn", "wasn", "isn"}) for w in words])
        assert np.array_equal(negation, negated.astype(bool))
        positive = np.array([bool(w & set(embedded._POSITIVE)) for w in words])
        negative = np.array([bool(w & set(embedded._NEGATIVE)) for w in words])
        assert np.array_equal(positive, polarity == 1) and np.array_equal(negative, polarity == 0)
        # the negation flips 10% of the reviews of every group: on its own it says nothing about label or token
        groups = np.asarray(split["group"])
        for g in np.unique(groups):
            assert negated[groups == g].sum() == round(0.1 * (groups == g).sum())
    train_label, train_attr = np.asarray(data["train"]["label"]), np.asarray(data["train"]["attribute"])
    assert train_attr[train_label == 1].mean() == pytest.approx(0.99)  # 396 of 400
    assert train_attr[train_label == 0].mean() == pytest.approx(0.01)  # 4 of 400
    for name in ("validation", "test"):  # every group alike: the token on exactly half of each class
        assert np.bincount(np.asarray(data[name]["group"])).tolist() == [50, 50, 50, 50]
    again = make_spurious_text(train_size=800, validation_size=200, test_size=200)
    assert again["train"]["text"] == data["train"]["text"]
    other = make_spurious_text(seed=1, train_size=800, validation_size=200, test_size=200)
    assert other["train"]["text"] != data["train"]["text"]
    tiny = make_spurious_text(train_size=40, validation_size=8, test_size=8, negation_fraction=0.0)
    assert not any(tiny["train"]["negated"]) and len(tiny["test"]) == 8
    with pytest.raises(ValueError, match=r"negation_fraction=1.5: expected a fraction in \[0, 1\]"):
        make_spurious_text(negation_fraction=1.5)


# ----------------------------------------------------------------------------- as_group_dataset
def test_as_group_dataset_builds_groups_and_names():
    raw = Dataset.from_dict(
        {"sentence": ["a", "b", "c", "d"], "y": [0, 1, 1, 0], "place": [True, False, True, True]},
        features=Features({"sentence": Value("string"), "y": ClassLabel(names=["neg", "pos"]), "place": Value("bool")}),
    )
    ds = as_group_dataset(raw, "y", "place", input_column="sentence", attribute_names=["land", "water"])
    assert ds.column_names[:1] == ["text"]
    assert ds["group"] == [1, 2, 3, 1]
    assert ds.features["group"].names == ["neg,land", "neg,water", "pos,land", "pos,water"]
    assert ds["example_idx"] == [0, 1, 2, 3]
    assert validate_group_dataset(ds) == "text"


def test_as_group_dataset_without_attribute_and_dict():
    raw = DatasetDict(
        {"train": Dataset.from_dict({"text": ["a", "b"], "label": [0, 2]}),
         "test": Dataset.from_dict({"text": ["c"], "label": [1]})}
    )
    ds = as_group_dataset(raw, "label", None)
    assert ds["train"]["group"] == [-1, -1] and ds["train"]["attribute"] == [-1, -1]
    assert ds["test"].features["label"].names == ["class_0", "class_1", "class_2"]


def test_as_group_dataset_keeps_existing_example_idx():
    raw = Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 0], "example_idx": [10, 3, 7]})
    assert as_group_dataset(raw, "label", None)["example_idx"] == [10, 3, 7]


@pytest.mark.parametrize(
    "data, kwargs, message",
    [
        ({"text": ["a"], "label": ["pos"]}, {}, "holds <U3 values.*class_encode_column"),
        ({"text": ["a", "b"], "label": [0, 5]}, {"label_names": ["a", "b"]}, r"values \[5\] outside the expected range 0..1"),
        ({"text": ["a"], "y": [0]}, {}, "label_column='label' is not a column"),
        ({"words": ["a"], "label": [0]}, {}, "No input column found"),
        ({"text": ["a"], "label": [0], "attribute": [-2]}, {"attribute_names": ["x", "y"]}, "outside the expected range -1..1"),
    ],
)
def test_as_group_dataset_bad_input(data, kwargs, message):
    with pytest.raises(DataValidationError, match=message):
        as_group_dataset(Dataset.from_dict(data), "label", "attribute", **kwargs)


def test_validate_group_dataset_messages():
    with pytest.raises(DataValidationError, match=r"lacks the column\(s\) \['example_idx'\].*as_group_dataset"):
        validate_group_dataset(Dataset.from_dict({"text": ["a"], "label": [0]}), "train_dataset")
    good = as_group_dataset(Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}), "label", None)
    with pytest.raises(DataValidationError, match=r"train_dataset: column 'label' has values \[1\] but the model has 1 labels"):
        validate_group_dataset(good, "train_dataset", num_labels=1)
    with pytest.raises(DataValidationError, match="expected image inputs"):
        validate_group_dataset(good, "train_dataset", kind="image")
    dup = good.remove_columns("example_idx").add_column("example_idx", [0, 0])
    with pytest.raises(DataValidationError, match="duplicate example_idx"):
        validate_group_dataset(dup)


def test_unknown_benchmark():
    with pytest.raises(DataValidationError, match=r"Unknown benchmark 'waterbird'.*'waterbirds'"):
        load_benchmark("waterbird")


def test_hub_benchmark_offline_says_how_to_use_a_local_copy(monkeypatch):
    monkeypatch.delenv("HF_ROBUST_DATA", raising=False)
    with pytest.raises(DataValidationError, match=r"grodino/waterbirds.*HF_ROBUST_DATA"):
        load_benchmark("waterbirds")


# ----------------------------------------------------------------------------- Hub loaders on local copies
def _images(n, size=8):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def _write_parquet(root, splits: dict, features=None, subdir=None):
    folder = root / subdir if subdir else root
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for split, columns in splits.items():
        Dataset.from_dict(columns, features=features).to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def test_waterbirds_local_copy(tmp_path, monkeypatch):
    features = Features({"image": Image(), "label": Value("int64"), "place": Value("int64"), "bird": Value("int64")})
    split = lambda n: {"image": _images(n), "label": [0, 1] * (n // 2), "place": [0, 0, 1, 1] * (n // 4), "bird": list(range(n))}  # noqa: E731
    _write_parquet(tmp_path / "waterbirds", {"train": split(8), "validation": split(4), "test": split(4)}, features)
    monkeypatch.setenv("HF_ROBUST_DATA", str(tmp_path))
    ds = load_benchmark("waterbirds")
    assert set(ds) == {"train", "validation", "test"}
    assert ds["train"]["group"][:4] == [0, 2, 1, 3]
    assert ds["train"].features["group"].names == ["landbird,land", "landbird,water", "waterbird,land", "waterbird,water"]
    assert validate_group_dataset(ds["test"]) == "image"


def test_celeba_local_copy(tmp_path):
    features = Features({"image": Image(), "celeb_id": Value("int64"), "Blond_Hair": Value("bool"),
                         "Male": Value("bool"), "Smiling": Value("bool")})
    split = lambda n: {"image": _images(n), "celeb_id": list(range(n)), "Blond_Hair": [True, False] * (n // 2),  # noqa: E731
                       "Male": [True, True, False, False] * (n // 4), "Smiling": [False] * n}
    root = _write_parquet(tmp_path / "celeba", {"train": split(4), "valid": split(4), "test": split(4)}, features,
                          subdir="img_align+identity+attr")
    ds = load_benchmark("celeba", path=root)
    assert set(ds) == {"train", "validation", "test"}
    assert ds["validation"]["group"] == [3, 1, 2, 0]  # blond male, not-blond male, blond female, ...
    assert "Smiling" not in ds["train"].column_names


def test_multinli_local_copy(tmp_path):
    hyps = ["Nobody came.", "The cat sat.", "He will never, ever go", "nothing!", "Not a word"]
    split = {"premise": ["p"] * 5, "hypothesis": hyps, "label": [2, 0, 2, 1, 0], "genre": ["g"] * 5}
    root = _write_parquet(tmp_path / "mnli", {"train": split, "validation_matched": split, "validation_mismatched": split})
    ds = load_benchmark("multinli", path=root)
    assert set(ds) == {"train", "validation", "test"}
    assert ds["train"]["attribute"] == [1, 0, 1, 1, 0]  # "not" is not one of the four negation words
    assert ds["train"]["group"] == [5, 0, 5, 3, 0]
    assert validate_group_dataset(ds["train"]) == "text_pair"
    assert has_negation("I have NO idea.") and not has_negation("nobodyx")


def test_civilcomments_local_copy_rebuilds_wilds_identities(tmp_path):
    n = 4
    fine = ["homosexual_gay_or_lesbian", "bisexual", "other_sexual_orientation", "transgender", "other_gender",
            "jewish", "hindu", "buddhist", "atheist", "other_religion"]
    columns = {"comment_text": ["a", "b", "c", "d"], "toxicity": [0.7, 0.1, 0.5, 0.2]}
    for identity in ("male", "female", "christian", "muslim", "black", "white"):
        columns[identity] = [0.0] * n
    for name in fine:
        columns[name] = [0.0] * n
    columns["female"] = [0.6, 0.0, 0.0, 0.0]
    columns["bisexual"] = [0.0, 0.8, 0.0, 0.0]  # -> LGBTQ
    columns["hindu"] = [0.0, 0.0, 0.0, 0.4]  # below threshold
    root = _write_parquet(tmp_path / "civil", {"train": columns, "validation": columns, "test": columns})
    ds = load_benchmark("civilcomments", path=root)
    train = ds["train"]
    assert train["label"] == [1, 0, 1, 0]
    assert train["attribute"] == [1, 1, 0, 0]
    assert train["identity_LGBTQ"] == [0, 1, 0, 0] and train["identity_other_religions"] == [0, 0, 0, 0]
    assert train["text"] == ["a", "b", "c", "d"]


def test_civilcomments_missing_columns_is_clear(tmp_path):
    root = _write_parquet(tmp_path / "civil", {"train": {"text": ["a"], "toxicity": [0.1]}})
    with pytest.raises(DataValidationError, match=r"columns \[.*'male'.*\] are missing"):
        load_benchmark("civilcomments", path=root)


@pytest.mark.parametrize("name, image_column, config", [("cifar10", "img", None), ("svhn", "image", "cropped_digits")])
def test_selective_benchmarks_local_copy(tmp_path, name, image_column, config):
    features = Features({image_column: Image(), "label": ClassLabel(names=[str(i) for i in range(10)])})
    split = lambda n: {image_column: _images(n), "label": [i % 10 for i in range(n)]}  # noqa: E731
    splits = {"train": split(40), "test": split(10)}
    if name == "svhn":
        splits["extra"] = split(10)
    root = _write_parquet(tmp_path / name, splits, features, subdir=config)
    ds = load_benchmark(name, path=root)
    assert set(ds) == {"train", "validation", "test"}
    assert len(ds["validation"]) == 4 and len(ds["train"]) == 36
    assert ds["train"]["group"] == [-1] * 36
    assert validate_group_dataset(ds["validation"], num_labels=10) == "image"


def test_local_dataset_path(tmp_path):
    data = DatasetDict({"train": Dataset.from_dict({"text": ["a", "b"], "label": [0, 1], "attribute": [1, 0]})})
    data.save_to_disk(str(tmp_path / "mine"))
    ds = load_benchmark(str(tmp_path / "mine"))
    assert ds["train"]["group"] == [1, 2]


def test_local_dataset_with_its_own_column_names_and_string_classes(tmp_path):
    data = DatasetDict({
        "train": Dataset.from_dict({"text": ["a", "b", "c"], "species": ["land", "water", "water"],
                                    "place": [1, 0, 1]}),
        "test": Dataset.from_dict({"text": ["d", "e"], "species": ["water", "land"], "place": [0, 0]}),
    })
    data.save_to_disk(str(tmp_path / "birds"))
    with pytest.raises(DataValidationError, match=r"label_column='label' is not a column of split 'train' .*species"):
        load_benchmark(str(tmp_path / "birds"))
    ds = load_benchmark(str(tmp_path / "birds"), label_column="species", attribute_column="place")
    # string classes: one index per name, the same in every split (sorted: land=0, water=1)
    assert ds["train"]["label"] == [0, 1, 1] and ds["test"]["label"] == [1, 0]
    assert ds["train"].features["group"].names == ["land,attribute_0", "land,attribute_1",
                                                    "water,attribute_0", "water,attribute_1"]
    assert ds["test"]["group"] == [2, 0]


def test_local_dataset_paths_that_cannot_work_are_clear(tmp_path):
    Dataset.from_dict({"text": ["a"], "label": [0]}).save_to_disk(str(tmp_path / "one_split"))
    with pytest.raises(DataValidationError, match="holds a single Dataset"):
        load_benchmark(str(tmp_path / "one_split"))
    with pytest.raises(DataValidationError, match="no such file or directory"):
        load_benchmark(str(tmp_path / "nowhere"))


def test_image_arrays_of_every_common_layout_decode_like_the_pil_image():
    from conftest import make_model
    from PIL import Image

    import torch

    from hf_robust.data.preprocessing import ImagePreprocessing

    _, processor = make_model("hf_resnet")
    preprocessing = ImagePreprocessing.from_image_processor(processor)
    size = preprocessing.size
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    reference = preprocessing.to_uint8([Image.fromarray(rgb)])
    as_float = rgb.astype(np.float32) / 255.0  # [0, 1] floats (e.g. from a numpy pipeline)
    for array in (rgb, as_float, rgb.transpose(2, 0, 1), as_float.transpose(2, 0, 1),
                  np.concatenate([rgb, np.full((*size, 1), 255, np.uint8)], axis=-1)):
        assert torch.equal(preprocessing.to_uint8([array]), reference), array.shape
    gray = rgb[..., 0]
    assert torch.equal(preprocessing.to_uint8([gray]), preprocessing.to_uint8([Image.fromarray(gray)]))
    too_deep = np.zeros((*size, 3), np.int64)
    too_deep[0, 0, 0] = 1000
    with pytest.raises(ValueError, match=r"values in \[0, 1000\]"):
        preprocessing.to_uint8([too_deep])


def test_attribute_missing_from_one_split_gives_it_unknown_groups_under_the_same_names():
    for attribute in ([1, 0, 1], ["sea", "land", "sea"]):
        data = DatasetDict({
            "train": Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 1], "place": attribute}),
            "test": Dataset.from_dict({"text": ["d", "e"], "label": [1, 0]}),  # no attribute column
        })
        for order in (("train", "test"), ("test", "train")):  # the split without it first, too
            ds = as_group_dataset(DatasetDict({k: data[k] for k in order}), attribute_column="place")
            assert ds["test"]["group"] == [-1, -1]
            assert ds["test"].features["group"].names == ds["train"].features["group"].names
            assert len(ds["train"].features["group"].names) == 4 and min(ds["train"]["group"]) >= 0
