"""The data model every hf_robust dataset follows, and the helpers that produce and check it.

Each split is a `datasets.Dataset` with
- an input column: `image`, `text`, or `premise` + `hypothesis`;
- `label` (ClassLabel, 0..K-1);
- `attribute` (ClassLabel, 0..A-1, the spurious attribute; -1 where unknown);
- `group` = label * A + attribute (ClassLabel named "<label>,<attribute>"; -1 where the attribute is unknown);
- `example_idx`: a stable per-split index, the key of every per-example output (masks, gradient norms,
  FairDropout assignments). It survives shuffling, sharding across processes and resume.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Value

META_COLUMNS = ("label", "attribute", "group", "example_idx")
INPUT_KINDS = {"image": ("image",), "text": ("text",), "text_pair": ("premise", "hypothesis")}
logger = logging.getLogger(__name__)


class DataValidationError(ValueError):
    """A dataset that does not follow the hf_robust data model; raised before any training starts."""


def input_kind(dataset: Dataset) -> str:
    """'image', 'text' or 'text_pair', from the columns present."""
    columns = set(dataset.column_names)
    for kind, needed in INPUT_KINDS.items():
        if set(needed) <= columns:
            return kind
    raise DataValidationError(
        f"No input column found: the dataset has columns {sorted(columns)}, expected one of 'image', 'text' or "
        "'premise' + 'hypothesis'. Rename your input column (dataset.rename_column(...)) or pass "
        "input_column= to as_group_dataset()."
    )


def _names(feature, values: np.ndarray, given: Sequence[str] | None, what: str) -> list[str]:
    if given is not None:
        return [str(n) for n in given]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    size = int(values.max()) + 1 if values.size and values.max() >= 0 else 0
    return [f"{what}_{i}" for i in range(size)]


def _rows(positions: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(str(int(p)) for p in positions[:limit])
    return shown + (f" (and {len(positions) - limit} more)" if len(positions) > limit else "")


def _check_missing(values: list, column: str, where: str = "") -> None:
    """None or NaN in a class column: an error naming the rows, before anything tries to compare them."""
    missing = np.asarray([v is None or (isinstance(v, float) and v != v) for v in values], dtype=bool)
    if missing.any():
        raise DataValidationError(
            f"{where}column {column!r} has {int(missing.sum())} missing value(s) (None or NaN) at row(s) "
            f"{_rows(np.flatnonzero(missing))}; expected a class index on every example. Drop those rows "
            f"(dataset.filter(lambda x: x[{column!r}] is not None)) or fill them in."
        )


def _as_int_column(values: list, column: str, missing: int | None = None) -> np.ndarray:
    """Class indices; None/NaN are an error, or `missing` (the attribute's "unknown", -1) when given."""
    if len(values) == 0:
        return np.zeros(0, dtype=np.int64)
    if missing is None:
        _check_missing(values, column)
    else:
        values = [missing if v is None or (isinstance(v, float) and v != v) else v for v in values]
    array = np.asarray(values)
    if np.issubdtype(array.dtype, np.floating) and np.all(array == np.round(array)):
        array = array.astype(np.int64)  # whole numbers stored as floats (e.g. a column that once held NaN)
    if array.dtype == bool:
        return array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise DataValidationError(
            f"Column {column!r} holds {array.dtype} values (e.g. {array[:3].tolist()}), expected integer class "
            f"indices. Encode it first, e.g. dataset.class_encode_column({column!r})."
        )
    return array.astype(np.int64)


def _encode_string_columns(dataset: DatasetDict, columns: Sequence[str | None]) -> DatasetDict:
    """String class columns as one ClassLabel (sorted names) shared by every split, so that a class has the same
    index in train and test."""
    for column in columns:
        having = [split for split in dataset.values() if column and column in split.column_names]
        feature = having[0].features.get(column) if having else None
        if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
            continue
        names = sorted(set().union(*(set(split[column]) for split in having)) - {None})
        dataset = DatasetDict({
            k: split.cast_column(column, ClassLabel(names=names)) if column in split.column_names else split
            for k, split in dataset.items()
        })
    return dataset


def as_group_dataset(
    dataset: Dataset | DatasetDict,
    label_column: str = "label",
    attribute_column: str | None = "attribute",
    *,
    input_column: str | None = None,
    label_names: Sequence[str] | None = None,
    attribute_names: Sequence[str] | None = None,
    remap_labels: bool = False,
) -> Dataset | DatasetDict:
    """Turn any classification dataset into the hf_robust data model.

    Args:
        dataset: a `Dataset` or `DatasetDict` (every split is converted with the same label/attribute names).
        label_column: integer (or ClassLabel) column with the target; in a `DatasetDict` string classes are
            encoded too (sorted names, the same indices in every split), as are string attributes.
        attribute_column: integer, bool or ClassLabel column with the spurious attribute; `None` (or a column
            that is absent) means unknown: `attribute` and `group` are then -1 (as for a None/NaN value).
        input_column: name of the input column if it is not already `image`/`text`; it is renamed to `image`
            when it holds images, to `text` otherwise.
        label_names, attribute_names: names for reports; taken from ClassLabel features when present.
        remap_labels: integer labels that leave gaps (e.g. 0, 2, 5: classes that no example has) are an error, as
            they would build a model with never-seen classes; with `remap_labels=True` they are renumbered
            0..K-1 in sorted order (names `class_<original value>`), with a warning.

    Example:
        >>> ds = as_group_dataset(load_dataset("my/birds"), label_column="species", attribute_column="place")
    """
    if isinstance(dataset, DatasetDict):
        for name, split in dataset.items():
            if label_column not in split.column_names:
                raise DataValidationError(
                    f"label_column={label_column!r} is not a column of split {name!r} (columns: "
                    f"{split.column_names}): name the label column (`label_column=`, or `--label_column` in "
                    "scripts/train.py)."
                )
        for name, split in dataset.items():
            _check_missing(split[label_column], label_column, where=f"split {name!r}: ")
        dataset = _encode_string_columns(dataset, [label_column, attribute_column])
        first = next(iter(dataset.values()))
        if label_names is None and not isinstance(first.features.get(label_column), ClassLabel):
            values = [_as_int_column(split[label_column], label_column) for split in dataset.values()]
            dataset, label_names = _contiguous_labels(
                dataset, label_column, np.concatenate(values), remap_labels, "every split"
            )
        # the attribute names come from the splits that have the column; a split without it gets group -1
        # under the same group names as the others
        with_attribute = [s for s in dataset.values() if attribute_column is not None and attribute_column in s.column_names]
        if attribute_names is None and with_attribute:
            feature = with_attribute[0].features.get(attribute_column)
            if isinstance(feature, ClassLabel):
                attribute_names = list(feature.names)
            else:
                values = [_as_int_column(s[attribute_column], attribute_column, missing=-1) for s in with_attribute if len(s)]
                top = max((int(v.max()) for v in values), default=-1)
                attribute_names = [f"attribute_{i}" for i in range(top + 1)]
        return DatasetDict(
            {
                name: as_group_dataset(
                    split,
                    label_column,
                    attribute_column,
                    input_column=input_column,
                    label_names=label_names,
                    attribute_names=attribute_names,
                )
                for name, split in dataset.items()
            }
        )

    if input_column is not None and input_column not in ("image", "text"):
        if input_column not in dataset.column_names:
            raise DataValidationError(
                f"input_column={input_column!r} is not a column of the dataset (columns: {dataset.column_names})."
            )
        from datasets import Image

        target = "image" if isinstance(dataset.features[input_column], Image) else "text"
        if target in dataset.column_names:
            dataset = dataset.remove_columns(target)
        dataset = dataset.rename_column(input_column, target)
    input_kind(dataset)
    if label_column not in dataset.column_names:
        raise DataValidationError(
            f"label_column={label_column!r} is not a column of the dataset (columns: {dataset.column_names})."
        )

    labels = _as_int_column(dataset[label_column], label_column)
    if label_names is None and not isinstance(dataset.features[label_column], ClassLabel):
        dataset, label_names = _contiguous_labels(dataset, label_column, labels, remap_labels, "the dataset")
        labels = _as_int_column(dataset[label_column], label_column)
    label_names = _names(dataset.features[label_column], labels, label_names, "class")
    _check_range(labels, len(label_names), label_column, allow_missing=False)

    has_attribute = attribute_column is not None and attribute_column in dataset.column_names
    if has_attribute:
        attributes = _as_int_column(dataset[attribute_column], attribute_column, missing=-1)
        attribute_names = _names(dataset.features[attribute_column], attributes, attribute_names, "attribute")
        _check_range(attributes, len(attribute_names), attribute_column, allow_missing=True)
    else:
        attributes = np.full(len(labels), -1, dtype=np.int64)
        attribute_names = list(attribute_names) if attribute_names is not None else []
    num_attributes = max(len(attribute_names), 1)
    groups = np.where(attributes >= 0, labels * num_attributes + attributes, -1)
    group_names = [f"{ln},{an}" for ln in label_names for an in attribute_names]

    # An existing example_idx is kept (it may key outputs computed before a shuffle); otherwise row order.
    example_idx = list(range(len(dataset)))
    if "example_idx" in dataset.column_names:
        existing = np.asarray(dataset["example_idx"], dtype=np.int64)
        if len(np.unique(existing)) == len(existing):
            example_idx = existing.tolist()
    drop = [c for c in (label_column, attribute_column, *META_COLUMNS) if c is not None and c in dataset.column_names]
    dataset = dataset.remove_columns(sorted(set(drop)))
    dataset = dataset.add_column("label", labels.tolist(), feature=ClassLabel(names=label_names))
    dataset = dataset.add_column(
        "attribute", attributes.tolist(), feature=ClassLabel(names=attribute_names or ["unknown"])
    )
    dataset = dataset.add_column("group", groups.tolist(), feature=ClassLabel(names=group_names or ["unknown"]))
    dataset = dataset.add_column("example_idx", example_idx, feature=Value("int64"))
    return dataset


def _contiguous_labels(dataset, column: str, values: np.ndarray, remap: bool, where: str):
    """(dataset, names) for integer labels without a ClassLabel: 0..max, or an error (or, with `remap`, a
    renumbering) when some class in between has no example."""
    present = np.unique(values)
    if present.size and present.min() < 0:
        raise DataValidationError(
            f"Column {column!r} has negative values {present[present < 0][:5].tolist()}; expected class indices "
            "0..K-1. Drop those rows or re-encode the column."
        )
    top = int(present.max()) if present.size else -1
    absent = sorted(set(range(top + 1)) - set(present.tolist()))
    if not absent:
        return dataset, [f"class_{i}" for i in range(top + 1)]
    if not remap:
        raise DataValidationError(
            f"Column {column!r} has the values {present.tolist()[:20]} in {where}: class(es) {absent[:10]} have no "
            f"example, so a {top + 1}-class model would have classes it never sees. Re-encode the labels as "
            f"0..{present.size - 1}, pass label_names= with the full list of classes, or pass remap_labels=True "
            "(--remap_labels in scripts/train.py) to renumber them in sorted order."
        )
    mapping = {int(v): i for i, v in enumerate(present.tolist())}
    logger.warning(
        "Column %r: renumbering the labels %s as 0..%d (remap_labels=True); the classes keep their old values in "
        "their names.", column, present.tolist()[:20], present.size - 1,
    )

    def renumber(batch):
        return {column: [mapping[int(v)] for v in batch[column]]}

    dataset = dataset.map(renumber, batched=True, desc=None)
    return dataset, [f"class_{v}" for v in present.tolist()]


def _check_range(values: np.ndarray, size: int, column: str, allow_missing: bool) -> None:
    low = -1 if allow_missing else 0
    bad = (values < low) | (values >= size)
    if bad.any():
        found = sorted(set(values[bad].tolist()))[:5]
        raise DataValidationError(
            f"Column {column!r} has values {found} outside the expected range {low}..{size - 1} "
            f"({size} names). Pass the full list of names, or re-encode the column as 0..{size - 1}."
        )


def validate_group_dataset(
    dataset: Dataset, name: str = "dataset", num_labels: int | None = None, kind: str | None = None
) -> str:
    """Check one split against the data model before any training; returns its input kind.

    Raises `DataValidationError` naming what was found, what was expected and how to fix it.
    """
    if not isinstance(dataset, Dataset):
        raise DataValidationError(
            f"{name} is a {type(dataset).__name__}, expected a datasets.Dataset (pick a split of a DatasetDict)."
        )
    missing = [c for c in ("label", "example_idx") if c not in dataset.column_names]
    if missing:
        raise DataValidationError(
            f"{name} lacks the column(s) {missing} (it has {dataset.column_names}). Convert it first: "
            "hf_robust.data.as_group_dataset(dataset, label_column=..., attribute_column=...)."
        )
    found_kind = input_kind(dataset)
    if kind is not None and found_kind != kind:
        raise DataValidationError(
            f"{name} has {found_kind} inputs, expected {kind} inputs for this model/method."
        )
    if len(dataset) == 0:
        raise DataValidationError(
            f"{name} is empty (0 examples): every split a run uses needs examples. Check the split's source "
            "(and filters such as --max_train_samples), or leave the split out of the run."
        )
    _check_missing(dataset["label"], "label", where=f"{name}: ")
    labels = np.asarray(dataset["label"])
    if num_labels is not None:
        bad = (labels < 0) | (labels >= num_labels)
        if bad.any():
            raise DataValidationError(
                f"{name}: column 'label' has values {sorted(set(labels[bad].tolist()))[:5]} but the model has "
                f"{num_labels} labels (0..{num_labels - 1}). Create the model with num_labels=<number of classes> "
                "or re-encode the labels."
            )
    indices = np.asarray(dataset["example_idx"])
    if len(np.unique(indices)) != len(indices):
        raise DataValidationError(
            f"{name} has duplicate example_idx values: every example needs its own index (it keys masks, "
            "scores and FairDropout assignments). Re-create it with as_group_dataset()."
        )
    if "group" not in dataset.column_names:
        raise DataValidationError(
            f"{name} lacks the 'group' column: use as_group_dataset(..., attribute_column=None) for data "
            "without attributes (groups are then -1)."
        )
    if found_kind == "image":
        check_images(dataset, name)
    else:
        check_texts(dataset, name, INPUT_KINDS[found_kind])
    return found_kind


def check_classes(dataset: Dataset, name: str, num_labels: int) -> None:
    """A training split must have an example of every class of the model (a one-class split teaches nothing)."""
    counts = np.bincount(np.asarray(dataset["label"], dtype=np.int64), minlength=num_labels)
    absent = np.flatnonzero(counts == 0)
    if absent.size:
        names = label_names(dataset)
        shown = [f"{i} ({names[i]!r})" if i < len(names) else str(i) for i in absent[:10].tolist()]
        raise DataValidationError(
            f"{name} has no example of class(es) {', '.join(shown)} of the model's {num_labels} classes (counts per "
            f"class: {counts.tolist()[:20]}): the model could never learn to predict them. Train on data with every "
            "class (a random or stratified subset rather than the first rows: scripts/train.py's "
            "--max_train_samples takes a stratified one), or re-encode the labels to the classes present."
        )


def check_texts(dataset: Dataset, name: str, columns: Sequence[str]) -> None:
    """None text is an error; empty (or whitespace-only) text a warning: the model sees only special tokens."""
    indices = np.asarray(dataset["example_idx"])
    for column in columns:
        values = dataset[column]
        missing = np.asarray([v is None for v in values], dtype=bool)
        if missing.any():
            raise DataValidationError(
                f"{name}: column {column!r} is None for {int(missing.sum())} example(s), example_idx "
                f"{_rows(indices[missing])}; expected a string. Drop them (dataset.filter) or fill them in."
            )
        empty = np.asarray([not str(v).strip() for v in values], dtype=bool)
        if empty.any():
            logger.warning(
                "%s: column %r is empty for %d example(s), example_idx %s: the model sees only special tokens "
                "for them.", name, column, int(empty.sum()), _rows(indices[empty]),
            )


def check_images(dataset: Dataset, name: str, batch_size: int = 256) -> None:
    """Every image of an `Image` column decodes, or an error naming the examples that do not (before training;
    `datasets` would otherwise fail in the middle of a training epoch, naming none). JPEGs are decoded at reduced
    size (`draft`), which reads every block of the file at a fraction of the cost."""
    import io

    from datasets import Image
    from PIL import Image as PILImage

    if not isinstance(dataset.features.get("image"), Image):
        return  # arrays: nothing to decode
    raw = dataset.select_columns(["image", "example_idx"]).cast_column("image", Image(decode=False))
    bad = []
    for batch in raw.iter(batch_size=batch_size):
        for item, idx in zip(batch["image"], batch["example_idx"]):
            try:
                if item is None:
                    raise ValueError("no image")
                source = io.BytesIO(item["bytes"]) if item.get("bytes") else item.get("path")
                with PILImage.open(source) as image:
                    if image.format == "JPEG":
                        image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
                    image.load()
            except Exception as error:  # whatever PIL raises for a file it cannot read
                bad.append((int(idx), f"{type(error).__name__}: {error}"))
    if bad:
        listed = "; ".join(f"example_idx {idx}: {message}" for idx, message in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise DataValidationError(
            f"{name}: {len(bad)} image(s) cannot be decoded: {listed}{more}. Remove them "
            "(dataset.filter(lambda x: x['example_idx'] not in {...})) or replace the files."
        )


def group_names(dataset: Dataset) -> list[str]:
    feature = dataset.features.get("group")
    return list(feature.names) if isinstance(feature, ClassLabel) else []


def label_names(dataset: Dataset) -> list[str]:
    feature = dataset.features.get("label")
    return list(feature.names) if isinstance(feature, ClassLabel) else []


def stratified_subset(dataset: Dataset, size: int, seed: int = 0, by: str = "label") -> Dataset:
    """A seeded random subset of `size` examples in which every value of the column `by` keeps its share
    (largest remainders; each value present keeps at least one example when `size` allows), in the dataset's
    order. The first rows of a split are often not a sample of it (sorted by class, or by source)."""
    if size >= len(dataset):
        return dataset
    keys = np.asarray(dataset[by], dtype=np.int64)
    values, counts = np.unique(keys, return_counts=True)
    quota = counts * size / len(keys)
    take = np.floor(quota).astype(np.int64)
    if size >= len(values):
        take = np.maximum(take, 1)
    # the examples still to place go to the largest remainders (ties: the rarer value first); never over size
    order = np.lexsort((counts, -(quota - np.floor(quota))))
    i = 0
    while take.sum() < size:
        value = order[i % len(order)]
        if take[value] < counts[value]:
            take[value] += 1
        i += 1
    while take.sum() > size:  # the minimum of one per value overshot: trim the largest
        take[np.argmax(take)] -= 1
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(keys == value))[:n] for value, n in zip(values, take)]
    return dataset.select(np.sort(np.concatenate(chosen)).tolist())


