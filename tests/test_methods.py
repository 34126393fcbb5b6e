"""The common tester: every method of the registry on every model family it supports (CASES), each case trained once
per session (`method_runs`, tests/conftest.py) and checked alike — the run trains and writes its results, model card
and health check with the method's stage names; a resumed finished run recomputes nothing and gives the same
results; the saved model loads with the model card's own code and gives the trained model's logits; N processes
give what one gives (tests/scripts/method_distributed.py). Each method's own behaviour is tested in its file
(tests/test_<method>.py), which reads the same runs.
"""

import json
import os

import pytest
import torch
from conftest import DISTRIBUTED_CHECKS, FAMILIES, TEXT_FAMILIES, RunDir, case_id, make_trainer

from hf_robust.core.files import atomic_write_json
from hf_robust.methods.registry import METHODS

# The matrix, peft's TEST_CASES habit: (method, family, data fixture, config kwargs over METHOD_TEST_DEFAULTS of
# conftest (and make_trainer's model_seed)[, variant]). _OWN_CASES are the runs the methods' own test files read
# (method_runs[case_id]): their settings are those tests' assumptions; "selecting" runs choose the method's knobs on
# validation (its label-free selection). The other cases are the smallest runs of the method on the family:
# tiny_digits (one step of 32), no plots.
_FD = dict(fair_dropout_positions=["dp3", "dp5"], p_gen=0.25, p_mem=0.3)
# FairDropout's label-free selection of its knobs at dp4: ERM and one (p_gen, p_mem) candidate (tests/test_health.py)
_FD_SELECTING = dict(fairdropout_selection="auto", fair_dropout_positions=["dp4"], selection_p_gen=[0.5],
                     selection_p_mem=[0.1], export_model=False)
# MaskTune's selection of its fine-tuning knobs: two learning rates x one batch size, one round (tests/test_health.py)
MT_SELECTING = dict(masktune_selection="auto", num_train_epochs=2, mask_threshold_std=1.0, masktune_iterations=1,
                    selection_learning_rate_factors=[0.1, 1.0], selection_batch_size_divisors=[2])
# the selection of beta: 2 steps per fine-tuning, vanilla FT among the candidates, no WiSE-FT. The model's seed (1)
# is one where the candidates differ on validation (a distillation wins: vanilla FT's worst class is at 7%, both
# betas' at 36%) rather than all predicting one class (tests/test_counterfactual.py)
CF_SELECTING = dict(model_seed=1, counterfactual_selection="auto", compare_vanilla=True, max_steps=2,
                    wise_ft_alphas=[], plot_examples=0)
