"""Counterfactual distillation: the CLIP zero-shot classifier, attention rollout against a per-image reference,
masks and refills, the loss against an independent computation, the frozen teacher (1 and 2 processes), the
stages and WiSE-FT, the main job, the cached digits teacher, bad inputs. What every method's run must do (stages,
report, resume, reload, N processes) is tested by tests/test_methods.py on the same runs."""

import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_model, make_trainer, method_config
from counterfactual_helpers import CLASS_NAMES, tiny_clip, tiny_clip_classifier
from datasets import DatasetDict
from torch import nn

from hf_robust.models.adapter import UnsupportedModelError, get_adapter
from hf_robust.models.clip import CLIPZeroShotClassifier, load_clip_zero_shot, zero_shot_weights
from hf_robust.methods.counterfactual.counterfactuals import draw_donors, make_counterfactuals, patch_masks, refill
from hf_robust.methods.counterfactual.embedding import image_embedding
from hf_robust.data import DataValidationError
from hf_robust.explain.rollout import gradient_weighted_rollout
from hf_robust.methods import CounterfactualDistillTrainer
from hf_robust.methods.counterfactual.trainer import TeacherMismatchError
from hf_robust.methods.counterfactual.wise_ft import interpolate_state_dicts, wise_ft


def config(tmp, **kwargs):
    # the paper's method (beta = 30, no selection of beta: conftest.METHOD_TEST_DEFAULTS) unless a test asks for it
    return method_config("counterfactual", tmp, **kwargs)


# ----------------------------------------------------------------------------- the CLIP zero-shot classifier
def test_zero_shot_logits_equal_clip_image_text_logits():
    """One template and one name per class: the head reproduces CLIPModel's own image-text logits."""
    clip, tokenizer, _ = tiny_clip(seed=3)
    names = ["zero", "five"]
    model = CLIPZeroShotClassifier.from_clip(clip, tokenizer, names, ["a photo of the digit {}."])
    x = torch.randn(4, 3, 32, 32)
    text = tokenizer([f"a photo of the digit {n}." for n in names], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = clip(pixel_values=x, **text).logits_per_image
        logits = model(pixel_values=x).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


def test_zero_shot_head_averages_normalised_prompts_then_renormalises():
    clip, tokenizer, _ = tiny_clip(seed=4)
    templates = ["a photo of the {}.", "the digit {}.", "a {}."]
    weights = zero_shot_weights(clip, tokenizer, CLASS_NAMES, templates)
    for row, names in zip(weights, CLASS_NAMES):
        texts = [t.format(n) for n in names for t in templates]
        with torch.no_grad():
            emb = clip.get_text_features(**tokenizer(texts, padding=True, return_tensors="pt")).pooler_output
        manual = torch.stack([e / e.norm() for e in emb]).mean(0)
        manual = manual / manual.norm() * clip.logit_scale.exp()
        torch.testing.assert_close(row, manual, rtol=1e-5, atol=1e-6)
    assert weights.norm(dim=1).sub(clip.logit_scale.exp()).abs().max() < 1e-4


def test_classifier_saves_loads_and_exposes_unnormalised_embedding(tmp_path):
    from transformers import AutoModelForImageClassification

    model, processor = tiny_clip_classifier()
    x = torch.randn(3, 3, 32, 32)
    model.save_pretrained(tmp_path / "clf")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "clf")
    assert type(loaded) is CLIPZeroShotClassifier and loaded.config.class_names == CLASS_NAMES
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, model(pixel_values=x).logits)
        f = model.image_embeds(x)
        # the head reads the L2-normalised embedding; f itself is not normalised
        torch.testing.assert_close(model(pixel_values=x).logits, model.classifier(f / f.norm(dim=-1, keepdim=True)))
    assert not torch.allclose(f.norm(dim=-1), torch.ones(3))


def test_load_clip_zero_shot_reads_a_local_checkpoint_like_the_hub_one(tmp_path):
    """The `openai/clip-vit-base-patch32` code path, on a local folder in the same layout."""
    clip, tokenizer, processor = tiny_clip(seed=5)
    for part in (clip, tokenizer, processor):
        part.save_pretrained(tmp_path)
    model, loaded_processor = load_clip_zero_shot(str(tmp_path), ["zero", "five"], "short")
    assert model.config._attn_implementation == "eager" and loaded_processor.crop_size["height"] == 32
    torch.testing.assert_close(model.classifier.weight, zero_shot_weights(clip, tokenizer, ["zero", "five"], "short"))
    adapter = get_adapter(model)
    assert adapter.family == "clip_zero_shot" and adapter.cam_method == "attention_rollout"
    assert adapter.patch_grid == (4, 4) and adapter.classifier is model.classifier
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(image_embedding(adapter, {"pixel_values": x}), model.image_embeds(x))


