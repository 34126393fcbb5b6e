"""MaskTune: batched XGrad-CAM against independent references, mask location and storage, the stages,
resume, determinism, text masking, selective classification, bad inputs. What every method's run must do (stages,
report, resume, reload, N processes) is tested by tests/test_methods.py on the same runs."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import IMAGE_FAMILIES, make_model, make_trainer, method_config
from torch import nn

from hf_robust.models.adapter import get_adapter
from hf_robust.explain.cam import threshold_masks, token_attributions, xgradcam
from hf_robust.data import DataValidationError
from hf_robust.methods.masktune.masks import MaskStore, cam_at_input_size, image_masks, pack_bits, token_masks, unpack_bits
from hf_robust.methods.masktune.selective import SelectiveClassifier, calibrate_thresholds, ensemble_response, selective_report
from hf_robust.methods import MaskTuneTrainer
from hf_robust.models.timm_wrap import maybe_wrap_timm


# ----------------------------------------------------------------------------- XGrad-CAM
def reference_xgradcam(model, adapter, pixel_values):
    """Straightforward per-image XGrad-CAM: one image at a time, full backward, retain_grad on the activation."""
    maps = []
    model.eval()
    for image in pixel_values:
        store = {}

        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            out.retain_grad()
            store["act"] = out

        handle = adapter.cam_layer.register_forward_hook(hook)
        logits = model(pixel_values=image[None]).logits
        handle.remove()
        model.zero_grad()
        logits[0, logits[0].argmax()].backward()
        act = adapter.activation_to_map(store["act"].detach())[0]
        grad = adapter.activation_to_map(store["act"].grad)[0]
        weights = np.array([(grad[c] * act[c]).sum().item() / (act[c].sum().item() + 1e-7) for c in range(act.shape[0])])
        cam = np.maximum((weights[:, None, None] * act.numpy()).sum(0), 0)
        maps.append(cam)
    return np.stack(maps)


@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_batched_xgradcam_matches_per_image_reference(family):
    model, _ = make_model(family)
    model = maybe_wrap_timm(model)
    adapter = get_adapter(model)
    x = torch.randn(5, 3, 32, 32)
    cam, logits = xgradcam(model, adapter, {"pixel_values": x})
    expected = reference_xgradcam(model, adapter, x)
    assert cam.shape == expected.shape
    np.testing.assert_allclose(cam.numpy(), expected, rtol=1e-3, atol=1e-5)
    assert torch.equal(logits.argmax(-1), model(pixel_values=x).logits.argmax(-1))


@pytest.mark.parametrize("family", ["timm_wrapper_resnet", "hf_vit"])
def test_xgradcam_pipeline_matches_grad_cam_package(family):
    """The `grad-cam` package's XGradCAM (what the authors run): normalised, resized maps agree."""
    pytest.importorskip("pytorch_grad_cam", reason="optional reference: pip install grad-cam")
    from pytorch_grad_cam import XGradCAM

    model, _ = make_model(family)
    adapter = get_adapter(model)
    model.eval()

    class Logits(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(pixel_values=x).logits

    reshape = None
    if adapter.cam_layout == "tokens":
        def reshape(tensor):  # noqa: E306
            return adapter.activation_to_map(tensor)

    x = torch.randn(4, 3, 32, 32)
    with XGradCAM(model=Logits(model), target_layers=[adapter.cam_layer], reshape_transform=reshape) as explainer:
        reference = explainer(input_tensor=x, targets=None)  # targets=None: the predicted class
    cam, _ = xgradcam(model, adapter, {"pixel_values": x})
    ours = cam_at_input_size(cam, (32, 32)).numpy()
    np.testing.assert_allclose(ours, reference, atol=1e-4)


def test_xgradcam_leaves_mode_and_gradients_alone():
    model, _ = make_model("timm_wrapper_resnet")
    model.train()
    frozen = model.timm_model.layer1[0].conv1.weight
    frozen.requires_grad_(False)
    xgradcam(model, get_adapter(model), {"pixel_values": torch.randn(2, 3, 32, 32)})
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert not frozen.requires_grad
    # a fully frozen model still gets maps (the activation is made a leaf)
    for p in model.parameters():
        p.requires_grad_(False)
    cam, _ = xgradcam(model, get_adapter(model), {"pixel_values": torch.randn(2, 3, 32, 32)})
    assert cam.shape == (2, 4, 4)


class RedDetector(nn.Module):
    """A CNN whose class-0 evidence is 'red pixels' (plus a weak uniform background, which makes the map dense
    as real CAMs are): its CAM must light up the red square."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 1, 1), nn.ReLU(), nn.AvgPool2d(2))
        self.head = nn.Linear(1, 2)
        with torch.no_grad():
            self.features[0].weight.copy_(torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1))
            self.features[0].bias.fill_(0.05)
            self.head.weight.copy_(torch.tensor([[1.0], [-1.0]]))
            self.head.bias.copy_(torch.tensor([0.0, -0.1]))  # class 0 predicted: the CAM target

    def forward(self, pixel_values):
        return self.head(self.features(pixel_values).mean((2, 3)))


def test_masks_cover_the_spurious_square():
    model = RedDetector()
    adapter = get_adapter(model, classifier="head", target_layer="features")
    images = torch.zeros(3, 3, 32, 32)
    images[:, 1, 10:20, 10:20] = 0.6  # a green blob (not evidence for class 0)
    images[0, 0, 2:6, 2:6] = 1.0  # red squares at different places
    images[1, 0, 24:28, 4:8] = 1.0
    images[2, 0, 12:16, 26:30] = 1.0
    masks = image_masks(model, adapter, images, k=2.0)
    for i, (top, left) in enumerate([(2, 2), (24, 4), (12, 26)]):
        square = torch.zeros(32, 32, dtype=torch.bool)
        square[top : top + 4, left : left + 4] = True
        assert masks[i][square].float().mean() >= 0.75, i  # the square is masked
        assert (masks[i] & ~square).sum() <= 20, i  # and little else (bilinear upsampling bleeds one ring)
        assert not masks[i][10:20, 10:20].any()


def test_threshold_masks_rule():
    scores = torch.tensor([[0.0, 0.1, 0.2, 0.9, 1.0, 0.0], [0.0] * 6, [-1.0, 0.5, 0.5, 0.5, 0.5, 3.0]])
    masks = threshold_masks(scores, k=1.0)
    for row, mask in zip(scores, masks):
        positive = row[row > 0].numpy()
        if positive.size == 0:
            assert not mask.any()  # an all-zero map masks nothing
            continue
        tau = positive.mean() + positive.std()
        assert mask.tolist() == [bool(v > tau and v > 0) for v in row.tolist()]
    valid = torch.tensor([[True] * 5 + [False]] * 3)
    assert not threshold_masks(scores, k=0.0, valid=valid)[:, 5].any()


# ----------------------------------------------------------------------------- MaskStore
def test_mask_store_pack_lookup_apply_union_save(tmp_path):
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(7, 5, 6, generator=generator) > 0.5
    assert torch.equal(unpack_bits(pack_bits(masks), (5, 6)), masks)
    idx = torch.tensor([40, 3, 17, 8, 99, 0, 5])
    store = MaskStore(masks, idx)
    assert store.packed.shape == (7, 4) and store.packed.dtype == torch.uint8  # 30 bits -> 4 bytes
    assert torch.equal(store[torch.tensor([17, 40])], masks[[2, 0]])
    with pytest.raises(KeyError, match=r"No mask for example_idx \[41\]"):
        store[torch.tensor([41])]
    pixels = torch.full((2, 3, 5, 6), 200, dtype=torch.uint8)
    out = store.apply_to_pixels(pixels, torch.tensor([99, 5]))
    assert torch.equal(out[0, 1] == 0, masks[4]) and torch.equal(out[1, 2] == 0, masks[6])
    other = MaskStore(~masks, idx)
    assert store.union(other).masks().all()
    store.save(tmp_path / "m.safetensors")
    loaded = MaskStore.load(tmp_path / "m.safetensors")
    assert torch.equal(loaded[idx], store[idx])
    tokens = MaskStore(torch.tensor([[False, True, False, True]]), torch.tensor([0]))
    ids = torch.tensor([[1, 2, 3]])
    assert tokens.token_transform(mask_token_id=9)(ids, torch.tensor([0])).tolist() == [[1, 9, 3]]


# ----------------------------------------------------------------------------- the trainer
# the paper's MaskTune (no label-free selection: conftest.METHOD_TEST_DEFAULTS) unless a test asks for it; the run of
# tests/test_methods.py (finetune_learning_rate=3e-4, mask_threshold_std=1.0), trained once per session
RUN = "masktune-timm_wrapper_resnet"


def test_masktune_masks_finetune_and_report(method_runs, small_digits):
    trainer = method_runs[RUN].trainer
    store = trainer.masks
    assert len(store) == len(small_digits["train"]) and store.shape == (32, 32)
    assert store.masked_fraction().mean() > 0
    # the masks are what image_masks computes for the ERM model, on the unmasked images
    erm = trainer.erm_model()
    rows = [small_digits["train"][i] for i in range(8)]
    batch = trainer.eval_collator(rows)
    expected = image_masks(erm, get_adapter(erm), batch["pixel_values"], k=1.0)
    assert torch.equal(store[batch["example_idx"]], expected)
    # exactly one epoch at the constant fine-tuning learning rate
    log = trainer.stage_log_history["finetune_1"]
    steps = [e for e in log if "learning_rate" in e]
    assert len(steps) == int(np.ceil(len(small_digits["train"]) / 32))
    assert {e["learning_rate"] for e in steps} == {3e-4}
    assert log[-1]["epoch"] == 1.0
    # (the run was evaluated and saved: results.json, its stages and splits, group_accuracy.png: test_methods.py)
    results = json.loads((Path(trainer.args.output_dir) / "results.json").read_text())
    selective = results["selective"]["report"]
    assert set(selective) == {"masktune_ensemble", "erm_softmax_response", "masktune_softmax_response"}
    assert selective["masktune_ensemble"]["validation"]["coverage_at_90"] == pytest.approx(0.9, abs=0.02)
    for plot in ("cam_overlays.png", "risk_coverage.png"):
        assert (Path(trainer.args.output_dir) / "plots" / plot).stat().st_size > 1000


def _bn_state(model):
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    return ([b.running_mean.clone() for b in bns], [b.running_var.clone() for b in bns],
            [b.weight.detach().clone() for b in bns])


@pytest.mark.parametrize("freeze", [True, False])
def test_finetune_keeps_erm_norm_statistics(method_runs, tmp_path, small_digits, freeze):
    mt_run = method_runs[RUN].trainer
    erm_means, erm_vars, erm_weights = _bn_state(mt_run.erm_model())
    if freeze:
        trainer = mt_run
    else:
        trainer = make_trainer("masktune", "timm_wrapper_resnet", small_digits, tmp_path / "mt",
                               finetune_learning_rate=3e-4, mask_threshold_std=1.0,
                               finetune_freeze_norm_statistics=False, finetune_batch_size=16)
        trainer.train()
        # the fine-tuning's own batch size (16) for exactly one epoch; ERM kept its 32 and the trainer gets it back
        n = len(small_digits["train"])
        steps = {stage: max(e["step"] for e in trainer.stage_log_history[stage] if "learning_rate" in e)
                 for stage in ("erm", "finetune_1")}
        assert steps["finetune_1"] == int(np.ceil(n / 16))
        assert steps["erm"] == int(np.ceil(n / 32)) * trainer.args.num_train_epochs
        assert trainer._train_batch_size == 32
    model = trainer.accelerator.unwrap_model(trainer.model)
    means, variances, weights = _bn_state(model)
    same_stats = all(torch.equal(a, b) for a, b in zip(means + variances, erm_means + erm_vars))
    assert same_stats == freeze
    assert any(not torch.equal(a, b) for a, b in zip(weights, erm_weights))  # the affine weights trained
    assert all("train" not in vars(m) for m in model.modules())  # the patch is gone
    model.train()
    assert all(m.training for m in model.modules())


def test_masktune_resume_after_masks_does_not_recompute_them(tmp_path, small_digits, monkeypatch):
    trainer = make_trainer("masktune", "timm_wrapper_resnet", small_digits, tmp_path / "mt", mask_threshold_std=1.0)
    calls = {"masks": 0}
    original = MaskTuneTrainer._mask_batch

    def counting(self, model, batch, **kwargs):
        calls["masks"] += 1
        return original(self, model, batch, **kwargs)

    monkeypatch.setattr(MaskTuneTrainer, "_mask_batch", counting)
    monkeypatch.setattr(MaskTuneTrainer, "_run_finetune", lambda self, i, d, r: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    first_masks, first_calls = trainer.masks.masks(), calls["masks"]
    assert first_calls > 0
    monkeypatch.undo()
    monkeypatch.setattr(MaskTuneTrainer, "_mask_batch", counting)
    resumed = make_trainer("masktune", "timm_wrapper_resnet", small_digits, tmp_path / "mt", mask_threshold_std=1.0)
    resumed.train(resume_from_checkpoint=True)
    assert calls["masks"] == first_calls  # not one more masking batch
    assert resumed.skipped_stages == ["erm", "masks_1"]
    assert torch.equal(resumed.masks.masks(), first_masks)
    assert "ERM" in resumed.stage_results  # the ERM baseline survives the resume


def test_same_seed_same_masks(tmp_path, small_digits, method_runs):
    mt_run = method_runs[RUN].trainer
    again = make_trainer("masktune", "timm_wrapper_resnet", small_digits, tmp_path / "mt",
                         finetune_learning_rate=3e-4, mask_threshold_std=1.0)
    again.train()
    assert torch.equal(again.masks.masks(), mt_run.masks.masks())
    assert torch.equal(again.masks.example_idx, mt_run.masks.example_idx)
    assert again.masks.masked_fraction().mean() > 0


def test_accumulative_masking_keeps_earlier_masks(tmp_path, small_digits):
    trainer = make_trainer("masktune", "timm_wrapper_resnet", small_digits, tmp_path / "mt", masktune_iterations=2,
                           accumulative_masking=True, mask_threshold_std=1.0)
    seen = []
    original = MaskTuneTrainer._run_masks

    def spy(self, iteration, stage_dir, resume):
        original(self, iteration, stage_dir, resume)
        seen.append(self.masks.masks().clone())

    MaskTuneTrainer._run_masks = spy
    try:
        trainer.train()
    finally:
        MaskTuneTrainer._run_masks = original
    assert trainer.finished_stages == ["erm", "masks_1", "finetune_1", "masks_2", "finetune_2", "selective"]
    assert (seen[1] | seen[0]).equal(seen[1])  # round 2 contains round 1
    assert seen[1].sum() >= seen[0].sum()
    # the earlier iteration's model is reported as a stage; the last one is the run's own result
    assert [s for s in trainer.stage_results if s.startswith("MaskTune")] == ["MaskTune 1"]
    first = trainer.stage_results["MaskTune 1"]
    assert set(first) == {"validation", "test_biased"}
    resumed = make_trainer("masktune", "timm_wrapper_resnet", small_digits, tmp_path / "mt", masktune_iterations=2,
                           accumulative_masking=True, mask_threshold_std=1.0)
    resumed.train(resume_from_checkpoint=True)  # every stage loaded, none re-run: the stage is read back
    assert resumed.stage_results["MaskTune 1"] == first


def test_masktune_on_text_masks_real_tokens(method_runs, text_data, tokenizer):
    trainer = method_runs["masktune-hf_bert"].trainer  # per_device_train_batch_size=16, max_length=32
    batch = trainer.eval_collator([text_data["train"][i] for i in range(len(text_data["train"]))])
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    stored = trainer.masks[batch["example_idx"]][:, : batch["input_ids"].shape[1]]
    erm = trainer.erm_model()
    adapter = get_adapter(erm)
    assert torch.equal(stored, token_masks(erm, adapter, inputs, tokenizer.all_special_ids, k=2.0, min_tokens=1))
    special = torch.isin(batch["input_ids"], torch.tensor(tokenizer.all_special_ids))
    assert not (stored & special).any()  # never [CLS], [SEP] or padding
    scores, _ = token_attributions(erm, adapter, inputs)
    has_positive = ((scores > 0) & ~special & batch["attention_mask"].bool()).any(1)
    assert torch.equal(stored.any(1), has_positive)  # at least the top token wherever one is positive
    assert has_positive.float().mean() > 0.5


def test_masktune_bad_inputs(tmp_path, small_digits, text_data, tokenizer):
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3)
            self.classifier = nn.Linear(2, 2)

        def forward(self, pixel_values, labels=None):
            return self.classifier(self.conv(pixel_values).mean((2, 3)))

    with pytest.raises(Exception, match="no CAM target layer.*target_layer="):
        MaskTuneTrainer(Plain(), method_config("masktune", tmp_path / "mt", classifier_layer="classifier"),
                                               train_dataset=small_digits["train"])
    import copy

    no_mask = copy.deepcopy(tokenizer)
    no_mask.mask_token = None
    bert, _ = make_model("hf_bert", vocab_size=tokenizer.vocab_size)
    with pytest.raises(DataValidationError, match="has none: use a tokenizer with a mask token"):
        MaskTuneTrainer(bert, method_config("masktune", tmp_path / "mt"), train_dataset=text_data["train"],
                                            processing_class=no_mask)
    with pytest.raises(DataValidationError, match="needs a train_dataset"):
        MaskTuneTrainer(make_model("timm_wrapper_resnet")[0], method_config("masktune", tmp_path / "mt"))
    with pytest.raises(DataValidationError, match=r"pixel_values of shape \(B, C, H, W\)"):
        image_masks(make_model("timm_wrapper_resnet")[0], get_adapter(make_model("timm_wrapper_resnet")[0]),
                    torch.randint(0, 100, (2, 12)))
    with pytest.raises(FileNotFoundError, match="erm_checkpoint='nowhere'"):
        MaskTuneTrainer(make_model("timm_wrapper_resnet")[0],
                        method_config("masktune", tmp_path / "mt", erm_checkpoint="nowhere"),
                        train_dataset=small_digits["train"])
    with pytest.raises(ValueError, match="masktune_iterations=0"):
        method_config("masktune", tmp_path / "mt", masktune_iterations=0)
    # the authors' fine-tuning options, refused before any training where the run cannot honour them
    with pytest.raises(ValueError, match="mask_erm_model='best'"):
        method_config("masktune", tmp_path / "mt", mask_erm_model="best")
    model, _ = make_model("timm_wrapper_resnet")
    model.save_pretrained(tmp_path / "erm_model")  # a saved model, no optimizer.pt
    for options, message in (
        (dict(mask_erm_model="best_validation_accuracy", erm_checkpoint=str(tmp_path / "erm_model")),
         "picks an epoch of the ERM stage's training"),
        (dict(finetune_continue_optimizer=True, erm_checkpoint=str(tmp_path / "erm_model")),
         "has no optimizer.pt: pass a Trainer checkpoint folder"),
        (dict(mask_erm_model="best_validation_accuracy", health_split="dev"), "on the 'dev' eval split"),
    ):
        with pytest.raises(DataValidationError, match=message):
            make_trainer("masktune", "timm_wrapper_resnet", small_digits, tmp_path / "refused", **options)
        assert not any(path.is_file() for path in (tmp_path / "refused").rglob("*"))  # nothing written


def _optimizer_states(monkeypatch):
    """Spy on MaskTuneTrainer.create_optimizer: (stage folder name, learning rates, a copy of the per-parameter
    state) of every optimizer a run creates, as created (before its first step)."""
    created = []
    original = MaskTuneTrainer.create_optimizer

    def spy(self, *args, **kwargs):
        optimizer = original(self, *args, **kwargs)
        raw = getattr(optimizer, "optimizer", optimizer)
        state = {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                 for i, s in raw.state_dict()["state"].items()}
        created.append((Path(self.args.output_dir).name, {g["lr"] for g in raw.param_groups}, state))
        return optimizer

    monkeypatch.setattr(MaskTuneTrainer, "create_optimizer", spy)
    return created


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[i].keys() == b[i].keys() and all(torch.equal(torch.as_tensor(a[i][k]), torch.as_tensor(b[i][k])) for k in a[i])
        for i in a)


def test_finetune_continues_the_optimizer_state_and_resumes_with_it(tmp_path, small_digits, monkeypatch):
    """finetune_continue_optimizer: round 1 starts from the ERM stage's last SGD state, round 2 from round 1's,
    each at the fine-tuning's own learning rate; a run interrupted before round 2 resumes with round 1's saved
    state and ends with the uninterrupted run's weights."""
    options = dict(finetune_learning_rate=3e-4, mask_threshold_std=1.0, masktune_iterations=2, optim="sgd",
                   optim_args="momentum=0.9", finetune_continue_optimizer=True)
    created = _optimizer_states(monkeypatch)
    full = make_trainer("masktune", "timm_wrapper_resnet", small_digits, tmp_path / "full", **options)
    full.train()
    stages = Path(full.args.output_dir) / "stages"
    saved = {name: torch.load(stages / name / "optimizer_state.pt", weights_only=True)
             for name in ("erm", "finetune_1", "finetune_2")}
    assert [name for name, _, _ in created] == ["erm", "finetune_1", "finetune_2"]
    assert created[0][2] == {}  # ERM: a fresh optimizer
    assert created[1][1] == created[2][1] == {3e-4}  # the fine-tuning's learning rate, not ERM's 1e-3
    assert saved["erm"]["state"] and _same_state(created[1][2], saved["erm"]["state"])
    assert _same_state(created[2][2], saved["finetune_1"]["state"])
    assert not _same_state(saved["finetune_1"]["state"], saved["erm"]["state"])  # round 1 moved the momentum

    monkeypatch.undo()
    original = MaskTuneTrainer._run_finetune

    def stop_before_round_2(self, iteration, stage_dir, resume):
        if iteration == 2:
            raise KeyboardInterrupt
        original(self, iteration, stage_dir, resume)

    monkeypatch.setattr(MaskTuneTrainer, "_run_finetune", stop_before_round_2)
    with pytest.raises(KeyboardInterrupt):
        make_trainer("masktune", "timm_wrapper_resnet", small_digits, tmp_path / "cut", **options).train()
    monkeypatch.undo()
    created = _optimizer_states(monkeypatch)
    resumed = make_trainer("masktune", "timm_wrapper_resnet", small_digits, tmp_path / "cut", **options)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.skipped_stages == ["erm", "masks_1", "finetune_1", "masks_2"]
    assert [name for name, _, _ in created] == ["finetune_2"] and _same_state(created[0][2], saved["finetune_1"]["state"])
    final, again = (t.accelerator.unwrap_model(t.model).state_dict() for t in (full, resumed))
    assert all(torch.equal(final[k], again[k]) for k in final)


def test_round_one_masks_come_from_the_best_validation_epoch(tmp_path, small_digits, monkeypatch):
    """mask_erm_model='best_validation_accuracy': each ERM epoch is scored on validation (labels only; the first
    of equal scores wins), the best epoch's weights make the round-1 masks, the last epoch's are fine-tuned, and
    the scoring leaves the ERM training as it would be without it."""
    from transformers import TrainerCallback

    epochs = []

    class Keep(TrainerCallback):
        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            if Path(args.output_dir).name == "erm":
                epochs.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    scripted = iter([0.5, 0.75, 0.75])  # epoch 2 is the best: epoch 3 only ties it
    real = MaskTuneTrainer.validation_summary

    def scored(self, *args, **kwargs):
        summary = real(self, *args, **kwargs)  # run as it would (its DataLoader draws a seed), report a script
        if self.current_stage == "erm":
            summary = {**summary, "accuracy": next(scripted)}
        return summary

    monkeypatch.setattr(MaskTuneTrainer, "validation_summary", scored)
    options = dict(finetune_learning_rate=3e-4, mask_threshold_std=1.0, num_train_epochs=3)
    trainer = make_trainer("masktune", "timm_wrapper_resnet", small_digits, tmp_path / "best",
                           mask_erm_model="best_validation_accuracy", trainer_kwargs={"callbacks": [Keep()]}, **options)
    trainer.train()
    assert len(epochs) == 3
    record = trainer.results()["erm_mask_model"]  # results.json's entry
    assert record["validation_accuracy"] == {"1": 0.5, "2": 0.75, "3": 0.75} and record["best_epoch"] == 2
    erm = trainer.erm_model()
    assert all(torch.equal(erm.state_dict()[k], epochs[2][k]) for k in epochs[2])  # ERM stage = the last epoch
    best = copy.deepcopy(erm)
    best.load_state_dict(epochs[1])
    rows = [small_digits["train"][i] for i in range(16)]
    batch = trainer.eval_collator(rows)
    expected = image_masks(best, get_adapter(best), batch["pixel_values"], k=1.0)
    assert torch.equal(trainer.masks[batch["example_idx"]], expected)
    assert not torch.equal(expected, image_masks(erm, get_adapter(erm), batch["pixel_values"], k=1.0))
    # the same ERM stage as a run that scores no epoch
    monkeypatch.undo()
    plain = make_trainer("masktune", "timm_wrapper_resnet", small_digits, tmp_path / "plain", **options)
    plain.train()
    assert all(torch.equal(plain.erm_model().state_dict()[k], v) for k, v in erm.state_dict().items())


def test_best_epoch_scores_survive_an_erm_stage_resumed_midway(tmp_path, small_digits):
    """An ERM stage killed in its third epoch resumes from its epoch-2 checkpoint with the epochs it had scored:
    the record, the best epoch and its weights are the uninterrupted run's."""
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            if Path(args.output_dir).name == "erm" and state.epoch >= 2:
                raise KeyboardInterrupt("killed in epoch 3")

    options = dict(finetune_learning_rate=3e-4, mask_threshold_std=1.0, num_train_epochs=3, save_strategy="epoch",
                   mask_erm_model="best_validation_accuracy")
    full = make_trainer("masktune", "timm_wrapper_resnet", small_digits, tmp_path / "full", **options)
    full.train()
    with pytest.raises(KeyboardInterrupt):
        make_trainer("masktune", "timm_wrapper_resnet", small_digits, tmp_path / "cut",
                     trainer_kwargs={"callbacks": [Kill()]}, **options).train()
    erm = tmp_path / "cut" / "stages" / "erm"
    assert set(json.loads((erm / "erm_epochs.json").read_text())["validation_accuracy"]) == {"1", "2"}
    resumed = make_trainer("masktune", "timm_wrapper_resnet", small_digits, tmp_path / "cut", **options)
    resumed.train(resume_from_checkpoint=True)
    ours, theirs = resumed.erm_epochs, full.erm_epochs
    assert ours["best_epoch"] == theirs["best_epoch"] and set(ours["validation_accuracy"]) == {"1", "2", "3"}
    for epoch, accuracy in theirs["validation_accuracy"].items():
        assert ours["validation_accuracy"][epoch] == pytest.approx(accuracy, abs=1 / 96 + 1e-9)  # one example
    from safetensors.torch import load_file

    a, b = (load_file(str(folder / "stages" / "erm" / "best_epoch" / "model.safetensors"))
            for folder in (tmp_path / "full", tmp_path / "cut"))
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    # a finished ERM stage read back (every stage loaded, none re-run) keeps the record for results.json
    again = make_trainer("masktune", "timm_wrapper_resnet", small_digits, tmp_path / "cut", **options)
    again.train(resume_from_checkpoint=True)
    assert "erm" in again.skipped_stages and again.results()["erm_mask_model"] == ours


def test_masktune_from_erm_checkpoint(tmp_path, small_digits):
    model, _ = make_model("timm_wrapper_resnet", seed=3)
    model.save_pretrained(tmp_path / "erm_model")
    trainer = make_trainer("masktune", "timm_wrapper_resnet", small_digits, tmp_path / "mt",
                           erm_checkpoint=str(tmp_path / "erm_model"), finetune_learning_rate=1e-4)
    trainer.train()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(trainer.erm_model()(pixel_values=x).logits, model.eval()(pixel_values=x).logits, atol=1e-6)


# ----------------------------------------------------------------------------- selective classification
def test_selective_ensemble_and_calibration():
    erm = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.9], [0.0, 3.0]])
    mt = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    pred, conf = ensemble_response(erm, mt)
    product = erm.softmax(-1) * mt.softmax(-1)
    assert torch.equal(pred, product.argmax(-1)) and torch.allclose(conf, product.max(-1).values)
    thresholds = calibrate_thresholds(conf, [1.0, 0.5])
    assert (conf >= thresholds[0.5]).float().mean() == 0.5 and (conf >= thresholds[1.0]).all()
    labels = torch.tensor([0, 0, 1, 1])
    report = selective_report({"validation": (pred, conf, labels), "test": (pred, conf, labels)}, "validation", [1.0, 0.5])
    assert report["test"]["coverage_at_50"] == 0.5
    correct = (pred == labels).float()
    top2 = conf.argsort(descending=True)[:2]
    assert report["test"]["risk_at_50"] == pytest.approx(1 - correct[top2].mean().item())


