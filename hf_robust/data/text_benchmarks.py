"""The Hub's text benchmarks: MultiNLI (the standard split, or group DRO's re-split) and CivilComments as WILDS
defines it (its 16 overlapping evaluation groups)."""

from __future__ import annotations

import logging
import os
import re
import string
from pathlib import Path

import numpy as np
from datasets import DatasetDict, concatenate_datasets

from .core import DataValidationError, as_group_dataset
from .hub import _read, _rename_splits, _require
from .overlapping import OVERLAPPING_GROUPS, overlapping_feature

logger = logging.getLogger(__name__)
NEGATION_WORDS = frozenset({"nobody", "no", "never", "nothing"})
CIVIL_IDENTITIES = ("male", "female", "LGBTQ", "christian", "muslim", "other_religions", "black", "white")
_CIVIL_AGGREGATES = {
    "LGBTQ": ("homosexual_gay_or_lesbian", "bisexual", "other_sexual_orientation", "transgender", "other_gender"),
    "other_religions": ("jewish", "hindu", "buddhist", "atheist", "other_religion"),
}


def has_negation(hypothesis: str) -> bool:
    """MultiNLI's spurious attribute on the `standard` split (Gururangan et al. 2018, arXiv:1803.02324): one of
    the four negation words, punctuation read as a word break ("no-one" has "no")."""
    return any(word in NEGATION_WORDS for word in re.sub(r"[^\w\s]", " ", hypothesis.lower()).split())


_ASCII_PUNCTUATION = str.maketrans("", "", string.punctuation)


def sagawa_has_negation(hypothesis: str) -> bool:
    """The negation attribute as group DRO computes it (Sagawa et al. 2020, arXiv:1911.08731; their
    `generate_multinli.py`): delete ASCII punctuation (not a word break: "no-one" -> "noone", "nobody's" ->
    "nobodys", neither a negation), lower-case, split on single spaces, then look for nobody / no / never /
    nothing."""
    return any(word in NEGATION_WORDS for word in hypothesis.translate(_ASCII_PUNCTUATION).lower().split(" "))


MULTINLI_SAGAWA_LABELS = ("contradiction", "entailment", "neutral")
_MULTINLI_HUB_LABELS = ("entailment", "neutral", "contradiction")  # nyu-mll/multi_nli's ClassLabel order
_MULTINLI_POOL = ("train", "validation_matched", "validation_mismatched")


def load_multinli(path=None, split: str = "standard", seed: int = 0, metadata_path: str | os.PathLike | None = None,
                  revision: str | None = None, **_) -> DatasetDict:
    """MultiNLI with the negation attribute (groups = label x negation, 6).

    Args:
        split: `"standard"` (default): MultiNLI's own splits and label order (entailment 0, neutral 1,
            contradiction 2): train, validation (= validation_matched) and test (= validation_mismatched; the
            official test labels are not public), negation by `has_negation`.
            `"sagawa"`: the benchmark of group DRO (Sagawa et al. 2020, arXiv:1911.08731), also used by JTT, DFR and
            SubpopBench: labels contradiction 0, entailment 1, neutral 2; train + validation_matched +
            validation_mismatched pooled (in that order) and split at random 50 / 20 / 30 % (validation =
            int(0.2 n), test = int(0.3 n) rows, train the rest), seeded by `seed`; negation by
            `sagawa_has_negation`.
        seed: the seed of the `sagawa` split. Group DRO's own split was drawn unseeded: only their file
            reproduces it (`metadata_path`).
        metadata_path: (`split="sagawa"`) their `metadata_random.csv` (columns gold_label, sentence2_has_negation,
            split with 0 / 1 / 2 = train / val / test, one row per labelled pair of the pooled data, in order): its
            split and negation columns are used as they are, and its labels must match the copy's.
    """
    if split not in ("standard", "sagawa"):
        raise DataValidationError(f"multinli: split={split!r}; expected 'standard' or 'sagawa'.")
    if metadata_path is not None and split != "sagawa":
        raise DataValidationError("multinli: metadata_path= is group DRO's file of the 'sagawa' split: pass "
                                  "split='sagawa' with it.")
    raw = _read("multinli", "nyu-mll/multi_nli", None, path, revision=revision)
    if split == "sagawa":
        return _multinli_sagawa(raw, seed, metadata_path)
    raw = _rename_splits(raw, {"validation_matched": "validation", "validation_mismatched": "test"})
    _require(raw, ("premise", "hypothesis", "label"), "multinli")
    raw = raw.select_columns(["premise", "hypothesis", "label"])
    raw = raw.filter(lambda batch: [y >= 0 for y in batch["label"]], batched=True)
    raw = raw.map(
        lambda batch: {"negation": [int(has_negation(h)) for h in batch["hypothesis"]]}, batched=True
    )
    return as_group_dataset(
        raw, "label", "negation", label_names=list(_MULTINLI_HUB_LABELS),
        attribute_names=["no negation", "negation"],
    )


