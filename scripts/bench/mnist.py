"""Reproduction of MaskTune's biased-MNIST experiment on the real digits, side by side with the paper's numbers.

    HF_ROBUST_DATA=<root> python scripts/bench/mnist.py --rows masktune,randmask --seeds 0,1,2
    python scripts/bench/mnist.py --data_path <folder of ylecun/mnist's layout> --rows masktune --seeds 0

Needs MNIST: the Hub's `ylecun/mnist`, or a local copy in its layout (`<root>/mnist/{train,test}-*.parquet`,
pointed at by `HF_ROBUST_DATA=<root>` or `--data_path`); without one it says so and exits with status 2.

Each row runs the main job (scripts/train.py, its `biased_mnist` defaults: the CPU recipe, or `--config
scripts/recipes/biased_mnist_paper.yaml` through `--recipe paper`) once per training seed (the dataset itself is
fixed: seed 0) and writes `reproductions.biased_mnist.<row>` (the paper recipe: `reproductions.biased_mnist_paper_recipe.<row>`;
`--recipe authors`, the CPU recipe with the authors' fine-tuning details (AUTHORS_FINETUNING):
`reproductions.biased_mnist_authors_finetuning.<row>`; so that no recipe's rows overwrite another's) into the results file (scripts/benchmark_results.json
by default; rows not run keep their entries): `test_biased_accuracy`, `test_biased_worst_group`,
`test_original_accuracy` (each `{"mean", "std", "per_seed"}`, fractions), `seconds` (wall clock per run), and
`paper` (the paper's mean and std, as fractions, with the table they come from; null where the paper has none).

Rows: `erm` (read off the ERM stage of the `masktune` runs when both are asked for: the same model, trained once;
likewise `fairdropout` from `fairdropout_dfr`'s "FairDropout" stage and the 1- and 2-iteration two-squares rows from
the 3-iteration run of their mode: see DERIVED),
(`gradtune` and `dfr` start from one ERM model per seed, trained once per process and not counted in their time)
`masktune`, `randmask`, `two_squares_{accumulative,non_accumulative}_{1,2,3}` (num_squares=2, MaskTune iterations),
`gradtune`, `dfr`, `fairdropout`, `fairdropout_dfr`. The `masktune` row also keeps the selective-classification
report (ERM x MaskTune ensemble, coverages 100/95/90/85/80%).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent  # scripts/
sys.path.insert(0, str(HERE))  # run as a script: `bench` importable
RESULTS = HERE / "benchmark_results.json"
# the results file's table of each recipe (`--recipe`)
TABLE_KEYS = {"cpu": "biased_mnist", "paper": "biased_mnist_paper_recipe", "authors": "biased_mnist_authors_finetuning"}
# `--recipe authors`: the CPU recipe with the authors' fine-tuning (aliasgharkhani/Masktune, `src/methods/base_method.py`):
# BatchNorm statistics re-estimated, the SGD state of the training before each fine-tuning continued, round-1 masks
# from the ERM epoch of best validation accuracy
AUTHORS_FINETUNING = ["--finetune_freeze_norm_statistics", "false", "--finetune_continue_optimizer", "true",
                      "--mask_erm_model", "best_validation_accuracy"]


def _paper(biased, original, source):
    """The paper's (mean, std) in percent -> fractions."""
    entry = {"source": source}
    for key, value in (("test_biased_accuracy", biased), ("test_original_accuracy", original)):
        entry[key] = None if value is None else {"mean": value[0] / 100, "std": value[1] / 100}
    return entry