def require_train_groups(dataset, method: str, alternative: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(group of every example, training size of each group, group names) of a training split, or a
    `DataValidationError` (raised before any training, by the methods that train with group labels) when it has no usable group labels: a group column missing, an unknown group (-1) on some example,
    or a single group. `alternative` names what to use instead."""
    how = ("add the spurious attribute (hf_robust.data.as_group_dataset(..., attribute_column=...); the main job: "
           f"--attribute_column), or {alternative}")
    if dataset is None:
        raise DataValidationError(f"{method} needs a train_dataset with the group of every example.")
    if "group" not in dataset.column_names:
        raise DataValidationError(f"{method} trains with the group of every training example, but the train split "
                                  f"has no `group` column: {how}.")
    groups = np.asarray(dataset["group"], dtype=np.int64)
    if (groups < 0).any():
        raise DataValidationError(
            f"{method} trains with the group of every training example, but {int((groups < 0).sum())} of the "
            f"{len(groups)} training examples have an unknown group (-1): {how}."
        )
    feature = dataset.features["group"]
    names = list(getattr(feature, "names", None) or [str(g) for g in range(int(groups.max(initial=-1)) + 1)])
    counts = np.bincount(groups, minlength=len(names))
    if (counts > 0).sum() < 2:
        raise DataValidationError(
            f"{method} trains with the groups, but the train split has {int((counts > 0).sum())} group with examples "
            f"({dict(zip(names, counts.tolist()))}): it needs at least two. Check the attribute column, or "
            f"{alternative}."
        )
    return groups, counts, names
