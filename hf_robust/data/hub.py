"""Reading a Hub benchmark: from a local copy in the Hub layout if there is one, else from the Hub with
`datasets.load_dataset` (parquet only: datasets >= 4 runs no loading scripts). A local copy is passed as `path=`,
or found in `$HF_ROBUST_DATA/<name>` (a `save_to_disk` folder, or a folder of parquet files laid out as on the
Hub, a config in its own sub-folder)."""

from __future__ import annotations

import json
import os
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


