"""scripts/train.py, the main job: arguments, config files, outputs, resume, errors."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import LAUNCH_TWO_PROCESSES, REPO

SCRIPT = REPO / "scripts" / "train.py"


@pytest.fixture(scope="module")
def train_script():
    spec = importlib.util.spec_from_file_location("hf_robust_train_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def quick(tmp_path, *extra):
    return [
        "--max_train_samples", "256", "--max_eval_samples", "64", "--num_train_epochs", "1",
        "--per_device_train_batch_size", "64", "--output_dir", str(tmp_path / "run"), "--use_cpu",
        "--disable_tqdm", "true", *extra,
    ]


def test_main_job_under_two_processes_on_cpu_forms_one_group(tmp_path, train_script):
    """`accelerate launch --multi_gpu --num_processes 2 scripts/train.py` with no --use_cpu on a machine without a
    GPU: the two processes train together (one gloo group, each on half the batches), not twice alone."""
    args = [a for a in quick(tmp_path, "--method", "erm", "--save_strategy", "no") if a != "--use_cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(LAUNCH_TWO_PROCESSES + [str(SCRIPT), *args], env=env, capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["num_processes"] == 2
    assert "process group is initialized, but parallel_mode" not in result.stdout + result.stderr
    _, config = train_script.parse_args(["--method", "erm"])
    assert config.use_cpu == (not train_script._has_accelerator())


def test_erm_main_job_writes_a_complete_run(tmp_path, train_script, digits, capsys):
    results = train_script.main(quick(tmp_path, "--method", "erm"))
    out = tmp_path / "run"
    saved = json.loads((out / "results.json").read_text())
    assert saved["method"] == "ERM" and saved["dataset"] == "biased_digits"
    assert set(saved["splits"]) == {"validation", "test_biased", "test_original"}
    assert saved["splits"]["test_biased"]["worst_group_accuracy"] == results["splits"]["test_biased"]["worst_group_accuracy"]
    for name in ("README.md", "config.json", "model.safetensors", "plots/group_accuracy.png"):
        assert (out / name).is_file(), name
    printed = capsys.readouterr().out
    assert "== test_biased ==" in printed and "worst-group accuracy" in printed and "digit 5-9,square" in printed

    # resuming a finished run skips its stage and reports the same numbers
    again = train_script.main(quick(tmp_path, "--method", "erm", "--resume_from_checkpoint", "true"))
    assert again["skipped_stages"] == ["erm"]
    assert again["splits"]["test_biased"] == results["splits"]["test_biased"]


def test_no_argument_default_is_erm_then_masktune(tmp_path, train_script, digits, capsys):
    script_args, args = train_script.parse_args([])
    assert script_args.method == "masktune" and script_args.dataset == "biased_digits"
    assert script_args.model == "digits-resnet18-64" and args.per_device_train_batch_size == 128
    # the fine-tuning knobs are left to the label-free selection: lr 1e-4 or 1e-3 at batch 32, k = 2, or no
    # fine-tuning at all
    # and the number of accumulative rounds (up to 3, while each improves on validation)
    assert (args.finetune_learning_rate, args.finetune_batch_size, args.mask_threshold_std) == (None, None, None)
    assert args.masktune_iterations is None and args.accumulative_masking and args.selection_max_iterations == 3
    assert args.masktune_selection == "auto" and args.on_worse == "warn"
    assert args.output_dir == "runs/biased_digits-masktune"
    results = train_script.main(quick(tmp_path, "--max_train_samples", "128"))
    assert results["method"] == "MaskTune" and "ERM" in results["stages"]
    candidates = results["selection"]["candidates"]
    assert [c["knobs"].get("finetune_learning_rate") for c in candidates[:3]] == [None, 1e-4, 1e-3]
    assert all(c["knobs"]["iterations"] > 1 for c in candidates[3:])  # the rounds after the first, if any ran
    assert results["health"]["status"] in ("ok", "worse_than_erm", "collapsed")
    printed = capsys.readouterr().out
    assert re.search(r"ERM +MaskTune", printed) and "worst-group accuracy" in printed  # (MaskTune 1 ... if rounds)
    assert "selection: " in printed and f"health: {results['health']['status']}" in printed


def test_config_file_and_command_line_precedence(tmp_path, train_script):
    config = tmp_path / "run.yaml"
    config.write_text("method: erm\ndataset: biased_digits\nnum_train_epochs: 7\nlearning_rate: 0.05\n")
    script_args, args = train_script.parse_args(["--config", str(config), "--learning_rate", "0.2"])
    assert args.num_train_epochs == 7  # from the file
    assert args.learning_rate == 0.2  # the command line wins
    assert args.per_device_train_batch_size == 128  # the dataset's default
    assert script_args.model == "digits-resnet18" and script_args.eval_splits == "validation,test_biased,test_original"
    assert args.output_dir == "runs/biased_digits-erm"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "masktun"], "--method 'masktun' is not one of"),
        (["--dataset", "waterbird"], "Unknown benchmark 'waterbird'"),
        (["--eval_splits", "test"], r"--eval_splits \['test'\] are not splits of biased_digits"),
        (["--config", "missing.yaml"], "--config missing.yaml: no such file"),
        (["--method", "fairdropout", "--p_gen", "1.5"], "error: .*p_gen"),
        (["--model", "digits-resnet19"], r"error: --model 'digits-resnet19' could not be loaded .*digits-resnet18"),
        (["--dataset", "/nowhere/data"], "no such file or directory"),
        (["--method", "gradtune", "--erm_checkpoint", "/nowhere"], "erm_checkpoint='/nowhere' is not a folder"),
    ],
)
def test_bad_arguments_are_clear_errors(tmp_path, train_script, argv, message, digits):
    with pytest.raises(SystemExit, match=message):
        train_script.main(quick(tmp_path) + argv)
    assert not (tmp_path / "run" / "results.json").exists()


def test_config_file_lists_and_comma_separated_flags(tmp_path, train_script):
    config = tmp_path / "run.yaml"
    config.write_text("method: fairdropout\neval_splits: [validation, test_biased]\nfair_dropout_positions: [dp3]\n")
    script_args, args = train_script.parse_args(["--config", str(config)])
    assert script_args.eval_splits == "validation,test_biased" and args.fair_dropout_positions == ["dp3"]
    _, args = train_script.parse_args(["--method", "fairdropout", "--fair_dropout_positions", "dp3,dp4"])
    assert args.fair_dropout_positions == ["dp3", "dp4"]
    _, args = train_script.parse_args(["--method", "fairdropout", "--fair_dropout_positions", "dp3", "dp5"])
    assert args.fair_dropout_positions == ["dp3", "dp5"]


def test_unknown_config_key(tmp_path, train_script):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"num_epochs": 3}))
    with pytest.raises(SystemExit, match=r"unknown keys \['num_epochs'\]"):
        train_script.parse_args(["--config", str(config)])


def test_push_to_hub_offline_saves_then_fails_clearly(tmp_path, train_script, digits):
    # (ERM: the push after saving is the script's, whatever the method)
    argv = quick(tmp_path, "--method", "erm", "--max_steps", "1", "--push_to_hub", "--hub_model_id", "me/digits-erm")
    with pytest.raises(SystemExit, match=r"error: Could not push .* as 'me/digits-erm'"):
        train_script.main(argv)
    assert (tmp_path / "run" / "results.json").is_file() and (tmp_path / "run" / "README.md").is_file()


def test_help_is_fast_and_lists_the_flags(train_script_help):
    for flag in ("--method", "--dataset", "--model", "--output_dir", "--train_augmentation", "--config"):
        assert flag in train_script_help
