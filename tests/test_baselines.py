"""The baselines every peer library ships: GroupDRO, JTT, group/class reweighting and resampling, SUBG. Their common
behaviour (report, health check, resume of a finished run, reload, N processes) is checked by the common tester
(tests/test_methods.py, which trains the runs read here); this file checks each method against an independent
computation, and that the group-based ones refuse data without groups before any training."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import make_trainer

from hf_robust.data import DataValidationError
from hf_robust.methods.balancing.rules import balanced_weights, subsample_positions
from hf_robust.methods.jtt.error_set import upsampled_positions

GROUP_DRO_RUN = "group_dro-timm_wrapper_resnet"
JTT_RUN = "jtt-timm_wrapper_resnet"
SUBG_RUN = "subg-timm_wrapper_resnet"
REWEIGHT_RUN = "reweight-timm_wrapper_resnet"


@pytest.fixture(scope="module")
def four_groups(digits):
    """8 training examples of each of biased_digits' 4 groups (32, shuffled), and 32 validation examples."""
    from datasets import DatasetDict

    train = digits["train"]
    groups = np.asarray(train["group"])
    rows = np.concatenate([np.flatnonzero(groups == g)[:8] for g in range(4)])
    rows = np.random.default_rng(0).permutation(rows)
    return DatasetDict({"train": train.select(rows.tolist()),
                        "validation": digits["validation"].shuffle(seed=0).select(range(32))})


def _ce(logits: list[float], label: int) -> float:
    top = max(logits)
    return top + math.log(sum(math.exp(z - top) for z in logits)) - logits[label]


def _recording(trainer):
    """Record, for every training forward, (logits, labels, groups, returned loss)."""
    steps, logits = [], []
    model = trainer.model
    model.register_forward_hook(lambda m, a, out: logits.append(out.logits.detach().clone()) if m.training else None)
    original = trainer.compute_loss

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        result = original(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        if model.training:
            steps.append((logits[-1], inputs["labels"].clone(), inputs["group"].clone(), float(loss.detach())))
        return result

    trainer.compute_loss = compute_loss
    return steps


# ----------------------------------------------------------------------------- GroupDRO
def test_group_dro_weights_and_loss_after_two_steps_match_a_hand_computation(four_groups, tmp_path):
    """Two training steps (batches of 16 of 4 groups of 8): per-group mean cross-entropy of each batch computed by
    hand from the step's logits, plus C / sqrt(n_g) (n_g = 8), the exponentiated-gradient update
    q_g <- q_g exp(eta l_g) / Z twice from uniform, and the loss sum_g q_g l_g with the updated q."""
    eta, c = 0.5, 0.5
    trainer = make_trainer("group_dro", "hf_vit", four_groups, tmp_path / "out", eval_splits=[], max_steps=2,
                           per_device_train_batch_size=16, group_dro_eta=eta, group_dro_adjustment=c,
                           learning_rate=1e-2)
    steps = _recording(trainer)
    trainer.train()
    assert len(steps) == 2
    q = [0.25] * 4
    for logits, labels, groups, loss in steps:
        losses = [_ce(row, y) for row, y in zip(logits.double().tolist(), labels.tolist())]
        group_losses = []
        for g in range(4):
            members = [l for l, gg in zip(losses, groups.tolist()) if gg == g]
            group_losses.append((sum(members) / len(members) if members else 0.0) + c / math.sqrt(8))
        q = [w * math.exp(eta * l) for w, l in zip(q, group_losses)]
        q = [w / sum(q) for w in q]
        assert loss == pytest.approx(sum(w * l for w, l in zip(q, group_losses)), rel=1e-5)
    assert trainer.group_weights.tolist() == pytest.approx(q, rel=1e-6)
    assert max(q) - min(q) > 0.01  # the weights moved
    results = trainer.results()["group_dro"]
    assert list(results["q"].values()) == pytest.approx(q, rel=1e-6)
    assert results["group_counts"] == {name: 8 for name in four_groups["train"].features["group"].names}


def test_group_dro_resumed_run_equals_the_uninterrupted_run(four_groups, tmp_path):
    """q is part of the checkpoints: a run cut after its first epoch and resumed ends with the uninterrupted run's
    q (bit for bit) and weights. (A ResNet: transformers 5 does not map a tiny ViT checkpoint's key names back
    when it resumes from it.)"""
    kwargs = dict(eval_splits=[], num_train_epochs=2, per_device_train_batch_size=8, save_strategy="epoch",
                  group_dro_eta=0.5, lr_scheduler_type="constant")
    full = make_trainer("group_dro", "timm_wrapper_resnet", four_groups, tmp_path / "full", **kwargs)
    full.train()
    stage = tmp_path / "full" / "stages" / "group_dro"
    saved = json.loads((stage / "stage.json").read_text())
    assert saved["stage"] == "group_dro"
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    cut = tmp_path / "cut" / "stages" / "group_dro"
    shutil.rmtree(cut / "checkpoint-8")
    (cut / "stage.json").unlink()  # as if killed right after the first epoch's checkpoint
    from safetensors.torch import load_file

    halfway = load_file(str(cut / "checkpoint-4" / "group_dro_state.safetensors"))["q"]
    assert not torch.allclose(halfway, torch.full((4,), 0.25, dtype=torch.float64))  # q had moved
    resumed = make_trainer("group_dro", "timm_wrapper_resnet", four_groups, tmp_path / "cut", **kwargs)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 8
    assert torch.equal(resumed.group_weights, full.group_weights)
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)


