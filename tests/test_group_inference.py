"""Group inference (hf_robust.inference): JTT's error set against the model's mistakes, precision / recall per group
against a hand computation, the gradient-norm rule against GradTune's own selection, the report in results.json,
the card and the plot of a tiny run (images and text), resume, `group_inference="off"`, and 2 processes = 1."""

import json

import pytest
import torch
from conftest import make_model, make_trainer

from hf_robust.inference import group_inference as gi
from hf_robust.inference.rules import class_table, error_set, example_order, gradient_norm_set, group_table
from hf_robust.methods.gradtune.rule import select_by_gradient_norm
from hf_robust.reporting.modelcard import group_inference_section

SECTION = "## Which examples look like the minority?"


def explicit_mistakes(model, dataset, processor) -> list[int]:
    """example_idx of the examples whose argmax logit is not the label: one example at a time, through the image
    processor (no hf_robust code)."""
    model.eval()
    wrong = []
    with torch.no_grad():
        for row in dataset:
            pixels = processor(images=row["image"].convert("RGB"), return_tensors="pt")["pixel_values"]
            if model(pixel_values=pixels).logits.argmax(-1).item() != row["label"]:
                wrong.append(row["example_idx"])
    return sorted(wrong)


# ----------------------------------------------------------------------------- the rules, on tensors
def test_error_set_is_argmax_not_label():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5], [0.2, 0.1]])
    labels = torch.tensor([0, 0, 1, 0])
    assert error_set(logits, labels).tolist() == [False, True, True, False]
    with pytest.raises(ValueError, match="logits"):
        error_set(logits[0], labels)


def test_precision_and_recall_per_group_by_hand():
    groups = torch.tensor([0, 0, 1, 1, 1, 2])
    in_set = torch.tensor([True, False, True, True, False, False])
    table = group_table(in_set, groups, ["a", "b", "c"])
    # |S| = 3; a: 1 of 2 in S; b: 2 of 3; c: 0 of 1
    assert table == {
        "a": {"count": 2, "in_set": 1, "precision": 1 / 3, "recall": 1 / 2},
        "b": {"count": 3, "in_set": 2, "precision": 2 / 3, "recall": 2 / 3},
        "c": {"count": 1, "in_set": 0, "precision": 0.0, "recall": 0.0},
    }
    empty = group_table(torch.zeros(6, dtype=torch.bool), groups)
    assert empty["group_0"] == {"count": 2, "in_set": 0, "precision": None, "recall": 0.0}
    assert group_table(in_set, torch.tensor([0, -1, 1, 1, 1, 2])) is None  # a group unknown: no table
    assert class_table(in_set, torch.tensor([0, 1, 1, 0, 0, 1]), ["x", "y"]) == {
        "x": {"count": 3, "in_set": 2}, "y": {"count": 3, "in_set": 1}}


