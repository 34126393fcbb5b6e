"""A method's 2-process check: `main(method, out_json, work_dir, erm_dir)`, run by tests/conftest.py
(`distributed_checks`) once as one process and once under `accelerate launch --multi_gpu --num_processes 2` (CPU,
gloo), each time in one process with the suite's other checks (tests/scripts/run_checks.py). Standalone:
`python tests/scripts/method_distributed.py <method> <out_json> <work_dir> [<erm_dir>]`.

Every check has one skeleton: the registry's trainer of the method (`hf_robust.methods.registry.METHODS`) on fixed
subsets of biased_digits (`CHECKS[method].splits`, odd sizes: uneven shards) with the method's own settings (a
training stage gets a per-device batch of 32 / world size: the same 32 examples per optimizer step under any number
of processes); the method's run (`CHECKS[method].run`); then the main process writes to out_json `method`,
`world_size`, `ranks_agree` (every process holds the same final weights and the same method outputs) and what the
method's tests compare. A method that starts from a trained ERM model (`CHECKS[method].erm_family`) loads it from
`erm_dir`: trained and saved by the one-process run, found by the two-process one.

What each check writes (the tests: tests/test_distributed.py for ERM, tests/test_<method>.py):
- erm: the metrics of a fixed model, a distributed per-example pass, a short training run of a tiny ViT (no
  BatchNorm, so N processes can match 1 closely): parameters, losses, metrics;
- masktune: the gathered masks (as stored, by example_idx) and the fine-tuned weights' sum;
- masktune_authors: the authors' fine-tuning options (ERM epochs scored, best-epoch masks, SGD state carried);
- gradtune: the gathered scores, the held-out split, the selection and the fine-tuned head;
- fairdropout: the mask every example got at every step it was seen (gathered from all processes), the logged
  losses, the final parameters, the evaluation, and a label-free selection of the knobs;
- counterfactual: how the teacher was held (wrapped or not, frozen, unchanged), the student's parameters, the
  per-step losses, the evaluation, WiSE-FT, and the random masks of one global batch;
- group_dro, jtt, reweight, subg (the baselines, tests/test_baselines.py): the parameters and logged losses, and
  GroupDRO's group weights q, JTT's error set, SUBG's kept rows (reweight: resampled by group, the seeded sampler).
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from datasets import DatasetDict

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # tests/ for conftest.make_model
from conftest import make_model  # noqa: E402

from hf_robust.data import load_benchmark  # noqa: E402
from hf_robust.methods import RobustConfig, RobustTrainer  # noqa: E402
from hf_robust.methods.masktune.masks import MaskStore  # noqa: E402
from hf_robust.methods.registry import get_method  # noqa: E402

GLOBAL_BATCH = 32
# settings of every check's config
COMMON = dict(use_cpu=True, report_to="none", disable_tqdm=True, seed=0, save_strategy="no")


def flat(parameters) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in parameters])


def digest(model) -> str:
    hasher = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        hasher.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return hasher.hexdigest()


def shared_erm_checkpoint(erm_dir: str, family: str, data, common: dict) -> None:
    """The ERM checkpoint that the one- and two-process runs of a check start from: trained (1 epoch, batch 32,
    lr 1e-3) and saved by the first, one-process run; the second finds it."""
    if Path(erm_dir).is_dir():
        return
    model, processor = make_model(family, seed=0)
    config = RobustConfig(output_dir=erm_dir + "_run", num_train_epochs=1, per_device_train_batch_size=GLOBAL_BATCH,
                          learning_rate=1e-3, **common)
    RobustTrainer(model, config, train_dataset=data["train"], processing_class=processor).train()
    model.save_pretrained(erm_dir)


@dataclass
class Run:
    """What a check's run hands back to the skeleton."""

    trainer: RobustTrainer
    outputs: dict  # written to out_json by the main process
    fingerprint: list[float] = field(default_factory=list)  # method outputs every process must hold alike


