"""Run by tests/test_distributed.py, once as one process and once under
`accelerate launch --multi_gpu --num_processes 2` (CPU, gloo). Writes what it computed to argv[1] (main process):
the metrics of a fixed model, a distributed per-example pass, and a short training run."""

import json
import sys

import torch
from datasets import DatasetDict

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # tests/ for conftest.make_model
from conftest import make_model  # noqa: E402

from hf_robust.data import load_benchmark  # noqa: E402
from hf_robust.methods import RobustConfig, RobustTrainer  # noqa: E402


def main(out_path: str, work_dir: str) -> None:
    digits = load_benchmark("biased_digits")
    data = DatasetDict(
        {
            "train": digits["train"].shuffle(seed=0).select(range(256)),
            "validation": digits["validation"].shuffle(seed=1).select(range(101)),  # odd sizes: uneven shards
            "test_biased": digits["test_biased"].select(range(0, 540, 7)),
        }
    )
    model, processor = make_model("hf_vit", seed=0)  # no BatchNorm: N processes can match 1 process closely
    probe = RobustConfig(output_dir=work_dir, use_cpu=True, report_to="none")
    world = probe.world_size
    args = RobustConfig(
        output_dir=work_dir, num_train_epochs=1, per_device_train_batch_size=32 // world,
        per_device_eval_batch_size=8, learning_rate=1e-3, save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, seed=0, logging_steps=1, train_sampling_strategy=sys.argv[3] if len(sys.argv) > 3 else "random",
    )
    trainer = RobustTrainer(model, args, train_dataset=data["train"],
                            eval_dataset={"validation": data["validation"], "test_biased": data["test_biased"]},
                            processing_class=processor)
    before = trainer.evaluate()
    pass_outputs = trainer.compute_per_example(
        data["validation"], lambda m, batch: {"logits": m(pixel_values=batch["pixel_values"]).logits}
    )
    trainer.train()
    after = trainer.evaluate()
    params = torch.cat([p.detach().flatten() for p in trainer.accelerator.unwrap_model(trainer.model).parameters()])
    if trainer.is_world_process_zero():
        timing = ("runtime", "per_second", "preparation_time")
        keep = lambda m: {k: v for k, v in m.items() if not any(t in k for t in timing)}  # noqa: E731
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        json.dump(
            {
                "world_size": world,
                "eval_before": keep(before),
                "eval_after": keep(after),
                "pass_idx": pass_outputs["example_idx"].tolist(),
                "pass_logits": pass_outputs["logits"].tolist(),
                "params": params.tolist(),
                "train_losses": losses,
            },
            open(out_path, "w"),
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