def test_group_dro_run_records_q_and_group_counts(method_runs):
    run = method_runs[GROUP_DRO_RUN]
    results = json.loads((run.output_dir / "results.json").read_text())["group_dro"]
    groups = np.asarray(method_runs.data["small_digits"]["train"]["group"])
    names = method_runs.data["small_digits"]["train"].features["group"].names
    assert results["group_counts"] == {name: int((groups == g).sum()) for g, name in enumerate(names)}
    assert sum(results["q"].values()) == pytest.approx(1.0)
    assert all(results["q"][name] == 0 for name, n in results["group_counts"].items() if n == 0)
    assert (results["eta"], results["adjustment"]) == (0.1, 1.0)
    stage = run.output_dir / "stages" / "group_dro"
    from safetensors.torch import load_file

    assert load_file(str(stage / "group_dro_state.safetensors"))["q"].tolist() == list(results["q"].values())


# ----------------------------------------------------------------------------- JTT
def test_jtt_error_set_is_the_erm_models_mistakes_on_train(method_runs):
    """The error set equals argmax != label of the saved identification model over the whole train split (in row
    order); the retraining starts from the initial weights and sees the error set jtt_upweight times."""
    import copy

    run = method_runs[JTT_RUN]
    trainer, out = run.trainer, run.output_dir
    train = method_runs.data["small_digits"]["train"]
    model = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model))
    trainer.load_model_state(out / "stages" / "erm", model)
    model.eval()
    predictions = []
    with torch.no_grad():
        for start in range(0, len(train), 64):
            batch = trainer.eval_collator([train[i] for i in range(start, min(start + 64, len(train)))])
            predictions.append(model(pixel_values=batch["pixel_values"]).logits.argmax(-1))
    mistakes = torch.nonzero(torch.cat(predictions) != torch.as_tensor(train["label"])).flatten()
    assert trainer.errors.tolist() == mistakes.tolist()
    assert 0 < len(mistakes) < len(train)
    report = json.loads((out / "results.json").read_text())["jtt"]
    assert report["error_set_size"] == len(mistakes) and report["upweight"] == 4
    assert report["retrain_size"] == len(train) + 3 * len(mistakes)
    groups = np.asarray(train["group"])
    for g, name in enumerate(train.features["group"].names):
        if (groups == g).any():
            hits = int(np.isin(np.flatnonzero(groups == g), mistakes.numpy()).sum())
            assert report["by_group"][name]["recall"] == pytest.approx(hits / (groups == g).sum())
            assert report["by_group"][name]["precision"] == pytest.approx(hits / len(mistakes))
    # the retraining: from the model as given, over the upsampled set (one epoch of batches of 32)
    from safetensors.torch import load_file

    initial = load_file(str(out / "stages" / "initial" / "model.safetensors"))
    assert all(torch.equal(initial[k], v) for k, v in run.initial_state["model"].items() if k in initial)
    assert trainer.state.max_steps == math.ceil(report["retrain_size"] / 32)


def test_jtt_chooses_lambda_on_validation_worst_class_accuracy(tiny_digits, tmp_path):
    """With jtt_upweight_grid, one retraining per lambda from the initial weights; the final model is the candidate
    with the best (worst-class, accuracy) on validation (ties: the first), and a resumed run keeps the choice."""
    from hf_robust.core.health import selection_score

    kwargs = dict(jtt_upweight_grid=[1, 4], save_plots=False)
    trainer = make_trainer("jtt", "hf_vit", tiny_digits, tmp_path / "out", **kwargs)
    trainer.train()
    selection = trainer.selection
    assert [c["knobs"] for c in selection["candidates"]] == [{"jtt_upweight": 1}, {"jtt_upweight": 4}]
    scores = [selection_score(c["validation"]) for c in selection["candidates"]]
    assert selection["chosen"] == (1 if scores[1] > scores[0] else 0)
    chosen = selection["chosen"]
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "out" / "stages" / "retrain" / f"candidate_{chosen}" / "model.safetensors"))
    final = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert all(torch.equal(final[k], v) for k, v in weights.items())
    results = trainer.results()
    upweight = [1, 4][chosen]
    assert results["jtt"]["upweight"] == upweight and results["selection"]["chosen_knobs"] == {"jtt_upweight": upweight}
    assert results["jtt"]["retrain_size"] == 32 + (upweight - 1) * results["jtt"]["error_set_size"]
    resumed = make_trainer("jtt", "hf_vit", tiny_digits, tmp_path / "out", **kwargs)
    resumed.train(resume_from_checkpoint=True)
    resumed.release_output_dir()
    assert resumed.skipped_stages == ["initial", "erm", "error_set", "retrain"]
    assert resumed.results()["jtt"] == results["jtt"] and resumed.selection == selection


