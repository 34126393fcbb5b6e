"""Run by tests/test_masktune.py, once as one process and once under
`accelerate launch --multi_gpu --num_processes 2` (CPU, gloo), from the same ERM checkpoint (argv[3], trained and
saved by the first, one-process run). Writes the gathered masks (as stored, by example_idx) and a fingerprint of
the fine-tuned weights to argv[1] (main process)."""

import json
import os
import sys

import torch
from datasets import DatasetDict

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # tests/ for conftest.make_model
from conftest import make_model, shared_erm_checkpoint  # noqa: E402

from hf_robust.data import load_benchmark  # noqa: E402
from hf_robust.methods import MaskTuneConfig, MaskTuneTrainer  # noqa: E402


def main(out_path: str, work_dir: str, erm_dir: str) -> None:
    digits = load_benchmark("biased_digits")
    data = DatasetDict(
        {
            "train": digits["train"].shuffle(seed=0).select(range(203)),  # odd size: uneven shards
            "validation": digits["validation"].shuffle(seed=1).select(range(64)),
        }
    )
    common = dict(use_cpu=True, report_to="none", disable_tqdm=True, seed=0, save_strategy="no",
                  per_device_eval_batch_size=16, logging_steps=100)
    shared_erm_checkpoint(erm_dir, "timm_wrapper_resnet", data, common)
    model, _ = make_model("timm_wrapper_resnet", seed=1)  # other weights: everything comes from the checkpoint
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # the same 32 examples per optimizer step either way
    args = MaskTuneConfig(output_dir=work_dir, erm_checkpoint=erm_dir, finetune_learning_rate=1e-3,
                          per_device_train_batch_size=32 // world_size, mask_threshold_std=1.0, masktune_selection="off",
                          **common)
    trainer = MaskTuneTrainer(model, args, train_dataset=data["train"], eval_dataset={"validation": data["validation"]})
    trainer.train()
    store = trainer.masks
    order = torch.argsort(store.example_idx)
    masks = store.masks()[order]
    weights = sum(p.detach().double().sum() for p in trainer.accelerator.unwrap_model(trainer.model).parameters())
    fingerprint = torch.tensor([float(masks.sum()), float(weights)])
    everyone = trainer.accelerator.gather(fingerprint[None]).view(-1, 2)
    if trainer.is_world_process_zero():
        json.dump(
            {
                "world_size": args.world_size,
                "example_idx": store.example_idx[order].tolist(),
                "masks": masks.flatten().int().tolist(),
                "shape": list(masks.shape),
                "weights_sum": float(weights),
                "ranks_agree": bool((everyone == everyone[0]).all()),
            },
            open(out_path, "w"),
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