def _multinli_sagawa(raw: DatasetDict, seed: int, metadata_path) -> DatasetDict:
    missing = [name for name in _MULTINLI_POOL if name not in raw]
    if missing:
        raise DataValidationError(
            f"multinli split='sagawa' pools {list(_MULTINLI_POOL)}; the copy lacks {missing} (it has {list(raw)})."
        )
    pool = DatasetDict({name: raw[name] for name in _MULTINLI_POOL})
    _require(pool, ("premise", "hypothesis", "label"), "multinli")
    feature = pool["train"].features["label"]
    names = list(feature.names) if hasattr(feature, "names") else list(_MULTINLI_HUB_LABELS)
    if sorted(names) != sorted(MULTINLI_SAGAWA_LABELS):
        raise DataValidationError(f"multinli: the label names are {names}; expected {list(_MULTINLI_HUB_LABELS)}.")
    pooled = concatenate_datasets([pool[name].select_columns(["premise", "hypothesis", "label"])
                                   for name in _MULTINLI_POOL])
    labels = np.asarray(pooled["label"], dtype=np.int64)
    if (labels < 0).any():  # pairs without a gold label (group DRO drops them too)
        pooled = pooled.select(np.flatnonzero(labels >= 0))
        labels = labels[labels >= 0]
    remap = np.asarray([MULTINLI_SAGAWA_LABELS.index(name) for name in names])
    labels = remap[labels]
    negation = np.asarray([sagawa_has_negation(h) for h in pooled["hypothesis"]], dtype=np.int64)
    if metadata_path is not None:
        codes, negation = _sagawa_metadata(metadata_path, labels, negation)
    else:
        n = len(labels)
        n_val, n_test = int(0.2 * n), int(0.3 * n)
        codes = np.asarray([0] * (n - n_val - n_test) + [1] * n_val + [2] * n_test, dtype=np.int64)
        codes = np.random.default_rng(seed).permutation(codes)
    pooled = pooled.remove_columns("label").add_column("label", labels.tolist())
    pooled = pooled.add_column("negation", negation.tolist())
    splits = DatasetDict({name: pooled.select(np.flatnonzero(codes == code))
                          for code, name in enumerate(("train", "validation", "test"))})
    return as_group_dataset(splits, "label", "negation", label_names=list(MULTINLI_SAGAWA_LABELS),
                            attribute_names=["no negation", "negation"])


def _sagawa_metadata(metadata_path, labels: np.ndarray, negation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(split codes, negation) from group DRO's metadata file, checked against the pooled copy's labels."""
    import pandas as pd

    path = Path(metadata_path)
    if not path.is_file():
        raise DataValidationError(f"multinli: metadata_path={str(path)!r} is not a file.")
    meta = pd.read_csv(path, index_col=0)
    needed = ["gold_label", "sentence2_has_negation", "split"]
    absent = [c for c in needed if c not in meta.columns]
    if absent:
        raise DataValidationError(
            f"multinli: {path} lacks the columns {absent} (it has {list(meta.columns)}); expected group DRO's "
            "metadata_random.csv (gold_label, sentence2_has_negation, split)."
        )
    if len(meta) != len(labels):
        raise DataValidationError(
            f"multinli: {path} has {len(meta)} rows, the pooled copy (train + validation_matched + "
            f"validation_mismatched, labelled pairs) {len(labels)}: they must be the same pairs in the same order "
            "(group DRO's file has 412,349 rows for MultiNLI 1.0)."
        )
    gold = meta["gold_label"].to_numpy()
    if gold.dtype.kind not in "iu":
        gold = np.asarray([MULTINLI_SAGAWA_LABELS.index(g) if g in MULTINLI_SAGAWA_LABELS else int(g) for g in gold])
    wrong = np.flatnonzero(gold != labels)
    if wrong.size:
        raise DataValidationError(
            f"multinli: {path} disagrees with the copy's labels on {wrong.size} rows (first rows "
            f"{wrong[:5].tolist()}): "
            "it describes other pairs, or another order, than train + validation_matched + validation_mismatched."
        )
    codes = meta["split"].to_numpy().astype(np.int64)
    if not np.isin(codes, (0, 1, 2)).all():
        raise DataValidationError(f"multinli: {path}: `split` must be 0 / 1 / 2 (train / val / test).")
    theirs = meta["sentence2_has_negation"].to_numpy().astype(np.int64)
    differ = int((theirs != negation).sum())
    if differ:
        logger.warning("multinli: the metadata's negation differs from sagawa_has_negation on %d rows; using the "
                       "metadata's.", differ)
    return codes, theirs


def _civil_columns(batch: dict, text_column: str) -> dict:
    """WILDS' label (toxicity >= 0.5) and its 8 identities (each >= 0.5; LGBTQ and other_religions rebuilt from the
    fine columns when a copy lacks them), any identity, and the 16 overlapping groups (label * 8 + identity)."""
    out = {"text": batch[text_column], "split": batch["split"]}
    toxicity = np.asarray(batch["toxicity"], dtype=np.float64)
    toxic = (toxicity >= 0.5).astype(np.int64)
    out["toxic"] = toxic.tolist()
    identities = np.zeros((len(toxicity), len(CIVIL_IDENTITIES)), dtype=bool)
    for i, identity in enumerate(CIVIL_IDENTITIES):
        if identity in batch:
            values = np.nan_to_num(np.asarray(batch[identity], dtype=np.float64)) >= 0.5
        else:
            values = np.zeros(len(toxicity), dtype=bool)
            for member in _CIVIL_AGGREGATES[identity]:
                values |= np.nan_to_num(np.asarray(batch[member], dtype=np.float64)) >= 0.5
        out[f"identity_{identity}"] = values.astype(np.int64).tolist()
        identities[:, i] = values
    out["identity_any"] = identities.any(axis=1).astype(np.int64).tolist()
    out[OVERLAPPING_GROUPS] = [(y * len(CIVIL_IDENTITIES) + np.flatnonzero(row)).tolist()
                               for y, row in zip(toxic, identities)]
    return out


def _wilds_split(values: list) -> np.ndarray:
    """WILDS' `split` column (train / val / test, or 0 / 1 / 2) as 0 / 1 / 2; anything else is an error."""
    codes = {"train": 0, "val": 1, "validation": 1, "test": 2, 0: 0, 1: 1, 2: 2}
    unknown = sorted({str(v) for v in set(values) if v not in codes})
    if unknown:
        raise DataValidationError(
            f"Benchmark 'civilcomments': the `split` column has the values {unknown[:5]}; expected WILDS' train, val "
            "and test."
        )
    return np.asarray([codes[v] for v in values], dtype=np.int64)


