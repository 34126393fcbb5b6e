"""Group inference's 2-process check: `python group_inference_distributed.py <out_json> <work_dir> <erm_dir>`, run by
tests/test_group_inference.py once as one process and once under `accelerate launch --multi_gpu --num_processes 2`
(CPU, gloo).

A GradTune run (tiny ViT, odd-sized subsets of biased_digits: uneven shards) from a shared ERM model (trained and
saved by the one-process run, found by the two-process one: both infer from the same weights); the hook runs after
its `erm` stage. The main process writes the run's `group_inference` report, the inferred sets and GradTune's own
fine-tuning set; `ranks_agree` says every process holds the same sets.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from datasets import DatasetDict

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # tests/ for conftest.make_model
sys.path.insert(0, __file__.rsplit("/", 1)[0])  # tests/scripts for method_distributed
from conftest import make_model  # noqa: E402
from method_distributed import COMMON, shared_erm_checkpoint  # noqa: E402

from hf_robust.data import load_benchmark  # noqa: E402
from hf_robust.methods import GradTuneConfig, GradTuneTrainer  # noqa: E402


def main(out_path: str, work_dir: str, erm_dir: str) -> None:
    digits = load_benchmark("biased_digits")
    data = DatasetDict({"train": digits["train"].shuffle(seed=0).select(range(97)),
                        "validation": digits["validation"].shuffle(seed=1).select(range(61))})
    common = dict(per_device_eval_batch_size=8, logging_steps=100)
    shared_erm_checkpoint(erm_dir, "hf_vit", data, {**COMMON, **common})
    model, processor = make_model("hf_vit", seed=1)  # other weights: everything comes from the checkpoint
    args = GradTuneConfig(output_dir=work_dir, erm_checkpoint=erm_dir, finetune_set_size=20, last_layer_epochs=5,
                          **COMMON, **common)
    trainer = GradTuneTrainer(model, args, train_dataset=data["train"], eval_dataset={"validation": data["validation"]},
                              processing_class=processor)
    trainer.train()
    trainer.save_model()
    hook = next(h for h in trainer.run_hooks() if type(h).__name__ == "GroupInferenceHook")
    sets = {k: v.tolist() for k, v in hook.tensors.items() if k.endswith("_idx")}
    fingerprint = torch.tensor([float(sum(v)) + len(v) for v in sets.values()], dtype=torch.float64)
    everyone = trainer.accelerator.gather(fingerprint[None]).view(-1, len(fingerprint))
    if trainer.is_world_process_zero():
        Path(out_path).write_text(json.dumps({
            "world_size": args.world_size,
            "ranks_agree": bool((everyone == everyone[0]).all()),
            "report": json.loads((Path(work_dir) / "results.json").read_text())["group_inference"],
            "sets": sets,
            "gradtune_set": torch.sort(trainer.last_layer.finetune_sets[0]).values.tolist(),
            "card_has_section": "## Which examples look like the minority?" in (Path(work_dir) / "README.md").read_text(),
        }))


if __name__ == "__main__":
    main(*sys.argv[1:4])
