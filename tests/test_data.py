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


MNLI_FEATURES = Features({"premise": Value("string"), "hypothesis": Value("string"),
                          "label": ClassLabel(names=["entailment", "neutral", "contradiction"])})


def _mnli_copy(root, sizes=(40, 12, 8), seed=0):
    """MultiNLI's three labelled splits in the Hub layout (nyu-mll/multi_nli's label order)."""
    rng = np.random.default_rng(seed)
    words = ["no", "nobody", "never", "nothing", "not", "no-one", "nobody's", "never.", "cat", "dog", "Nothing,"]
    splits, pooled = {}, []
    for name, n in zip(("train", "validation_matched", "validation_mismatched"), sizes):
        hyps = [f"{name} {i} " + " ".join(rng.choice(words, 2)) for i in range(n)]
        labels = rng.integers(0, 3, n).tolist()
        splits[name] = {"premise": [f"p {name} {i}" for i in range(n)], "hypothesis": hyps, "label": labels}
        pooled += list(zip(hyps, labels))
    _write_parquet(root, splits, MNLI_FEATURES)
    return pooled


def test_multinli_sagawa_split_labels_pooling_and_negation_rule(tmp_path):
    from hf_robust.data import sagawa_has_negation

    pooled = _mnli_copy(tmp_path / "mnli")
    ds = load_benchmark("multinli", path=tmp_path / "mnli", split="sagawa", seed=3)
    n = len(pooled)  # 60: 50/20/30 -> validation int(0.2 n) = 12, test int(0.3 n) = 18, train the rest
    assert [len(ds[k]) for k in ("train", "validation", "test")] == [30, 12, 18]
    assert ds["train"].features["label"].names == ["contradiction", "entailment", "neutral"]
    rows = {h: y for h, y in pooled}
    seen = []
    for split in ("train", "validation", "test"):
        for h, y, a, g in zip(ds[split]["hypothesis"], ds[split]["label"], ds[split]["attribute"], ds[split]["group"]):
            # hub order entailment 0, neutral 1, contradiction 2 -> contradiction 0, entailment 1, neutral 2
            assert y == {0: 1, 1: 2, 2: 0}[rows[h]]
            assert a == int(sagawa_has_negation(h)) and g == 2 * y + a
            seen.append(h)
    assert sorted(seen) == sorted(rows) and len(set(seen)) == n  # every pair of the three splits, once
    # punctuation is deleted, not a word break (their rule): "no-one" and "nobody's" are no negation, "never." is
    assert not sagawa_has_negation("x no-one") and not sagawa_has_negation("nobody's here")
    assert sagawa_has_negation("x never.") and sagawa_has_negation("Nothing, really") and not sagawa_has_negation("not")
    assert has_negation("x no-one")  # the standard split's rule reads "-" as a word break
    again = load_benchmark("multinli", path=tmp_path / "mnli", split="sagawa", seed=3)
    other = load_benchmark("multinli", path=tmp_path / "mnli", split="sagawa", seed=4)
    assert again["test"]["hypothesis"] == ds["test"]["hypothesis"] != other["test"]["hypothesis"]
    standard = load_benchmark("multinli", path=tmp_path / "mnli")  # the default: MultiNLI's own splits
    assert [len(standard[k]) for k in ("train", "validation", "test")] == [40, 12, 8]
    assert standard["train"].features["label"].names == ["entailment", "neutral", "contradiction"]


