"""Quality and speed of every method, measured on this machine and written to scripts/benchmark_results.json.

    python scripts/benchmark.py                      # every method, seeds 0 1 2
    python scripts/benchmark.py --methods erm --seeds 0
    python scripts/benchmark.py --suite              # every method's default on every benchmark of the suite

Quality: the main job (scripts/train.py) with its defaults on the embedded `biased_digits` benchmark (the
dataset is fixed, seed 0; the training seed varies), per split and per group, and the mean over seeds.
Speed: ratios measured side by side in ONE process on the same model and data (absolute seconds depend on
the machine; ratios are what the issues state). Timed assertions never go into the tests: they live here.

Each method contributes one function to BENCHMARKS; running a subset of methods updates only their entries.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import train_script  # scripts/ is sys.path[0] when this file runs

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "benchmark_results.json"


def _summary(runs: list[dict], split: str) -> dict:
    def values(key, source="splits"):
        return [run[source][split][key] for run in runs if split in run[source]]

    out = {}
    for key in ("worst_group_accuracy", "accuracy"):
        vals = values(key)
        out[key] = {"mean": statistics.mean(vals), "per_seed": vals}
    return out


def quality(method: str, seeds: list[int], extra: list[str] | None = None, collect: tuple[str, ...] = ()) -> dict:
    """Run the main job per seed (default recipe) and keep every split's report plus wall-clock time (and the
    `collect` keys of the results, for methods that report more)."""
    train = train_script()
    runs = []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            argv = ["--method", method, "--seed", str(seed), "--output_dir", tmp, "--disable_tqdm", "true",
                    "--save_strategy", "no", *(extra or [])]
            results = train.main(argv)
            results["seconds"] = round(time.perf_counter() - start, 1)
            runs.append(results)
    splits = list(runs[0]["splits"])
    summary = {split: _summary(runs, split) for split in splits}
    stage_summary = {}
    for stage in runs[0].get("stages", {}):
        stage_runs = [{"splits": run["stages"][stage]} for run in runs]
        stage_summary[stage] = {split: _summary(stage_runs, split) for split in splits}
    return {
        "seeds": seeds,
        "mean": summary,
        "stages_mean": stage_summary,
        "seconds_per_run": [run["seconds"] for run in runs],
        "runs": [{k: run[k] for k in ("seed", "splits", "stages", "seconds", *collect) if k in run} for run in runs],
    }


def erm_timing() -> dict:
    """One ERM epoch vs one inference pass vs the distributed per-example pass, on the default model/data."""
    import torch
    import transformers

    from hf_robust.data import load_benchmark
    from hf_robust.models import load_model
    from hf_robust.methods import RobustConfig, RobustTrainer

    transformers.logging.set_verbosity_error()
    data = load_benchmark("biased_digits")
    transformers.set_seed(0)
    model, _ = load_model("digits-resnet18", 2, data["train"].features["label"].names)
    with tempfile.TemporaryDirectory() as tmp:
        args = RobustConfig(output_dir=tmp, num_train_epochs=1, per_device_train_batch_size=128,
                            per_device_eval_batch_size=256, learning_rate=1e-3, save_strategy="no", report_to="none",
                            disable_tqdm=True, logging_steps=10_000)
        trainer = RobustTrainer(model, args, train_dataset=data["train"])
        start = time.perf_counter()
        trainer.train()
        epoch = time.perf_counter() - start

        start = time.perf_counter()
        trainer.predict(data["train"])
        inference = time.perf_counter() - start

        def logits(model, batch):
            with torch.no_grad():
                return {"logits": model(pixel_values=batch["pixel_values"]).logits}

        start = time.perf_counter()
        trainer.compute_per_example(data["train"], logits, description="Benchmark pass")
        per_example = time.perf_counter() - start
    return {
        "erm_epoch_seconds": round(epoch, 2),
        "inference_pass_seconds": round(inference, 2),
        "per_example_pass_seconds": round(per_example, 2),
        "per_example_pass_over_inference": round(per_example / inference, 3),
        "inference_pass_over_erm_epoch": round(inference / epoch, 3),
        "train_examples": len(data["train"]),
    }


def cli_help_seconds() -> float:
    import subprocess

    start = time.perf_counter()
    subprocess.run([sys.executable, str(HERE / "train.py"), "--help"], check=True, capture_output=True)
    return round(time.perf_counter() - start, 2)


def benchmark_erm(seeds: list[int]) -> dict:
    return {"quality": quality("erm", seeds), "timing": {**erm_timing(), "train_py_help_seconds": cli_help_seconds()}}


def benchmark_counterfactual(seeds: list[int]) -> dict:
    """scripts/bench/counterfactual.py: the embedded demo per seed; distillation step / plain step."""
    from bench import counterfactual as bench_counterfactual

    return bench_counterfactual.benchmark_counterfactual(seeds, quality)


def benchmark_fairdropout(seeds: list[int]) -> dict:
    """Position/p chosen on validation worst-class accuracy; FairDropout, FairDropout-DFR and ERM on every seed;
    speed ratios (scripts/bench/fair_dropout.py)."""
    from bench import fair_dropout as bench_fair_dropout

    return {"timing": bench_fair_dropout.timing(), "quality": bench_fair_dropout.quality(train_script(), seeds)}


def benchmark_gradtune(seeds: list[int]) -> dict:
    """scripts/bench/gradtune.py: GradTune and DFR share one ERM model per seed within a process."""
    from bench import gradtune as bench_gradtune

    return bench_gradtune.benchmark_gradtune(seeds)


def benchmark_dfr(seeds: list[int]) -> dict:
    from bench import gradtune as bench_gradtune

    return bench_gradtune.benchmark_dfr(seeds)


def benchmark_masktune(seeds: list[int]) -> dict:
    """scripts/bench/masktune.py: the main job's ERM -> MaskTune per seed; masking pass / ERM epoch."""
    from bench import masktune as bench_masktune

    return bench_masktune.benchmark_masktune(seeds, quality)