# ----------------------------------------------------------------------------- attention rollout
def reference_rollout(model, pixel_values, labels):
    """Straightforward Chefer rollout: one image at a time, retain_grad on the attention maps, loops over heads."""
    maps = []
    model.eval()
    for image, label in zip(pixel_values, labels):
        outputs = model(pixel_values=image[None], output_attentions=True)
        for attention in outputs.attentions:
            attention.retain_grad()
        model.zero_grad()
        outputs.logits[0, label].backward()
        tokens = outputs.attentions[0].shape[-1]
        relevance = np.eye(tokens)
        for attention in outputs.attentions:
            a, g = attention[0].detach().numpy(), attention.grad[0].numpy()
            heads = [np.maximum(g[h] * a[h], 0) for h in range(a.shape[0])]
            relevance = relevance + (sum(heads) / len(heads)) @ relevance
        row = relevance[0, 1:]
        maps.append(row / row.max())
    return np.stack(maps)


@pytest.mark.parametrize("family", ["clip_zero_shot", "hf_vit"])
def test_batched_rollout_matches_per_image_reference(family):
    model, _ = make_model(family, seed=2)
    get_adapter(model).enable_attention_maps()
    x = torch.randn(5, 3, 32, 32)
    labels = torch.tensor([0, 1, 1, 0, 1])
    cam, logits = gradient_weighted_rollout(model, {"pixel_values": x}, labels)
    expected = reference_rollout(model, x, labels)
    assert cam.shape == (5, 4, 4)
    np.testing.assert_allclose(cam.flatten(1).numpy(), expected, rtol=1e-4, atol=1e-6)
    assert (cam.flatten(1).amax(1) - 1).abs().max() < 1e-4  # normalised by the per-image max


def test_rollout_leaves_parameter_gradients_untouched():
    model, _ = tiny_clip_classifier(seed=2)
    model.set_attn_implementation("eager")
    gradient_weighted_rollout(model, {"pixel_values": torch.randn(2, 3, 32, 32)}, torch.tensor([0, 1]))
    assert all(p.grad is None for p in model.parameters()) and model.training


def test_rollout_needs_attention_maps():
    model, _ = tiny_clip_classifier(seed=2)
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="eager"):
        gradient_weighted_rollout(model, {"pixel_values": torch.randn(2, 3, 32, 32)})


# ----------------------------------------------------------------------------- masks and refills
def distinct_images(n=6, size=32):
    return torch.arange(n * 3 * size * size, dtype=torch.float32).view(n, 3, size, size) / 1000 + 1


def pixel_mask(mask, size=32):
    cell = size // mask.shape[-1]
    return mask.repeat_interleave(cell, 1).repeat_interleave(cell, 2)


def test_masks_follow_the_cam_threshold_and_probability():
    cam = torch.rand(8, 4, 4)
    obj = patch_masks("object", cam=cam, threshold=0.3)
    assert torch.equal(obj, cam > 0.3) and torch.equal(patch_masks("context", cam=cam, threshold=0.3), cam <= 0.3)
    rand = patch_masks("random", grid=(16, 16), batch_size=64, probability=0.25, generator=torch.Generator().manual_seed(0))
    assert abs(rand.float().mean().item() - 0.25) < 0.02


def test_refill_none_zeroes_exactly_the_masked_pixels():
    x = distinct_images()
    mask = torch.rand(6, 4, 4, generator=torch.Generator().manual_seed(1)) < 0.5
    out = refill(x, mask)
    pm = pixel_mask(mask)[:, None].expand_as(x)
    assert (out[pm] == 0).all() and torch.equal(out[~pm], x[~pm])


def test_refill_single_takes_every_masked_patch_from_one_other_image_at_the_same_place():
    x = distinct_images()
    mask = torch.rand(6, 4, 4, generator=torch.Generator().manual_seed(2)) < 0.5
    mask[:, 0, 0] = True
    donors = draw_donors("single", 6, (4, 4), torch.Generator().manual_seed(3))
    out = refill(x, mask, donors)
    pm = pixel_mask(mask)
    for i in range(6):
        assert torch.equal(out[i][:, ~pm[i]], x[i][:, ~pm[i]])
        # by content alone: exactly one image of the batch supplies all the masked pixels, and not the image itself
        sources = [j for j in range(6) if torch.equal(out[i][:, pm[i]], x[j][:, pm[i]])]
        assert len(sources) == 1 and sources[0] != i and donors[i].unique().tolist() == sources


def test_refill_multi_draws_a_donor_per_patch_never_the_image_itself():
    x = distinct_images()
    mask = torch.ones(6, 4, 4, dtype=torch.bool)
    donors = draw_donors("multi", 6, (4, 4), torch.Generator().manual_seed(4))
    out = refill(x, mask, donors)
    for i in range(6):
        for r in range(4):
            for c in range(4):
                patch = (slice(None), slice(8 * r, 8 * r + 8), slice(8 * c, 8 * c + 8))
                sources = [j for j in range(6) if torch.equal(out[i][patch], x[j][patch])]
                assert sources == [donors[i, r, c].item()] and sources[0] != i
        assert len(donors[i].unique()) > 1  # several donors per image: multi, not single
    many = draw_donors("multi", 3, (32, 32), torch.Generator().manual_seed(5))
    assert (many != torch.arange(3).view(3, 1, 1)).all()
    assert set(many.unique().tolist()) == {0, 1, 2}


