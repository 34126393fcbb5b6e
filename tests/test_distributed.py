"""N processes give the result of one: a real 2-process run (accelerate launch --multi_gpu, CPU, gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).parent / "scripts" / "distributed_check.py"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def _run(command, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits):  # `digits` caches the benchmark before two processes read it
    tmp = tmp_path_factory.mktemp("dist")
    _run([sys.executable, str(SCRIPT), str(tmp / "one.json"), str(tmp / "one")], tmp)
    _run(LAUNCH + [str(SCRIPT), str(tmp / "two.json"), str(tmp / "two")], tmp)
    return json.loads((tmp / "one.json").read_text()), json.loads((tmp / "two.json").read_text())


@pytest.mark.distributed
def test_two_processes_really_ran(runs):
    one, two = runs
    assert one["world_size"] == 1 and two["world_size"] == 2


@pytest.mark.distributed
def test_evaluation_is_exactly_the_one_process_result(runs):
    one, two = runs
    # the fixed model before training: every metric identical, every group counted once
    assert one["eval_before"].keys() == two["eval_before"].keys()
    for key, value in one["eval_before"].items():
        if key.endswith("_loss"):  # the Trainer's loss is a mean of per-batch means: batches differ by shard
            assert two["eval_before"][key] == pytest.approx(value, rel=1e-3)
        elif key != "epoch":
            assert two["eval_before"][key] == value, key
    assert two["eval_before"]["eval_validation_group_0_count"] + two["eval_before"]["eval_validation_group_1_count"] \
        + two["eval_before"]["eval_validation_group_2_count"] + two["eval_before"]["eval_validation_group_3_count"] == 101


@pytest.mark.distributed
def test_per_example_pass_matches_one_process(runs):
    one, two = runs
    assert two["pass_idx"] == one["pass_idx"] and len(set(two["pass_idx"])) == 101
    np.testing.assert_allclose(np.asarray(two["pass_logits"]), np.asarray(one["pass_logits"]), atol=1e-5)


@pytest.mark.distributed
def test_training_lands_within_tolerance(runs):
    """Stated tolerance: the same examples per optimizer step (32 = 2 x 16), so parameters agree to 1e-3 and the
    per-step losses to 1e-3 after an epoch; evaluation accuracies within one example."""
    one, two = runs
    assert len(one["train_losses"]) == len(two["train_losses"])
    np.testing.assert_allclose(two["train_losses"], one["train_losses"], atol=1e-3)
    np.testing.assert_allclose(np.asarray(two["params"]), np.asarray(one["params"]), atol=1e-3)
    for split, size in (("validation", 101), ("test_biased", 78)):
        key = f"eval_{split}_accuracy"
        assert abs(two["eval_after"][key] - one["eval_after"][key]) <= 1 / size + 1e-9
