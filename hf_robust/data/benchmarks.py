"""`load_benchmark(name)`: the group-annotated benchmarks of the spurious-correlation literature.

Hub benchmarks are read from their Hub ids with `datasets.load_dataset` (parquet only: datasets >= 4 runs no
loading scripts). Each can instead come from a local copy in the same layout: pass `path=`, or set
`HF_ROBUST_DATA=<dir>` and put the copy in `<dir>/<name>` (a `save_to_disk` folder or a folder of parquet
files laid out as on the Hub). The embedded benchmarks are generated here and cached under `HF_HOME`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, concatenate_datasets, load_dataset, load_from_disk

from .core import DataValidationError, as_group_dataset
from .overlapping import OVERLAPPING_GROUPS, overlapping_feature
from .embedded import make_biased_digits, make_spurious_text

NEGATION_WORDS = frozenset({"nobody", "no", "never", "nothing"})
CIVIL_IDENTITIES = ("male", "female", "LGBTQ", "christian", "muslim", "other_religions", "black", "white")
_CIVIL_AGGREGATES = {
    "LGBTQ": ("homosexual_gay_or_lesbian", "bisexual", "other_sexual_orientation", "transgender", "other_gender"),
    "other_religions": ("jewish", "hindu", "buddhist", "atheist", "other_religion"),
}


def _local_source(name: str, path: str | os.PathLike | None, aliases: tuple[str, ...] = ()) -> Path | None:
    """`path`, else `$HF_ROBUST_DATA/<name>` (or `/<alias>`: the Hub dataset's own name, e.g. `mnist` for
    `biased_mnist`, which is built from it), else None."""
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise DataValidationError(f"path={str(path)!r} for benchmark {name!r} does not exist.")
        return path
    root = os.environ.get("HF_ROBUST_DATA")
    for folder in (name, *aliases):
        if root and (Path(root) / folder).exists():
            return Path(root) / folder
    return None


def _read(name: str, hub_id: str, config: str | None, path, aliases: tuple[str, ...] = (),
          revision: str | None = None) -> DatasetDict:
    """The raw DatasetDict from a local copy if there is one, else from the Hub (at `revision`: a commit, tag or
    branch; default the main branch)."""
    local = _local_source(name, path, aliases)
    if local is None:
        try:
            extra = {"revision": revision} if revision else {}
            return load_dataset(hub_id, config, **extra) if config else load_dataset(hub_id, **extra)
        except Exception as error:  # offline, or no such dataset: say where a local copy can go
            raise DataValidationError(
                f"Could not load benchmark {name!r} from the Hub ({hub_id}"
                f"{', config ' + config if config else ''}): {type(error).__name__}: {error}. Without network, "
                f"save a copy with the same layout and pass path=<dir> (or --dataset <dir>), or set "
                f"HF_ROBUST_DATA=<root> with the copy in <root>/{(*aliases, name)[0]}."
            ) from error
    if config and (local / config).is_dir() and not (local / "dataset_dict.json").exists():
        local = local / config
    return _load_local(local)


def _empty_parts(local: Path) -> list[str]:
    """The splits (save_to_disk) or parquet files of a local dataset that hold no rows: `datasets` cannot load
    them (IndexError / "corresponds to no data")."""
    empty = []
    if (local / "dataset_dict.json").exists():
        for split in json.loads((local / "dataset_dict.json").read_text()).get("splits", []):
            state = local / split / "state.json"
            if state.is_file() and not json.loads(state.read_text()).get("_data_files"):
                empty.append(f"split {split!r}")
        return empty
    import pyarrow.parquet as pq

    for file in sorted(local.rglob("*.parquet")):
        try:
            if pq.ParquetFile(file).metadata.num_rows == 0:
                empty.append(str(file.relative_to(local)))
        except Exception:  # not a parquet file datasets could read either: its own error says so
            continue
    return empty


def _load_local(local: Path) -> DatasetDict | Dataset:
    empty = _empty_parts(local)
    if empty:
        raise DataValidationError(
            f"The local dataset {local} has empty splits ({', '.join(empty)}: 0 rows), which `datasets` cannot "
            "load. Remove them, or give them examples."
        )
    try:
        return load_from_disk(str(local)) if (local / "dataset_dict.json").exists() else load_dataset(str(local))
    except (IndexError, ValueError) as error:
        raise DataValidationError(
            f"`datasets` could not read the local dataset {local}: {type(error).__name__}: {error}. Expected a "
            "save_to_disk folder of a DatasetDict, or a folder of parquet files named by split, every split with "
            "examples."
        ) from error


def _rename_splits(dataset: DatasetDict, mapping: dict[str, str]) -> DatasetDict:
    return DatasetDict({mapping.get(k, k): v for k, v in dataset.items() if mapping.get(k, k) is not None})


def _require(dataset: DatasetDict, columns: tuple[str, ...], name: str) -> None:
    for split, data in dataset.items():
        missing = [c for c in columns if c not in data.column_names]
        if missing:
            raise DataValidationError(
                f"Benchmark {name!r}, split {split!r}: columns {missing} are missing (found {data.column_names}); "
                f"expected the Hub layout with {list(columns)}."
            )


def _validation_from_train(dataset: DatasetDict, fraction: float, seed: int) -> DatasetDict:
    """A seeded held-out part of train as `validation`, for datasets that ship only train/test."""
    if "validation" in dataset:
        return dataset
    parts = dataset["train"].train_test_split(test_size=fraction, seed=seed)
    return DatasetDict({"train": parts["train"], "validation": parts["test"], **{k: v for k, v in dataset.items() if k != "train"}})


def load_waterbirds(path=None, **_) -> DatasetDict:
    raw = _read("waterbirds", "grodino/waterbirds", None, path)
    _require(raw, ("image", "label", "place"), "waterbirds")
    return as_group_dataset(
        raw, "label", "place", label_names=["landbird", "waterbird"], attribute_names=["land", "water"]
    )


def load_celeba(path=None, **_) -> DatasetDict:
    raw = _read("celeba", "flwrlabs/celeba", "img_align+identity+attr", path)
    raw = _rename_splits(raw, {"valid": "validation"})
    _require(raw, ("image", "Blond_Hair", "Male"), "celeba")
    keep = ["image", "Blond_Hair", "Male"] + (["celeb_id"] if "celeb_id" in raw["train"].column_names else [])
    raw = raw.select_columns(keep)
    return as_group_dataset(
        raw, "Blond_Hair", "Male", label_names=["not blond", "blond"], attribute_names=["female", "male"]
    )


def has_negation(hypothesis: str) -> bool:
    """MultiNLI's spurious attribute (Gururangan et al. 2018; Sagawa et al. 2020): a negation word."""
    return any(word in NEGATION_WORDS for word in re.sub(r"[^\w\s]", " ", hypothesis.lower()).split())


