"""Run by tests/test_distributed.py, once as one process and once under
`accelerate launch --multi_gpu --num_processes 2` (CPU, gloo): a short ERM run of a tiny BatchNorm ResNet at the
same global batch. Writes (main process) its final parameters and BatchNorm running statistics to argv[1]."""

import json
import sys

import torch
from datasets import DatasetDict

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # tests/ for conftest.make_model
from conftest import make_model  # noqa: E402

from hf_robust.data import load_benchmark  # noqa: E402
from hf_robust.trainer import RobustConfig, RobustTrainer  # noqa: E402


def main(out_path: str, work_dir: str) -> None:
    digits = load_benchmark("biased_digits")
    data = DatasetDict({"train": digits["train"].shuffle(seed=0).select(range(256))})
    model, processor = make_model("timm_wrapper_resnet", seed=0)
    world = RobustConfig(output_dir=work_dir, use_cpu=True, report_to="none").world_size
    args = RobustConfig(
        output_dir=work_dir, num_train_epochs=1, per_device_train_batch_size=32 // world, learning_rate=1e-2,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0, logging_steps=1,
    )
    trainer = RobustTrainer(model, args, train_dataset=data["train"], processing_class=processor)
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    state = model.state_dict()
    if trainer.is_world_process_zero():
        json.dump(
            {
                "world_size": world,
                "norm_classes": sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__}),
                "params": torch.cat([p.detach().flatten() for p in model.parameters()]).tolist(),
                "running": torch.cat([v.flatten().float() for k, v in state.items() if "running_" in k]).tolist(),
            },
            open(out_path, "w"),
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