@dataclass
class Check:
    # split -> (shuffle seed or None, rows): the subsets of biased_digits the check runs on
    splits: dict[str, tuple[int | None, range]]
    # (method, data, work_dir, world size, erm_dir) -> Run
    run: Callable[[str, DatasetDict, str, int, str | None], Run]
    erm_family: str | None = None  # starts from ERM of this family (trained once, shared by 1 and 2 processes)
    # settings of both the method's run and the shared ERM run
    common: dict = field(default_factory=dict)


def config(method: str, work_dir: str, **kwargs):
    """The registry's config of `method`: COMMON and `kwargs`."""
    return get_method(method).config_class()(output_dir=work_dir, **{**COMMON, **kwargs})


def trainer_class(method: str):
    return get_method(method).trainer_class()


# ----------------------------------------------------------------------------- the checks
def run_erm(method, data, work_dir, world, erm_dir) -> Run:
    model, processor = make_model("hf_vit", seed=0)
    args = config(method, work_dir, num_train_epochs=1, per_device_train_batch_size=GLOBAL_BATCH // world,
                  per_device_eval_batch_size=8, learning_rate=1e-3, logging_steps=1)
    trainer = trainer_class(method)(model, args, train_dataset=data["train"],
                                    eval_dataset={"validation": data["validation"], "test_biased": data["test_biased"]},
                                    processing_class=processor)
    before = trainer.evaluate()
    pass_outputs = trainer.compute_per_example(
        data["validation"], lambda m, batch: {"logits": m(pixel_values=batch["pixel_values"]).logits}
    )
    trainer.train()
    after = trainer.evaluate()
    timing = ("runtime", "per_second", "preparation_time")
    keep = lambda m: {k: v for k, v in m.items() if not any(t in k for t in timing)}  # noqa: E731
    return Run(trainer, {
        "eval_before": keep(before),
        "eval_after": keep(after),
        "pass_idx": pass_outputs["example_idx"].tolist(),
        "pass_logits": pass_outputs["logits"].tolist(),
        "params": flat(trainer.accelerator.unwrap_model(trainer.model).parameters()).tolist(),
        "train_losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
    })


def run_masktune_authors(method, data, work_dir, world, erm_dir) -> Run:
    """MaskTune with the authors' fine-tuning options: its own 2-epoch ERM stage scored epoch by epoch, round-1 masks
    from the best epoch, each of 2 rounds continuing the SGD state of the training before it."""
    model, _ = make_model("timm_wrapper_resnet", seed=0)
    args = config("masktune", work_dir, num_train_epochs=2, learning_rate=1e-2, optim="sgd", optim_args="momentum=0.9",
                  per_device_train_batch_size=GLOBAL_BATCH // world, per_device_eval_batch_size=16, logging_steps=100,
                  finetune_learning_rate=1e-3, mask_threshold_std=1.0, masktune_selection="off", masktune_iterations=2,
                  finetune_continue_optimizer=True, mask_erm_model="best_validation_accuracy")
    trainer = trainer_class("masktune")(model, args, train_dataset=data["train"],
                                        eval_dataset={"validation": data["validation"]})
    trainer.train()
    stages = Path(work_dir) / "stages"
    masks = {}
    for round_ in (1, 2):  # by example_idx
        store = MaskStore.from_state_dict(trainer.load_stage_tensors(stages / f"masks_{round_}", "masks"))
        masks[str(round_)] = store.masks()[torch.argsort(store.example_idx)].flatten().int().tolist()
    momentum = {}
    for stage in ("erm", "finetune_1", "finetune_2"):
        buffers = [s["momentum_buffer"].double() for s in torch.load(stages / stage / "optimizer_state.pt",
                                                                     weights_only=True)["state"].values()]
        momentum[stage] = [sum(float(b.sum()) for b in buffers), sum(float(b.abs().sum()) for b in buffers)]
    weights = sum(p.detach().double().sum() for p in trainer.accelerator.unwrap_model(trainer.model).parameters())
    return Run(trainer, {"erm_epochs": trainer.erm_epochs, "masks": masks, "momentum": momentum,
                        "weights_sum": float(weights)})