_SMALL = dict(save_plots=False)
_SMALL_BY_METHOD = {
    "erm": _SMALL,
    "masktune": _SMALL,
    "gradtune": dict(finetune_set_size=8, last_layer_epochs=10, **_SMALL),
    "dfr": dict(dfr_num_subsets=2, dfr_regularization=[1.0, 0.1], **_SMALL),
    "fairdropout": dict(p_gen=0.25, p_mem=0.3, **_SMALL),  # at the adapter's default position
    "fairdropout_dfr": dict(p_gen=0.25, p_mem=0.3, dfr_num_subsets=2, dfr_regularization=[1.0, 0.1], **_SMALL),
    # (tests/test_counterfactual.py reads the timm_wrapper_resnet one: a CNN student)
    "counterfactual": dict(wise_ft_alphas=[], **_SMALL),
    "group_dro": _SMALL,
    "jtt": dict(jtt_upweight=3, **_SMALL),
    "reweight": _SMALL,  # by group, reweighting the loss (the default)
    "subg": _SMALL,
}
# (method, family): the error that refuses the family, before any training
UNSUPPORTED = {
    ("masktune", "hf_resnet"): r"gives a 1x1 map for \(32, 32\) inputs",  # its last stage is 1x1 at 32x32
    ("masktune", "timm_resnet"): r"gives a 1x1 map for \(32, 32\) inputs",
    ("counterfactual", "hf_bert"): r"works on image inputs; the data has text inputs",  # counterfactual images
}
_OWN_CASES = [
    ("erm", "timm_wrapper_resnet", "small_digits", {}),
    ("erm", "hf_resnet", "small_digits", {}),  # the ERM run FairDropout's selection is compared with
    ("masktune", "timm_wrapper_resnet", "small_digits", dict(finetune_learning_rate=3e-4, mask_threshold_std=1.0)),
    ("masktune", "timm_wrapper_resnet", "small_digits", MT_SELECTING, "selecting"),
    ("masktune", "hf_bert", "text_data", dict(per_device_train_batch_size=16, max_length=32)),
    ("gradtune", "timm_wrapper_resnet", "small_digits", {}),
    ("dfr", "timm_wrapper_resnet", "small_digits", dict(dfr_balance="class", dfr_num_subsets=3)),
    ("fairdropout", "timm_wrapper_resnet", "small_digits", _FD),
    ("fairdropout", "hf_resnet", "small_digits", _FD_SELECTING),
    # from the FairDropout model above (erm_checkpoint: no second FairDropout training)
    ("fairdropout_dfr", "timm_wrapper_resnet", "small_digits",
     dict(_FD, erm_checkpoint=RunDir("fairdropout-timm_wrapper_resnet"))),
    ("fairdropout_dfr", "hf_resnet", "small_digits", _FD_SELECTING),
    # zero-shot -> vanilla -> distill -> WiSE-FT on a tiny CLIP
    ("counterfactual", "clip_zero_shot", "clip_data", dict(compare_vanilla=True, wise_ft_alphas=[0.0, 0.5, 1.0])),
    ("counterfactual", "clip_zero_shot", "clip_data", CF_SELECTING, "selecting"),
    # the baselines (tests/test_baselines.py): a larger step size shows q moving; resampling by class
    ("group_dro", "timm_wrapper_resnet", "small_digits", dict(group_dro_eta=0.1, group_dro_adjustment=1.0)),
    ("jtt", "timm_wrapper_resnet", "small_digits", dict(jtt_upweight=4)),
    ("reweight", "timm_wrapper_resnet", "small_digits", dict(balance_by="class", balance_mode="resample")),
    ("subg", "timm_wrapper_resnet", "small_digits", {}),
]
# FairDropout-DFR at BERT's `pooled` rather than its default `fc`: the export folds fc's new projection into the head,
# exact up to the float32 rounding of the folded weights, which the head's weights multiply; DFR's L1-logistic head
# on the near-constant features of this one-epoch tiny BERT reaches |W| = 3.8e3 (logits then 1.2e-4 apart)
_SMALL_BY_CASE = {("fairdropout_dfr", "hf_bert"): dict(fair_dropout_positions=["pooled"])}
CASES = _OWN_CASES + [
    (method, family, "text_data" if family in TEXT_FAMILIES else "tiny_digits",
     dict(_SMALL_BY_METHOD[method], **({"max_length": 32} if family in TEXT_FAMILIES else {}),
          **_SMALL_BY_CASE.get((method, family), {})))
    for method in METHODS for family in FAMILIES
    if (method, family) not in UNSUPPORTED and (method, family) not in {tuple(case[:2]) for case in _OWN_CASES}
]
IDS = [case_id(case) for case in CASES]
READ_ELSEWHERE = {case_id(case) for case in _OWN_CASES}
# the methods with a 2-process check (tests/scripts/method_distributed.py <method>); DFR and FairDropout-DFR have
# none of their own (their held-out split and sharded feature pass are the last-layer stages GradTune's check runs)
DISTRIBUTED_METHODS = [name for name, (script, _) in DISTRIBUTED_CHECKS.items() if script == "method_distributed.py"]


def expected(method: str, config: dict) -> dict:
    """What a run of `method` with `config` must report: its stages (in order), the stages it reports as results of
    their own (`results["stages"]`), the reference of its health check."""
    last_layer = ["heldout", "scores", "select", "last_layer"]
    fd_selects = config.get("fairdropout_selection") == "auto"
    if method == "erm":
        return dict(stages=["erm"], reported=set(), reference=None)
    if method == "masktune":  # one round; the last round's model is the run's own result
        select = ["select"] if config.get("masktune_selection") == "auto" else []
        return dict(stages=["erm", *select, "masks_1", "finetune_1", "selective"], reported={"ERM"}, reference="ERM")
    if method in ("gradtune", "dfr"):
        return dict(stages=["erm", *last_layer], reported={"ERM"}, reference="ERM")
    if method == "fairdropout":  # the model as given is the reference, saved as the stage `initial`
        if fd_selects:
            return dict(stages=["select_fair_dropout", "fairdropout"], reported={"ERM"}, reference="ERM (p_gen = 1)")
        return dict(stages=["initial", "fairdropout"], reported=set(), reference="the model as given")
    if method == "fairdropout_dfr":
        return dict(stages=["select_fair_dropout"] * fd_selects + ["fairdropout", *last_layer],
                    reported={"ERM", "FairDropout"} if fd_selects else {"FairDropout"}, reference="FairDropout")
    if method == "counterfactual":
        vanilla = config.get("compare_vanilla", False)
        reported = {"Zero-shot", "Vanilla FT"} if vanilla else {"Zero-shot"}
        if config.get("wise_ft_alphas", [0.5]):
            reported |= {"WiSE-CF", "WiSE-FT"} if vanilla else {"WiSE-CF"}
        select = ["select"] if config.get("counterfactual_selection") == "auto" else []
        return dict(stages=["zero_shot", *["vanilla"] * vanilla, *select, "distill", "wise_ft"], reported=reported,
                    reference="Vanilla FT" if vanilla else "Zero-shot")
    if method == "group_dro":  # (methods without an ERM stage: the model as given is the reference)
        return dict(stages=["initial", "group_dro"], reported=set(), reference="the model as given")
    if method == "jtt":  # the identification model is the report's ERM
        return dict(stages=["initial", "erm", "error_set", "retrain"], reported={"ERM"}, reference="ERM")
    if method == "reweight":
        return dict(stages=["initial", "train"], reported=set(), reference="the model as given")
    if method == "subg":
        return dict(stages=["initial", "subsample", "train"], reported=set(), reference="the model as given")
    raise AssertionError(f"{method}: a method of the registry without expectations here")