def test_selective_classifier_abstains_when_models_disagree():
    class Fixed(nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, pixel_values):
            return type("Out", (), {"logits": self.logits})()

    a = Fixed(torch.tensor([[5.0, 0.0], [5.0, 0.0]]))
    b = Fixed(torch.tensor([[5.0, 0.0], [0.0, 5.0]]))
    classifier = SelectiveClassifier(a, b)
    predictions = classifier.predict(threshold=0.5, pixel_values=torch.zeros(2, 1))
    assert predictions.tolist() == [0, -1]  # agree -> answer; disagree -> abstain
    # models left in training mode (dropout on) still predict in evaluation mode, and get their mode back
    class WithDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.dropout, self.linear = nn.Dropout(0.9), nn.Linear(4, 2)

        def forward(self, pixel_values):
            return self.linear(self.dropout(pixel_values))

    dropped = SelectiveClassifier(WithDropout(), WithDropout()).train()
    x = torch.randn(64, 4)
    first = dropped.predict(threshold=0.0, pixel_values=x)
    assert torch.equal(first, dropped.predict(threshold=0.0, pixel_values=x)) and dropped.erm_model.dropout.training


# ----------------------------------------------------------------------------- 2 processes = 1 process
@pytest.mark.distributed
def test_two_processes_compute_the_masks_of_one(distributed_checks):
    """tests/scripts/method_distributed.py masktune (both runs really ran, every process holding the same masks and
    weights: test_methods.py)."""
    one, two = distributed_checks["masktune"]
    assert two["example_idx"] == one["example_idx"] and len(one["example_idx"]) == 203  # none dropped or doubled
    assert one["shape"] == two["shape"] and sum(one["masks"]) > 0
    assert two["masks"] == one["masks"]  # bit-identical
    # stated tolerance: the fine-tuning epoch sees the same 32 examples per step (2 x 16 against 1 x 32), so the
    # weights agree up to float reassociation in the gradient all-reduce
    assert two["weights_sum"] == pytest.approx(one["weights_sum"], rel=1e-3)