def timing_counterfactual() -> dict:
    from bench import counterfactual as bench_counterfactual

    return bench_counterfactual.step_timing()


def timing_masktune() -> dict:
    from bench import masktune as bench_masktune

    return bench_masktune.timing()


# methods whose speed measurements can be re-run alone (`--timing_only`), keeping the quality results on file
TIMINGS = {"counterfactual": timing_counterfactual, "masktune": timing_masktune}

BENCHMARKS = {"erm": benchmark_erm, "masktune": benchmark_masktune, "gradtune": benchmark_gradtune,
              "dfr": benchmark_dfr, "fairdropout": benchmark_fairdropout, "counterfactual": benchmark_counterfactual}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(BENCHMARKS), help=f"comma-separated, from {list(BENCHMARKS)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds of the quality runs")
    parser.add_argument("--output", default=str(RESULTS),
                        help="results file, updated in place (method by method); default: the tracked "
                             "scripts/benchmark_results.json — pass another path for a trial run")
    parser.add_argument("--suite", action="store_true",
                        help="run every method's default on every benchmark of the shortcut suite (scripts/bench/suite.py); "
                             "--methods and --benchmarks narrow it; results under 'suite' in the results file")
    parser.add_argument("--benchmarks", default=None, help="with --suite: comma-separated benchmarks of the suite")
    parser.add_argument("--timing_only", action="store_true",
                        help=f"re-measure only the speed ratios (methods {list(TIMINGS)}), keep the quality results")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    seeds = [int(s) for s in args.seeds.split(",")]
    path = Path(args.output)
    results = json.loads(path.read_text()) if path.exists() else {}
    import torch

    results["machine"] = {
        "platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    if args.suite:
        from bench import suite as bench_suite

        methods = bench_suite.SUITE_METHODS if args.methods == ",".join(BENCHMARKS) else tuple(args.methods.split(","))
        benchmarks = tuple(args.benchmarks.split(",")) if args.benchmarks else bench_suite.SUITE
        suite = results.setdefault("suite", {})

        def save(table):
            for benchmark, entries in table.items():
                for method, entry in entries.items():
                    old = suite.setdefault(benchmark, {}).get(method, {"runs": []})
                    seeds = {r["seed"] for r in entry["runs"]}
                    runs = sorted([r for r in old["runs"] if r["seed"] not in seeds] + entry["runs"],
                                  key=lambda r: r["seed"])
                    suite[benchmark][method] = {"runs": runs, "mean": bench_suite._mean(runs),
                                                "measured_at": time.strftime("%Y-%m-%d %H:%M")}
            path.write_text(json.dumps(results, indent=2))

        bench_suite.run_suite(seeds, benchmarks, methods, on_result=save, recorded=json.loads(json.dumps(suite)))
        print(bench_suite.markdown_table(suite))
        print(bench_suite.knobs_table(suite))
        return
    for method in args.methods.split(","):
        if args.timing_only:
            if method not in TIMINGS:
                sys.exit(f"error: --timing_only: no separate timing for {method!r}; available: {list(TIMINGS)}.")
            print(f"== timing {method}", flush=True)
            entry = results.setdefault("methods", {}).setdefault(method, {})
            entry["timing"] = {**entry.get("timing", {}), **TIMINGS[method]()}
            entry["timing_measured_at"] = time.strftime("%Y-%m-%d %H:%M")
            path.write_text(json.dumps(results, indent=2))
            continue
        print(f"== benchmarking {method} (seeds {seeds})", flush=True)
        start = time.perf_counter()
        results.setdefault("methods", {})[method] = BENCHMARKS[method](seeds)
        results["methods"][method]["measured_at"] = time.strftime("%Y-%m-%d %H:%M")
        results["methods"][method]["benchmark_seconds"] = round(time.perf_counter() - start, 1)
        path.write_text(json.dumps(results, indent=2))
    print(json.dumps({m: r.get("quality", {}).get("mean") for m, r in results["methods"].items()}, indent=1))


if __name__ == "__main__":
    main()
