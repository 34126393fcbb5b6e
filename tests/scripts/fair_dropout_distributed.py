"""Run by tests/test_fair_dropout.py, once as one process and once under
`accelerate launch --multi_gpu --num_processes 2` (CPU, gloo): FairDropout training of a tiny ViT (no BatchNorm,
so N processes can match one closely) with FairDropout after block 0 and on the pooled feature. Writes to argv[1]
(main process) the mask every example got at every step it was seen (gathered from all processes), the logged
losses, the final parameters and the evaluation metrics."""

import json
import sys

import torch
from accelerate.utils import gather_object
from datasets import DatasetDict

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # tests/ for conftest.make_model
from conftest import make_model  # noqa: E402

from hf_robust.data import load_benchmark  # noqa: E402
from hf_robust.methods.fair_dropout import layer as fair_dropout_layer  # noqa: E402
from hf_robust.methods import FairDropoutTrainer, FairDropoutTrainingConfig  # noqa: E402


def main(out_path: str, work_dir: str) -> None:
    digits = load_benchmark("biased_digits")
    data = DatasetDict(
        {
            "train": digits["train"].shuffle(seed=0).select(range(64)),
            "validation": digits["validation"].shuffle(seed=1).select(range(61)),  # odd size: uneven shards
        }
    )
    model, processor = make_model("hf_vit", seed=0)
    probe = FairDropoutTrainingConfig(output_dir=work_dir, use_cpu=True, report_to="none")
    world = probe.world_size
    args = FairDropoutTrainingConfig(
        output_dir=work_dir, num_train_epochs=2, per_device_train_batch_size=32 // world, per_device_eval_batch_size=8,
        learning_rate=1e-3, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
        logging_steps=1, fair_dropout_positions=["block0", "pooled"], p_gen=0.25, p_mem=0.3, export_model=False,
    )
    seen = []  # (position seed, example index, mask as a bit string) of every training forward on this process
    original = fair_dropout_layer.fair_dropout_mask

    def recording_mask(example_idx, num_features, p_gen, p_mem, seed=0):
        mask = original(example_idx, num_features, p_gen, p_mem, seed)
        for idx, row in zip(example_idx.tolist(), mask.tolist()):
            seen.append((seed, idx, "".join("1" if bit else "0" for bit in row)))
        return mask

    fair_dropout_layer.fair_dropout_mask = recording_mask
    trainer = FairDropoutTrainer(model, args, train_dataset=data["train"], eval_dataset={"validation": data["validation"]},
                                 processing_class=processor)
    trainer.train()
    fair_dropout_layer.fair_dropout_mask = original
    metrics = trainer.evaluate()
    masks = gather_object(seen) if world > 1 else seen
    # the label-free selection (positions x one pair, ERM first): every candidate scored on the whole validation
    # split by the distributed per-example pass
    model, processor = make_model("hf_vit", seed=0)
    select_args = FairDropoutTrainingConfig(
        output_dir=work_dir + "/select", num_train_epochs=1, per_device_train_batch_size=32 // world,
        per_device_eval_batch_size=8, learning_rate=1e-3, save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, seed=0, logging_steps=1, selection_positions=["pooled", "block0"], selection_p_gen=[0.25],
        selection_p_mem=[0.3], export_model=False, save_plots=False,
    )
    selecting = FairDropoutTrainer(model, select_args, train_dataset=data["train"],
                                   eval_dataset={"validation": data["validation"]}, processing_class=processor)
    selecting.train()
    params = torch.cat([p.detach().flatten() for p in trainer.accelerator.unwrap_model(trainer.model).parameters()])
    if trainer.is_world_process_zero():
        by_example = {}
        for seed, idx, bits in masks:
            by_example.setdefault(f"{seed}:{idx}", set()).add(bits)
        json.dump(
            {
                "world_size": world,
                "masks": {key: sorted(value) for key, value in by_example.items()},
                "mask_calls": len(masks),
                "train_losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
                "params": params.tolist(),
                "eval": {k: v for k, v in metrics.items() if k.endswith("accuracy")},
                "selection": selecting.selection,
            },
            open(out_path, "w"),
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