def load_civilcomments(path=None, revision: str | None = None, **_) -> DatasetDict:
    """CivilComments as WILDS defines it (Koh et al. 2021, arXiv:2012.07421): the `raw` config of the Hub repo
    `pietrolesci/civilcomments-wilds` (one table of WILDS' rows and columns), split on WILDS' `split` column
    (train / val / test -> train / validation / test: 269,038 / 45,180 / 133,782 rows in WILDS).

    label = toxicity >= 0.5; WILDS' 8 identities (male, female, LGBTQ, christian, muslim, other_religions, black,
    white) each mentioned when its value is >= 0.5 (WILDS' code compares `>= 0.5` for both), kept as the columns
    `identity_<name>`. Evaluation uses the literature's 16 OVERLAPPING groups, each identity x toxic / non-toxic
    (column `overlapping_groups`, "<label>,<identity>"; a comment counts in every group it belongs to, one that
    mentions no identity in none): `worst_group_accuracy` is the worst of them, as WILDS, JTT and DFR report.
    Training-time groups (samplers, group-balanced heads) are the disjoint `group` = label x any identity (4
    groups), the coarse grouping JTT uses for training.

    The repo's `default` config is not read: it is not WILDS' split (about 3k rows fewer, de-duplicated:
    ~268k / 45k / 133k), so its numbers would not compare with the literature's.
    """
    raw = _read("civilcomments", "pietrolesci/civilcomments-wilds", "raw", path, revision=revision)
    table = concatenate_datasets(list(raw.values())) if len(raw) > 1 else next(iter(raw.values()))
    columns = table.column_names
    if "split" not in columns:
        raise DataValidationError(
            f"Benchmark 'civilcomments': the copy has no `split` column (columns: {columns[:12]}...): expected the "
            "`raw` config of pietrolesci/civilcomments-wilds (WILDS' one table with its `split` column), e.g. "
            "load_dataset('pietrolesci/civilcomments-wilds', 'raw').save_to_disk(<dir>). The `default` config "
            "(train/validation/test without `split`) is de-duplicated and is not WILDS' split."
        )
    text_column = "text" if "text" in columns else "comment_text"
    needed = [text_column, "toxicity", "split"]
    for identity in CIVIL_IDENTITIES:
        needed.extend([identity] if identity in columns else _CIVIL_AGGREGATES.get(identity, (identity,)))
    _require(DatasetDict({"raw": table}), tuple(needed), "civilcomments")
    table = table.map(_civil_columns, batched=True, fn_kwargs={"text_column": text_column}, remove_columns=columns)
    codes = _wilds_split(table["split"])
    table = table.remove_columns("split")
    splits = DatasetDict({name: table.select(np.flatnonzero(codes == code))
                          for code, name in enumerate(("train", "validation", "test")) if (codes == code).any()})
    label_names = ["non-toxic", "toxic"]
    data = as_group_dataset(splits, "toxic", "identity_any", label_names=label_names,
                            attribute_names=["no identity", "identity"])
    names = [f"{label},{identity}" for label in label_names for identity in CIVIL_IDENTITIES]
    feature = overlapping_feature(names)
    return DatasetDict({name: split.cast_column(OVERLAPPING_GROUPS, feature) for name, split in data.items()})