def test_gradient_norm_set_is_gradtunes_selection():
    norms = torch.rand(50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    chosen = gradient_norm_set(norms, size=20, top_k=None, seed=3)
    assert torch.nonzero(chosen).flatten().tolist() == select_by_gradient_norm(norms, 20, None, 3).tolist()
    assert chosen.sum() == 20 and chosen[torch.topk(norms, 16).indices].all()  # k = 0.8 M' largest norms


def test_examples_shown_by_score_classes_in_turn():
    in_set = torch.tensor([True, True, True, False, True, True])
    scores = torch.tensor([0.1, 0.9, 0.5, 5.0, 0.7, 0.7])
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    assert example_order(in_set, scores, labels, 4).tolist() == [1, 4, 2, 5]  # ties: the earlier position first
    assert example_order(in_set, scores, labels, 10).tolist() == [1, 4, 2, 5, 0]


# ----------------------------------------------------------------------------- on any model
def test_infer_groups_error_set_equals_the_models_mistakes(small_digits):
    model, processor = make_model("hf_resnet", seed=3)
    data = small_digits["train"].select(range(64))
    result = gi.infer_groups(model, data, rule="error_set", processing_class=processor, batch_size=16)
    assert result.example_idx.tolist() == explicit_mistakes(model, data, processor)
    assert result.report["size"] == len(result.example_idx) and result.report["examples_scored"] == 64
    assert 0 < result.report["size"] < 64  # a random model gets some right, some wrong: the check has teeth
    assert sum(row["in_set"] for row in result.report["per_group"].values()) == result.report["size"]
    shown = result.report["examples"]
    assert len(shown) == min(gi.EXAMPLES_PER_RULE, result.report["size"])
    assert all(e["example_idx"] in set(result.example_idx.tolist()) and e["label"] != e["prediction"] for e in shown)
    assert result.images.shape[0] == len(shown) and result.images.dtype == torch.uint8
    assert result.maps is None  # the tiny ResNet's CAM layer gives a 1x1 map at 32x32: nothing to show
    with pytest.raises(ValueError, match="rule="):
        gi.infer_groups(model, data, rule="errors", processing_class=processor)


def test_infer_groups_gradient_norm_with_cams(small_digits, tmp_path):
    model, processor = make_model("hf_vit", seed=0)
    data = small_digits["validation"]
    result = gi.infer_groups(model, data, rule="gradient_norm", processing_class=processor, finetune_set_size=20,
                             seed=1)
    assert result.report["size"] == 20 and result.report["settings"]["top_k_effective"] == 16
    scores = torch.tensor([e["score"] for e in result.report["examples"]])
    assert len(scores) == gi.EXAMPLES_PER_RULE and (scores > 0).all()
    assert result.maps is not None and result.maps.shape[0] == gi.EXAMPLES_PER_RULE  # the ViT's 4x4 patch grid
    assert float(result.maps.min()) >= 0 and float(result.maps.max()) <= 1
    assert result.plot(tmp_path / "examples.png").stat().st_size > 5_000


# ----------------------------------------------------------------------------- in a run
@pytest.fixture(scope="module")
def erm_run(small_digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("gi_erm") / "run"
    trainer = make_trainer("erm", "hf_vit", small_digits, out)
    trainer.train()
    trainer.save_model()
    return trainer, out


def test_a_run_reports_both_rules_in_results_card_and_plot(erm_run, small_digits):
    trainer, out = erm_run
    results = json.loads((out / "results.json").read_text())
    report = results["group_inference"]
    assert list(report) == ["error_set", "gradient_norm"]
    errors, norms = report["error_set"], report["gradient_norm"]
    assert errors["split"] == "train" and errors["examples_scored"] == len(small_digits["train"])
    assert norms["split"] == "validation" and norms["examples_scored"] == len(small_digits["validation"]) // 2
    assert norms["size"] == norms["examples_scored"]  # M' = 500 is capped by the 48 held-out examples
    for entry in (errors, norms):
        assert set(entry["per_group"]) <= set(small_digits["train"].features["group"].names)
        assert sum(r["in_set"] for r in entry["per_group"].values()) == entry["size"]
        assert len(entry["examples"]) == min(gi.EXAMPLES_PER_RULE, entry["size"])
    # the ERM model is the final model of an ERM run: the error set is its mistakes on the training split
    hook = next(h for h in trainer.run_hooks() if isinstance(h, gi.GroupInferenceHook))
    _, processor = make_model("hf_vit")
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert hook.tensors["error_set_idx"].tolist() == explicit_mistakes(model, small_digits["train"], processor)
    card = (out / "README.md").read_text()
    assert SECTION in card and "![inferred minority](plots/group_inference.png)" in card
    first = next(iter(errors["per_group"].items()))
    assert f"| error set | {first[0]} | {first[1]['count']} | {first[1]['in_set']} |" in card
    assert (out / "plots" / "group_inference.png").stat().st_size > 5_000
    assert (out / "stages" / gi.FOLDER / "report.json").is_file()


def test_a_resumed_run_reloads_the_report(erm_run, small_digits, monkeypatch):
    trainer, out = erm_run
    saved = json.loads((out / "results.json").read_text())["group_inference"]

    def refuse(self, settings):
        raise AssertionError("recomputed")

    monkeypatch.setattr(gi.GroupInferenceHook, "compute", refuse)
    resumed = make_trainer("erm", "hf_vit", small_digits, out)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.results()["group_inference"] == saved
    # a changed held-out fraction changes the report's settings: recomputed, not reused
    monkeypatch.undo()
    marker = out / "stages" / gi.FOLDER / "report.json"
    stale = json.loads(marker.read_text())
    stale["settings"]["heldout_fraction"] = 0.25
    stale["reports"]["error_set"]["size"] = -1
    marker.write_text(json.dumps(stale))
    again = make_trainer("erm", "hf_vit", small_digits, out)
    again.train(resume_from_checkpoint=True)
    assert again.results()["group_inference"] == saved


def test_off_leaves_no_report(small_digits, tmp_path):
    trainer = make_trainer("erm", "hf_resnet", small_digits, tmp_path / "off", group_inference="off")
    trainer.train()
    trainer.save_model()
    assert "group_inference" not in json.loads((tmp_path / "off" / "results.json").read_text())
    assert not (tmp_path / "off" / "plots" / "group_inference.png").exists()
    assert SECTION not in (tmp_path / "off" / "README.md").read_text()
    with pytest.raises(ValueError, match="group_inference='sometimes'"):
        make_trainer("erm", "hf_resnet", small_digits, tmp_path / "bad", group_inference="sometimes")


def test_the_report_changes_nothing_the_method_trains(small_digits, tmp_path):
    """MaskTune's stages after ERM (masks, a fine-tuning epoch) give the same model with the report on or off."""
    weights = {}
    for switch in ("on", "off"):
        trainer = make_trainer("masktune", "timm_wrapper_resnet", small_digits, tmp_path / switch,
                               finetune_learning_rate=3e-4, mask_threshold_std=1.0, group_inference=switch)
        trainer.train()
        weights[switch] = trainer.accelerator.unwrap_model(trainer.model).state_dict()
        assert ("group_inference" in trainer.results()) == (switch == "on")
    assert all(torch.equal(weights["on"][k], v) for k, v in weights["off"].items())


def test_a_model_the_rules_cannot_read_is_reported_as_skipped(small_digits, tmp_path, monkeypatch):
    from hf_robust.models.adapter import ModelAdapter, UnsupportedModelError

    def per_token(self, inputs):
        raise UnsupportedModelError("The classifier runs on every token")

    monkeypatch.setattr(ModelAdapter, "penultimate", per_token)
    trainer = make_trainer("erm", "hf_resnet", small_digits, tmp_path / "skip")
    trainer.train()  # the run itself goes on
    trainer.save_model()
    report = json.loads((tmp_path / "skip" / "results.json").read_text())["group_inference"]
    assert set(report) == {"error_set", "gradient_norm"}
    assert all("classifier runs on every token" in entry["skipped"] for entry in report.values())
    assert "not computed, the model does not allow it" in (tmp_path / "skip" / "README.md").read_text()


def test_gradtune_run_infers_its_own_finetuning_set(small_digits, tmp_path):
    trainer = make_trainer("gradtune", "hf_resnet", small_digits, tmp_path / "gt", finetune_set_size=20,
                           last_layer_epochs=5)
    trainer.train()
    hook = next(h for h in trainer.run_hooks() if isinstance(h, gi.GroupInferenceHook))
    gradtune_set = torch.sort(trainer.last_layer.finetune_sets[0]).values
    assert hook.tensors["gradient_norm_idx"].tolist() == gradtune_set.tolist()
    assert hook.reports["gradient_norm"]["size"] == 20 < hook.reports["gradient_norm"]["examples_scored"]


def test_text_run_shows_top_tokens(text_data, tokenizer, tmp_path):
    trainer = make_trainer("erm", "hf_bert", text_data, tmp_path / "text", tokenizer=tokenizer)
    trainer.train()
    trainer.save_model()
    report = json.loads((tmp_path / "text" / "results.json").read_text())["group_inference"]
    vocabulary = set(tokenizer.get_vocab())
    for entry in report.values():
        assert entry["examples"] and any(example["top_tokens"] for example in entry["examples"])
        for example in entry["examples"]:
            tokens = [t for t, _ in example["top_tokens"]]
            assert len(tokens) <= gi.TOP_TOKENS and set(tokens) <= vocabulary
            assert not {"[CLS]", "[SEP]", "[PAD]"} & set(tokens)
            scores = [s for _, s in example["top_tokens"]]
            assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)
    card = (tmp_path / "text" / "README.md").read_text()
    token = next(e["top_tokens"][0][0] for entry in report.values() for e in entry["examples"] if e["top_tokens"])
    assert SECTION in card and f"`{token}`" in card


def test_card_section_without_group_labels():
    report = {"error_set": {"split": "train", "part": "all", "examples_scored": 10, "size": 3, "fraction": 0.3,
                            "per_class": {"neg": {"count": 5, "in_set": 1}, "pos": {"count": 5, "in_set": 2}},
                            "examples": [{"label": "neg", "prediction": "pos", "group": None,
                                          "top_tokens": [["great", 0.5], ["movie", 0.1]]}]},
              "gradient_norm": {"skipped": "no eval split 'validation' to draw the held-out half from"}}
    section = group_inference_section(report, None)
    assert "no group labels" in section and "| error set | pos | 5 | 2 |" in section
    assert "`great`, `movie`" in section and "not computed, no eval split 'validation'" in section
    assert "precision" not in section.split("no group labels")[1].split("\n")[2]


# ----------------------------------------------------------------------------- N processes
@pytest.mark.distributed
def test_two_processes_infer_what_one_does(distributed_checks):
    """tests/scripts/group_inference_distributed.py, run as one process and under a 2-process launch (the shared
    launch of `distributed_checks`)."""
    outputs = dict(zip(("one", "two"), distributed_checks["group_inference"]))
    one, two = outputs["one"], outputs["two"]
    assert (one["world_size"], two["world_size"]) == (1, 2) and one["ranks_agree"] and two["ranks_agree"]
    assert one["sets"] == two["sets"] and one["sets"]["error_set_idx"]
    for world in (one, two):  # the inferred set is GradTune's fine-tuning set under any number of processes
        assert world["sets"]["gradient_norm_idx"] == world["gradtune_set"] and world["card_has_section"]
    strip = lambda r: {rule: {k: v for k, v in entry.items() if k != "examples"} for rule, entry in r.items()}  # noqa
    assert strip(one["report"]) == strip(two["report"])
    assert [e["example_idx"] for e in one["report"]["error_set"]["examples"]] == \
        [e["example_idx"] for e in two["report"]["error_set"]["examples"]]
