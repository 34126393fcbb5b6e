"""Run by tests/test_gradtune.py, once as one process and once under
`accelerate launch --multi_gpu --num_processes 2` (CPU, gloo), from the same ERM checkpoint (argv[3], trained and
saved by the first, one-process run). Writes the gathered scores, the held-out split, the selection and the
fine-tuned head to argv[1] (main process)."""

import json
import sys

import torch
from datasets import DatasetDict

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # tests/ for conftest.make_model
from conftest import make_model, shared_erm_checkpoint  # noqa: E402

from hf_robust.data import load_benchmark  # noqa: E402
from hf_robust.methods import GradTuneConfig, GradTuneTrainer  # noqa: E402


def main(out_path: str, work_dir: str, erm_dir: str) -> None:
    digits = load_benchmark("biased_digits")
    data = DatasetDict(
        {
            "train": digits["train"].shuffle(seed=0).select(range(256)),
            "validation": digits["validation"].shuffle(seed=1).select(range(101)),  # odd size: uneven shards
        }
    )
    common = dict(use_cpu=True, report_to="none", disable_tqdm=True, seed=0, save_strategy="no",
                  per_device_eval_batch_size=8, logging_steps=100)
    shared_erm_checkpoint(erm_dir, "hf_vit", data, common)
    model, processor = make_model("hf_vit", seed=1)  # other weights: everything must come from the checkpoint
    args = GradTuneConfig(output_dir=work_dir, erm_checkpoint=erm_dir, finetune_set_size=40, last_layer_epochs=50,
                          **common)
    trainer = GradTuneTrainer(model, args, train_dataset=data["train"], eval_dataset={"validation": data["validation"]},
                              processing_class=processor)
    trainer.train()
    scores = trainer.last_layer.data
    selected = trainer.last_layer.finetune_sets[0]
    head = trainer.adapter.classifier.weight.detach()
    fingerprint = torch.tensor([float(selected.sum()), float(head.double().sum()), float(scores.norms.sum())])
    everyone = trainer.accelerator.gather(fingerprint[None]).view(-1, 3)
    if trainer.is_world_process_zero():
        json.dump(
            {
                "world_size": args.world_size,
                "example_idx": scores.example_idx.tolist(),
                "norms": scores.norms.tolist(),
                "heldout_idx": trainer.last_layer.heldout_idx.tolist(),
                "selected": selected.tolist(),
                "head": head.flatten().tolist(),
                "ranks_agree": bool((everyone == everyone[0]).all()),
            },
            open(out_path, "w"),
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