def test_jtt_upsampled_positions():
    positions = upsampled_positions(5, np.array([1, 3]), 3)
    assert positions.tolist() == [0, 1, 2, 3, 4, 1, 3, 1, 3]
    assert np.bincount(positions).tolist() == [1, 3, 1, 3, 1]
    assert upsampled_positions(3, np.array([0]), 1).tolist() == [0, 1, 2]


# ----------------------------------------------------------------------------- balancing and SUBG
def test_balanced_weights_give_every_key_the_same_total_weight():
    weights = balanced_weights(np.array([0, 0, 0, 1, 2, 2]))
    assert weights.tolist() == pytest.approx([2 / 3, 2 / 3, 2 / 3, 2.0, 1.0, 1.0])
    assert weights.mean() == pytest.approx(1.0)
    # an absent key (3 of 0..4) does not count among the K keys
    assert balanced_weights(np.array([0, 4, 4, 4])).tolist() == pytest.approx([2.0, 2 / 3, 2 / 3, 2 / 3])


def test_reweighted_loss_is_the_batch_mean_of_weighted_losses(four_groups, tmp_path):
    """On a batch of the 32 examples with groups of 2 / 6 / 8 / 16 (weights 4, 4/3, 1, 1/2): the trainer's
    loss is mean_i w_i CE_i with w = N / (K n_g), computed by hand from the logits."""
    from datasets import DatasetDict

    groups = np.asarray(four_groups["train"]["group"])
    rows = np.concatenate([np.flatnonzero(groups == g)[:n] for g, n in enumerate((2, 6, 8, 8))])
    data = DatasetDict({"train": four_groups["train"].select(rows.tolist())})
    trainer = make_trainer("reweight", "hf_vit", data, tmp_path / "out", eval_splits=[])
    weights = {g: 24 / (4 * n) for g, n in enumerate((2, 6, 8, 8))}
    batch = trainer._prepare_inputs(trainer.eval_collator([data["train"][i] for i in range(len(rows))]))
    model = trainer.model.train()
    with torch.no_grad():
        loss = float(trainer.compute_loss(model, batch))
        logits = model(pixel_values=batch["pixel_values"]).logits.double().tolist()
    hand = [weights[g] * _ce(z, y) for z, y, g in zip(logits, batch["labels"].tolist(), batch["group"].tolist())]
    assert loss == pytest.approx(sum(hand) / len(hand), rel=1e-5)
    assert trainer.results()["balancing"]["weights"] == pytest.approx(
        {name: weights[g] for g, name in enumerate(data["train"].features["group"].names)})


def test_subg_keeps_the_smallest_group_size_of_every_group_seeded():
    keys = np.array([0] * 10 + [1] * 3 + [2] * 7 + [4] * 5)
    kept = subsample_positions(keys, seed=0)
    assert np.bincount(keys[kept]).tolist() == [3, 3, 3, 0, 3]
    assert kept.tolist() == sorted(set(kept.tolist()))  # sorted, without repeats
    assert set(np.flatnonzero(keys == 1)) <= set(kept.tolist())  # the smallest group is kept whole
    assert subsample_positions(keys, seed=0).tolist() == kept.tolist()  # reproducible
    assert subsample_positions(keys, seed=1).tolist() != kept.tolist()  # another seed, another draw


def test_subg_run_trains_on_the_recorded_subsample(method_runs):
    run = method_runs[SUBG_RUN]
    trainer, out = run.trainer, run.output_dir
    train = method_runs.data["small_digits"]["train"]
    groups = np.asarray(train["group"])
    sizes = np.bincount(groups, minlength=4)
    smallest = sizes[sizes > 0].min()
    kept = trainer.kept
    assert np.bincount(groups[kept], minlength=4).tolist() == [smallest if n else 0 for n in sizes]
    assert kept.tolist() == subsample_positions(groups, seed=trainer.args.seed).tolist()
    report = json.loads((out / "results.json").read_text())["balancing"]
    assert set(report["kept_sizes"].values()) == {int(smallest)} and report["kept"] == len(kept)
    from safetensors.torch import load_file

    stored = load_file(str(out / "stages" / "subsample" / "outputs.safetensors"))
    assert stored["example_idx"].tolist() == np.asarray(train["example_idx"])[kept].tolist()
    # ERM's step budget: one epoch of the whole train split in batches of 32, over the subsample
    assert trainer.state.max_steps == math.ceil(len(train) / 32) == report["steps"]