_TABLE5 = "Taghanaki et al. 2022 (arXiv:2210.00055), appendix Table 5 (two squares)"
PAPER = {
    "erm": _paper((18.59, 0.75), (60.78, 0.74), "arXiv:2210.00055, Figure 2 / appendix Table 5 (ERM, no masking)"),
    "masktune": _paper((98.26, 0.27), (98.46, 0.21), "arXiv:2210.00055, appendix Table 6"),
    "randmask": _paper((59.06, 9.25), (91.02, 1.87), "arXiv:2210.00055, appendix Table 6 (random masking)"),
    "two_squares_accumulative_1": _paper((24.68, 2.73), (59.93, 5.25), _TABLE5),
    "two_squares_accumulative_2": _paper((97.01, 2.86), (98.61, 0.61), _TABLE5),
    "two_squares_accumulative_3": _paper((98.88, 0.60), (99.00, 0.14), _TABLE5),
    "two_squares_non_accumulative_1": _paper((28.08, 11.44), (64.38, 10.45), _TABLE5),
    "two_squares_non_accumulative_2": _paper((30.69, 5.69), (62.07, 4.03), _TABLE5),
    "two_squares_non_accumulative_3": _paper((24.91, 2.45), (58.76, 0.76), _TABLE5),
}
ROWS = {  # row -> (method, extra flags of scripts/train.py)
    "erm": ("erm", []),
    "masktune": ("masktune", []),
    "randmask": ("masktune", ["--mask_method", "random"]),
    **{f"two_squares_{'accumulative' if acc else 'non_accumulative'}_{n}": (
        "masktune", ["--dataset_kwargs", '{"num_squares": 2}', "--masktune_iterations", str(n),
                     "--accumulative_masking", str(acc).lower()])
       for acc in (True, False) for n in (1, 2, 3)},
    "gradtune": ("gradtune", []),
    "dfr": ("dfr", []),
    "fairdropout": ("fairdropout", []),
    "fairdropout_dfr": ("fairdropout_dfr", []),
    # the baselines (GroupDRO and SUBG use the training groups; JTT does not)
    "group_dro": ("group_dro", []),
    "jtt": ("jtt", []),
    "subg": ("subg", []),
}

# rows read off a stage of another row's runs (the same model, trained once): asked-for row -> (row whose runs hold
# it, the stage). FairDropout is FairDropout-DFR's model before its last layer is retrained; MaskTune's iterations
# 1 and 2 are the 3-iteration run before its later iterations (iteration 1 is the same model in both modes).
DERIVED = {
    "erm": ("masktune", "ERM"),
    "fairdropout": ("fairdropout_dfr", "FairDropout"),
    **{f"two_squares_{mode}_{n}": (f"two_squares_{mode}_3", f"MaskTune {n}")
       for mode in ("accumulative", "non_accumulative") for n in (1, 2)},
}


def check_data(data_path: str | None) -> None:
    """Exit with a clear message (status 2) when MNIST can be read neither locally nor from the Hub."""
    from hf_robust.data import DataValidationError
    from hf_robust.data.benchmarks import _read

    try:
        _read("biased_mnist", "ylecun/mnist", "mnist", data_path, aliases=("mnist",))
    except DataValidationError as error:
        print(
            "error: biased_mnist needs MNIST and none was found: no local copy "
            f"(HF_ROBUST_DATA={os.environ.get('HF_ROBUST_DATA')!r}, --data_path={data_path!r}) and the Hub's "
            "ylecun/mnist could not be read. Point at a copy in the layout of ylecun/mnist (a folder with "
            "mnist/train-00000-of-00001.parquet and mnist/test-00000-of-00001.parquet): HF_ROBUST_DATA=<root> with "
            f"<root>/mnist, or --data_path <that folder>.\n({error})",
            file=sys.stderr,
        )
        sys.exit(2)


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_seed": values}


def summarise(runs: list[dict], seeds: list[int], stage: str | None = None) -> dict:
    """The row's entry from the main job's results (of `stage` of each run, e.g. "ERM", or its final model)."""
    splits = [run["stages"][stage] if stage else run["splits"] for run in runs]
    return {
        "seeds": seeds,
        "test_biased_accuracy": _stats([s["test_biased"]["accuracy"] for s in splits]),
        "test_biased_worst_group": _stats([s["test_biased"]["worst_group_accuracy"] for s in splits]),
        "test_original_accuracy": _stats([s["test_original"]["accuracy"] for s in splits]),
        "validation_accuracy": _stats([s["validation"]["accuracy"] for s in splits]),
        "validation_worst_class_accuracy": _stats([s["validation"]["worst_class_accuracy"] for s in splits]),
    }