def test_multinli_sagawa_metadata_file_reproduces_their_split(tmp_path):
    import pandas as pd

    pooled = _mnli_copy(tmp_path / "mnli")
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 3, len(pooled))
    negation = rng.integers(0, 2, len(pooled))  # theirs is used as it is
    gold = [{0: 1, 1: 2, 2: 0}[y] for _, y in pooled]
    # as their generate_multinli.py writes it: the pooled frame's index, gold_label, sentence2_has_negation, split
    frame = pd.DataFrame({"gold_label": gold, "sentence2_has_negation": negation, "split": codes},
                         index=np.arange(len(pooled)) * 2)
    frame.to_csv(tmp_path / "metadata_random.csv")
    ds = load_benchmark("multinli", path=tmp_path / "mnli", split="sagawa",
                        metadata_path=str(tmp_path / "metadata_random.csv"))
    for code, split in enumerate(("train", "validation", "test")):
        assert ds[split]["hypothesis"] == [pooled[i][0] for i in np.flatnonzero(codes == code)]
        assert ds[split]["attribute"] == negation[codes == code].tolist()
        assert ds[split]["label"] == [gold[i] for i in np.flatnonzero(codes == code)]
    frame.iloc[:-1].to_csv(tmp_path / "short.csv")
    with pytest.raises(DataValidationError, match="has 59 rows, the pooled copy .* 60"):
        load_benchmark("multinli", path=tmp_path / "mnli", split="sagawa", metadata_path=str(tmp_path / "short.csv"))
    frame.assign(gold_label=(np.asarray(gold) + 1) % 3).to_csv(tmp_path / "other.csv")
    with pytest.raises(DataValidationError, match="disagrees with the copy's labels on 60 rows"):
        load_benchmark("multinli", path=tmp_path / "mnli", split="sagawa", metadata_path=str(tmp_path / "other.csv"))
    with pytest.raises(DataValidationError, match="pass split='sagawa'"):
        load_benchmark("multinli", path=tmp_path / "mnli", metadata_path=str(tmp_path / "other.csv"))
    with pytest.raises(DataValidationError, match="expected 'standard' or 'sagawa'"):
        load_benchmark("multinli", path=tmp_path / "mnli", split="random")


CIVIL = ("male", "female", "LGBTQ", "christian", "muslim", "other_religions", "black", "white")


def _civil_raw(n=60, seed=0, aggregates=True):
    """A table in WILDS' layout (the Hub repo's `raw` config): comment_text, split, toxicity and the identities."""
    rng = np.random.default_rng(seed)
    columns = {"id": list(range(n)), "comment_text": [f"comment {i}" for i in range(n)],
               "split": [["train", "val", "test"][i % 3] for i in range(n)],
               "toxicity": rng.choice([0.0, 0.2, 0.5, 0.8], n).tolist(), "severe_toxicity": [0.0] * n}
    for identity in CIVIL if aggregates else ("male", "female", "christian", "muslim", "black", "white"):
        # 0.5 is on WILDS' threshold (>= 0.5: mentioned); several identities per comment
        columns[identity] = rng.choice([0.0, 0.0, 0.3, 0.5, 1.0], n).tolist()
    return columns


def test_civilcomments_is_wilds_raw_split_with_16_overlapping_groups(tmp_path, monkeypatch):
    columns = _civil_raw()
    _write_parquet(tmp_path / "civilcomments", {"train": columns}, subdir="raw")
    # a `default` config beside it (another layout, other rows) is never read
    _write_parquet(tmp_path / "civilcomments", {"train": {"text": ["x"], "toxicity": [0.9]}})
    monkeypatch.setenv("HF_ROBUST_DATA", str(tmp_path))
    ds = load_benchmark("civilcomments")
    assert set(ds) == {"train", "validation", "test"} and [len(ds[k]) for k in ("train", "validation", "test")] == [20] * 3
    names = ds["train"].features["overlapping_groups"].feature.names
    assert names[:2] == ["non-toxic,male", "non-toxic,female"] and names[8] == "toxic,male" and len(names) == 16
    for split, code in (("train", "train"), ("validation", "val"), ("test", "test")):
        rows = [i for i, s in enumerate(columns["split"]) if s == code]
        data = ds[split]
        assert data["text"] == [columns["comment_text"][i] for i in rows]
        toxic = [int(columns["toxicity"][i] >= 0.5) for i in rows]
        assert data["label"] == toxic
        for k, identity in enumerate(CIVIL):
            mentioned = [int(columns[identity][i] >= 0.5) for i in rows]
            assert data[f"identity_{identity}"] == mentioned
        expected = [[y * 8 + k for k, identity in enumerate(CIVIL) if columns[identity][i] >= 0.5]
                    for y, i in zip(toxic, rows)]
        assert data["overlapping_groups"] == expected
        assert data["attribute"] == [int(bool(e)) for e in expected]  # training groups: label x any identity
        assert data["group"] == [2 * y + int(bool(e)) for y, e in zip(toxic, expected)]
    assert max(len(m) for m in ds["train"]["overlapping_groups"]) >= 3  # really overlapping
    assert validate_group_dataset(ds["train"]) == "text"