def as_saved(obj, tmp_path):
    """`obj` as results.json holds it (standard JSON: NaN and infinities are null)."""
    path = tmp_path / "as_saved.json"
    atomic_write_json(path, obj, strict=True)
    return json.loads(path.read_text())


def eval_inputs(trainer, dataset, rows: int | None = None) -> dict:
    """The model inputs of the first `rows` examples of `dataset` (default: all), as evaluation feeds them."""
    batch = trainer.eval_collator([dataset[i] for i in range(len(dataset) if rows is None else rows)])
    return {k: v for k, v in batch.items() if k in ("pixel_values", "input_ids", "attention_mask", "token_type_ids")}


def without_timing(obj):
    """`obj` (metrics, results) without what measures this run rather than the model: timings, and the training
    epoch (0 in a run that trained nothing)."""
    if isinstance(obj, dict):
        return {k: without_timing(v) for k, v in obj.items()
                if k != "epoch" and not any(t in k for t in ("runtime", "seconds", "per_second", "preparation_time"))}
    return obj


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def case_run(request, method_runs):
    """The case's run (pytest runs every test of one case before the next case); one that no other test file
    reads is dropped after its tests."""
    key = case_id(request.param)
    yield method_runs[key]
    if key not in READ_ELSEWHERE:
        method_runs.release(key)


# ----------------------------------------------------------------------------- the matrix
def test_every_method_of_the_registry_runs_on_every_family_or_says_why_not():
    covered = {tuple(case[:2]) for case in CASES}
    for method in METHODS:
        for family in FAMILIES:
            assert ((method, family) in covered) != ((method, family) in UNSUPPORTED), (method, family)
    assert len(set(IDS)) == len(IDS)
    assert all(expected(case[0], case[3]) for case in CASES)


@pytest.mark.parametrize("method, family", list(UNSUPPORTED), ids=[f"{m}-{f}" for m, f in UNSUPPORTED])
def test_an_unsupported_family_is_refused_before_training(method, family, small_digits, text_data, tokenizer,
                                                           tmp_path):
    from hf_robust.data import DataValidationError
    from hf_robust.models.adapter import UnsupportedModelError

    text = family in TEXT_FAMILIES
    with pytest.raises((UnsupportedModelError, DataValidationError), match=UNSUPPORTED[method, family]):
        make_trainer(method, family, text_data if text else small_digits, tmp_path / "out",
                     tokenizer=tokenizer if text else None)
    assert not (tmp_path / "out" / "stages").exists()


