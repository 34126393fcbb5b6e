"""Run by tests/test_counterfactual.py, once as one process and once under
`accelerate launch --multi_gpu --num_processes 2` (CPU, gloo): a short counterfactual distillation of a tiny CLIP
zero-shot classifier. Writes to argv[1] (main process) how the teacher was held (wrapped or not, frozen,
unchanged), the student's final parameters, the per-step losses and the evaluation."""

import hashlib
import json
import sys

import torch
from datasets import DatasetDict

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # tests/ for the helpers
from counterfactual_helpers import tiny_clip_classifier  # noqa: E402

from hf_robust.data import load_benchmark  # noqa: E402
from hf_robust.methods import CounterfactualDistillConfig, CounterfactualDistillTrainer  # noqa: E402


def digest(model) -> str:
    hasher = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        hasher.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return hasher.hexdigest()


def main(out_path: str, work_dir: str) -> None:
    digits = load_benchmark("biased_digits")
    data = DatasetDict(
        {
            "train": digits["train"].shuffle(seed=0).select(range(256)),
            "validation": digits["validation"].shuffle(seed=1).select(range(101)),  # odd size: uneven shards
        }
    )
    model, processor = tiny_clip_classifier(seed=0)
    world = CounterfactualDistillConfig(output_dir=work_dir, use_cpu=True, report_to="none").world_size
    args = CounterfactualDistillConfig(
        output_dir=work_dir, num_train_epochs=1, per_device_train_batch_size=32 // world, per_device_eval_batch_size=8,
        learning_rate=1e-3, warmup_steps=0, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
        seed=0, logging_steps=1, refill_strategy="single", wise_ft_alphas=[0.5], save_plots=False,
        counterfactual_selection="off",  # one distillation (beta = 30): the comparison is of its steps
    )
    trainer = CounterfactualDistillTrainer(model, args, train_dataset=data["train"],
                                           eval_dataset={"validation": data["validation"]}, processing_class=processor)
    teacher_before = digest(trainer.teacher)
    trainer.train()
    after = trainer.evaluate()
    teacher = trainer.teacher
    student = trainer.accelerator.unwrap_model(trainer.model)
    params = torch.cat([p.detach().flatten() for p in student.parameters()])
    # random masks without refilling: this process's rows of one global batch of 8 get the masks one process
    # gives those rows
    trainer.args.mask_strategy, trainer.args.refill_strategy = "random", "none"
    batch = trainer._prepare_inputs(trainer.eval_collator([data["train"][i] for i in range(8)]))
    rows = slice(trainer.args.process_index * 8 // world, (trainer.args.process_index + 1) * 8 // world)
    _, mask = trainer.counterfactuals(batch["pixel_values"][rows], None)
    random_masks = trainer.accelerator.gather(mask.contiguous())
    if trainer.is_world_process_zero():
        logs = [e for e in trainer.state.log_history if "ce_loss" in e]
        json.dump(
            {
                "world_size": world,
                "student_wrapper": type(trainer.model_wrapped).__name__,
                "teacher_type": type(teacher).__name__,
                "teacher_unchanged": digest(teacher) == teacher_before,
                "teacher_training": teacher.training,
                "teacher_requires_grad": any(p.requires_grad for p in teacher.parameters()),
                "teacher_grads": any(p.grad is not None for p in teacher.parameters()),
                "params": params.tolist(),
                "losses": [e["loss"] for e in logs],
                "ce_losses": [e["ce_loss"] for e in logs],
                "distill_losses": [e["distill_loss"] for e in logs],
                "masked_fractions": [e["masked_fraction"] for e in logs],
                "random_none_masks": random_masks.int().tolist(),
                "eval": {k: v for k, v in after.items() if k.endswith("accuracy")},
                "wise_ft": trainer.wise_ft_results["sweep"]["counterfactual"]["0.5"]["validation"]["accuracy"],
            },
            open(out_path, "w"),
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
