"""Benchmark of MaskTune (imported by scripts/benchmark.py; `benchmark_masktune(seeds)`).

Quality: the main job's default (`scripts/train.py --method masktune` on `biased_digits`: ERM, masks, one-epoch
fine-tune), per training seed; the ERM stage of the same run is the baseline the issue compares with.

Speed, side by side in one process on the same ERM model and training set:
- one ERM training epoch,
- the masking pass over the training set (hf_robust: batched xGradCAM + thresholds on the device, gathered and
  packed by `example_idx`, as the `masks` stage runs it),
- what the authors' code runs: the `grad-cam` package's XGradCAM per batch, then a per-image numpy threshold
  (mean + k*std of the positive values) and mask, one image at a time;
- a training step of the same model (ERM's batch of 128 and the fine-tuning's batch of 32) with contiguous (NCHW)
  tensors, as every run trains, and with `torch.channels_last`: how much of the main job's time a memory-format
  change alone could save (README, "The main job's time").
"""

from __future__ import annotations

import statistics
from functools import partial
import tempfile
import time

SPLITS = ("validation", "test_original", "test_biased")
MODEL = "digits-resnet18-64"


def _mean(values):
    return {"mean": statistics.mean(values), "per_seed": values}


def quality(quality_fn, seeds: list[int]) -> dict:
    """The main job per seed, and the acceptance check on the means."""
    result = quality_fn("masktune", seeds, collect=("finetune_learning_rate", "selective"))
    runs = result["runs"]
    erm = {split: {key: _mean([run["stages"]["ERM"][split][key] for run in runs])
                   for key in ("worst_group_accuracy", "accuracy")} for split in SPLITS}
    mt = result["mean"]
    gain = mt["test_biased"]["worst_group_accuracy"]["mean"] - erm["test_biased"]["worst_group_accuracy"]["mean"]
    original_drop = erm["test_original"]["accuracy"]["mean"] - mt["test_original"]["accuracy"]["mean"]
    result["erm_stage_mean"] = erm
    result["acceptance"] = {
        "masktune_test_biased_worst_group": round(mt["test_biased"]["worst_group_accuracy"]["mean"], 4),
        "erm_test_biased_worst_group": round(erm["test_biased"]["worst_group_accuracy"]["mean"], 4),
        "gain_points": round(100 * gain, 2),
        "test_original_accuracy_drop_points": round(100 * original_drop, 2),
        "met": bool(mt["test_biased"]["worst_group_accuracy"]["mean"] >= 0.85 and gain >= 0.40
                    and original_drop <= 0.02),
        "main_job_seconds": result["seconds_per_run"],
    }
    return result


def _gradcam_package_masks(model, adapter, pixel_values, k: float):
    """The authors' pipeline: grad-cam's XGradCAM (predicted class), then numpy thresholds image by image."""
    import numpy as np
    import torch
    from pytorch_grad_cam import XGradCAM

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(pixel_values=x).logits

    with XGradCAM(model=Logits(model), target_layers=[adapter.cam_layer]) as explainer:
        maps = explainer(input_tensor=pixel_values, targets=None)
    masks = []
    for heatmap in maps:  # per image, in numpy, as src/utils/masking.py of the authors' code
        positive = heatmap[heatmap > 0]
        if positive.size == 0:
            masks.append(np.zeros_like(heatmap, dtype=bool))
            continue
        masks.append(heatmap > positive.mean() + k * positive.std())
    return np.stack(masks)


