"""Reading a Hub benchmark: from a local copy in the Hub layout if there is one, else from the Hub with
`datasets.load_dataset` (parquet only: datasets >= 4 runs no loading scripts). A local copy is passed as `path=`,
or found in `$HF_ROBUST_DATA/<name>` (a `save_to_disk` folder, or a folder of parquet files laid out as on the
Hub, a config in its own sub-folder)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from .core import DataValidationError


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




HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(name: str) -> bool:
    """`owner/name` (one slash, no leading `/` or `.`): a Hub dataset id rather than a local path."""
    return bool(HUB_ID.match(name))


def read_hub_dataset(repo_id: str, config: str | None = None, revision: str | None = None) -> DatasetDict:
    """Any Hub dataset as a DatasetDict (`datasets.load_dataset`), or a clear error (offline, no such dataset)."""
    try:
        extra = {"revision": revision} if revision else {}
        raw = load_dataset(repo_id, config, **extra) if config else load_dataset(repo_id, **extra)
    except Exception as error:  # offline, no such dataset, a script-based dataset datasets >= 4 cannot run
        raise DataValidationError(
            f"{repo_id!r} is not a local folder, and loading it as a Hub dataset failed: {type(error).__name__}: "
            f"{error}. Without network, save a copy (load_dataset({repo_id!r}).save_to_disk(<dir>)) and pass <dir>."
        ) from error
    if isinstance(raw, Dataset):
        raise DataValidationError(f"{repo_id!r} loaded as one Dataset; expected a DatasetDict of splits.")
    return raw


# ----------------------------------------------------------------------------- where the data came from
# datasets caches a Hub dataset under <cache>/<owner>___<name>/<config>/<version>/<commit sha>/ (the `hash` of the
# builder is the repo's commit): the revision is read off the path of the dataset's (memory-mapped) files
_SHA = re.compile(r"^[0-9a-f]{40}$")


def hub_revision(dataset: Dataset) -> dict | None:
    """`{"repo": "owner/name", "revision": <commit sha>}` of a split loaded from the Hub (its cache files' path, so
    offline too; a split derived from it by map/select/add_column keeps them), else None (a local copy, a
    generated or in-memory dataset). When the path names the repo but no commit, the Hub's dataset info is asked
    (online only)."""
    for cache in getattr(dataset, "cache_files", None) or []:
        parts = Path(cache.get("filename", "")).parts
        for i, part in enumerate(parts):
            if "___" not in part:
                continue
            repo = part.replace("___", "/", 1)
            sha = next((p for p in parts[i + 1 :] if _SHA.match(p)), None)
            if sha is None:
                sha = _hub_sha(repo)
            if sha is not None:
                return {"repo": repo, "revision": sha}
    return None


def _hub_sha(repo: str) -> str | None:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(repo).sha
    except Exception:  # no network, no such repo: the fingerprint stands alone
        return None


def dataset_provenance(splits: dict[str, Dataset]) -> dict:
    """What `results.json` and the card record of the data: `dataset_revision` (the Hub repo and commit, when the
    data came from the Hub; else None) and `dataset_fingerprint` (each split's `datasets` fingerprint, which
    changes with the data and with every transform applied to it)."""
    splits = {name: split for name, split in splits.items() if isinstance(split, Dataset)}
    revision = next((r for r in map(hub_revision, splits.values()) if r is not None), None)
    return {"dataset_revision": revision,
            "dataset_fingerprint": {name: getattr(split, "_fingerprint", None) for name, split in splits.items()}}