def test_two_processes_run_the_authors_options_as_one(distributed_checks):
    """tests/scripts/method_distributed.py masktune_authors: the ERM epochs scored on the gathered validation
    predictions, round-1 masks from the same best epoch, the SGD state carried from stage to stage, 2 processes as
    1. Stated tolerances: ERM trains on the same 32 examples per step (2 x 16 against 1 x 32), so the weights, the
    momentum buffers and the CAMs agree up to float reassociation in the gradient all-reduce."""
    one, two = distributed_checks["masktune_authors"]
    assert set(one["erm_epochs"]["validation_accuracy"]) == {"1", "2"}
    assert two["erm_epochs"]["best_epoch"] == one["erm_epochs"]["best_epoch"]
    for epoch, accuracy in one["erm_epochs"]["validation_accuracy"].items():
        assert two["erm_epochs"]["validation_accuracy"][epoch] == pytest.approx(accuracy, abs=1 / 48 + 1e-9)
    for round_ in ("1", "2"):
        a, b = np.array(one["masks"][round_]), np.array(two["masks"][round_])
        assert a.shape == b.shape == (64 * 32 * 32,) and a.sum() > 0
        assert (a == b).mean() >= 0.99
    for stage, (total, size) in one["momentum"].items():
        assert size > 0 and two["momentum"][stage][0] == pytest.approx(total, abs=1e-5 * size)
    assert two["weights_sum"] == pytest.approx(one["weights_sum"], rel=1e-3)


def test_text_masks_land_on_their_tokens_with_a_left_padding_tokenizer(tmp_path):
    """Masks are stored by token position: the collator pads on the right whatever the tokenizer's default, so
    a token's position does not depend on the other texts of the batch."""
    from conftest import tiny_tokenizer

    from hf_robust.methods.masktune.masks import MaskStore
    from hf_robust.data.preprocessing import GroupDataCollator

    tokenizer = tiny_tokenizer(tmp_path)
    tokenizer.padding_side = "left"
    rows = [{"text": "great", "label": 1, "example_idx": 0},
            {"text": "great great great great great great", "label": 1, "example_idx": 1}]
    collator = GroupDataCollator("text", tokenizer=tokenizer)
    great = tokenizer.convert_tokens_to_ids("great")
    ids = collator(rows)["input_ids"][0]  # the masking pass: example 0 beside a longer text
    store = MaskStore(torch.stack([ids == great, torch.zeros_like(ids, dtype=torch.bool)]), torch.tensor([0, 1]))
    alone = collator.with_options(example_transform=store.token_transform(tokenizer.mask_token_id))([rows[0]])
    assert great not in alone["input_ids"][0].tolist() and tokenizer.mask_token_id in alone["input_ids"][0].tolist()