def load_multinli(path=None, **_) -> DatasetDict:
    """MultiNLI with the negation attribute. Splits: train, validation (= validation_matched) and test
    (= validation_mismatched; the official test labels are not public)."""
    raw = _read("multinli", "nyu-mll/multi_nli", None, path)
    raw = _rename_splits(raw, {"validation_matched": "validation", "validation_mismatched": "test"})
    _require(raw, ("premise", "hypothesis", "label"), "multinli")
    raw = raw.select_columns(["premise", "hypothesis", "label"])
    raw = raw.filter(lambda batch: [y >= 0 for y in batch["label"]], batched=True)
    raw = raw.map(
        lambda batch: {"negation": [int(has_negation(h)) for h in batch["hypothesis"]]}, batched=True
    )
    return as_group_dataset(
        raw, "label", "negation", label_names=["entailment", "neutral", "contradiction"],
        attribute_names=["no negation", "negation"],
    )


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


def load_cifar10(path=None, seed: int = 0, validation_fraction: float = 0.1, **_) -> DatasetDict:
    raw = _read("cifar10", "uoft-cs/cifar10", None, path)
    raw = DatasetDict({k: v.rename_column("img", "image") if "img" in v.column_names else v for k, v in raw.items()})
    _require(raw, ("image", "label"), "cifar10")
    return as_group_dataset(_validation_from_train(raw, validation_fraction, seed), "label", None)


def load_svhn(path=None, seed: int = 0, validation_fraction: float = 0.1, **_) -> DatasetDict:
    raw = _read("svhn", "ufldl-stanford/svhn", "cropped_digits", path)
    raw = _rename_splits(raw, {"extra": None})
    _require(raw, ("image", "label"), "svhn")
    return as_group_dataset(_validation_from_train(raw, validation_fraction, seed), "label", None)


def _cached(name: str, builder: Callable[..., DatasetDict], source: str = "", **kwargs) -> DatasetDict:
    """Generate once per (name, arguments, `source`: a fingerprint of the data it is built from) into HF_HOME;
    atomic, so parallel processes never see half a copy. `builder` may be a functools.partial."""
    from huggingface_hub.constants import HF_HOME

    import inspect

    # the generator's source is part of the key: editing it invalidates old copies
    code = Path(inspect.getsourcefile(getattr(builder, "func", builder))).read_bytes()
    key = hashlib.sha256(json.dumps({"name": name, **kwargs}, sort_keys=True, default=str).encode() + code
                         + source.encode())
    target = Path(HF_HOME) / "hf_robust" / "datasets" / f"{name}-{key.hexdigest()[:16]}"
    if not (target / "dataset_dict.json").exists():
        dataset = builder(**kwargs)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
        dataset.save_to_disk(str(tmp))
        try:
            os.replace(tmp, target)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    return load_from_disk(str(target))


def load_biased_digits(path=None, seed: int = 0, **kwargs) -> DatasetDict:
    if path is not None:
        return load_from_disk(str(path))
    return _cached("biased_digits", make_biased_digits, seed=seed, **kwargs)