def test_civilcomments_rebuilds_wilds_aggregates_from_the_fine_identities(tmp_path):
    columns = _civil_raw(n=6, aggregates=False)
    fine = ["homosexual_gay_or_lesbian", "bisexual", "other_sexual_orientation", "transgender", "other_gender",
            "jewish", "hindu", "buddhist", "atheist", "other_religion"]
    for name in fine:
        columns[name] = [0.0] * 6
    columns["bisexual"] = [0.0, 0.8, 0.0, 0.0, 0.0, 0.0]  # -> LGBTQ (row 1: the train split's second row)
    columns["hindu"] = [0.0, 0.0, 0.0, 0.4, 0.0, 0.0]  # below the threshold
    ds = load_benchmark("civilcomments", path=_write_parquet(tmp_path / "civil", {"train": columns}, subdir="raw"))
    assert ds["train"]["identity_LGBTQ"] == [0, 0] and ds["validation"]["identity_LGBTQ"] == [1, 0]
    assert ds["train"]["identity_other_religions"] == [0, 0]


def test_civilcomments_without_wilds_split_column_is_refused_clearly(tmp_path):
    columns = _civil_raw(n=6)
    del columns["split"]
    root = _write_parquet(tmp_path / "civil", {"train": columns, "validation": columns, "test": columns})
    with pytest.raises(DataValidationError, match=r"no `split` column.*`raw` config.*not WILDS' split"):
        load_benchmark("civilcomments", path=root)
    columns = _civil_raw(n=6)
    columns["split"][0] = "extra"
    with pytest.raises(DataValidationError, match=r"`split` column has the values \['extra'\]"):
        load_benchmark("civilcomments", path=_write_parquet(tmp_path / "civil2", {"train": columns}, subdir="raw"))


def test_civilcomments_missing_columns_is_clear(tmp_path):
    root = _write_parquet(tmp_path / "civil", {"train": {"text": ["a"], "toxicity": [0.1], "split": ["train"]}},
                          subdir="raw")
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


# ----------------------------------------------------------------------------- overlapping groups through a run
def _overlapping_text_data(text_data, num_groups=5, seed=0):
    """text_data with random overlapping evaluation groups (some examples in none, group 4 empty everywhere)."""
    from hf_robust.data.overlapping import add_overlapping_groups

    rng = np.random.default_rng(seed)
    names = [f"g{g}" for g in range(num_groups)]
    out = {}
    for split, data in text_data.items():
        matrix = rng.random((len(data), num_groups)) < 0.35
        matrix[:, 4] = False
        out[split] = add_overlapping_groups(data, [np.flatnonzero(row).tolist() for row in matrix], names)
    return DatasetDict(out)


@pytest.fixture
def repo_metric(monkeypatch):
    """The trainer's metric module from this checkout (an editable install may point metric_path elsewhere)."""
    from pathlib import Path

    import hf_robust.resources

    metrics = Path(__file__).resolve().parents[1] / "metrics"
    monkeypatch.setattr(hf_robust.resources, "metric_path", lambda name: str(metrics / name))