def test_counterfactuals_from_a_shared_pool_equal_the_whole_batch_slice():
    """What each process makes from the gathered global batch is the slice of the one-process result."""
    x = distinct_images(8)
    cam = torch.rand(8, 4, 4, generator=torch.Generator().manual_seed(6))
    for mask, fill in (("object", "single"), ("random", "multi"), ("context", "none")):
        whole, whole_mask, _ = make_counterfactuals(x, mask, fill, cam=cam, grid=(4, 4),
                                                    generator=torch.Generator().manual_seed(7))
        half, half_mask, _ = make_counterfactuals(x[4:], mask, fill, cam=cam[4:], grid=(4, 4), pool=x, offset=4,
                                                  generator=torch.Generator().manual_seed(7))
        assert torch.equal(half, whole[4:]) and torch.equal(half_mask, whole_mask[4:])


def test_refill_handles_grids_that_do_not_divide_the_image():
    x = distinct_images(3, size=30)
    mask = torch.zeros(3, 4, 4, dtype=torch.bool)
    mask[:, 0, 0] = True
    out = refill(x, mask)
    assert (out[:, :, :8, :8] == 0).all() and torch.equal(out[:, :, 8:, 8:], x[:, :, 8:, 8:])


# ----------------------------------------------------------------------------- the trainer
# the runs of tests/test_methods.py, trained once per session: zero-shot -> vanilla -> distill -> WiSE-FT on a tiny
# CLIP (clip_data), the same with the label-free selection of beta, a CNN student
RUN, SELECTING_RUN = "counterfactual-clip_zero_shot", "counterfactual-clip_zero_shot-selecting"


