"""RobustTrainer: group-aware evaluation, reports, Hub push offline, stages and resume, peft, bad inputs. What every
method's run writes (results.json, model card, plots, files), its resume and its reload: tests/test_methods.py."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_model, make_trainer, method_config, quick_config

from hf_robust.data import DataValidationError
from hf_robust.resources import load_metric
from hf_robust.methods import HubPushError, RobustConfig, RobustTrainer, Stage


def config(tmp_path, **kwargs):
    return method_config("erm", tmp_path / "out", **kwargs)


def manual_predictions(trainer, dataset):
    """Predictions of the trainer's model, computed without the Trainer's evaluation loop."""
    model = trainer.model.eval()
    batch = trainer.eval_collator([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        return model(pixel_values=batch["pixel_values"]).logits.argmax(-1).numpy()


def test_erm_evaluates_every_split_by_worst_group(method_runs, small_digits):
    run = method_runs["erm-timm_wrapper_resnet"]  # the ERM run of test_methods.py: trained, evaluated, saved
    trainer, metrics = run.trainer, run.metrics
    for split in ("validation", "test_biased"):
        for key in ("accuracy", "worst_group_accuracy", "worst_class_accuracy", "mean_group_accuracy"):
            assert f"eval_{split}_{key}" in metrics
        data = small_digits[split]
        predictions = manual_predictions(trainer, data)
        labels, groups = np.asarray(data["label"]), np.asarray(data["group"])
        assert metrics[f"eval_{split}_accuracy"] == pytest.approx((predictions == labels).mean())
        per_group = [(predictions[groups == g] == labels[groups == g]).mean() for g in np.unique(groups)]
        assert metrics[f"eval_{split}_worst_group_accuracy"] == pytest.approx(min(per_group))
        for g in np.unique(groups):
            assert metrics[f"eval_{split}_group_{g}_count"] == (groups == g).sum()
    report = trainer.eval_results["validation"]
    assert set(report["groups"]) == set(small_digits["validation"].features["group"].names)
    assert sum(g["count"] for g in report["groups"].values()) == len(small_digits["validation"])


def test_evaluation_loss_is_the_mean_cross_entropy_of_the_split(tmp_path, small_digits):
    trainer = make_trainer("erm", "timm_wrapper_resnet", small_digits, tmp_path / "out",
                           per_device_eval_batch_size=7)  # an uneven last batch
    metrics = trainer.evaluate()
    data = small_digits["validation"]
    model = trainer.model.eval()
    batch = trainer.eval_collator([data[i] for i in range(len(data))])
    with torch.no_grad():
        logits = model(pixel_values=batch["pixel_values"]).logits
    expected = torch.nn.functional.cross_entropy(logits.double(), torch.as_tensor(data["label"])).item()
    assert metrics["eval_validation_loss"] == pytest.approx(expected, rel=1e-5)


def test_save_model_evaluates_a_model_trained_since_its_last_evaluation(tmp_path, small_digits):
    trainer = make_trainer("erm", "timm_wrapper_resnet", small_digits, tmp_path / "out", max_steps=1)
    trainer.evaluate()
    before = trainer.eval_results["validation"]["accuracy"]
    trainer.train()  # the evaluation above described the untrained model
    assert trainer.eval_results == {}
    trainer.save_model()  # no evaluate() in between: save_model runs it
    results = json.loads((Path(trainer.args.output_dir) / "results.json").read_text())
    assert set(results["splits"]) == {"validation", "test_biased"}
    predictions = manual_predictions(trainer, small_digits["validation"])
    accuracy = (predictions == np.asarray(small_digits["validation"]["label"])).mean()
    assert results["splits"]["validation"]["accuracy"] == pytest.approx(accuracy)
    assert isinstance(before, float)
    trainer.save_model(str(tmp_path / "final"))  # elsewhere: the card loads that folder
    assert 'from_pretrained("final")' in (tmp_path / "final" / "README.md").read_text()


def test_a_given_augmenting_collator_augments_training_only(tmp_path, small_digits):
    from hf_robust.data.preprocessing import GroupDataCollator, ImagePreprocessing

    model, processor = make_model("hf_resnet")
    collator = GroupDataCollator("image", ImagePreprocessing.from_image_processor(processor), augmentation="flip")
    trainer = RobustTrainer(model, config(tmp_path), train_dataset=small_digits["train"],
                            eval_dataset=small_digits["validation"], processing_class=processor, data_collator=collator)
    assert (trainer.eval_collator.augmentation, trainer.train_collator.augmentation) == ("none", "flip")
    rows = [small_digits["validation"][i] for i in range(8)]
    assert torch.equal(trainer.eval_collator(rows)["pixel_values"], trainer.eval_collator(rows)["pixel_values"])
    with pytest.raises(ValueError, match="augments with 'flip' but train_augmentation is 'crop_flip'"):
        RobustTrainer(model, config(tmp_path, train_augmentation="crop_flip"), train_dataset=small_digits["train"],
                      processing_class=processor, data_collator=collator)


def test_push_to_hub_offline_fails_clearly_after_saving(tmp_path, small_digits):
    trainer = make_trainer("erm", "timm_wrapper_resnet", small_digits, tmp_path / "out", push_to_hub=True,
                           hub_model_id="someone/robust-digits", max_steps=2)
    trainer.train()
    trainer.evaluate()
    with pytest.raises(HubPushError, match=r"someone/robust-digits.*saved in .*hf upload .* --exclude 'stages/\*' "):
        trainer.push_to_hub()
    out = Path(trainer.args.output_dir)
    for name in ("results.json", "README.md", "config.json", "model.safetensors"):
        assert (out / name).is_file(), name


class TwoStageToy(RobustTrainer):
    """ERM, then a per-example pass (logits of the training set); `fail_in` simulates a kill inside a stage."""

    calls: dict = {}

    def __init__(self, *args, fail_in=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fail_in = fail_in

    def stages(self):
        return [Stage("erm", self._erm, self.load_model_state), Stage("scores", self._scores, self._load_scores),
                Stage("finalize", self._finalize)]

    def _count(self, name):
        TwoStageToy.calls[name] = TwoStageToy.calls.get(name, 0) + 1

    def _erm(self, stage_dir, resume):
        self._count("erm")
        self._run_erm_stage(stage_dir, resume)

    def _scores(self, stage_dir, resume):
        self._count("scores")
        outputs = self.compute_per_example(
            self.train_dataset, lambda model, batch: {"logits": model(pixel_values=batch["pixel_values"]).logits},
            description="Scoring",
        )
        self.save_stage_tensors(stage_dir, outputs)
        self.scores = outputs

    def _load_scores(self, stage_dir):
        self.scores = self.load_stage_tensors(stage_dir)

    def _finalize(self, stage_dir, resume):
        self._count("finalize")
        if self.fail_in == "finalize":
            raise KeyboardInterrupt("killed")


def test_resume_skips_finished_stages(tmp_path, small_digits):
    TwoStageToy.calls = {}
    make = lambda **kw: TwoStageToy(  # noqa: E731
        make_model("timm_wrapper_resnet")[0], config(tmp_path), train_dataset=small_digits["train"],
        eval_dataset=small_digits["validation"], **kw,
    )
    first = make(fail_in="finalize")
    with pytest.raises(KeyboardInterrupt):
        first.train()
    stages = Path(first.args.output_dir) / "stages"
    assert (stages / "erm" / "stage.json").is_file() and (stages / "scores" / "stage.json").is_file()
    assert not (stages / "finalize" / "stage.json").exists()
    assert not (Path(first.args.output_dir) / "results.json").exists()

    resumed = make()  # a new process would build a fresh (random) model: the stage restores the ERM weights
    resumed.train(resume_from_checkpoint=True)
    assert TwoStageToy.calls == {"erm": 1, "scores": 1, "finalize": 2}
    assert resumed.skipped_stages == ["erm", "scores"]
    assert torch.equal(resumed.scores["logits"], first.scores["logits"])
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(resumed.model.eval()(pixel_values=x).logits, first.model.eval()(pixel_values=x).logits)
    # an uninterrupted run computes the same stage outputs
    TwoStageToy.calls = {}
    fresh = TwoStageToy(make_model("timm_wrapper_resnet")[0], config(tmp_path / "fresh"),
                        train_dataset=small_digits["train"], eval_dataset=small_digits["validation"])
    fresh.train()
    assert TwoStageToy.calls == {"erm": 1, "scores": 1, "finalize": 1}
    assert torch.allclose(fresh.scores["logits"], resumed.scores["logits"], atol=1e-5)
    # a fresh (not resumed) run into the same folder starts over
    TwoStageToy.calls = {}
    make().train()
    assert TwoStageToy.calls == {"erm": 1, "scores": 1, "finalize": 1}


def test_resume_with_other_settings_is_refused(tmp_path, small_digits):
    trainer = RobustTrainer(make_model("timm_wrapper_resnet")[0], config(tmp_path, max_steps=1),
                            train_dataset=small_digits["train"])
    trainer.train()
    other = RobustTrainer(make_model("timm_wrapper_resnet")[0], config(tmp_path, max_steps=1, seed=7),
                          train_dataset=small_digits["train"])
    with pytest.raises(ValueError, match="seed 0, but this run is 'ERM' with seed 7"):
        other.train(resume_from_checkpoint=True)
    # any setting the finished stage depends on: its outputs would be reused silently
    changed = RobustTrainer(make_model("timm_wrapper_resnet")[0],
                            config(tmp_path, max_steps=1, learning_rate=0.01, balanced_sampling="class"),
                            train_dataset=small_digits["train"])
    with pytest.raises(ValueError, match="computed with balanced_sampling='none', learning_rate=0.001, but this run "
                                         "has balanced_sampling='class', learning_rate=0.01"):
        changed.train(resume_from_checkpoint=True)
    # what changes no output (where logs go, the evaluation batch size) does not stop a resume
    same = RobustTrainer(make_model("timm_wrapper_resnet")[0],
                         config(tmp_path, max_steps=1, logging_steps=5, per_device_eval_batch_size=7),
                         train_dataset=small_digits["train"])
    same.train(resume_from_checkpoint=True)
    assert same.skipped_stages == ["erm"]
    with pytest.raises(ValueError, match="is not a checkpoint folder of this run's stages"):
        same.train(resume_from_checkpoint=str(tmp_path))


def test_compute_per_example_is_ordered_and_complete(tmp_path, small_digits):
    trainer = make_trainer("erm", "timm_wrapper_resnet", small_digits, tmp_path / "out", per_device_eval_batch_size=7)
    data = small_digits["validation"].shuffle(seed=3)  # rows out of example_idx order
    out = trainer.compute_per_example(
        data, lambda model, batch: {"label": batch["labels"], "tokens": batch["labels"][:, None].repeat(1, 3)}
    )
    order = np.argsort(np.asarray(data["example_idx"]))
    assert out["example_idx"].tolist() == np.asarray(data["example_idx"])[order].tolist()
    assert out["label"].tolist() == np.asarray(data["label"])[order].tolist()
    assert out["tokens"].shape == (len(data), 3)


class BatchRecorder(RobustTrainer):
    """Records the example indices of every training batch, with the epoch it belongs to."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.batches.append((round(self.state.epoch or 0, 6), inputs["example_idx"].tolist()))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def test_class_balanced_sampling(tmp_path, small_digits):
    trainer = make_trainer("erm", "timm_wrapper_resnet", small_digits, tmp_path / "out", balanced_sampling="class")
    sampler = trainer._get_train_sampler()
    labels = np.asarray(small_digits["train"]["label"])
    draws = [list(iter(sampler)) for _ in range(20)]
    drawn = np.concatenate([labels[d] for d in draws])
    assert abs(drawn.mean() - 0.5) < 0.03
    assert draws[0] != draws[1]  # a new draw every epoch ...
    sampler.set_epoch(1)
    assert list(iter(sampler)) == draws[1]  # ... that is a function of (seed, epoch) alone