def load_scene_digits(path=None, seed: int = 0, **kwargs) -> DatasetDict:
    if path is not None:
        return load_from_disk(str(path))
    kwargs = {"majority_fraction": 0.95, "minority_fraction": 0.05, **kwargs}
    return _cached("scene_digits", make_biased_digits, seed=seed, shortcut="scene", **kwargs)


def load_tinted_digits(path=None, seed: int = 0, **kwargs) -> DatasetDict:
    if path is not None:
        return load_from_disk(str(path))
    kwargs = {"majority_fraction": 0.97, "minority_fraction": 0.03, **kwargs}
    return _cached("tinted_digits", make_biased_digits, seed=seed, shortcut="tint", **kwargs)


def load_biased_mnist(path=None, seed: int = 0, num_squares: int = 1, **kwargs) -> DatasetDict:
    """MaskTune's biased-MNIST protocol on the real digits (`hf_robust.data.biased_mnist`), generated once per
    (MNIST copy, seed, num_squares) and cached under HF_HOME. The digits come from the Hub's `ylecun/mnist`, or a
    local copy in its layout: `path=<dir>` or `HF_ROBUST_DATA=<root>` with `<root>/mnist` (or
    `<root>/biased_mnist`). `seed` fixes which digits carry the square and which are `validation`; `num_squares=2`
    adds the second (blue) square; `conflicting_digits` ("authors", default, or "all") says which digits conflict
    with the square (see `hf_robust.data.biased_mnist`)."""
    from functools import partial

    from .biased_mnist import make_biased_mnist

    raw = _read("biased_mnist", "ylecun/mnist", "mnist", path, aliases=("mnist",))
    # the copy's identity: its datasets fingerprints, sizes and labels (a cheap column read)
    source = json.dumps({k: [v._fingerprint, len(v), hashlib.sha256(np.asarray(v["label"]).tobytes()).hexdigest()]
                         for k, v in sorted(raw.items()) if "label" in v.column_names})
    return _cached("biased_mnist", partial(make_biased_mnist, raw), source=source, seed=seed,
                   num_squares=num_squares, **kwargs)


def load_spurious_text(path=None, seed: int = 0, **kwargs) -> DatasetDict:
    if path is not None:
        return load_from_disk(str(path))
    return make_spurious_text(seed=seed, **kwargs)


BENCHMARKS: dict[str, Callable[..., DatasetDict]] = {
    "waterbirds": load_waterbirds,
    "celeba": load_celeba,
    "multinli": load_multinli,
    "civilcomments": load_civilcomments,
    "cifar10": load_cifar10,
    "svhn": load_svhn,
    "biased_digits": load_biased_digits,
    "scene_digits": load_scene_digits,
    "tinted_digits": load_tinted_digits,
    "biased_mnist": load_biased_mnist,
    "spurious_text": load_spurious_text,
}


def load_benchmark(
    name: str,
    path: str | os.PathLike | None = None,
    label_column: str = "label",
    attribute_column: str | None = "attribute",
    remap_labels: bool = False,
    **kwargs,
) -> DatasetDict:
    """Load a group-annotated benchmark, or a user dataset from a local path.

    Args:
        name: one of `BENCHMARKS` (waterbirds, celeba, multinli, civilcomments, cifar10, svhn, biased_mnist, biased_digits,
            scene_digits, tinted_digits, spurious_text), or the path of a local dataset (`save_to_disk` folder of a DatasetDict, or a folder of
            parquet files) with a label column and optionally an attribute column.
        path: a local copy of the benchmark `name` in its Hub layout (overrides `HF_ROBUST_DATA`).
        label_column, attribute_column: the columns of a local dataset (see `as_group_dataset`); string values
            are encoded as class indices shared by every split.
        remap_labels: renumber the integer labels of a local dataset that leave gaps (see `as_group_dataset`).
        kwargs: passed to the benchmark's loader (e.g. `seed` for the embedded ones).

    Returns:
        A `DatasetDict` in the hf_robust data model (`label`, `attribute`, `group`, `example_idx`).
    """
    if name in BENCHMARKS:
        return BENCHMARKS[name](path=path, **kwargs)
    if Path(name).exists():
        local = Path(name)
        if (local / "state.json").exists() and not (local / "dataset_dict.json").exists():
            raise DataValidationError(
                f"{name} holds a single Dataset (save_to_disk of one split); expected a DatasetDict with train and "
                "evaluation splits: DatasetDict({'train': ..., 'validation': ...}).save_to_disk(...)."
            )
        raw = _load_local(local)
        if isinstance(raw, Dataset):
            raise DataValidationError(
                f"{name} holds a single Dataset; expected a DatasetDict with train and evaluation splits."
            )
        return as_group_dataset(raw, label_column, attribute_column, remap_labels=remap_labels)
    if os.sep in name or name.startswith("."):
        raise DataValidationError(f"{name}: no such file or directory (expected a local dataset folder).")
    raise DataValidationError(
        f"Unknown benchmark {name!r}: expected one of {sorted(BENCHMARKS)} or the path of a local dataset "
        "(a save_to_disk folder or a folder of parquet files)."
    )