_ERM_DIRS: dict[tuple, str] = {}
_WORK = tempfile.TemporaryDirectory(prefix="bench_mnist_erm_")


def erm_checkpoint(seed: int, recipe: list[str], data_path: str | None, log=print) -> str:
    """The ERM model of `seed` (trained once per process by the main job): GradTune and DFR start from it, as
    their own `erm` stage would train it, so the two rows share one ERM model per seed."""
    key = (seed, tuple(recipe))
    if key not in _ERM_DIRS:
        from bench.common import train_script

        out = str(Path(_WORK.name) / f"erm_seed{seed}")
        argv = ["--method", "erm", "--dataset", "biased_mnist", *recipe, "--seed", str(seed), "--output_dir", out,
                "--disable_tqdm", "true", "--save_strategy", "no", "--save_plots", "false"]
        if data_path:
            argv += ["--dataset_path", data_path]
        log(f"  shared ERM seed {seed}: scripts/train.py {' '.join(argv)}")
        train_script().main(argv)
        _ERM_DIRS[key] = out
    return _ERM_DIRS[key]


def run_row(row: str, seeds: list[int], recipe: list[str], data_path: str | None, log=print) -> tuple[dict, list]:
    from bench.common import train_script

    method, extra = ROWS[row]
    train = train_script()
    runs, seconds, cpu_seconds = [], [], []
    for seed in seeds:
        with tempfile.TemporaryDirectory(prefix=f"bench_mnist_{row}_") as tmp:
            argv = ["--method", method, "--dataset", "biased_mnist", *recipe, *extra, "--seed", str(seed),
                    "--output_dir", tmp, "--disable_tqdm", "true", "--save_strategy", "no", "--save_plots", "false"]
            if data_path:
                argv += ["--dataset_path", data_path]
            if method in ("gradtune", "dfr"):  # not timed: the shared ERM model is trained outside the row's clock
                argv += ["--erm_checkpoint", erm_checkpoint(seed, recipe, data_path, log)]
            log(f"  {row} seed {seed}: scripts/train.py {' '.join(argv)}")
            start, cpu = time.perf_counter(), _cpu_seconds()
            results = train.main(argv)
            seconds.append(round(time.perf_counter() - start, 1))
            cpu_seconds.append(round(_cpu_seconds() - cpu, 1))
            log(f"  {row} seed {seed}: {seconds[-1]} s, test_biased "
                f"{results['splits']['test_biased']['accuracy']:.4f}, test_original "
                f"{results['splits']['test_original']['accuracy']:.4f}")
            runs.append(results)
    entry = summarise(runs, seeds)
    entry["seconds"] = {"mean": statistics.mean(seconds), "per_seed": seconds}
    # CPU time of this process (user + system): on a shared machine, wall time includes waiting for the cores
    entry["cpu_seconds"] = {"mean": statistics.mean(cpu_seconds), "per_seed": cpu_seconds}
    import torch

    entry["torch_threads"] = torch.get_num_threads()
    entry["command"] = f"scripts/train.py --method {method} --dataset biased_mnist {' '.join(recipe + extra)}"
    if method == "masktune" and "selective" in runs[0]:
        entry["selective"] = [run["selective"] for run in runs]
    if "health" in runs[0]:
        entry["health"] = [run["health"] for run in runs]
    if "group_inference" in runs[0]:  # the inferred minority of each seed's ERM stage, per rule
        from bench.common import inference_summary

        entry["group_inference"] = [inference_summary(run) for run in runs]
    if "erm_mask_model" in runs[0]:  # mask_erm_model="best_validation_accuracy": each ERM epoch's score, the best
        entry["erm_mask_model"] = [run["erm_mask_model"] for run in runs]
    if "selection" in runs[0]:  # the knobs each seed's label-free selection chose
        entry["selection"] = [{"chosen_knobs": run["selection"]["chosen_knobs"],
                               "method_helped": run["selection"]["method_helped"]} for run in runs]
    return entry, runs


