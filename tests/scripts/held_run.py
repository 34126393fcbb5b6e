"""A real ERM run into an output folder that waits, once it holds the folder, until a gate file appears.

Usage: held_run.py <output_dir> <seed> <started file> <gate file>. Used by tests/test_reliability.py to have two
processes run into one folder at the same time, deterministically (no sleeps racing each other). Reads the
biased_digits cache of the HF_HOME it inherits.
"""

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from transformers import TrainerCallback  # noqa: E402

from hf_robust.data import load_benchmark  # noqa: E402
from hf_robust.models import load_model  # noqa: E402
from hf_robust.methods import RobustConfig, RobustTrainer  # noqa: E402

output_dir, seed, started, gate = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])


class WaitForGate(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        started.touch()
        deadline = time.time() + 300
        while not gate.exists() and time.time() < deadline:
            time.sleep(0.1)


data = load_benchmark("biased_digits")
model, processor = load_model("digits-resnet18", 2, ["digit 0-4", "digit 5-9"])
config = RobustConfig(output_dir=output_dir, max_steps=1, per_device_train_batch_size=16, save_strategy="no",
                      report_to="none", use_cpu=True, disable_tqdm=True, seed=seed, save_plots=False)
trainer = RobustTrainer(model, config, train_dataset=data["train"].shuffle(seed=0).select(range(32)),
                        eval_dataset={"validation": data["validation"].select(range(0, 1436, 45))},
                        processing_class=processor, callbacks=[WaitForGate()])
trainer.train()
trainer.save_model()