def test_a_run_reports_overlapping_groups_ece_and_class_balanced_accuracy(tmp_path, text_data, tokenizer, repo_metric):
    import json

    import torch
    from conftest import make_trainer

    data = _overlapping_text_data(text_data)
    trainer = make_trainer("erm", "hf_bert", data, tmp_path / "run", tokenizer=tokenizer, eval_splits=["test"],
                           per_device_eval_batch_size=16, num_train_epochs=4,
                           trainer_kwargs={"dataset_name": "overlapping_text"})
    trainer.train()
    trainer.save_model()
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    report = results["splits"]["test"]

    # the same numbers by brute force from the model's logits
    logits = torch.as_tensor(trainer.predict(data["test"]).predictions)
    predictions = logits.argmax(-1).numpy()
    labels = np.asarray(data["test"]["label"])
    memberships = data["test"]["overlapping_groups"]
    per_group = {}
    for g in range(5):
        idx = [i for i, m in enumerate(memberships) if g in m]
        if idx:
            per_group[f"g{g}"] = (float(np.mean(predictions[idx] == labels[idx])), len(idx))
    assert len(per_group) == 4 and report["overlapping_groups"] is True
    assert {name: (pytest.approx(v["accuracy"]), v["count"]) for name, v in report["groups"].items()} == per_group
    assert report["worst_group_accuracy"] == pytest.approx(min(a for a, _ in per_group.values()))
    assert sum(c for _, c in per_group.values()) > len(labels) - sum(not m for m in memberships)  # overlapping
    recalls = [np.mean(predictions[labels == c] == c) for c in np.unique(labels)]
    assert report["class_balanced_accuracy"] == pytest.approx(np.mean(recalls))
    confidence, _ = logits.double().softmax(-1).max(-1)
    bins = np.minimum(np.searchsorted(np.arange(1, 16) / 15, confidence.numpy(), side="left"), 14)
    ece = sum((bins == b).sum() / len(labels) * abs(np.mean(predictions[bins == b] == labels[bins == b])
                                                    - confidence.numpy()[bins == b].mean())
              for b in range(15) if (bins == b).any())
    assert report["expected_calibration_error"] == pytest.approx(ece)


# ----------------------------------------------------------------------------- any Hub dataset id; provenance
def test_any_hub_dataset_id_loads_like_a_local_path(tmp_path, monkeypatch):
    import hf_robust.data.hub as hub

    data = DatasetDict({
        "train": Dataset.from_dict({"sentence": ["a", "b", "c"], "stars": ["low", "high", "high"], "place": [1, 0, 1]}),
        "test": Dataset.from_dict({"sentence": ["d", "e"], "stars": ["high", "low"], "place": [0, 0]}),
    })
    data.save_to_disk(str(tmp_path / "owner" / "reviews"))
    local = load_benchmark(str(tmp_path / "owner" / "reviews"), label_column="stars", attribute_column="place",
                           input_column="sentence")
    calls = []

    def fake_load_dataset(repo_id, *args, **kwargs):
        calls.append((repo_id, args, kwargs))
        return data

    monkeypatch.setattr(hub, "load_dataset", fake_load_dataset)
    remote = load_benchmark("owner/reviews", label_column="stars", attribute_column="place", input_column="sentence",
                            config="en", revision="v1")
    assert calls == [("owner/reviews", ("en",), {"revision": "v1"})]
    for split in ("train", "test"):
        for column in ("text", "label", "attribute", "group", "example_idx"):
            assert remote[split][column] == local[split][column], (split, column)
    assert remote["train"].features["group"].names == local["train"].features["group"].names
    assert remote["train"]["label"] == [1, 0, 0]  # string classes, sorted: high 0, low 1

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(hub, "load_dataset", offline)
    with pytest.raises(DataValidationError, match=r"'owner/missing' is not a local folder.*ConnectionError.*save_to_disk"):
        load_benchmark("owner/missing")


def test_hub_benchmarks_ask_the_hub_for_their_config_and_revision(monkeypatch):
    import hf_robust.data.hub as hub

    calls = []

    def fake_load_dataset(repo_id, *args, **kwargs):
        calls.append((repo_id, args, kwargs))
        raise ConnectionError("offline")

    monkeypatch.setattr(hub, "load_dataset", fake_load_dataset)
    monkeypatch.delenv("HF_ROBUST_DATA", raising=False)
    with pytest.raises(DataValidationError, match="pietrolesci/civilcomments-wilds, config raw"):
        load_benchmark("civilcomments", revision="abc")
    assert calls == [("pietrolesci/civilcomments-wilds", ("raw",), {"revision": "abc"})]