def merge_entries(first: dict, second: dict) -> dict:
    """One row's entry over the seeds of two runs of it (e.g. seeds run as separate processes): per-seed values
    concatenated, means and stds recomputed."""
    if set(first["seeds"]) & set(second["seeds"]):
        raise ValueError(f"Both entries have seeds {sorted(set(first['seeds']) & set(second['seeds']))}.")
    merged = {**first, "seeds": first["seeds"] + second["seeds"]}
    for key, value in first.items():
        if isinstance(value, dict) and "per_seed" in value and isinstance(second.get(key), dict):
            values = value["per_seed"] + second[key]["per_seed"]
            merged[key] = _stats(values) if "std" in value else {"mean": statistics.mean(values), "per_seed": values}
    for key in ("selective", "health", "selection", "group_inference", "erm_mask_model"):
        if key in first and key in second:
            merged[key] = first[key] + second[key]
    return merged


def markdown_table(table: dict) -> str:
    """The README table of `reproductions.biased_mnist`: ours (mean +- std over seeds, %) beside the paper's."""

    def cell(value):
        if not value:
            return "-"
        if len(value.get("per_seed", [0, 0])) == 1:  # one seed: no spread to show
            return f"{100 * value['mean']:.2f}"
        return f"{100 * value['mean']:.2f} +- {100 * value['std']:.2f}"

    lines = ["| row | seeds | test_biased acc | test_biased worst group | test_original acc | paper biased | "
             "paper original | seconds (CPU s) / run |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in ROWS:
        if row not in table:
            continue
        entry, paper = table[row], table[row].get("paper") or {}
        seconds = entry.get("seconds")
        timing = "-" if not seconds else f"{seconds['mean']:.0f} ({entry['cpu_seconds']['mean']:.0f})"
        lines.append(f"| {row} | {len(entry['seeds'])} | {cell(entry['test_biased_accuracy'])} | "
                     f"{cell(entry['test_biased_worst_group'])} | {cell(entry['test_original_accuracy'])} | "
                     f"{cell(paper.get('test_biased_accuracy'))} | {cell(paper.get('test_original_accuracy'))} | "
                     f"{timing} |")
    return "\n".join(lines)


SELECTIVE_TARGETS = (100, 95, 90)  # the coverages of the MaskTune paper's selective-classification tables


def selective_table(entry: dict) -> str:
    """The README table of the `masktune` row's selective classification: per selector and test split, the coverage
    reached and the risk (error on the kept examples) at the thresholds calibrated on validation for each target
    coverage, mean over the seeds (%)."""
    reports = [run["report"] for run in entry.get("selective", []) if run.get("report")]
    if not reports:
        return ""
    head = " | ".join(f"{t}% target: coverage / risk" for t in SELECTIVE_TARGETS)
    lines = [f"| selector | split | {head} |", "| --- | --- |" + " --- |" * len(SELECTIVE_TARGETS)]
    for selector in reports[0]:
        for split in reports[0][selector]:
            cells = []
            for target in SELECTIVE_TARGETS:
                coverage = statistics.mean(r[selector][split][f"coverage_at_{target}"] for r in reports)
                risk = statistics.mean(r[selector][split][f"risk_at_{target}"] for r in reports)
                cells.append(f"{100 * coverage:.1f} / {100 * risk:.2f}")
            lines.append(f"| {selector} | {split} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="masktune,erm", help=f"comma-separated, from {list(ROWS)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--recipe", choices=tuple(TABLE_KEYS), default="cpu",
                        help="cpu: scripts/train.py's biased_mnist defaults; paper: scripts/recipes/biased_mnist_paper.yaml; "
                             "authors: cpu with the authors' fine-tuning details (BatchNorm re-estimated, SGD state "
                             "continued, round-1 masks from the best-validation ERM epoch)")
    parser.add_argument("--data_path", default=None, help="local copy of ylecun/mnist (else HF_ROBUST_DATA / the Hub)")
    parser.add_argument("--output", default=str(RESULTS), help="results file, updated in place (row by row)")
    parser.add_argument("--table", action="store_true", help="print the README table of the results file and exit")
    parser.add_argument("--merge", nargs="*", default=[],
                        help="results files of other runs (other seeds) whose biased_mnist rows are merged into "
                             "--output, seed by seed; nothing is trained")
    args = parser.parse_args(argv)
    if args.merge:
        path = Path(args.output)
        results = json.loads(path.read_text()) if path.exists() else {}
        key = TABLE_KEYS[args.recipe]
        table = results.setdefault("reproductions", {}).setdefault(key, {})
        for other in args.merge:
            for row, entry in json.loads(Path(other).read_text())["reproductions"].get(key, {}).items():
                table[row] = merge_entries(table[row], entry) if row in table else entry
        path.write_text(json.dumps(results, indent=2))
        print(markdown_table(table))
        return
    if args.table:
        results = json.loads(Path(args.output).read_text()) if Path(args.output).exists() else {}
        table = results.get("reproductions", {}).get("biased_mnist", {})
        print(markdown_table(table))
        for recipe, what in (("paper", "The paper's recipe"),
                             ("authors", "The CPU recipe with the authors' fine-tuning details")):
            other = results.get("reproductions", {}).get(TABLE_KEYS[recipe])
            if other:
                print(f"\n{what} (--recipe {recipe}, `reproductions.{TABLE_KEYS[recipe]}`):\n")
                print(markdown_table(other))
        if "masktune" in table and table["masktune"].get("selective"):
            print(f"\nSelective classification (`masktune` row, {len(table['masktune']['selective'])} seeds, "
                  "thresholds calibrated on validation):\n")
            print(selective_table(table["masktune"]))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"error: --rows {unknown}: expected rows from {list(ROWS)}.")
    seeds = [int(s) for s in args.seeds.split(",")]
    check_data(args.data_path)
    recipe = {"paper": ["--config", str(HERE / "recipes" / "biased_mnist_paper.yaml")],
              "authors": AUTHORS_FINETUNING}.get(args.recipe, [])
    path = Path(args.output)
    for row in rows:
        if row in DERIVED and DERIVED[row][0] in rows:
            continue  # read off the other row's runs below
        print(f"== biased_mnist {row} (seeds {seeds}, {args.recipe} recipe)", flush=True)
        entry, runs = run_row(row, seeds, recipe, args.data_path)
        entries = {row: entry}
        for name, (source, stage) in DERIVED.items():
            if source == row and name in rows:
                derived = summarise(runs, seeds, stage=stage)
                derived["seconds"] = None
                derived["command"] = f"the {stage!r} stage of the {source} row's runs (the same model, trained once)"
                if name == "fairdropout" and "selection" in entry:  # FairDropout's knobs, chosen in those runs
                    derived["selection"] = entry["selection"]
                entries[name] = derived
        results = json.loads(path.read_text()) if path.exists() else {}
        table = results.setdefault("reproductions", {}).setdefault(TABLE_KEYS[args.recipe], {})
        for name, value in entries.items():
            value["recipe"] = args.recipe
            value["paper"] = PAPER.get(name)
            value["measured_at"] = time.strftime("%Y-%m-%d %H:%M")
            table[name] = value
        path.write_text(json.dumps(results, indent=2))
        for name, value in entries.items():
            print(f"   {name}: test_biased {value['test_biased_accuracy']['mean']:.4f} (worst group "
                  f"{value['test_biased_worst_group']['mean']:.4f}), test_original "
                  f"{value['test_original_accuracy']['mean']:.4f}; paper {value['paper']}", flush=True)


if __name__ == "__main__":
    main()