def memory_format_steps(model_name: str, batch, repeats: int = 5, steps: int = 6) -> dict:
    """Seconds per training step (forward, backward, AdamW) of two copies of one fresh model on one batch: contiguous
    (NCHW) and channels_last, alternated `repeats` times; the fastest of the last steps of each turn counts."""
    import copy

    import torch

    from hf_robust.models import load_model

    base, _ = load_model(model_name, 2)
    fastest = {}
    for memory_format in ("contiguous", "channels_last") * repeats:
        model = copy.deepcopy(base).train()
        inputs = {key: value for key, value in batch.items() if key in ("pixel_values", "labels")}
        if memory_format == "channels_last":
            model = model.to(memory_format=torch.channels_last)
            inputs["pixel_values"] = inputs["pixel_values"].contiguous(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            model(**inputs).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            times.append(time.perf_counter() - start)
        fastest[memory_format] = min([fastest.get(memory_format, float("inf"))] + times[2:])
    return {"contiguous_step_seconds": round(fastest["contiguous"], 4),
            "channels_last_step_seconds": round(fastest["channels_last"], 4),
            "contiguous_over_channels_last": round(fastest["contiguous"] / fastest["channels_last"], 3)}


def timing(seed: int = 0) -> dict:
    import torch
    import transformers

    from hf_robust.models.adapter import get_adapter
    from hf_robust.data import load_benchmark
    from hf_robust.models import load_model
    from hf_robust.methods import MaskTuneConfig, MaskTuneTrainer

    transformers.logging.set_verbosity_error()
    data = load_benchmark("biased_digits")
    transformers.set_seed(seed)
    model, processor = load_model(MODEL, 2, data["train"].features["label"].names)
    with tempfile.TemporaryDirectory() as tmp:
        args = MaskTuneConfig(output_dir=tmp, num_train_epochs=1, per_device_train_batch_size=128,
                              per_device_eval_batch_size=256, learning_rate=1e-3, save_strategy="no",
                              report_to="none", disable_tqdm=True, logging_steps=10_000)
        trainer = MaskTuneTrainer(model, args, train_dataset=data["train"], processing_class=processor)
        start = time.perf_counter()
        trainer.train_stage(trainer.stage_dir("erm"), False)
        epoch = time.perf_counter() - start

        start = time.perf_counter()
        outputs = trainer.compute_per_example(data["train"], partial(trainer._mask_batch, k=trainer.mask_threshold),
                                              description="Masking")
        masking = time.perf_counter() - start

        # the authors' pipeline on the same images, batch by batch (the collator's preprocessing is shared)
        model = trainer.accelerator.unwrap_model(trainer.model).eval()
        adapter = get_adapter(model)
        loader = torch.utils.data.DataLoader(data["train"], batch_size=256, collate_fn=trainer.eval_collator)
        start = time.perf_counter()
        reference = [_gradcam_package_masks(model, adapter, batch["pixel_values"], trainer.mask_threshold)
                     for batch in loader]
        package = time.perf_counter() - start
        ours = outputs["mask"][torch.argsort(outputs["example_idx"])].numpy()
        import numpy as np

        agreement = float((np.concatenate(reference) == ours).mean())
        memory_format = {}
        for batch_size in (128, 32):
            loader = torch.utils.data.DataLoader(data["train"], batch_size=batch_size, collate_fn=trainer.eval_collator)
            memory_format[f"batch_{batch_size}"] = memory_format_steps(MODEL, next(iter(loader)))
    return {
        "model": f"{MODEL} (the MaskTune default of scripts/train.py on biased_digits)",
        "train_examples": len(data["train"]),
        "erm_epoch_seconds": round(epoch, 2),
        "masking_pass_seconds": round(masking, 2),
        "masking_pass_over_erm_epoch": round(masking / epoch, 3),
        "target": 1.5,
        "gradcam_package_pipeline_seconds": round(package, 2),
        "gradcam_package_over_masking_pass": round(package / masking, 2),
        "mask_pixel_agreement_with_gradcam_package": round(agreement, 5),
        "training_step_memory_format": memory_format,
        "torch_threads": torch.get_num_threads(),
    }


def benchmark_masktune(seeds: list[int], quality_fn) -> dict:
    return {"timing": timing(), "quality": quality(quality_fn, seeds)}
