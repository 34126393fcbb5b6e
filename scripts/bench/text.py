"""Every method on `spurious_text` with the pre-trained MiniLM: the text benchmark on which ERM leans on a shortcut.

    python scripts/bench/text.py --rows erm,dfr --seeds 0          # run, and update the results file
    python scripts/bench/text.py --table                           # print the README table of the results file

Each row runs the main job (scripts/train.py, the `spurious_text` recipe: the `minilm` preset, i.e. the real
pre-trained all-MiniLM-L6-v2 of the `text` extra) once per training seed and writes
`reproductions.spurious_text.<row>` into the results file (scripts/benchmark_results.json by default; rows and seeds
not run keep their entries, so seeds may be run by separate processes, one after the other or side by side):
`test_worst_group`, `test_accuracy` (each `{"mean", "std", "per_seed"}`, fractions), `health` (the run's health
status per seed), `seconds` (wall clock per run) and `runs` (one record per seed: the knobs chosen, the reference's
worst group, the health reason).

Rows: `erm`; `erm_balanced` (ERM on a group-balanced training set of the same size, the token on half of each
class: the reference that shows the core signal is learnable); `masktune` (token masking); `gradtune` and `dfr`
(from the `erm` row's model of the same seed, `--erm_checkpoint`, when this process trained it: their seconds then
leave the shared ERM out); `fairdropout` (position `fc`); `fairdropout_dfr` (from the `fairdropout` row's model of
the same seed when this process trained it). Each record's `reference_test_worst_group` is its run's own reference
stage (ERM; the FairDropout model for FairDropout-DFR); for FairDropout, the `erm` row's run of the same seed.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
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
DATASET = "spurious_text"

ROWS = {  # row -> (method, extra flags of scripts/train.py)
    "erm": ("erm", []),
    "erm_balanced": ("erm", ["--dataset_kwargs", '{"majority_fraction": 0.5, "minority_fraction": 0.5}']),
    "masktune": ("masktune", []),
    "gradtune": ("gradtune", []),
    "dfr": ("dfr", []),
    "fairdropout": ("fairdropout", ["--fair_dropout_positions", "fc"]),
    "fairdropout_dfr": ("fairdropout_dfr", ["--fair_dropout_positions", "fc"]),
    # the baselines (GroupDRO and SUBG use the training groups; JTT does not)
    "group_dro": ("group_dro", []),
    "subg": ("subg", []),
    "jtt": ("jtt", []),
}
STARTS_FROM = {"gradtune": "erm", "dfr": "erm", "fairdropout_dfr": "fairdropout"}  # row -> row whose model it reuses


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_seed": values}


def summarise(runs: list[dict]) -> dict:
    """A row's entry from its per-seed records (sorted by seed)."""
    runs = sorted(runs, key=lambda r: r["seed"])
    return {
        "seeds": [r["seed"] for r in runs],
        "test_worst_group": _stats([r["test_worst_group"] for r in runs]),
        "test_accuracy": _stats([r["test_accuracy"] for r in runs]),
        "health": [r["health"] for r in runs],
        "seconds": {"mean": statistics.mean(r["seconds"] for r in runs), "per_seed": [r["seconds"] for r in runs]},
        "runs": runs,
    }


@contextlib.contextmanager
def _locked(path: Path):
    """The results file, read and written under an exclusive lock (several processes may record seeds at once)."""
    import hashlib

    name = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"bench_text_{name}.lock", "w") as lock:  # not beside the results
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(path.read_text()) if path.exists() else {}
        yield results
        path.write_text(json.dumps(results, indent=2))


def record(path: Path, row: str, run: dict, command: str) -> dict:
    """Add (or replace) one seed of `row` in `reproductions.spurious_text` and recompute its statistics."""
    with _locked(path) as results:
        table = results.setdefault("reproductions", {}).setdefault(DATASET, {})
        old = table.get(row, {}).get("runs", [])
        entry = summarise([r for r in old if r["seed"] != run["seed"]] + [run])
        import torch

        entry.update(command=command, torch_threads=torch.get_num_threads(),
                     measured_at=time.strftime("%Y-%m-%d %H:%M"))
        table[row] = entry
    return entry


def run_rows(rows: list[str], seeds: list[int], path: Path, log=print) -> None:
    from bench.suite import _record, _run

    from bench.common import train_script

    train = train_script()
    for seed in seeds:
        with tempfile.TemporaryDirectory(prefix="bench_text_") as tmp:
            outputs = {}
            for row in rows:
                method, extra = ROWS[row]
                start_from = outputs.get(STARTS_FROM.get(row))
                if start_from is not None:
                    extra = [e for e in extra if e not in ("--fair_dropout_positions", "fc")]
                    extra += ["--erm_checkpoint", str(start_from)]
                out = Path(tmp) / row
                log(f"== {DATASET} {row} seed {seed}: scripts/train.py --method {method} --dataset {DATASET} "
                    f"{' '.join(extra)}", flush=True)
                results, seconds = _run(train, method, DATASET, seed, out, *extra)
                outputs[row] = out
                # the reference: the run's own stage (ERM; FairDropout's ERM candidate, bit for bit the erm row's
                # model; the FairDropout model for FairDropout-DFR)
                run = _record(method, results, None, seconds)
                command = f"scripts/train.py --method {method} --dataset {DATASET} {' '.join(ROWS[row][1])}".strip()
                if row in STARTS_FROM:
                    command += f" (--erm_checkpoint: the {STARTS_FROM[row]} row's model when run in the same process)"
                run["started_from"] = STARTS_FROM.get(row) if start_from is not None else None
                entry = record(path, row, run, command)
                log(f"   {row} seed {seed}: test worst group {100 * run['test_worst_group']:.1f}%, accuracy "
                    f"{100 * run['test_accuracy']:.1f}%, health {run['health']}, {run['seconds']} s; row mean "
                    f"{100 * entry['test_worst_group']['mean']:.1f}% over seeds {entry['seeds']}", flush=True)


def markdown_table(table: dict) -> str:
    """The README table of `reproductions.spurious_text`: test worst group (mean +- std, per seed), test accuracy,
    health per seed, seconds per run."""
    lines = ["| method | seeds | test worst group, mean +- std | per seed | test accuracy | health | seconds / run |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in list(ROWS) + [r for r in table if r not in ROWS]:
        if row not in table:
            continue
        entry = table[row]
        worst = entry["test_worst_group"]
        spread = f"{100 * worst['mean']:.1f}" + (f" +- {100 * worst['std']:.1f}" if len(worst["per_seed"]) > 1 else "")
        per_seed = " / ".join(f"{100 * v:.1f}" for v in worst["per_seed"])
        health = ", ".join(f"{h}" for h in entry["health"])
        lines.append(f"| {row} | {','.join(map(str, entry['seeds']))} | {spread} | {per_seed} | "
                     f"{100 * entry['test_accuracy']['mean']:.1f} | {health} | {entry['seconds']['mean']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="erm,dfr", help=f"comma-separated, from {list(ROWS)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--output", default=str(RESULTS), help="results file, updated in place (seed by seed)")
    parser.add_argument("--table", action="store_true", help="print the README table of the results file and exit")
    args = parser.parse_args(argv)
    path = Path(args.output)
    if args.table:
        results = json.loads(path.read_text()) if path.exists() else {}
        print(markdown_table(results.get("reproductions", {}).get(DATASET, {})))
        return
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"error: --rows {unknown}: expected rows from {list(ROWS)}.")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    run_rows(rows, [int(s) for s in args.seeds.split(",")], path)


if __name__ == "__main__":
    main()
