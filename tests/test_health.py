"""The health check every run ends with, and the label-free selection of a method's knobs. Every method's run
reports a health status against its reference (ERM's: only the collapse checks): tests/test_methods.py."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_model, make_trainer, quick_config

from hf_robust.methods import RobustConfig, RobustTrainer, Stage
from hf_robust.core.health import HealthCheckError, assess, prediction_summary


# ----------------------------------------------------------------------------- pure functions
def test_prediction_summary_counts_labels_only():
    summary = prediction_summary([0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0], num_classes=2)
    assert summary["accuracy"] == pytest.approx(4 / 6)
    assert summary["class_accuracy"] == pytest.approx([2 / 3, 2 / 3])
    assert summary["prediction_share"] == pytest.approx([0.5, 0.5])
    # a class absent from the labels is no worst class
    summary = prediction_summary([0, 0, 2], [0, 0, 2], num_classes=3)
    assert summary["class_accuracy"][1] is None and summary["worst_class_accuracy"] == 1.0


def test_assess_statuses():
    erm = prediction_summary([0] * 40 + [1] * 60, [0] * 50 + [1] * 50, 2)  # class 0 at 80%, class 1 at 100%
    same = prediction_summary([0] * 39 + [1] * 61, [0] * 50 + [1] * 50, 2)  # 78%: within the 2-point margin
    worse = prediction_summary([0] * 35 + [1] * 65, [0] * 50 + [1] * 50, 2)  # 70%
    one_class = prediction_summary([1] * 100, [0] * 50 + [1] * 50, 2)
    assert assess(same, erm)[0] == "ok"
    status, reason = assess(worse, erm, ["a", "b"])
    assert status == "worse_than_erm" and "80.0%" in reason and "70.0%" in reason
    status, reason = assess(one_class, erm, ["a", "b"])
    assert status == "collapsed" and "'a'" in reason
    chance = prediction_summary([0, 1] * 50, [0] * 50 + [1] * 50, 2)  # both classes predicted, 50% balanced
    assert assess(chance, None)[0] == "collapsed"
    assert assess(worse, None)[0] == "ok"  # no reference: only the collapse checks


# ----------------------------------------------------------------------------- the check in a run
class BreakingTrainer(RobustTrainer):
    """ERM, then a 'method' that pushes every prediction to class 1: a collapse, forced deterministically."""

    _name = "Breaker"

    def stages(self):
        return [self.erm_baseline_stage(), Stage("break", self._break, self.load_model_state)]

    def _break(self, stage_dir: Path, resume: bool) -> None:
        with torch.no_grad():
            self.adapter.classifier.bias[1] += 1e4
        self.save_model_state(stage_dir)


def breaking_trainer(tmp_path, data, **kwargs):
    model, processor = make_model("hf_resnet", seed=0)
    config = quick_config(RobustConfig, tmp_path / "out", logging_steps=100, **kwargs)
    return BreakingTrainer(model, config, train_dataset=data["train"],
                           eval_dataset={"validation": data["validation"], "test_biased": data["test_biased"]},
                           processing_class=processor)


def predictions(trainer, dataset):
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    batch = trainer.eval_collator([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        return model(pixel_values=batch["pixel_values"]).logits.argmax(-1).numpy()


@pytest.mark.parametrize("on_worse", ["warn", "keep"])
def test_a_collapse_is_reported_everywhere(tmp_path, small_digits, caplog, on_worse):
    trainer = breaking_trainer(tmp_path, small_digits, on_worse=on_worse)
    with caplog.at_level(logging.WARNING, logger="hf_robust"):
        trainer.train()
    health = trainer.health
    assert health["status"] == "collapsed" and health["reference"] == "ERM" and health["action"] == "kept"
    assert health["method"]["prediction_share"] == pytest.approx([0.0, 1.0])
    assert health["erm"]["prediction_share"][0] > 0
    assert (predictions(trainer, small_digits["validation"]) == 1).all()  # the broken model is kept
    warned = [r for r in caplog.records if "health: collapsed" in r.getMessage()]
    assert bool(warned) == (on_worse == "warn")
    trainer.evaluate()
    trainer.save_model()
    out = Path(trainer.args.output_dir)
    saved = json.loads((out / "results.json").read_text())
    assert saved["health"]["status"] == "collapsed"
    card = (out / "README.md").read_text()
    body = card.split("---", 2)[2]
    assert body.index("Health check: `collapsed`") < body.index("## Worst-group accuracy")
    assert "did worse than ERM" in body


def test_fallback_to_erm_restores_the_erm_model(tmp_path, small_digits):
    trainer = breaking_trainer(tmp_path, small_digits, on_worse="fallback_to_erm")
    trainer.train()
    assert trainer.health["status"] == "collapsed" and trainer.health["action"] == "fell back to the ERM model"
    erm = breaking_trainer(tmp_path / "ref", small_digits)
    erm.load_model_state(Path(trainer.args.output_dir) / "stages" / "erm")
    val = small_digits["validation"]
    np.testing.assert_array_equal(predictions(trainer, val), predictions(erm, val))
    assert trainer.evaluate()["eval_validation_accuracy"] == pytest.approx(trainer.stage_results["ERM"]["validation"]["accuracy"])


def test_error_stops_before_anything_is_saved(tmp_path, small_digits):
    trainer = breaking_trainer(tmp_path, small_digits, on_worse="error")
    with pytest.raises(HealthCheckError, match="collapsed"):
        trainer.train()
    out = Path(trainer.args.output_dir)
    assert not (out / "results.json").exists() and not (out / "README.md").exists()
    assert (out / "stages" / "break" / "stage.json").is_file()  # the stages stay, for a resume with other settings


def test_without_validation_the_health_is_unknown(tmp_path, small_digits):
    """(An unharmed run is ok, or collapsed, with no reference for ERM: test_methods.py.)"""
    trainer = make_trainer("erm", "hf_resnet", small_digits, tmp_path / "erm2", eval_splits=["test_biased"])
    trainer.train()
    assert trainer.health["status"] == "unknown" and "'validation'" in trainer.health["reason"]


def test_masktune_with_an_absurd_learning_rate_is_flagged(tmp_path, small_digits):
    trainer = make_trainer("masktune", "timm_wrapper_resnet", small_digits, tmp_path / "mt", eval_splits=["validation"],
                           finetune_learning_rate=50.0, mask_threshold_std=1.0, num_train_epochs=2)
    trainer.train()
    assert trainer.health["status"] in ("collapsed", "worse_than_erm"), trainer.health


# ----------------------------------------------------------------------------- label-free selection
# MaskTune choosing its fine-tuning knobs (test_methods.MT_SELECTING: 2 learning rates x 1 batch size, one round):
# the run of test_methods.py, trained once per session
MT_RUN = "masktune-timm_wrapper_resnet-selecting"


def mt_selecting(tmp_path, data, **kwargs):
    from test_methods import MT_SELECTING

    return make_trainer("masktune", "timm_wrapper_resnet", data, tmp_path / "mt", **{**MT_SELECTING, **kwargs})


def candidate_predictions(trainer, index, dataset):
    copy = mt_selecting(Path(trainer.args.output_dir) / "copy", {"train": dataset, "validation": dataset,
                                                                  "test_biased": dataset})
    copy.load_model_state(trainer.candidate_folder(trainer.stage_dir("select"), index))
    return predictions(copy, dataset)


def test_selection_scores_every_candidate_on_validation_and_keeps_the_best(method_runs, small_digits):
    """(Its stages, erm -> select -> masks_1 -> finetune_1 -> selective: test_methods.py.)"""
    trainer = method_runs[MT_RUN].trainer
    selection = trainer.selection
    knobs = [c["knobs"] for c in selection["candidates"]]
    assert knobs == [{"finetune": False},
                     {"finetune": True, "finetune_learning_rate": 1e-4, "finetune_batch_size": 16, "mask_threshold_std": 1.0},
                     {"finetune": True, "finetune_learning_rate": 1e-3, "finetune_batch_size": 16, "mask_threshold_std": 1.0}]
    val = small_digits["validation"]
    labels = np.asarray(val["label"])
    scores = []
    for i, record in enumerate(selection["candidates"]):
        pred = candidate_predictions(trainer, i, val)
        worst = min((pred[labels == c] == c).mean() for c in (0, 1))
        assert record["validation"]["worst_class_accuracy"] == pytest.approx(worst)
        scores.append((worst, (pred == labels).mean()))
    assert selection["chosen"] == max(range(3), key=lambda i: (scores[i], -i))
    # the final model is the chosen candidate; the report says what was chosen
    np.testing.assert_array_equal(predictions(trainer, val), candidate_predictions(trainer, selection["chosen"], val))
    results = trainer.results()
    assert results["selection"]["chosen_knobs"] == knobs[selection["chosen"]]
    assert results["selection"]["method_helped"] == (selection["chosen"] != 0)


def test_selection_never_reads_group_labels(method_runs, small_digits, tmp_path):
    selection_run = method_runs[MT_RUN].trainer
    from datasets import DatasetDict

    blind = DatasetDict({name: split.map(lambda row: {"group": -1}) for name, split in small_digits.items()})
    trainer = mt_selecting(tmp_path, blind)
    trainer.train()
    assert trainer.selection["chosen"] == selection_run.selection["chosen"]
    for mine, theirs in zip(trainer.selection["candidates"], selection_run.selection["candidates"]):
        assert mine["knobs"] == theirs["knobs"]
        assert mine["validation"]["worst_class_accuracy"] == theirs["validation"]["worst_class_accuracy"]


def test_the_erm_model_wins_when_fine_tuning_hurts(tmp_path, small_digits, caplog):
    trainer = mt_selecting(tmp_path, small_digits, selection_learning_rate_factors=[5e4], masktune_iterations=None)
    with caplog.at_level(logging.WARNING, logger="hf_robust"):
        trainer.train()
    assert trainer.selection["chosen"] == 0 and trainer.masktune_kept_erm
    # no round runs after the kept ERM model (rounds are chosen: up to 3), none is reported as a MaskTune model
    assert trainer.finished_stages[-3:] == ["masks_3", "finetune_3", "selective"]
    assert not trainer.iteration_records and not [s for s in trainer.stage_results if s.startswith("MaskTune")]
    assert any("MaskTune did not help on validation" in r.getMessage() for r in caplog.records)
    results = trainer.results()
    assert results["selection"]["method_helped"] is False and "ERM model was kept" in results["selection"]["note"]
    assert trainer.selection["candidates"][1]["validation"]["nonfinite_share"] > 0  # the broken candidate
    assert trainer.health["method"] == trainer.health["erm"]  # the kept model is the ERM model
    val = small_digits["validation"]
    np.testing.assert_array_equal(predictions(trainer, val), candidate_predictions(trainer, 0, val))


def test_rounds_are_chosen_on_validation_and_resume(tmp_path, small_digits):
    """masktune_iterations unset: round i + 1 runs only while round i improved on the round before (validation
    worst-class accuracy); the run keeps the last round that improved (its model and masks), the rounds after it
    are skipped stages, and a resumed run rebuilds the same choice from the stage folders."""
    from safetensors.torch import load_file

    from hf_robust.methods.masktune.masks import MaskStore

    def summary(worst):
        return {"accuracy": worst, "worst_class_accuracy": worst, "class_accuracy": [worst, worst],
                "prediction_share": [0.5, 0.5], "nonfinite_share": 0.0}

    kwargs = dict(finetune_learning_rate=1e-3, finetune_batch_size=16, masktune_iterations=None,
                  selection_max_iterations=4)
    trainer = mt_selecting(tmp_path, small_digits, **kwargs)
    assert "select" not in [s.name for s in trainer.stages()] and trainer.chooses_iterations
    rounds = iter([summary(0.6), summary(0.8), summary(0.7)])  # round 2 improves on round 1, round 3 does not
    trainer._round_summary = lambda: next(rounds)
    trainer.train()
    assert trainer.finished_stages == ["erm", "masks_1", "finetune_1", "masks_2", "finetune_2", "masks_3",
                                       "finetune_3", "masks_4", "finetune_4", "selective"]
    assert trainer.stopped_after == 2 and [r["iteration"] for r in trainer.iteration_records] == [1, 2, 3]
    kept = load_file(str(trainer.stage_dir("finetune_2") / "model.safetensors"))
    final = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert all(torch.equal(final[k], v) for k, v in kept.items())
    round_masks = [MaskStore.from_state_dict(trainer.load_stage_tensors(trainer.stage_dir(f"masks_{i}"), "masks"))
                   for i in (1, 2, 3)]
    assert torch.equal(trainer.masks.masks(), round_masks[1].masks())  # round 2's masks, not round 3's
    assert (round_masks[1].masks() | round_masks[0].masks()).equal(round_masks[1].masks())  # accumulative
    assert not (trainer.stage_dir("masks_4") / "masks.safetensors").exists()  # never computed
    assert {"MaskTune 1", "MaskTune 2", "MaskTune 3"} <= set(trainer.stage_results)  # every round reported
    results = trainer.results()
    assert [c["knobs"]["iterations"] for c in results["selection"]["candidates"]] == [1, 2, 3]
    assert results["selection"]["chosen_knobs"]["iterations"] == 2 and "2 accumulative round" in results["selection"]["note"]
    resumed = mt_selecting(tmp_path, small_digits, **kwargs)
    resumed.train(resume_from_checkpoint=True)  # nothing re-run: the rounds' records are read back
    assert resumed.stopped_after == 2 and resumed.iteration_records == trainer.iteration_records
    assert resumed.skipped_stages == trainer.finished_stages
    final = resumed.accelerator.unwrap_model(resumed.model).state_dict()
    assert all(torch.equal(final[k], v) for k, v in kept.items())
    assert torch.equal(resumed.masks.masks(), round_masks[1].masks())


def test_setting_every_knob_skips_the_selection(tmp_path, small_digits):
    trainer = mt_selecting(tmp_path, small_digits, finetune_learning_rate=1e-3, finetune_batch_size=16)
    assert "select" not in [s.name for s in trainer.stages()]


def test_candidates_resume_one_by_one(tmp_path, small_digits):
    trainer = make_trainer("erm", "hf_resnet", small_digits, tmp_path / "out", eval_splits=["validation"])
    calls = []

    def train(knobs, folder, resume):
        calls.append(knobs["bias"])
        if knobs["bias"] == 2 and len(calls) == 3:
            raise KeyboardInterrupt  # interrupted during the third candidate
        with torch.no_grad():
            trainer.adapter.classifier.bias.copy_(torch.tensor([0.0, float(knobs["bias"])]))

    grid = [{"bias": 0}, {"bias": 1}, {"bias": 2}, {"bias": -1}]
    stage = tmp_path / "out" / "stages" / "select"
    with pytest.raises(KeyboardInterrupt):
        trainer.run_candidates(stage, grid, train, resume=False)
    selection = trainer.run_candidates(stage, grid, train, resume=True)
    assert calls == [0, 1, 2, 2, -1]  # the finished candidates were not trained again
    assert [c["knobs"] for c in selection["candidates"]] == grid


# FairDropout(-DFR) runs whose selection tries ERM and one (p_gen, p_mem) pair at dp4 (test_methods._FD_SELECTING),
# and the ERM run on the same model: runs of test_methods.py, trained once per session
FD_RUN, FD_DFR_RUN, ERM_RUN = "fairdropout-hf_resnet", "fairdropout_dfr-hf_resnet", "erm-hf_resnet"


def test_fairdropout_selection_trains_erm_among_the_candidates(method_runs):
    """(Its stages, select_fair_dropout -> fairdropout, and the health check's reference, "ERM (p_gen = 1)":
    test_methods.py.)"""
    from hf_robust.methods.fair_dropout.inject import fair_dropout_modules

    trainer = method_runs[FD_RUN].trainer
    knobs = [c["knobs"] for c in trainer.selection["candidates"]]
    assert knobs == [{"positions": ["dp4"], "p_gen": 1.0, "p_mem": 1.0},
                     {"positions": ["dp4"], "p_gen": 0.5, "p_mem": 0.1}]
    chosen = knobs[trainer.selection["chosen"]]
    assert fair_dropout_modules(trainer.model).config.p_gen == chosen["p_gen"]
    # the health check's reference is the ERM candidate, scored as the selection scored it
    assert trainer.health["erm"] == trainer.selection["candidates"][0]["validation"]
    assert trainer.health["method"] == trainer.selection["candidates"][trainer.selection["chosen"]]["validation"]
    # the ERM candidate is plain ERM: the same run without FairDropout gives the same validation predictions
    erm = method_runs[ERM_RUN].trainer
    assert erm.health["method"]["class_accuracy"] == pytest.approx(trainer.health["erm"]["class_accuracy"], abs=0.02)


def test_fairdropout_dfr_selects_fair_dropout_then_retrains_the_head(method_runs):
    """FairDropout-DFR with its default selection (no erm_checkpoint): the knob selection and the last layer's
    held-out selection are two stages of one run (select_fair_dropout -> fairdropout -> heldout -> scores -> select
    -> last_layer, the health check's reference "FairDropout", which the report shows: test_methods.py), and the
    head is retrained on the chosen candidate's model."""
    from hf_robust.methods.fair_dropout.inject import fair_dropout_modules

    trainer = method_runs[FD_DFR_RUN].trainer
    chosen = trainer.selection["candidates"][trainer.selection["chosen"]]
    assert fair_dropout_modules(trainer.model).config.p_gen == chosen["knobs"]["p_gen"]
    # the health check's reference (the FairDropout stage) is the chosen candidate, scored as the selection scored
    # it (both on the half of validation the head is not fitted on)
    assert trainer.health["erm"] == chosen["validation"]
    assert "FairDropout" in trainer.stage_results
    assert trainer.last_layer.finetune_sets.shape[0] == trainer.args.dfr_num_subsets


def test_fairdropout_selection_searches_positions_as_separate_runs_would(tmp_path, small_digits):
    """Positions unset: each of the adapter's selection positions (ResNet dp4, dp3) is tried; a candidate at a
    switched position is the run one would get by naming that position (same masks, same initial weights), and the
    final model carries the chosen candidate's position and weights."""
    from safetensors.torch import load_file

    from hf_robust.methods.fair_dropout.inject import fair_dropout_modules

    def run(out, **kwargs):
        trainer = make_trainer("fairdropout", "hf_resnet", small_digits, tmp_path / out, eval_splits=["validation"],
                               fairdropout_selection="auto", export_model=False, **kwargs)
        trainer.train()
        return trainer

    trainer = run("fd", selection_p_gen=[0.5], selection_p_mem=[0.1])
    knobs = [c["knobs"] for c in trainer.selection["candidates"]]
    assert knobs == [{"positions": ["dp4"], "p_gen": 1.0, "p_mem": 1.0},
                     {"positions": ["dp4"], "p_gen": 0.5, "p_mem": 0.1},
                     {"positions": ["dp3"], "p_gen": 0.5, "p_mem": 0.1}]
    chosen = trainer.selection["chosen"]
    assert fair_dropout_modules(trainer.model).config.positions == knobs[chosen]["positions"]
    saved = load_file(str(trainer.candidate_folder(trainer.stage_dir("select_fair_dropout"), chosen) / "model.safetensors"))
    final = trainer.model.state_dict()
    assert all(torch.equal(final[k], v) for k, v in saved.items())
    # the dp3 candidate (trained after the model was switched from dp4) = a run that names dp3 from the start
    named = run("dp3", fair_dropout_positions=["dp3"], p_gen=0.5, p_mem=0.1)
    switched = trainer.selection["candidates"][2]["validation"]
    assert named.health["method"]["class_accuracy"] == pytest.approx(switched["class_accuracy"], abs=1e-6)
    assert named.health["method"]["prediction_share"] == pytest.approx(switched["prediction_share"], abs=1e-6)
