"""Run by tests/test_distributed.py, once as one process and once under
`accelerate launch --multi_gpu --num_processes 2` (CPU, gloo), on a tiny BatchNorm ResNet at the same global batch
of 32 (2 x 16 under two processes). Writes (main process) to argv[1]:

- `step`: one training-mode forward and backward of a fixed global batch through the model the trainer holds
  (its BatchNorm layers synced across processes when there are two): the gathered logits, the gradients averaged
  over processes, and every BatchNorm layer's batch mean and variance (read back from the running statistics of
  that one step: momentum 1);
- `train`: the first optimizer step of a RobustTrainer run (argv[3] steps, default 1) with plain SGD (no Adam:
  Adam divides by the running gradient magnitude, so the rounding noise of a near-zero gradient becomes a step of
  up to lr): parameters and BatchNorm running statistics before and after;
- with two processes, `unsynced_step` and `unsynced_train`: the same with the BatchNorm layers switched back to
  the stock, per-process ones (what the tests must see fail).
"""

import copy
import json
import sys

import torch
import torch.distributed as dist
from datasets import DatasetDict
from torch import nn

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # tests/ for conftest.make_model
from conftest import make_model  # noqa: E402

from hf_robust.data import load_benchmark  # noqa: E402
from hf_robust.core.sync_norm import SyncedBatchNorm2d  # noqa: E402
from hf_robust.methods import RobustConfig, RobustTrainer  # noqa: E402

GLOBAL_BATCH = 32


def unsync(model: nn.Module) -> nn.Module:
    """The model with per-process BatchNorm statistics (the stock class), as without hf_robust.core.sync_norm."""
    for module in model.modules():
        if isinstance(module, SyncedBatchNorm2d):
            module.__class__ = nn.BatchNorm2d
    return model


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def flat(tensors) -> list[float]:
    return torch.cat([t.detach().flatten().float() for t in tensors]).tolist()


def one_step(model: nn.Module, trainer: RobustTrainer, batch: dict) -> dict:
    """One training-mode forward/backward of this process's share of the global batch; the logits gathered, the
    gradients of the global mean loss, the batch statistics of every BatchNorm layer."""
    model = copy.deepcopy(model).train()
    for norm in batch_norms(model):
        norm.momentum = 1.0  # running statistics := this batch's (mean, unbiased variance)
    world, rank = trainer.args.world_size, trainer.args.process_index
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    logits = model(pixel_values=batch["pixel_values"][rows]).logits
    loss = nn.functional.cross_entropy(logits, batch["labels"][rows], reduction="sum") / GLOBAL_BATCH
    loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    if world > 1:
        for grad in grads:
            dist.all_reduce(grad)  # sums of per-process sums over the global batch: the global gradient
    norms = batch_norms(model)
    return {
        "logits": trainer.accelerator.gather(logits.detach().contiguous()).tolist(),
        "grads": flat(grads),
        "batch_mean": flat(n.running_mean for n in norms),
        "batch_var": flat(n.running_var for n in norms),
    }


def train(data, work_dir: str, synced: bool) -> dict:
    model, processor = make_model("timm_wrapper_resnet", seed=0)
    world = RobustConfig(output_dir=work_dir, use_cpu=True, report_to="none").world_size
    args = RobustConfig(
        output_dir=work_dir, max_steps=int(sys.argv[3]) if len(sys.argv) > 3 else 1,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        optim="sgd", learning_rate=0.05, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
        seed=0, logging_steps=1,
    )
    trainer = RobustTrainer(model, args, train_dataset=data["train"], processing_class=processor)
    if not synced:
        unsync(trainer.model)
    batch = trainer._prepare_inputs(trainer.eval_collator([data["train"][i] for i in range(GLOBAL_BATCH)]))
    step = one_step(trainer.model, trainer, batch)
    initial = flat(trainer.model.parameters())
    initial_running = flat(t for k, t in trainer.model.state_dict().items() if "running_" in k)
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {
        "trainer": trainer,
        "norm_classes": sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__}),
        "step": step,
        "train": {
            "initial": initial,
            "initial_running": initial_running,
            "params": flat(model.parameters()),
            "running": flat(t for k, t in model.state_dict().items() if "running_" in k),
            "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        },
    }


def main(out_path: str, work_dir: str) -> None:
    digits = load_benchmark("biased_digits")
    data = DatasetDict({"train": digits["train"].shuffle(seed=0).select(range(256))})
    synced = train(data, work_dir, synced=True)
    trainer = synced.pop("trainer")
    result = {"world_size": trainer.args.world_size, "threads": torch.get_num_threads(), **synced}
    if trainer.args.world_size > 1:
        unsynced = train(data, work_dir + "_unsynced", synced=False)
        unsynced.pop("trainer")
        result["unsynced_norm_classes"] = unsynced["norm_classes"]
        result["unsynced_step"], result["unsynced_train"] = unsynced["step"], unsynced["train"]
    if trainer.is_world_process_zero():
        json.dump(result, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