def run_masktune(method, data, work_dir, world, erm_dir) -> Run:
    model, _ = make_model("timm_wrapper_resnet", seed=1)  # other weights: everything comes from the checkpoint
    args = config(method, work_dir, erm_checkpoint=erm_dir, finetune_learning_rate=1e-3,
                  per_device_train_batch_size=GLOBAL_BATCH // world, mask_threshold_std=1.0,
                  masktune_selection="off", **CHECKS[method].common)
    trainer = trainer_class(method)(model, args, train_dataset=data["train"],
                                    eval_dataset={"validation": data["validation"]})
    trainer.train()
    store = trainer.masks
    order = torch.argsort(store.example_idx)
    masks = store.masks()[order]
    weights = sum(p.detach().double().sum() for p in trainer.accelerator.unwrap_model(trainer.model).parameters())
    return Run(trainer, {
        "example_idx": store.example_idx[order].tolist(),
        "masks": masks.flatten().int().tolist(),
        "shape": list(masks.shape),
        "weights_sum": float(weights),
    }, fingerprint=[float(masks.sum())])


def run_gradtune(method, data, work_dir, world, erm_dir) -> Run:
    model, processor = make_model("hf_vit", seed=1)  # other weights: everything must come from the checkpoint
    args = config(method, work_dir, erm_checkpoint=erm_dir, finetune_set_size=40, last_layer_epochs=50,
                  **CHECKS[method].common)
    trainer = trainer_class(method)(model, args, train_dataset=data["train"],
                                    eval_dataset={"validation": data["validation"]}, processing_class=processor)
    trainer.train()
    scores = trainer.last_layer.data
    selected = trainer.last_layer.finetune_sets[0]
    head = trainer.adapter.classifier.weight.detach()
    return Run(trainer, {
        "example_idx": scores.example_idx.tolist(),
        "norms": scores.norms.tolist(),
        "heldout_idx": trainer.last_layer.heldout_idx.tolist(),
        "selected": selected.tolist(),
        "head": head.flatten().tolist(),
    }, fingerprint=[float(selected.sum()), float(head.double().sum()), float(scores.norms.sum())])


def run_fairdropout(method, data, work_dir, world, erm_dir) -> Run:
    from accelerate.utils import gather_object

    from hf_robust.methods.fair_dropout import layer as fair_dropout_layer

    # FairDropout after block 0 and on the pooled feature of a tiny ViT (no BatchNorm: N processes can match one)
    model, processor = make_model("hf_vit", seed=0)
    args = config(method, work_dir, num_train_epochs=2, per_device_train_batch_size=GLOBAL_BATCH // world,
                  per_device_eval_batch_size=8, learning_rate=1e-3, logging_steps=1,
                  fair_dropout_positions=["block0", "pooled"], p_gen=0.25, p_mem=0.3, export_model=False)
    seen = []  # (position seed, example index, mask as a bit string) of every training forward on this process
    original = fair_dropout_layer.fair_dropout_mask

    def recording_mask(example_idx, num_features, p_gen, p_mem, seed=0):
        mask = original(example_idx, num_features, p_gen, p_mem, seed)
        for idx, row in zip(example_idx.tolist(), mask.tolist()):
            seen.append((seed, idx, "".join("1" if bit else "0" for bit in row)))
        return mask

    fair_dropout_layer.fair_dropout_mask = recording_mask
    try:
        trainer = trainer_class(method)(model, args, train_dataset=data["train"],
                                        eval_dataset={"validation": data["validation"]}, processing_class=processor)
        trainer.train()
    finally:
        fair_dropout_layer.fair_dropout_mask = original
    metrics = trainer.evaluate()
    masks = gather_object(seen) if world > 1 else seen
    # the label-free selection (positions x one pair, ERM first): every candidate scored on the whole validation
    # split by the distributed per-example pass
    model, processor = make_model("hf_vit", seed=0)
    select_args = config(method, work_dir + "/select", num_train_epochs=1,
                         per_device_train_batch_size=GLOBAL_BATCH // world, per_device_eval_batch_size=8,
                         learning_rate=1e-3, logging_steps=1, selection_positions=["pooled", "block0"],
                         selection_p_gen=[0.25], selection_p_mem=[0.3], export_model=False, save_plots=False)
    selecting = trainer_class(method)(model, select_args, train_dataset=data["train"],
                                      eval_dataset={"validation": data["validation"]}, processing_class=processor)
    selecting.train()
    by_example = {}
    for seed, idx, bits in masks:
        by_example.setdefault(f"{seed}:{idx}", set()).add(bits)
    return Run(trainer, {
        "masks": {key: sorted(value) for key, value in by_example.items()},
        "mask_calls": len(masks),
        "train_losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "params": flat(trainer.accelerator.unwrap_model(trainer.model).parameters()).tolist(),
        "eval": {k: v for k, v in metrics.items() if k.endswith("accuracy")},
        "selection": selecting.selection,
    })