def test_hub_revision_is_read_off_the_cache_path_of_the_data_and_what_derives_from_it(tmp_path):
    from hf_robust.data.hub import dataset_provenance, hub_revision

    sha = "0123456789abcdef0123456789abcdef01234567"
    folder = tmp_path / "datasets" / "pietrolesci___civilcomments-wilds" / "raw" / "0.0.0" / sha
    folder.mkdir(parents=True)
    Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}).to_parquet(str(folder / "part.parquet"))
    from datasets import load_dataset

    loaded = load_dataset("parquet", data_files=str(folder / "part.parquet"), cache_dir=str(folder / "cache"))["train"]
    derived = as_group_dataset(loaded.select([1, 0]).map(lambda x: {"text": x["text"] + "!"}), attribute_column=None)
    expected = {"repo": "pietrolesci/civilcomments-wilds", "revision": sha}
    assert hub_revision(loaded) == expected and hub_revision(derived) == expected
    assert hub_revision(Dataset.from_dict({"x": [1]})) is None
    record = dataset_provenance({"train": derived})
    assert record["dataset_revision"] == expected and record["dataset_fingerprint"] == {"train": derived._fingerprint}


def test_a_local_datasets_fingerprint_goes_into_results_and_the_card(tmp_path, tokenizer, repo_metric):
    import json

    from conftest import make_trainer

    data = DatasetDict({"train": make_spurious_text(train_size=32, validation_size=16, test_size=8)["train"],
                        "validation": make_spurious_text(train_size=32, validation_size=16, test_size=8)["validation"]})
    data.save_to_disk(str(tmp_path / "mine"))
    ds = load_benchmark(str(tmp_path / "mine"))
    trainer = make_trainer("erm", "hf_bert", ds, tmp_path / "run", tokenizer=tokenizer,
                           trainer_kwargs={"dataset_name": str(tmp_path / "mine")})
    trainer.train()
    trainer.save_model()
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["dataset_fingerprint"] == {"train": ds["train"]._fingerprint,
                                              "validation": ds["validation"]._fingerprint}
    assert results["dataset_revision"] is None
    assert list(results)[list(results).index("dataset") + 1] == "dataset_revision"
    card = (tmp_path / "run" / "README.md").read_text()
    assert f"datasets fingerprint `{ds['train']._fingerprint}`" in card