def test_class_resampling_run_records_its_probabilities(method_runs):
    run = method_runs[REWEIGHT_RUN]
    report = json.loads((run.output_dir / "results.json").read_text())["balancing"]
    labels = np.asarray(method_runs.data["small_digits"]["train"]["label"])
    assert report["balance_by"] == "class" and report["balance_mode"] == "resample"
    counts = np.bincount(labels)
    assert list(report["sampling_probability"].values()) == pytest.approx((1 / (2 * counts)).tolist())
    assert sum(p * n for p, n in zip(report["sampling_probability"].values(), counts)) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- refusals
NEEDS_GROUPS = [("group_dro", {}), ("subg", {}), ("reweight", {}), ("reweight", dict(balance_mode="resample"))]


@pytest.mark.parametrize("method, kwargs", NEEDS_GROUPS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(NEEDS_GROUPS)])
def test_group_methods_refuse_training_data_without_groups_before_training(method, kwargs, tiny_digits, tmp_path):
    from datasets import DatasetDict

    blind = DatasetDict({**tiny_digits, "train": tiny_digits["train"].map(lambda row: {"group": -1})})
    with pytest.raises(DataValidationError, match=r"32 training examples have an unknown group \(-1\)"):
        make_trainer(method, "hf_vit", blind, tmp_path / "out", **kwargs)
    one_group = DatasetDict({**tiny_digits, "train": tiny_digits["train"].map(lambda row: {"group": 1})})
    with pytest.raises(DataValidationError, match="at least two"):
        make_trainer(method, "hf_vit", one_group, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out" / "results.json").exists() and not (tmp_path / "out" / "stages").exists()


@pytest.mark.parametrize("method, kwargs", [("jtt", {}), ("reweight", dict(balance_by="class")),
                                            ("subg", dict(balance_by="class"))], ids=["jtt", "reweight", "suby"])
def test_methods_without_group_labels_run_on_data_without_groups(method, kwargs, tiny_digits, tmp_path):
    from datasets import DatasetDict

    blind = DatasetDict({name: split.map(lambda row: {"group": -1}) for name, split in tiny_digits.items()})
    trainer = make_trainer(method, "hf_vit", blind, tmp_path / "out", save_plots=False, **kwargs)
    trainer.train()
    results = trainer.results()
    assert results["finished_stages"][-1] in ("retrain", "train")
    if method == "jtt":
        assert "by_group" not in results["jtt"] and results["jtt"]["train_size"] == 32
    else:
        labels = np.asarray(blind["train"]["label"])
        assert results["balancing"]["sizes"] == {name: int((labels == k).sum())
                                                 for k, name in enumerate(blind["train"].features["label"].names)}


def test_config_checks():
    from hf_robust.methods.balancing.config import ReweightConfig
    from hf_robust.methods.group_dro.config import GroupDROConfig
    from hf_robust.methods.jtt.config import JTTConfig

    with pytest.raises(ValueError, match="group_dro_eta"):
        GroupDROConfig(output_dir="x", group_dro_eta=-1, use_cpu=True)
    with pytest.raises(ValueError, match="jtt_upweight"):
        JTTConfig(output_dir="x", jtt_upweight=0, use_cpu=True)
    with pytest.raises(ValueError, match="would balance a second time"):
        ReweightConfig(output_dir="x", balanced_sampling="class", use_cpu=True)
    with pytest.raises(ValueError, match="balance_mode"):
        ReweightConfig(output_dir="x", balance_mode="subsample", use_cpu=True)


# ----------------------------------------------------------------------------- N processes
@pytest.mark.distributed
@pytest.mark.parametrize("method", ["group_dro", "jtt", "reweight", "subg"])
def test_two_processes_give_the_one_process_baseline(method, distributed_checks):
    """tests/scripts/method_distributed.py <method>: the same global batches of 32 on 1 and 2 processes. Measured
    (2-core AMD EPYC): parameters within 2.5e-6, q within 1e-9, the same error set and subsample."""
    one, two = distributed_checks[method]
    np.testing.assert_allclose(two["params"], one["params"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(two["train_losses"], one["train_losses"], rtol=1e-5)
    if method == "group_dro":
        np.testing.assert_allclose(two["q"], one["q"], rtol=1e-7)
        assert max(one["q"]) - min(one["q"]) > 0.005
    if method == "jtt":
        assert two["errors"] == one["errors"] and 0 < len(one["errors"]) < 128
        assert two["results"] == one["results"]
    if method == "subg":
        assert two["kept"] == one["kept"] and two["results"] == one["results"]