def test_balanced_sampling_resumed_run_sees_the_same_batches(tmp_path, small_digits):
    """A run resumed after its first epoch draws the uninterrupted run's batches (transformers does not replay
    the finished epochs, so a sampler with one running generator would restart at epoch 0's draw)."""
    train = small_digits["train"].select(range(64))

    def run(output_dir, resume=None):
        trainer = BatchRecorder(
            make_model("timm_wrapper_resnet")[0],
            quick_config(RobustConfig, output_dir, num_train_epochs=2, per_device_train_batch_size=16,
                         balanced_sampling="class", save_strategy="epoch", logging_steps=100),
            train_dataset=train,
        )
        trainer.batches = []
        trainer.train(resume_from_checkpoint=resume)
        return trainer.batches

    full = run(tmp_path / "full")
    stage_dir = tmp_path / "full" / "stages" / "erm"
    checkpoints = sorted(stage_dir.glob("checkpoint-*"), key=lambda d: int(d.name.split("-")[1]))
    assert len(checkpoints) == 2
    # interrupted after epoch 1: only its checkpoint is left and the stage never finished
    import shutil

    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    cut_stage = tmp_path / "cut" / "stages" / "erm"
    for checkpoint in checkpoints[1:]:
        shutil.rmtree(cut_stage / checkpoint.name)
    (cut_stage / "stage.json").unlink()
    resumed = run(tmp_path / "cut", resume=True)
    per_epoch = len(full) // 2
    assert [b for _, b in resumed] == [b for _, b in full[per_epoch:]]
    assert full[0][1] != full[per_epoch][1]
    # an interrupted stage goes on only with the settings it started with (here: another global batch)
    shutil.rmtree(cut_stage / checkpoints[1].name)
    (cut_stage / "stage.json").unlink()
    other = BatchRecorder(make_model("timm_wrapper_resnet")[0],
                          quick_config(RobustConfig, tmp_path / "cut", num_train_epochs=2, per_device_train_batch_size=8,
                                       balanced_sampling="class", save_strategy="epoch"), train_dataset=train)
    with pytest.raises(ValueError, match=r"checkpoint-\d+ was computed with global_train_batch_size=16, but this run "
                                         r"has global_train_batch_size=8: its schedule and batches would change"):
        other.train(resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="balanced_sampling='groups': expected 'none', 'class' or 'group'"):
        config(tmp_path, balanced_sampling="groups")