def test_run_writes_results_card_and_health(case_run, method_runs, tmp_path):
    from huggingface_hub import ModelCard

    run = case_run
    method, _, data_name, config = run.case[:4]
    trainer, out = run.trainer, run.output_dir
    want = expected(method, config)
    assert trainer.finished_stages == want["stages"]
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == trainer._name
    assert results["trainer"] == type(trainer).__name__ == METHODS[method].trainer.rsplit(":", 1)[1]
    assert results["finished_stages"] == want["stages"] and results["skipped_stages"] == []
    splits = [name for name in method_runs.data[data_name] if name != "train"]
    assert list(results["splits"]) == splits and results["splits"] == as_saved(trainer.eval_results, tmp_path)
    assert set(results["stages"]) == want["reported"]
    # the health check: a verdict on validation against the method's reference (ERM itself has none: it can only
    # be found collapsed)
    health = results["health"]
    assert health["reference"] == want["reference"] and health["split"] == "validation"
    assert health["status"] in (("ok", "collapsed") if want["reference"] is None else ("ok", "worse_than_erm",
                                                                                          "collapsed")), health
    assert health == as_saved(trainer.health, tmp_path)
    # the model card: the model-index holds every split's numbers, the card names the method and the health check
    card = ModelCard.load(out / "README.md")
    index = {(r["dataset"]["split"], m["type"]): m["value"]
             for r in card.data.to_dict()["model-index"][0]["results"] for m in r["metrics"]}
    for split, report in results["splits"].items():
        assert f"| {split} |" in card.text
        for metric in ("worst_group_accuracy", "accuracy", "mean_group_accuracy"):
            if report.get(metric) is not None:
                assert index[(split, metric)] == pytest.approx(round(report[metric], 4)), (split, metric)
    assert set(trainer._tag_names) <= set(card.data.tags) and "hf_robust" in card.data.tags
    assert f"Health check: `{health['status']}`" in card.text and "## How to use" in card.text
    umask = os.umask(0)
    os.umask(umask)
    for name in ("results.json", "README.md", "config.json"):  # the same permissions as any file written here
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    if trainer.args.save_plots:
        assert (out / "plots" / "group_accuracy.png").stat().st_size > 1000


def test_resumed_finished_run_recomputes_nothing(case_run, method_runs, monkeypatch, tmp_path):
    """A new trainer resumed on the finished folder skips every stage (nothing trained, no stage run), restores the
    final model bit for bit and reports the same results."""
    import transformers

    from hf_robust.core.trainer import RobustTrainer

    run = case_run
    resumed = method_runs.new_trainer(case_id(run.case), run.output_dir)

    def recompute(*args, **kwargs):
        raise AssertionError("a stage ran again on resume")

    monkeypatch.setattr(transformers.Trainer, "train", recompute)  # every training loop of a stage
    monkeypatch.setattr(RobustTrainer, "_mark_stage_finished", recompute)  # every stage that runs
    try:
        resumed.train(resume_from_checkpoint=True)
    finally:
        monkeypatch.undo()
        resumed.release_output_dir()  # (a run that is not saved keeps its folder until it is)
    stages = expected(run.case[0], run.case[3])["stages"]  # every stage of the run
    assert resumed.skipped_stages == resumed.finished_stages == stages
    final = resumed.accelerator.unwrap_model(resumed.model).state_dict()
    trained = run.trainer.accelerator.unwrap_model(run.trainer.model).state_dict()
    assert final.keys() == trained.keys() and all(torch.equal(final[k], v) for k, v in trained.items())
    assert without_timing(resumed.evaluate()) == without_timing(run.metrics)
    saved = json.loads((run.output_dir / "results.json").read_text())
    again = as_saved(resumed.results(), tmp_path)
    assert again["skipped_stages"] == stages
    again["skipped_stages"] = saved["skipped_stages"]
    assert without_timing(again) == without_timing(saved)


def test_saved_model_loads_with_the_cards_code(case_run, method_runs, monkeypatch):
    """The model card's "How to use" code, run next to the saved folder, loads a model with the trained model's
    logits (a FairDropout export, with the evaluation-time masks folded into the next layer: to 1e-5)."""
    run = case_run
    card = (run.output_dir / "README.md").read_text()
    code = card.split("## How to use", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert f'"{run.output_dir.name}"' in code
    monkeypatch.chdir(run.output_dir.parent)
    namespace = {}
    exec(code, namespace)
    loaded = namespace["model"].eval()
    trainer = run.trainer
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    split = "validation"
    inputs = eval_inputs(trainer, method_runs.data[run.case[2]][split], rows=None)
    with torch.no_grad():
        expected_logits = model(**inputs).logits
        logits = loaded(**inputs).logits
    assert logits.shape == expected_logits.shape
    exported = 'subfolder="exported"' in code
    torch.testing.assert_close(logits, expected_logits, rtol=0 if exported else 1e-5, atol=1e-5 if exported else 1e-6)


# ----------------------------------------------------------------------------- N processes
@pytest.mark.distributed
@pytest.mark.parametrize("method", DISTRIBUTED_METHODS)
def test_two_processes_really_ran_and_agree(method, distributed_checks):
    """Each method's check ran as one process and as two, and the two processes ended with the same model and
    method outputs (the method's tests compare the two runs: tests/test_<method>.py, ERM's test_distributed.py)."""
    one, two = distributed_checks[method]
    assert (one["method"], two["method"]) == (method, method)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["ranks_agree"] and two["ranks_agree"]
