"""Two squares on real MNIST (the MaskTune paper's appendix Table 5): which of the authors' fine-tuning details matter.

    HF_ROBUST_DATA=<root> python scripts/bench/mnist_two_squares.py --seeds 0,1,2 --work_dir runs/two_squares

A diagnostic of issue 13, not a method: per training seed it trains ONE ERM stage (the CPU default: 3 epochs at a
constant 0.01) inside the `control` run and fine-tunes that model three ways, accumulative masking, 3 rounds of one
epoch at ERM's final learning rate (0.01):

- `control`: hf_robust's defaults: the round-1 masks from the last ERM epoch, a fresh SGD per round, BatchNorm
  statistics frozen during fine-tuning;
- `bn`: BatchNorm statistics re-estimated during fine-tuning (`--finetune_freeze_norm_statistics false`);
- `authors`: as the authors' code (aliasgharkhani/Masktune, `src/methods/base_method.py`) runs: BatchNorm
  re-estimated, the SGD state (momentum buffers) of ERM's last step continued into round 1 and from round to round,
  and the round-1 masks computed with the ERM epoch of best validation accuracy (the authors' `best_erm_model`;
  the first maximum, as their strict `>` keeps it).

The `bn` and `authors` runs start from the `control` run's ERM model (`--erm_checkpoint`), so the three differ
only in the fine-tuning. The two authors' details were added here by a subclass of `MaskTuneTrainer`
(`AuthorsFinetuning`) before they became MaskTune options (`finetune_continue_optimizer`, `mask_erm_model`; full
runs with them: `scripts/bench/mnist.py --recipe authors`, which reproduce this script's `authors` runs). Each run also gets a square probe: the accuracy of its ERM
and final models on the `test_original` digits with no square, the red one only, the blue one only and both
pasted in (the 5-9 with a square are the failing group of `test_biased`), which shows which square each model
reads.

Writes `reproductions.biased_mnist_two_squares_diagnostics.finetuning_<variant>` into the results file and prints a
table. Runs whose `results.json` is already in `--work_dir` are read, not trained again.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent  # scripts/
sys.path.insert(0, str(HERE))
RESULTS = HERE / "benchmark_results.json"
VARIANTS = ("control", "bn", "authors")
KEY = "biased_mnist_two_squares_diagnostics"


def trainer_class():
    """`MaskTuneTrainer` with the authors' two fine-tuning details that hf_robust has no option for (see the
    module's docstring), and the ERM stage's artifacts the other variants start from."""
    import torch
    from safetensors.torch import load_file, save_model
    from transformers import TrainerCallback

    from hf_robust.methods.masktune.trainer import MaskTuneTrainer

    class EpochStates(TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer

        def on_epoch_end(self, args, state, control, **kwargs):
            trainer = self.trainer
            if trainer.record_erm_to is not None and Path(args.output_dir).name == "erm":
                model = trainer.accelerator.unwrap_model(trainer.model)
                trainer.epoch_states.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    class AuthorsFinetuning(MaskTuneTrainer):
        record_erm_to: Path | None = None  # control: save the ERM stage's last / best epochs and its SGD state here
        continue_from: Path | None = None  # authors: the folder of those artifacts

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.epoch_states, self.carried_state, self.best_state = [], None, None
            self.add_callback(EpochStates(self))
            if self.continue_from is not None:
                self.carried_state = torch.load(self.continue_from / "erm_optimizer.pt", weights_only=False)
                self.best_state = load_file(str(self.continue_from / "erm_best" / "model.safetensors"))

        def create_optimizer(self, *args, **kwargs):
            optimizer = super().create_optimizer(*args, **kwargs)
            if self.carried_state is not None and Path(self.args.output_dir).name.startswith("finetune"):
                optimizer.load_state_dict(self.carried_state)  # same parameters, same groups: the momentum goes on
            return optimizer

        def train_stage(self, stage_dir, resume, train_dataset=None, **overrides):
            output = super().train_stage(stage_dir, resume, train_dataset, **overrides)
            if self.continue_from is not None:
                self.carried_state = copy.deepcopy(self.optimizer.state_dict())  # round to round
            if self.record_erm_to is not None and stage_dir.name == "erm":
                self._record_erm(self.record_erm_to)
            return output

        def _record_erm(self, folder: Path) -> None:
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(self.optimizer.state_dict(), folder / "erm_optimizer.pt")
            model = self.accelerator.unwrap_model(self.model)
            last = {k: v.detach().clone() for k, v in model.state_dict().items()}
            (folder / "erm_last").mkdir(exist_ok=True)
            save_model(model, str(folder / "erm_last" / "model.safetensors"))
            accuracy = []
            for state in self.epoch_states:
                model.load_state_dict(state)
                accuracy.append(self.validation_summary()["accuracy"])  # labels only
            best = max(range(len(accuracy)), key=lambda i: (accuracy[i], -i))
            model.load_state_dict(self.epoch_states[best])
            (folder / "erm_best").mkdir(exist_ok=True)
            save_model(model, str(folder / "erm_best" / "model.safetensors"))
            model.load_state_dict(last)
            (folder / "erm_epochs.json").write_text(json.dumps({"validation_accuracy": accuracy,
                                                                "best_epoch": best + 1}))

        def _compute_masks(self, k, previous, description):
            if self.best_state is None or previous is not None:
                return super()._compute_masks(k, previous, description)
            model = self.accelerator.unwrap_model(self.model)  # round 1: the best-validation ERM epoch masks
            last = {n: v.detach().clone() for n, v in model.state_dict().items()}
            model.load_state_dict(self.best_state)
            self.best_state = None
            try:
                return super()._compute_masks(k, previous, description)
            finally:
                model.load_state_dict(last)

    return AuthorsFinetuning


@functools.lru_cache(maxsize=2)
def _test_original(data_path: str | None):
    """The `test_original` digits (uint8 N x 28 x 28 x 3) and labels, decoded once per process."""
    import numpy as np

    from hf_robust.data import load_benchmark

    split = load_benchmark("biased_mnist", num_squares=2, path=data_path)["test_original"]
    return np.stack([np.asarray(image.convert("RGB")) for image in split["image"]]), np.asarray(split["label"])


def square_probe(model_folder: Path, weights: Path | None, data_path: str | None) -> dict:
    """Accuracy (%) of a saved model on the `test_original` digits of each class with no square, the red square
    (top-left), the blue one (top-right) or both pasted in, as the benchmark draws them."""
    import torch
    from safetensors.torch import load_model
    from transformers import AutoModelForImageClassification

    import hf_robust.models.mnist_cnn  # noqa: F401  (registers the preset)

    images, labels = _test_original(data_path)
    model = AutoModelForImageClassification.from_pretrained(str(model_folder))
    if weights is not None:
        load_model(model, str(weights))
    model.eval()
    probe = {}
    for label in (0, 1):
        for name in ("none", "red", "blue", "both"):
            x = images[labels == label].copy()
            if name in ("red", "both"):
                x[:, 0:4, 0:4] = (255, 0, 0)
            if name in ("blue", "both"):
                x[:, 0:4, -4:] = (0, 0, 255)
            pixels = torch.tensor(x).permute(0, 3, 1, 2).float() / 255  # the preset's processor: rescale only
            with torch.no_grad():
                predictions = model(pixel_values=pixels).logits.argmax(-1)
            probe[f"class_{label}_{name}"] = round(100 * (predictions == label).float().mean().item(), 2)
    return probe


def run(seed: int, variant: str, work: Path, data_path: str | None) -> dict:
    """One run (or the one already in `work`), summarised."""
    folder = work / f"seed{seed}"
    out = folder / variant
    argv = ["--method", "masktune", "--dataset", "biased_mnist", "--dataset_kwargs", '{"num_squares": 2}',
            "--masktune_iterations", "3", "--accumulative_masking", "true", "--seed", str(seed),
            "--disable_tqdm", "true", "--save_strategy", "no", "--save_plots", "false", "--output_dir", str(out)]
    if variant != "control":
        argv += ["--erm_checkpoint", str(folder / "erm_last"), "--finetune_learning_rate", "0.01",
                 "--finetune_freeze_norm_statistics", "false"]
    if data_path:
        argv += ["--dataset_path", data_path]
    seconds = None
    if not (out / "results.json").is_file():
        if variant != "control" and not (folder / "erm_last").is_dir():
            run(seed, "control", work, data_path)
        from bench.common import train_script
        from hf_robust.methods.registry import METHODS

        cls = trainer_class()
        cls.record_erm_to = folder if variant == "control" else None
        cls.continue_from = folder if variant == "authors" else None
        spec = METHODS["masktune"]
        METHODS["masktune"] = type("Spec", (), {"__getattr__": lambda self, name: getattr(spec, name),
                                                "trainer_class": lambda self: cls})()
        start = time.perf_counter()
        try:
            train_script().main(argv)
        finally:
            METHODS["masktune"] = spec
        seconds = round(time.perf_counter() - start, 1)
        (folder / f"{variant}.json").write_text(json.dumps({"seconds": seconds}))
    elif (folder / f"{variant}.json").is_file():  # the wall time of the run when it was trained
        seconds = json.loads((folder / f"{variant}.json").read_text()).get("seconds")
    results = json.loads((out / "results.json").read_text())
    metrics = ("accuracy", "worst_group_accuracy")
    summary = {
        "seed": seed,
        "seconds": seconds,
        "splits": {s: {m: results["splits"][s][m] for m in metrics}
                   for s in ("validation", "test_biased", "test_original")},
        "earlier_stages_accuracy": {
            stage: {s: values[s]["accuracy"] for s in ("test_biased", "test_original")}
            for stage, values in results["stages"].items() if stage == "ERM" or stage.startswith("MaskTune ")},
        "health": results.get("health", {}).get("status"),
        "square_probe": {"ERM": square_probe(out, folder / "erm_last" / "model.safetensors", data_path),
                         "final": square_probe(out, None, data_path)},
    }
    epochs = folder / "erm_epochs.json"
    if epochs.is_file():
        summary["erm_epochs"] = json.loads(epochs.read_text())
    return summary


def table(entries: dict) -> str:
    lines = ["| fine-tuning | seeds | test_biased acc, rounds 1 / 2 / 3 (per seed) | mean after round 3 | worst group | "
             "test_original |", "| --- | --- | --- | --- | --- | --- |"]
    for variant, entry in entries.items():
        runs = entry["runs"]
        rounds = [" / ".join(f"{100 * r['earlier_stages_accuracy'][f'MaskTune {i}']['test_biased']:.1f}"
                             for i in (1, 2)) + f" / {100 * r['splits']['test_biased']['accuracy']:.1f}" for r in runs]
        mean = statistics.mean(r["splits"]["test_biased"]["accuracy"] for r in runs)
        first = runs[:3]  # the acceptance's seeds, when more were run
        mean_text = f"**{100 * mean:.1f}**" + (
            f" (first 3: {100 * statistics.mean(r['splits']['test_biased']['accuracy'] for r in first):.1f})"
            if len(runs) > 3 else "")
        worst = statistics.mean(r["splits"]["test_biased"]["worst_group_accuracy"] for r in runs)
        original = statistics.mean(r["splits"]["test_original"]["accuracy"] for r in runs)
        lines.append(f"| {variant} | {','.join(str(r['seed']) for r in runs)} | {'; '.join(rounds)} | "
                     f"{mean_text} | {100 * worst:.1f} | {100 * original:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {VARIANTS}")
    parser.add_argument("--work_dir", required=True, help="the runs' folders (kept: later calls read them)")
    parser.add_argument("--data_path", default=None, help="local copy of ylecun/mnist (else HF_ROBUST_DATA / the Hub)")
    parser.add_argument("--output", default=str(RESULTS), help="results file, updated in place")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"error: --variants {unknown}: expected some of {list(VARIANTS)}.")
    from bench.mnist import check_data

    check_data(args.data_path)
    import torch

    seeds = [int(s) for s in args.seeds.split(",")]
    entries = {}
    for variant in variants:
        runs = [run(seed, variant, Path(args.work_dir), args.data_path) for seed in seeds]
        entries[variant] = {
            "command": f"python scripts/bench/mnist_two_squares.py --variants {variant} --seeds <seed>",
            "runs": runs,
            "test_biased_accuracy_mean": statistics.mean(r["splits"]["test_biased"]["accuracy"] for r in runs),
            "torch_threads": torch.get_num_threads(),
            "measured_at": time.strftime("%Y-%m-%d %H:%M"),
            "note": "two squares, accumulative, 3 rounds, CPU-default ERM; the fine-tuning variants share one ERM "
                    "model per seed (scripts/bench/mnist_two_squares.py)",
        }
    path = Path(args.output)
    results = json.loads(path.read_text()) if path.exists() else {}
    diagnostics = results.setdefault("reproductions", {}).setdefault(KEY, {})
    for variant, entry in entries.items():
        diagnostics[f"finetuning_{variant}"] = entry
    path.write_text(json.dumps(results, indent=2))
    print(table(entries))


if __name__ == "__main__":
    main()