def _step_and_reference(trainer, model, data, mask, fill, teacher_embeds):
    """(the trainer's loss for 16 training examples, CE and MSE computed independently with `teacher_embeds`),
    after moving the student away from its teacher."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer._generator = lambda: torch.Generator().manual_seed(11)
    batch = trainer._prepare_inputs(trainer.train_collator([data["train"][i] for i in range(16)]))
    model.train()
    loss = trainer.compute_loss(model, batch)
    x, y = batch["pixel_values"], batch["labels"]
    with torch.no_grad():
        ce = F.cross_entropy(model(pixel_values=x).logits, y)
    cam, _ = gradient_weighted_rollout(model, {"pixel_values": x}, y)
    x_cf, _, _ = make_counterfactuals(x, mask, fill, cam=cam, threshold=0.3, probability=0.5, grid=(4, 4),
                                      generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        mse = ((model.image_embeds(x_cf) - teacher_embeds(x_cf)) ** 2).mean()
    return loss, ce, mse


@pytest.mark.parametrize("mask,fill", [("object", "single"), ("context", "multi"), ("random", "none")])
def test_loss_equals_ce_plus_beta_mse_computed_independently(tmp_path, clip_data, mask, fill):
    model, processor = tiny_clip_classifier(seed=0)
    teacher = copy.deepcopy(model).eval()  # the zero-shot model, kept apart from the trainer
    trainer = make_trainer("counterfactual", "clip_zero_shot", clip_data, tmp_path, model=model, processor=processor,
                           mask_strategy=mask, refill_strategy=fill, distill_weight=30.0)
    loss, ce, mse = _step_and_reference(trainer, model, clip_data, mask, fill, teacher.image_embeds)
    assert mse > 1e-4
    torch.testing.assert_close(loss.detach(), ce + 30.0 * mse, rtol=1e-5, atol=1e-6)
    assert trainer._metrics["ce_loss"][0].item() == pytest.approx(ce.item(), rel=1e-6)
    assert trainer._metrics["distill_loss"][0].item() == pytest.approx(mse.item(), rel=1e-5)


def test_teacher_runs_in_its_own_dtype_with_sdpa_and_the_loss_compares_in_float32(tmp_path, clip_data):
    model, processor = tiny_clip_classifier(seed=0)
    reference = copy.deepcopy(model).to(torch.bfloat16).eval()
    reference.set_attn_implementation("sdpa")
    trainer = make_trainer("counterfactual", "clip_zero_shot", clip_data, tmp_path, model=model, processor=processor,
                           teacher_dtype="bfloat16")
    teacher = trainer.teacher
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    # the student keeps eager attention for its attention maps; the teacher needs none and runs SDPA
    assert model.config._attn_implementation == "eager" and teacher.config._attn_implementation == "sdpa"
    loss, ce, mse = _step_and_reference(trainer, model, clip_data, "object", "single",
                                        lambda x: reference.image_embeds(x.to(torch.bfloat16)).float())
    assert mse > 1e-4
    torch.testing.assert_close(loss.detach(), ce + 30.0 * mse, rtol=1e-5, atol=1e-6)
    loss.backward()  # the teacher's embedding is an ordinary tensor the loss may keep for its backward
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_is_bit_identical_after_training_and_frozen(method_runs):
    run = method_runs[RUN]  # compare_vanilla=True, wise_ft_alphas=[0.0, 0.5, 1.0]
    trainer, teacher_before, student_before = run.trainer, run.initial_state["teacher"], run.initial_state["model"]
    after = trainer.teacher.state_dict()
    assert after.keys() == teacher_before.keys()
    assert all(torch.equal(after[k], v) for k, v in teacher_before.items())
    assert not trainer.teacher.training and not any(p.requires_grad for p in trainer.teacher.parameters())
    assert all(p.grad is None for p in trainer.teacher.parameters())
    student = trainer.model.state_dict()
    assert any(not torch.equal(student[k], v) for k, v in student_before.items())  # the student did train
    assert trainer.teacher is not trainer.model


def test_ce_and_distillation_terms_are_logged_separately(method_runs):
    trainer = method_runs[RUN].trainer
    logs = [e for e in trainer.stage_log_history["distill"] if "loss" in e and "ce_loss" in e]
    assert logs and all({"ce_loss", "distill_loss", "masked_fraction"} <= set(e) for e in logs)
    assert any(e["distill_loss"] > 0 for e in logs)
    # per logged step (logging_steps=1): loss = ce + beta * distill
    for e in logs:
        assert e["loss"] == pytest.approx(e["ce_loss"] + 30.0 * e["distill_loss"], rel=1e-4, abs=1e-5)
    vanilla = [e for e in trainer.stage_log_history["vanilla"] if "loss" in e]
    assert vanilla and not any("distill_loss" in e for e in vanilla)


def test_results_and_wise_ft_endpoints(method_runs):
    """(Its stages, zero_shot -> vanilla -> distill -> wise_ft, and the ones it reports, "Zero-shot", "Vanilla FT",
    "WiSE-FT", "WiSE-CF": test_methods.py.)"""
    tmp = method_runs[RUN].output_dir
    results = json.loads((Path(tmp) / "results.json").read_text())
    sweep = results["wise_ft"]["sweep"]
    for split in ("validation", "test_biased"):
        # alpha 0 is the zero-shot model, alpha 1 the fine-tuned one: the same evaluations
        assert sweep["vanilla"]["0.0"][split]["accuracy"] == results["stages"]["Zero-shot"][split]["accuracy"]
        assert sweep["counterfactual"]["0.0"][split]["accuracy"] == results["stages"]["Zero-shot"][split]["accuracy"]
        assert sweep["vanilla"]["1.0"][split]["accuracy"] == results["stages"]["Vanilla FT"][split]["accuracy"]
        assert sweep["counterfactual"]["1.0"][split]["accuracy"] == results["splits"][split]["accuracy"]
    assert results["counterfactual"]["cam_method"] == "attention_rollout"
    assert (Path(tmp) / "plots" / "counterfactuals.png").stat().st_size > 10_000
    assert "counterfactual-distillation" in (Path(tmp) / "README.md").read_text()


# ----------------------------------------------------------------------------- label-free selection of beta
def selecting_trainer(tmp, data, **kwargs):
    """A tiny run that chooses beta (test_methods.CF_SELECTING: model seed 1, 2 steps per fine-tuning, vanilla FT
    among the candidates, no WiSE-FT), as the run SELECTING_RUN."""
    from test_methods import CF_SELECTING

    return make_trainer("counterfactual", "clip_zero_shot", data, tmp, **{**CF_SELECTING, **kwargs})


def saved_state(trainer, folder) -> dict:
    model = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model))
    trainer.load_model_state(Path(folder), model=model)
    return model.state_dict()


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def beta_of_logged_steps(history) -> list[float]:
    """beta = (loss - ce) / distill of every logged distillation step."""
    return [(e["loss"] - e["ce_loss"]) / e["distill_loss"] for e in history if "ce_loss" in e and e["distill_loss"] > 0]


def test_selection_of_beta_keeps_the_best_worst_class_candidate(method_runs, clip_data):
    """(Its stages, zero_shot -> vanilla -> select -> distill -> wise_ft: test_methods.py.)"""
    run = method_runs[SELECTING_RUN]
    trainer, tmp = run.trainer, run.output_dir
    selection = trainer.selection
    records = selection["candidates"]
    assert [r["knobs"] for r in records] == [{"distill_weight": 0.0}, {"distill_weight": 30.0}, {"distill_weight": 10.0}]
    select = trainer.stage_dir("select")
    # candidate 0 is the vanilla fine-tuning itself, not retrained; the others are distillations with their beta
    assert same_weights(saved_state(trainer, trainer.candidate_folder(select, 0)), saved_state(trainer, trainer.stage_dir("vanilla")))
    assert "candidate_0" not in trainer.stage_log_history
    for i, beta in ((1, 30.0), (2, 10.0)):
        betas = beta_of_logged_steps(trainer.stage_log_history[f"candidate_{i}"])
        assert betas and all(b == pytest.approx(beta, rel=1e-3) for b in betas)
    # every record is the candidate's own validation score (labels only), and the best one is chosen
    val = clip_data["validation"]
    labels = np.asarray(val["label"])
    for i, record in enumerate(records):
        model = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model)).eval()
        trainer.load_model_state(trainer.candidate_folder(select, i), model=model)
        batch = trainer.eval_collator([val[j] for j in range(len(val))])
        with torch.no_grad():
            pred = model(pixel_values=batch["pixel_values"]).logits.argmax(-1).numpy()
        worst = min((pred[labels == c] == c).mean() for c in (0, 1))
        assert record["validation"]["worst_class_accuracy"] == pytest.approx(worst)
    scores = [(r["validation"]["worst_class_accuracy"], r["validation"]["accuracy"], -i) for i, r in enumerate(records)]
    assert selection["chosen"] == max(range(3), key=lambda i: scores[i])
    # the final model (and the distill stage's output) is the chosen candidate; beta is the chosen one's
    chosen = trainer.candidate_folder(select, selection["chosen"])
    final = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert same_weights(final, saved_state(trainer, chosen))
    assert same_weights(saved_state(trainer, trainer.stage_dir("distill")), saved_state(trainer, chosen))
    results = json.loads((Path(tmp) / "results.json").read_text())
    beta = records[selection["chosen"]]["knobs"]["distill_weight"]
    assert results["selection"]["chosen"] == selection["chosen"]
    assert results["selection"]["chosen_knobs"] == {"distill_weight": beta}
    assert results["selection"]["method_helped"] == (beta != 0.0) and results["selection"]["note"]
    assert results["counterfactual"]["distill_weight"] == beta == trainer.distill_weight
    assert (Path(tmp) / "plots" / "selection.png").stat().st_size > 5_000


def test_vanilla_winning_the_selection_keeps_it_and_says_so(method_runs, caplog):
    import logging

    trainer = copy.copy(method_runs[SELECTING_RUN].trainer)  # the trained run's state, without changing it
    trainer.selection = {**trainer.selection, "chosen": 0}
    with caplog.at_level(logging.WARNING, logger="hf_robust"):
        trainer._apply_selection()
    assert trainer.distill_weight == 0.0
    assert any("Counterfactual distillation did not help on validation: vanilla fine-tuning (beta = 0)" in r.getMessage()
               and "of the 3 candidates" in r.getMessage() for r in caplog.records)
    results = trainer.results()["selection"]
    assert results["method_helped"] is False and "vanilla fine-tuned model was kept" in results["note"]


def test_setting_beta_skips_the_selection(tmp_path, clip_data):
    trainer = selecting_trainer(tmp_path, clip_data, distill_weight=10.0, compare_vanilla=False)
    trainer.train()
    assert trainer.finished_stages == ["zero_shot", "distill", "wise_ft"] and trainer.selection is None
    betas = beta_of_logged_steps(trainer.stage_log_history["distill"])
    assert betas and all(b == pytest.approx(10.0, rel=1e-3) for b in betas)
    results = trainer.results()
    assert results["counterfactual"]["distill_weight"] == 10.0 and "selection" not in results
    # without it and with the selection off: the paper's beta = 30, no selection either
    off = selecting_trainer(tmp_path / "off", clip_data, counterfactual_selection="off")
    assert off.distill_weight == 30.0 and "select" not in [s.name for s in off.stages()]


def test_selection_resumes_candidate_by_candidate(method_runs, clip_data, tmp_path):
    import shutil

    run = method_runs[SELECTING_RUN]
    trainer, tmp = run.trainer, run.output_dir
    out = tmp_path / "run"
    shutil.copytree(tmp, out)
    stages = out / "stages"
    (stages / "select" / "candidate_2" / "candidate.json").unlink()  # as if interrupted during the last candidate
    for name in ("select", "distill", "wise_ft"):
        (stages / name / "stage.json").unlink()
    resumed = selecting_trainer(out, clip_data)
    trained = []
    original = resumed.train_stage

    def spy(stage_dir, *args, **kwargs):
        trained.append(Path(stage_dir).name)
        return original(stage_dir, *args, **kwargs)

    resumed.train_stage = spy
    resumed.train(resume_from_checkpoint=True)
    assert trained == ["candidate_2"]
    assert resumed.skipped_stages == ["zero_shot", "vanilla"]
    assert resumed.selection["chosen"] == trainer.selection["chosen"]
    for mine, theirs in zip(resumed.selection["candidates"], trainer.selection["candidates"]):
        assert mine["knobs"] == theirs["knobs"] and mine["validation"] == theirs["validation"]
    assert resumed.distill_weight == trainer.distill_weight
    # a resume with every stage finished restores the chosen beta from the saved selection
    again = selecting_trainer(out, clip_data)
    again.train(resume_from_checkpoint=True)
    assert "select" in again.skipped_stages and again.selection["chosen"] == trainer.selection["chosen"]
    assert again.distill_weight == trainer.distill_weight


def test_selection_of_beta_never_reads_group_labels(method_runs, clip_data, tmp_path):
    blind = DatasetDict({**clip_data, "validation": clip_data["validation"].map(lambda row: {"group": -1})})
    trainer = selecting_trainer(tmp_path, blind)
    trainer.train()
    reference = method_runs[SELECTING_RUN].trainer.selection
    assert trainer.selection["chosen"] == reference["chosen"]
    for mine, theirs in zip(trainer.selection["candidates"], reference["candidates"]):
        assert mine["knobs"] == theirs["knobs"] and mine["validation"] == theirs["validation"]


def test_wise_ft_endpoints_are_the_two_models_and_the_middle_their_mean():
    zero_shot, _ = tiny_clip_classifier(seed=0)
    tuned, _ = tiny_clip_classifier(seed=1)
    for alpha, expected in ((0.0, zero_shot), (1.0, tuned)):
        mixed = wise_ft(zero_shot, tuned, alpha).state_dict()
        assert all(torch.equal(mixed[k], v) for k, v in expected.state_dict().items())
    half = wise_ft(zero_shot, tuned, 0.5).state_dict()
    key = "classifier.weight"
    torch.testing.assert_close(half[key], (zero_shot.state_dict()[key] + tuned.state_dict()[key]) / 2)
    assert tuned.state_dict()[key].data_ptr() != half[key].data_ptr()  # a new model, the inputs untouched
    with pytest.raises(ValueError, match="alpha"):
        wise_ft(zero_shot, tuned, 1.5)
    other, _ = tiny_clip_classifier(seed=0, projection_dim=8)
    with pytest.raises(ValueError, match="share an architecture"):
        interpolate_state_dicts(zero_shot.state_dict(), other.state_dict(), 0.5)


def test_cnn_student_uses_xgradcam_on_its_cam_grid(method_runs):
    """The timm_wrapper_resnet run of test_methods.py (32 training examples, wise_ft_alphas=[])."""
    trainer = method_runs["counterfactual-timm_wrapper_resnet"].trainer
    assert trainer.adapter.cam_method == "xgradcam"
    logs = [e for e in trainer.state.log_history if "distill_loss" in e]
    assert logs and all(np.isfinite(e["loss"]) for e in logs)
    assert trainer._patch_grid(None) == (4, 4)  # the CAM layer's 4x4 map at 32x32 (output_stride 8)


# ----------------------------------------------------------------------------- bad inputs
def test_teacher_with_another_embedding_size_is_refused_before_training(tmp_path, clip_data):
    teacher, _ = tiny_clip_classifier(seed=0, projection_dim=8)
    model, processor = tiny_clip_classifier(seed=0)
    with pytest.raises(TeacherMismatchError, match="8 dimensions.*16"):
        CounterfactualDistillTrainer(model, config(tmp_path), train_dataset=clip_data["train"],
                                     processing_class=processor, teacher=teacher)
    assert not (tmp_path / "stages").exists()


def test_teacher_that_cannot_read_the_inputs_is_refused(tmp_path, clip_data):
    teacher, _ = tiny_clip_classifier(seed=0, image_size=64)
    model, processor = tiny_clip_classifier(seed=0)
    with pytest.raises(TeacherMismatchError, match="cannot read"):
        CounterfactualDistillTrainer(model, config(tmp_path), train_dataset=clip_data["train"],
                                     processing_class=processor, teacher=teacher)


def test_non_image_data_and_non_classifiers_are_refused(tmp_path, text_data, clip_data):
    model, processor = tiny_clip_classifier(seed=0)
    with pytest.raises(DataValidationError, match="text inputs"):
        CounterfactualDistillTrainer(model, config(tmp_path), train_dataset=text_data["train"],
                                     processing_class=processor)
    # (a BERT on text: test_methods.py, test_an_unsupported_family_is_refused_before_training)
    clip, _, processor = tiny_clip()
    with pytest.raises(UnsupportedModelError, match="from_clip"):
        CounterfactualDistillTrainer(clip, config(tmp_path), train_dataset=clip_data["train"], processing_class=processor)


@pytest.mark.parametrize("bad", [dict(mask_strategy="patch"), dict(refill_strategy="all"), dict(cam_threshold=1.5),
                                 dict(donor_pool="nearby"), dict(distill_weight=-1.0), dict(wise_ft_alphas=[2.0]),
                                 dict(teacher_dtype="int8"), dict(counterfactual_selection="yes"),
                                 dict(selection_distill_weights=[]), dict(selection_distill_weights=[30.0, 0.0])])
def test_bad_settings_are_refused(tmp_path, bad):
    with pytest.raises(ValueError):
        config(tmp_path, **bad)


# ----------------------------------------------------------------------------- main job and the cached teacher
def test_main_job_runs_the_method_with_a_local_clip(tmp_path, digits):
    clip, tokenizer, processor = tiny_clip(seed=0)
    for part in (clip, tokenizer, processor):
        part.save_pretrained(tmp_path / "clip")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import train

    results = train.main([
        "--method", "counterfactual", "--model", str(tmp_path / "clip"), "--output_dir", str(tmp_path / "run"),
        "--max_train_samples", "64", "--max_eval_samples", "32", "--num_train_epochs", "1", "--save_strategy", "no",
        "--per_device_train_batch_size", "32", "--disable_tqdm", "true", "--use_cpu", "true",
        "--wise_ft_alphas", "0.5",
    ])
    assert results["trainer"] == "CounterfactualDistillTrainer"
    assert {"Zero-shot", "Vanilla FT", "WiSE-FT"} <= set(results["stages"])  # compare_vanilla is the job's default
    # beta is chosen on validation by default, vanilla FT (beta = 0) among the candidates
    assert [c["knobs"]["distill_weight"] for c in results["selection"]["candidates"]] == [0.0, 30.0, 10.0]
    assert results["counterfactual"]["distill_weight"] == results["selection"]["chosen_knobs"]["distill_weight"]
    assert (tmp_path / "run" / "plots" / "selection.png").exists()
    fixed = train.parse_args(["--method", "counterfactual", "--distill_weight", "30"])[1]
    assert fixed.distill_weight == 30.0 and not fixed.selects_distill_weight  # a set beta: no selection
    assert (tmp_path / "run" / "plots" / "counterfactuals.png").exists()
    # the method's defaults replace the dataset's training recipe (waterbirds: SGD 1e-3 with augmentation for ERM)
    script, args = train.parse_args(["--method", "counterfactual", "--dataset", "waterbirds"])
    assert script.model == "openai/clip-vit-base-patch32" and args.optim == "adamw_torch"
    assert (args.learning_rate, args.weight_decay, args.max_grad_norm, args.train_augmentation) == (3e-5, 0.1, 1.0, "none")
    assert train.parse_args(["--method", "counterfactual"])[0].model == "digits-clip"  # the embedded demo


def test_digits_teacher_is_trained_once_and_cached(tmp_path, monkeypatch):
    from hf_robust import digits_clip

    calls = []

    def fake_pretrain(settings=None, log_every=0):
        calls.append(1)
        return tiny_clip(seed=0)

    monkeypatch.setattr(digits_clip, "pretrain_digits_clip", fake_pretrain)
    first = digits_clip.digits_clip_path(tmp_path)
    second = digits_clip.digits_clip_path(tmp_path)
    assert first == second and len(calls) == 1
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json"} <= set(os.listdir(first))
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [first.name]  # no half-written folder left
    umask = os.umask(0)
    os.umask(umask)
    assert first.stat().st_mode & 0o777 == 0o777 & ~umask  # readable by others as any folder (not mkdtemp's 0700)
    model, _ = digits_clip.load_digits_clip(["digit 0-4", "digit 5-9"], cache_dir=tmp_path)
    assert model.config.class_names == CLASS_NAMES and model.config.id2label == {0: "digit 0-4", 1: "digit 5-9"}
    # the key covers what the teacher learns from (here its class words): other words, another teacher
    monkeypatch.setattr(digits_clip, "DIGIT_WORDS", [*digits_clip.DIGIT_WORDS[:-1], "nein"])
    assert digits_clip.digits_clip_path(tmp_path) != first and len(calls) == 2


# ----------------------------------------------------------------------------- two processes
# tests/scripts/method_distributed.py counterfactual (both runs really ran, every process holding the same student:
# test_methods.py)
@pytest.mark.distributed
def test_teacher_stays_unwrapped_and_frozen_under_two_processes(distributed_checks):
    one, two = distributed_checks["counterfactual"]
    assert two["student_wrapper"] == "DistributedDataParallel"  # the student is synchronised ...
    for run in (one, two):  # ... the teacher never: not wrapped, eval mode, no gradients, unchanged
        assert run["teacher_type"] == "CLIPZeroShotClassifier"
        assert run["teacher_unchanged"] and not run["teacher_training"]
        assert not run["teacher_requires_grad"] and not run["teacher_grads"]


@pytest.mark.distributed
def test_two_processes_land_within_tolerance_of_one(distributed_checks):
    """Stated tolerance: the same 32 examples per optimizer step (2 x 16) and, with the global donor pool, the same
    masks and donors, so per-step losses and final parameters agree to 1e-3 (float reductions differ) and the
    evaluation accuracies to within one example. Measured spread after the 8 AdamW steps (2-core AMD EPYC): parameters
    1.1e-5 between 1 and 2 processes, 9.0e-5 between 1-process runs that differ only in kernel path
    (ATEN_CPU_CAPABILITY default vs avx2); losses 1e-6 and 7.8e-5 (of ~16). The parameter tolerance is 11x the
    kernel-path spread, the tightest margin of the distributed comparisons: AdamW amplifies the rounding noise of
    small gradients, so a change of optimizer or run length here needs the spread measured again."""
    one, two = distributed_checks["counterfactual"]
    assert len(one["losses"]) == len(two["losses"]) == 8
    np.testing.assert_allclose(two["masked_fractions"], one["masked_fractions"], atol=1e-6)
    # random masks without refill are drawn for the global batch too (each process used to draw its rows alone)
    assert np.asarray(one["random_none_masks"]).shape[0] == 8
    assert two["random_none_masks"] == one["random_none_masks"]
    for key in ("losses", "ce_losses", "distill_losses"):
        np.testing.assert_allclose(two[key], one[key], atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(np.asarray(two["params"]), np.asarray(one["params"]), atol=1e-3)
    assert abs(two["eval"]["eval_validation_accuracy"] - one["eval"]["eval_validation_accuracy"]) <= 1 / 101 + 1e-9
    assert abs(two["wise_ft"] - one["wise_ft"]) <= 1 / 101 + 1e-9


def test_digits_teacher_pretraining_runs_contrastively_on_unbiased_digits(digits, caplog):
    """The real pre-training loop, shrunk to a few steps (its full run is measured by the benchmark): the contrastive
    loss over the ten digit prompts goes down, and the prompts are single word tokens."""
    import logging
    import math

    from transformers import CLIPModel

    from hf_robust.models.digits_clip import DIGIT_WORDS, pretrain_digits_clip

    settings = dict(vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=1, heads=2, projection_dim=16,
                    train_copies=1, epochs=3, batch_size=256)
    with caplog.at_level(logging.WARNING, logger="hf_robust.models.digits_clip"):
        model, tokenizer, processor = pretrain_digits_clip(settings, log_every=1)
    losses = [float(r.getMessage().rsplit(" ", 1)[1]) for r in caplog.records if "pre-training step" in r.getMessage()]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses) and np.mean(losses[-3:]) < losses[0] - 0.5
    assert isinstance(model, CLIPModel) and not model.training
    assert all(len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1 for word in DIGIT_WORDS)
    assert processor.crop_size == {"height": 32, "width": 32}


def test_wise_ft_of_lora_models_interpolates_the_merged_weights():
    """lerp'ing LoRA's A and B apart is not the mix of the weights: wise_ft merges copies first."""
    from peft import LoraConfig, get_peft_model

    from hf_robust import wise_ft
    from hf_robust.methods.counterfactual.wise_ft import interpolate_state_dicts

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    config = LoraConfig(target_modules=["0"], r=2, init_lora_weights=False)
    zero_shot = get_peft_model(copy.deepcopy(base), config)
    tuned = get_peft_model(copy.deepcopy(base), config)  # another random A, B: as if trained
    merged_zs, merged_ft = copy.deepcopy(zero_shot).merge_and_unload(), copy.deepcopy(tuned).merge_and_unload()
    mixed = wise_ft(zero_shot, tuned, 0.5)
    expected = 0.5 * merged_zs[0].weight + 0.5 * merged_ft[0].weight
    torch.testing.assert_close(mixed[0].weight, expected)
    with pytest.raises(ValueError, match="interpolate A and B separately"):
        interpolate_state_dicts(zero_shot.state_dict(), tuned.state_dict(), 0.5)


def test_trainer_without_args_uses_the_default_config(tmp_path, clip_data, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default output folder
    model, processor = tiny_clip_classifier(seed=0)
    trainer = CounterfactualDistillTrainer(model, train_dataset=clip_data["train"].select(range(8)),
                                           processing_class=processor)
    assert trainer.args.mask_strategy == "object" and trainer.args.distill_weight is None
    # beta is chosen on validation by default; until then (and with the selection off) it is the paper's 30
    assert trainer.args.selects_distill_weight and trainer.distill_weight == 30.0
    assert "select" in [s.name for s in trainer.stages()]


def test_zero_shot_head_does_not_depend_on_the_tokenizer_padding_side():
    """CLIP's text tower pools at the first end-of-text token (its pad token) and uses absolute positions."""
    clip, tokenizer, _ = tiny_clip()
    right = zero_shot_weights(clip, tokenizer, CLASS_NAMES, templates=["a photo of {}.", "{}"])
    tokenizer.padding_side = "left"
    left = zero_shot_weights(clip, tokenizer, CLASS_NAMES, templates=["a photo of {}.", "{}"])
    torch.testing.assert_close(left, right)