# ----------------------------------------------------------------------------- the literature's image recipe
def test_waterbirds_and_celeba_recipes_use_torchvision_resnet50_with_the_literatures_preprocessing(tmp_path, monkeypatch,
                                                                                                   repo_metric):
    """A tiny ResNet-50 saved with `timm/resnet50.tv_in1k`'s timm config (no pretrained weights here), loaded the
    way the recipe's model is (TimmWrapper from_pretrained), trained on a local Waterbirds copy with the recipe."""
    import timm
    import torch
    import torchvision.transforms.v2.functional as TF

    from hf_robust import RobustConfig, RobustTrainer
    from hf_robust.models.presets import load_model, timm_classifier
    from hf_robust.recipes import recipe

    for dataset in ("waterbirds", "celeba"):
        settings = recipe("erm", dataset)
        assert settings["model"] == "timm/resnet50.tv_in1k" and settings["train_augmentation"] == "crop_flip"
    tv_cfg = {k: list(v) if isinstance(v, tuple) else v
              for k, v in timm.models.get_pretrained_cfg("resnet50.tv_in1k").to_dict().items()}
    tiny = timm_classifier("resnet50", 2, {0: "landbird", 1: "waterbird"}, {"channels": [8, 8, 16, 16]}, tv_cfg)
    tiny.save_pretrained(str(tmp_path / "resnet50_tv"))
    model, processor = load_model(str(tmp_path / "resnet50_tv"), 2, ["landbird", "waterbird"])
    assert processor is None and type(model).__name__ == "TimmWrapperForImageClassification"

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (200, 300, 3), dtype=np.uint8) for _ in range(8)]  # H 200, W 300
    features = Features({"image": Image(), "label": Value("int64"), "place": Value("int64")})
    split = {"image": images, "label": [0, 1] * 4, "place": [0, 0, 1, 1] * 2}
    _write_parquet(tmp_path / "waterbirds", {"train": split, "validation": split}, features)
    monkeypatch.setenv("HF_ROBUST_DATA", str(tmp_path))
    data = load_benchmark("waterbirds")

    settings = {k: v for k, v in recipe("erm", "waterbirds").items() if k != "model"}
    settings.update(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4,
                    per_device_eval_batch_size=4, use_cpu=True, save_strategy="no", save_plots=False)
    trainer = RobustTrainer(model, RobustConfig(**settings), train_dataset=data["train"],
                            eval_dataset={"validation": data["validation"]})
    geometry = trainer.eval_collator.image_preprocessing
    # resize the shorter side to 256, centre crop 224, ImageNet mean / std, bilinear
    assert geometry.size == (224, 224) and geometry.resize_shortest_edge == 256
    assert geometry.mean == (0.485, 0.456, 0.406) and geometry.std == (0.229, 0.224, 0.225)
    assert geometry.interpolation == "bilinear"
    assert trainer.train_collator.augmentation == "crop_flip" and trainer.eval_collator.augmentation == "none"
    batch = trainer.eval_collator([data["validation"][i] for i in range(2)])
    assert batch["pixel_values"].shape == (2, 3, 224, 224)
    # the same pixels as torchvision's Resize(256) + CenterCrop(224) + Normalize (up to uint8 rounding)
    reference = torch.stack([TF.center_crop(TF.resize(torch.from_numpy(images[i]).permute(2, 0, 1), [256],
                                                      antialias=True), [224, 224]) for i in range(2)])
    reference = TF.normalize(reference.float() / 255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert (batch["pixel_values"] - reference).abs().max() <= 1.01 / 255 / 0.224
    trainer.train()
    assert 0.0 <= trainer.evaluate()["eval_validation_worst_group_accuracy"] <= 1.0


@pytest.mark.distributed
def test_overlapping_groups_under_two_processes_are_the_one_process_result(distributed_checks):
    """tests/scripts/overlapping_distributed.py as one process and as two (the shared launch)."""
    out = dict(zip(("one", "two"), distributed_checks["overlapping_groups"]))  # the suite's shared launch
    assert (out["one"]["world_size"], out["two"]["world_size"]) == (1, 2)
    one, two = out["one"]["metrics"], out["two"]["metrics"]
    assert one.keys() == two.keys()
    for key, value in one.items():
        if key.endswith("_loss"):
            assert two[key] == pytest.approx(value, rel=1e-6)
        elif not key.endswith(("_runtime", "_per_second", "_time")):
            assert two[key] == pytest.approx(value, rel=1e-9), key
    # and they are the overlapping counts: every example once in each of its groups, group 5 empty
    memberships = out["one"]["memberships"]
    predictions, labels = np.asarray(out["one"]["predictions"]), np.asarray(out["one"]["labels"])
    assert out["two"]["predictions"] == out["one"]["predictions"]
    for g in range(5):
        idx = [i for i, m in enumerate(memberships) if g in m]
        assert two[f"eval_validation_group_{g}_count"] == len(idx)
        assert two[f"eval_validation_group_{g}_accuracy"] == pytest.approx(np.mean(predictions[idx] == labels[idx]))
    assert "eval_validation_group_5_accuracy" not in two and "eval_validation_expected_calibration_error" in two


def test_a_hub_benchmark_keeps_its_revision_through_the_loader(tmp_path, monkeypatch):
    """CivilComments read "from the Hub" (load_dataset returning data cached where datasets caches a Hub repo at a
    commit): every split the loader returns still names the repo and the commit."""
    import datasets

    import hf_robust.data.hub as hub
    from hf_robust.data.hub import dataset_provenance

    sha = "89abcdef0123456789abcdef0123456789abcdef"
    source = tmp_path / "raw.parquet"
    Dataset.from_dict(_civil_raw()).to_parquet(str(source))
    cache = tmp_path / "cache" / "pietrolesci___civilcomments-wilds" / "raw" / "0.0.0" / sha

    def from_the_hub(repo_id, config=None, **kwargs):
        assert (repo_id, config) == ("pietrolesci/civilcomments-wilds", "raw")
        return datasets.load_dataset("parquet", data_files={"train": str(source)}, cache_dir=str(cache))

    monkeypatch.setattr(hub, "load_dataset", from_the_hub)
    monkeypatch.delenv("HF_ROBUST_DATA", raising=False)
    ds = load_benchmark("civilcomments")
    record = dataset_provenance(dict(ds))
    assert record["dataset_revision"] == {"repo": "pietrolesci/civilcomments-wilds", "revision": sha}
    assert set(record["dataset_fingerprint"]) == {"train", "validation", "test"}