@pytest.mark.parametrize("family", ["hf_bert", "hf_vit"])
def test_lora_models_train_and_evaluate(tmp_path, family, small_digits, text_data, tokenizer):
    from peft import LoraConfig, get_peft_model

    model, processor = make_model(family, vocab_size=tokenizer.vocab_size)
    if family == "hf_bert":
        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], r=4))
        data, processor = text_data, tokenizer
        evals = {"validation": data["validation"], "test": data["test"]}
    else:
        model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"], r=4))
        data = small_digits
        evals = {"validation": data["validation"]}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = RobustTrainer(model, config(tmp_path, learning_rate=5e-3), train_dataset=data["train"],
                            eval_dataset=evals, processing_class=processor)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    trainer.train()
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_validation_worst_group_accuracy"] <= 1.0
    assert any(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if n in lora_before)
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if n in frozen_before)


def test_bad_inputs_are_refused_before_training(tmp_path, small_digits, text_data):
    model, processor = make_model("timm_wrapper_resnet")
    no_idx = small_digits["train"].remove_columns("example_idx")
    with pytest.raises(DataValidationError, match=r"train_dataset lacks the column\(s\) \['example_idx'\]"):
        RobustTrainer(model, config(tmp_path), train_dataset=no_idx)
    three_classes = small_digits["train"].cast_column("label", small_digits["train"].features["label"].__class__(names=["a", "b", "c"]))
    three_classes = three_classes.map(lambda row: {"label": 2}, features=three_classes.features)
    with pytest.raises(DataValidationError, match=r"values \[2\] but the model has 2 labels"):
        RobustTrainer(model, config(tmp_path), train_dataset=three_classes)
    with pytest.raises(DataValidationError, match="The data has text inputs but TimmWrapperForImageClassification is a image model"):
        RobustTrainer(model, config(tmp_path), train_dataset=text_data["train"])
    with pytest.raises(Exception, match="no adapter for Sequential"):
        RobustTrainer(torch.nn.Sequential(torch.nn.Linear(2, 2)), config(tmp_path), train_dataset=small_digits["train"])

    class ImageOnly(RobustTrainer):
        _name = "ImageOnly"
        _input_kinds = ("image",)

    bert, _ = make_model("hf_bert")
    with pytest.raises(DataValidationError, match="ImageOnly.*works on image inputs; the data has text inputs"):
        ImageOnly(bert, config(tmp_path), train_dataset=text_data["train"])
    with pytest.raises(ValueError, match="remove_unused_columns=True would drop"):
        config(tmp_path, remove_unused_columns=True)


def test_metric_module_is_the_trainers_metric(tmp_path, small_digits):
    trainer = make_trainer("erm", "timm_wrapper_resnet", small_digits, tmp_path / "out")
    assert trainer.metric.name == load_metric().name == "worst_group_accuracy"


def test_results_file_is_standard_json(tmp_path):
    from hf_robust.core.files import atomic_write_json

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    atomic_write_json(tmp_path / "r.json", {"worst_group_accuracy": float("nan"), "x": [np.float32(0.5), np.inf]},
                      strict=True)
    assert json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse) == {
        "worst_group_accuracy": None, "x": [0.5, None]}
