"""Overlapping evaluation groups under N processes: `main(out_json, work_dir)` evaluates a fixed tiny ViT on 101
biased_digits validation examples that carry random overlapping groups (`overlapping_groups`; group 5 empty), with
a per-device batch of 8 (uneven shards, batches with different numbers of groups per example: padding on both
axes), and writes the metrics and the memberships. Run by tests/test_data.py once as one process and once under
`accelerate launch --multi_gpu --num_processes 2` (CPU, gloo). Standalone:
`python tests/scripts/overlapping_distributed.py <out_json> <work_dir>`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # conftest.make_model
from conftest import make_model  # noqa: E402

import hf_robust.resources  # noqa: E402
from hf_robust.data import load_benchmark  # noqa: E402
from hf_robust.data.overlapping import add_overlapping_groups  # noqa: E402
from hf_robust.methods import RobustConfig, RobustTrainer  # noqa: E402

if (REPO / "metrics" / "worst_group_accuracy").is_dir():  # this checkout's metric, whatever is installed
    hf_robust.resources.metric_path = lambda name: str(REPO / "metrics" / name)


def main(out_json: str, work_dir: str) -> None:
    data = load_benchmark("biased_digits")["validation"].select(range(101))
    rng = np.random.default_rng(0)
    matrix = rng.random((len(data), 6)) < [0.5, 0.3, 0.1, 0.6, 0.2, 0.0]
    memberships = [np.flatnonzero(row).tolist() for row in matrix]
    data = add_overlapping_groups(data, memberships, [f"g{g}" for g in range(6)])
    model, processor = make_model("hf_vit", seed=0)
    config = RobustConfig(output_dir=work_dir, per_device_eval_batch_size=8, use_cpu=True, report_to="none",
                          disable_tqdm=True, seed=0, save_strategy="no")
    trainer = RobustTrainer(model, config, eval_dataset={"validation": data}, processing_class=processor)
    metrics = trainer.evaluate()
    logits = trainer.predict(data).predictions
    if trainer.is_world_process_zero():
        Path(out_json).write_text(json.dumps({
            "world_size": config.world_size, "metrics": metrics, "memberships": memberships,
            "predictions": np.asarray(logits).argmax(-1).tolist(), "labels": list(data["label"]),
        }))


if __name__ == "__main__":
    main(*sys.argv[1:])
