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
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, load_from_disk

from .core import DataValidationError, as_group_dataset
from .embedded import make_biased_digits, make_spurious_text
from .hub import (
    _load_local,
    _read,
    _rename_splits,
    _require,
    _validation_from_train,
    looks_like_hub_id,
    read_hub_dataset,
)
from .text_benchmarks import (  # noqa: F401 (their public names, importable from here as before)
    CIVIL_IDENTITIES,
    NEGATION_WORDS,
    has_negation,
    load_civilcomments,
    load_multinli,
    sagawa_has_negation,
)

def load_waterbirds(path=None, revision: str | None = None, **_) -> DatasetDict:
    raw = _read("waterbirds", "grodino/waterbirds", None, path, revision=revision)
    _require(raw, ("image", "label", "place"), "waterbirds")
    return as_group_dataset(
        raw, "label", "place", label_names=["landbird", "waterbird"], attribute_names=["land", "water"]
    )


def load_celeba(path=None, revision: str | None = None, **_) -> DatasetDict:
    raw = _read("celeba", "flwrlabs/celeba", "img_align+identity+attr", path, revision=revision)
    raw = _rename_splits(raw, {"valid": "validation"})
    _require(raw, ("image", "Blond_Hair", "Male"), "celeba")
    keep = ["image", "Blond_Hair", "Male"] + (["celeb_id"] if "celeb_id" in raw["train"].column_names else [])
    raw = raw.select_columns(keep)
    return as_group_dataset(
        raw, "Blond_Hair", "Male", label_names=["not blond", "blond"], attribute_names=["female", "male"]
    )


def load_cifar10(path=None, seed: int = 0, validation_fraction: float = 0.1, revision: str | None = None,
                 **_) -> DatasetDict:
    raw = _read("cifar10", "uoft-cs/cifar10", None, path, revision=revision)
    raw = DatasetDict({k: v.rename_column("img", "image") if "img" in v.column_names else v for k, v in raw.items()})
    _require(raw, ("image", "label"), "cifar10")
    return as_group_dataset(_validation_from_train(raw, validation_fraction, seed), "label", None)


def load_svhn(path=None, seed: int = 0, validation_fraction: float = 0.1, revision: str | None = None,
              **_) -> DatasetDict:
    raw = _read("svhn", "ufldl-stanford/svhn", "cropped_digits", path, revision=revision)
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
    """Load a group-annotated benchmark, a local dataset, or any Hub dataset.

    Args:
        name: one of `BENCHMARKS` (waterbirds, celeba, multinli, civilcomments, cifar10, svhn, biased_mnist,
            biased_digits, scene_digits, tinted_digits, spurious_text), the path of a local dataset (`save_to_disk`
            folder of a DatasetDict, or a folder of parquet files), or a Hub dataset id (`owner/name`), each with a
            label column and optionally an attribute column.
        path: a local copy of the benchmark `name` in its Hub layout (overrides `HF_ROBUST_DATA`).
        label_column, attribute_column: the columns of a local or Hub dataset (see `as_group_dataset`); string
            values are encoded as class indices shared by every split.
        remap_labels: renumber the integer labels of a local or Hub dataset that leave gaps (see `as_group_dataset`).
        kwargs: passed to the benchmark's loader (e.g. `seed` for the embedded ones, `split="sagawa"` for multinli,
            `revision` for a Hub benchmark). For a local or Hub dataset: `input_column` (see `as_group_dataset`),
            and for a Hub dataset `config` and `revision`; others (`seed`, ...) are ignored.

    Returns:
        A `DatasetDict` in the hf_robust data model (`label`, `attribute`, `group`, `example_idx`).
    """
    if name in BENCHMARKS:
        return BENCHMARKS[name](path=path, **kwargs)
    convert = dict(remap_labels=remap_labels, input_column=kwargs.get("input_column"))
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
        return as_group_dataset(raw, label_column, attribute_column, **convert)
    if looks_like_hub_id(name):
        raw = read_hub_dataset(name, config=kwargs.get("config"), revision=kwargs.get("revision"))
        return as_group_dataset(raw, label_column, attribute_column, **convert)
    if os.sep in name or name.startswith("."):
        raise DataValidationError(f"{name}: no such file or directory (expected a local dataset folder).")
    raise DataValidationError(
        f"Unknown benchmark {name!r}: expected one of {sorted(BENCHMARKS)}, the path of a local dataset "
        "(a save_to_disk folder or a folder of parquet files), or a Hub dataset id (owner/name)."
    )