def run_counterfactual(method, data, work_dir, world, erm_dir) -> Run:
    model, processor = make_model("clip_zero_shot", seed=0)  # a tiny CLIP's zero-shot classifier
    args = config(method, work_dir, num_train_epochs=1, per_device_train_batch_size=GLOBAL_BATCH // world,
                  per_device_eval_batch_size=8, learning_rate=1e-3, warmup_steps=0, logging_steps=1,
                  refill_strategy="single", wise_ft_alphas=[0.5], save_plots=False,
                  counterfactual_selection="off")  # one distillation (beta = 30): the comparison is of its steps
    trainer = trainer_class(method)(model, args, train_dataset=data["train"],
                                    eval_dataset={"validation": data["validation"]}, processing_class=processor)
    teacher_before = digest(trainer.teacher)
    trainer.train()
    after = trainer.evaluate()
    teacher = trainer.teacher
    params = flat(trainer.accelerator.unwrap_model(trainer.model).parameters())
    # random masks without refilling: this process's rows of one global batch of 8 get the masks one process
    # gives those rows
    trainer.args.mask_strategy, trainer.args.refill_strategy = "random", "none"
    batch = trainer._prepare_inputs(trainer.eval_collator([data["train"][i] for i in range(8)]))
    rows = slice(trainer.args.process_index * 8 // world, (trainer.args.process_index + 1) * 8 // world)
    _, mask = trainer.counterfactuals(batch["pixel_values"][rows], None)
    random_masks = trainer.accelerator.gather(mask.contiguous())
    logs = [e for e in trainer.state.log_history if "ce_loss" in e]
    return Run(trainer, {
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
    })


def run_baseline(method, data, work_dir, world, erm_dir) -> Run:
    """A baseline on a tiny ViT, 2 epochs of global batches of 32 (the last partial one dropped: JTT's and SUBG's
    training sets have data-dependent sizes, and a padded last batch would differ between 1 and 2 processes). The
    train split: 64 biased training rows plus 64 group-balanced validation rows (every group present), renumbered."""
    from datasets import concatenate_datasets

    train = concatenate_datasets([data["train"], data["validation"].select(range(64))])
    train = train.remove_columns("example_idx").add_column("example_idx", list(range(len(train))))
    train = train.cast_column("example_idx", data["train"].features["example_idx"])
    validation = data["validation"].select(range(64, len(data["validation"])))
    model, processor = make_model("hf_vit", seed=0)
    args = config(method, work_dir, num_train_epochs=2, per_device_train_batch_size=GLOBAL_BATCH // world,
                  per_device_eval_batch_size=8, learning_rate=1e-3, logging_steps=1, save_plots=False,
                  dataloader_drop_last=True, **CHECKS[method].common)
    trainer = trainer_class(method)(model, args, train_dataset=train, eval_dataset={"validation": validation},
                                    processing_class=processor)
    trainer.train()
    params = flat(trainer.accelerator.unwrap_model(trainer.model).parameters())
    outputs = {"params": params.tolist(), "train_losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
               "results": {k: v for k, v in trainer.results().items() if k in ("group_dro", "jtt", "balancing")}}
    fingerprint = []
    if method == "group_dro":
        outputs["q"] = trainer.group_weights.tolist()
        fingerprint = trainer.group_weights.tolist()
    if method == "jtt":
        outputs["errors"] = trainer.errors.tolist()
        fingerprint = [float(trainer.errors.sum()), float(len(trainer.errors))]
    if method == "subg":
        outputs["kept"] = trainer.kept.tolist()
        fingerprint = [float(trainer.kept.sum())]
    return Run(trainer, outputs, fingerprint=fingerprint)


_BASELINE_SPLITS = {"train": (0, range(64)), "validation": (1, range(160))}

CHECKS: dict[str, Check] = {
    "erm": Check({"train": (0, range(256)), "validation": (1, range(101)), "test_biased": (None, range(0, 540, 7))},
                 run_erm),
    "masktune": Check({"train": (0, range(203)), "validation": (1, range(64))}, run_masktune,
                      erm_family="timm_wrapper_resnet", common=dict(per_device_eval_batch_size=16, logging_steps=100)),
    "masktune_authors": Check({"train": (0, range(64)), "validation": (1, range(48))}, run_masktune_authors),
    "gradtune": Check({"train": (0, range(256)), "validation": (1, range(101))}, run_gradtune, erm_family="hf_vit",
                      common=dict(per_device_eval_batch_size=8, logging_steps=100)),
    "fairdropout": Check({"train": (0, range(64)), "validation": (1, range(61))}, run_fairdropout),
    "counterfactual": Check({"train": (0, range(256)), "validation": (1, range(101))}, run_counterfactual),
    "group_dro": Check(_BASELINE_SPLITS, run_baseline, common=dict(group_dro_eta=0.1, group_dro_adjustment=1.0)),
    "jtt": Check(_BASELINE_SPLITS, run_baseline, common=dict(jtt_upweight=3, jtt_identification_epochs=1)),
    "reweight": Check(_BASELINE_SPLITS, run_baseline, common=dict(balance_mode="resample")),
    "subg": Check(_BASELINE_SPLITS, run_baseline),
}


def main(method: str, out_path: str, work_dir: str, erm_dir: str | None = None) -> None:
    check = CHECKS[method]
    digits = load_benchmark("biased_digits")
    data = DatasetDict({
        name: (digits[name] if seed is None else digits[name].shuffle(seed=seed)).select(rows)
        for name, (seed, rows) in check.splits.items()
    })
    world = RobustConfig(output_dir=work_dir, use_cpu=True, report_to="none").world_size
    if check.erm_family is not None:
        if erm_dir is None:
            raise SystemExit(f"The {method} check starts from a shared ERM model: pass its folder (erm_dir).")
        shared_erm_checkpoint(erm_dir, check.erm_family, data, {**COMMON, **check.common})
    run = check.run(method, data, work_dir, world, erm_dir)
    trainer = run.trainer
    weights = sum(p.detach().double().sum() for p in trainer.accelerator.unwrap_model(trainer.model).parameters())
    fingerprint = torch.tensor([*run.fingerprint, float(weights)])
    everyone = trainer.accelerator.gather(fingerprint[None]).view(-1, len(fingerprint))
    if trainer.is_world_process_zero():
        result = {"method": method, "world_size": world, "ranks_agree": bool((everyone == everyone[0]).all()),
                  **run.outputs}
        Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:5])
