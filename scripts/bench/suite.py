"""Every method's default on every embedded benchmark of the shortcut suite: `benchmark.py --suite`.

The suite: `biased_digits` (a small patch: a 4-pixel square), `scene_digits` (a large background scene) and
`tinted_digits` (a colour over the whole image), all built from scikit-learn's bundled digits and photos, each
with the same recipe (hf_robust.recipes.DIGITS_RECIPE; no per-benchmark tuning of any knob). Per benchmark and
training seed, the main job runs each method with its defaults; GradTune and DFR start from the ERM run's model
(`--erm_checkpoint`: the same ERM, as their own ERM stage would train it) and FairDropout-DFR from the FairDropout
run's. Recorded per run: the test worst-group accuracy (`test`, all four groups, where the benchmark has it;
`test_biased` for biased_digits), the reference's (the run's own ERM stage; for FairDropout, plain ERM with the same
seed and recipe), the health status, and the knobs the run chose on validation.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from bench.common import inference_summary, train_script

SUITE = ("biased_digits", "scene_digits", "tinted_digits")
SUITE_METHODS = ("erm", "masktune", "gradtune", "dfr", "fairdropout", "fairdropout_dfr", "counterfactual",
                 "group_dro", "jtt", "subg")
# methods compared with plain ERM (same seed and recipe) rather than a stage of their own run: no ERM stage
# (GroupDRO, SUBG), or one that is not the ERM model (JTT's short identification stage). FairDropout's default run
# reports its selection's ERM candidate (p_gen = 1), bit for bit that plain ERM run, as its "ERM" stage.
PLAIN_ERM_REFERENCE = ("group_dro", "jtt", "subg")


def _test_split(results: dict) -> str:
    return "test" if "test" in results["splits"] else "test_biased"


def _chosen_knobs(method: str, results: dict) -> dict:
    if results.get("selection"):
        return results["selection"]["chosen_knobs"]
    if method in ("gradtune", "dfr", "fairdropout_dfr") and results.get("last_layer"):
        info = results["last_layer"]
        return {k: info[k] for k in ("C", "best_epoch") if k in info}
    if method == "fairdropout" and results.get("fair_dropout"):
        return {k: results["fair_dropout"][k] for k in ("positions", "p_gen", "p_mem")}
    return {}


def _record(method: str, results: dict, erm: dict | None, seconds: float, erm_record: dict | None = None) -> dict:
    split = _test_split(results)
    # the run's own reference stage: ERM (MaskTune, GradTune, DFR; FairDropout's p_gen = 1 candidate), vanilla
    # fine-tuning (counterfactual), the FairDropout model whose last layer FairDropout-DFR retrains
    stages = results.get("stages", {})
    own = "FairDropout" if method == "fairdropout_dfr" else "ERM"
    reference = (stages.get(own) or stages.get("Vanilla FT") or {}).get(split)
    if method in PLAIN_ERM_REFERENCE and erm is not None:  # plain ERM with the same seed and recipe
        reference = erm["splits"][split]
    elif method in PLAIN_ERM_REFERENCE and erm_record is not None:  # that ERM run, recorded earlier in the results file
        reference = {"worst_group_accuracy": erm_record["test_worst_group"]}
    if method == "erm":
        reference = results["splits"][split]
    health = results.get("health") or {}
    return {
        "seed": results["seed"],
        "split": split,
        "test_worst_group": results["splits"][split]["worst_group_accuracy"],
        "test_accuracy": results["splits"][split]["accuracy"],
        "reference_test_worst_group": reference["worst_group_accuracy"] if reference else None,
        "health": health.get("status"),
        "health_reason": health.get("reason"),
        "validation_worst_class": (health.get("method") or {}).get("worst_class_accuracy"),
        "reference_validation_worst_class": (health.get("erm") or {}).get("worst_class_accuracy"),
        "chosen": _chosen_knobs(method, results),
        "group_inference": inference_summary(results),
        "seconds": round(seconds, 1),
    }


def _run(train, method: str, benchmark: str, seed: int, out: Path, *extra: str) -> tuple[dict, float]:
    start = time.perf_counter()
    argv = ["--method", method, "--dataset", benchmark, "--seed", str(seed), "--output_dir", str(out),
            "--disable_tqdm", "true", "--save_strategy", "no", "--save_plots", "false", *extra]
    results = train.main(argv)
    return results, time.perf_counter() - start


def run_suite(seeds: list[int], benchmarks=SUITE, methods=SUITE_METHODS, on_result=None, recorded=None) -> dict:
    """{benchmark: {method: {"runs": [record per seed], "mean": {...}}}}; `on_result(table)` after each run.
    `recorded`: the suite already in the results file; the baselines' reference (plain ERM, same seed and recipe: a
    deterministic run on one machine) is read from it when there, instead of training that ERM again."""
    recorded = recorded or {}
    train = train_script()
    table: dict = {}
    for benchmark in benchmarks:
        for seed in seeds:
            with tempfile.TemporaryDirectory() as tmp:
                tmp = Path(tmp)
                erm = None
                erm_record = next((r for r in recorded.get(benchmark, {}).get("erm", {}).get("runs", [])
                                   if r["seed"] == seed), None)
                needs_erm = {"erm", "gradtune", "dfr"} & set(methods) or (
                    set(PLAIN_ERM_REFERENCE) & set(methods) and not erm_record)
                if needs_erm:
                    erm, seconds = _run(train, "erm", benchmark, seed, tmp / "erm")
                    if "erm" in methods:
                        _add(table, benchmark, "erm", _record("erm", erm, None, seconds), on_result)
                for method in methods:
                    if method == "erm":
                        continue
                    extra = []
                    if method in ("gradtune", "dfr"):
                        extra = ["--erm_checkpoint", str(tmp / "erm")]
                    if method == "fairdropout_dfr" and (tmp / "fairdropout").is_dir():
                        extra = ["--erm_checkpoint", str(tmp / "fairdropout")]
                    results, seconds = _run(train, method, benchmark, seed, tmp / method, *extra)
                    _add(table, benchmark, method, _record(method, results, erm, seconds, erm_record), on_result)
    return table


def _add(table: dict, benchmark: str, method: str, record: dict, on_result) -> None:
    entry = table.setdefault(benchmark, {}).setdefault(method, {"runs": []})
    entry["runs"] = [r for r in entry["runs"] if r["seed"] != record["seed"]] + [record]
    entry["runs"].sort(key=lambda r: r["seed"])
    entry["mean"] = _mean(entry["runs"])
    print(f"   {benchmark:14s} {method:16s} seed {record['seed']}: test worst group "
          f"{100 * record['test_worst_group']:.1f}% (reference {_pct(record['reference_test_worst_group'])}), "
          f"health {record['health']}, chosen {record['chosen']}, {record['seconds']} s", flush=True)
    if on_result is not None:
        on_result(table)


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _mean(runs: list[dict]) -> dict:
    def mean(key):
        values = [r[key] for r in runs if r[key] is not None]
        return statistics.mean(values) if values else None

    statuses = [r["health"] for r in runs]
    return {"seeds": [r["seed"] for r in runs], "test_worst_group": mean("test_worst_group"),
            "reference_test_worst_group": mean("reference_test_worst_group"), "test_accuracy": mean("test_accuracy"),
            "health": {s: statuses.count(s) for s in dict.fromkeys(statuses)}}


def markdown_table(table: dict) -> str:
    """Method x benchmark: mean test worst group (its reference's), health statuses over the seeds."""
    benchmarks = list(table)
    methods = list(dict.fromkeys(m for b in benchmarks for m in table[b]))
    lines = ["| method | " + " | ".join(benchmarks) + " |", "| --- |" + " --- |" * len(benchmarks)]
    for method in methods:
        cells = []
        for benchmark in benchmarks:
            entry = table[benchmark].get(method)
            if not entry:
                cells.append("–")
                continue
            m = entry["mean"]
            health = ", ".join(f"{n} {s}" for s, n in m["health"].items())
            cell = f"**{_pct(m['test_worst_group'])}**"
            if method != "erm":
                cell += f" (ref. {_pct(m['reference_test_worst_group'])})"
            cells.append(f"{cell}; {health}; seeds {','.join(map(str, m['seeds']))}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _knobs(chosen: dict) -> str:
    if not chosen:
        return "–"
    parts = []
    for key, value in chosen.items():
        if isinstance(value, list):
            value = ",".join(map(str, value))
        elif isinstance(value, float):
            value = f"{value:g}"
        parts.append(f"{key} {value}")
    return ", ".join(parts)


def knobs_table(table: dict) -> str:
    """Method x benchmark: the knobs each seed's run chose on validation (labels only), and its health status."""
    benchmarks = list(table)
    methods = list(dict.fromkeys(m for b in benchmarks for m in table[b] if m != "erm"))
    # methods with no knob to choose (the baselines run with their defaults) have no row
    methods = [m for m in methods if any(r["chosen"] for b in benchmarks for r in table[b].get(m, {}).get("runs", []))]
    lines = ["| method | " + " | ".join(benchmarks) + " |", "| --- |" + " --- |" * len(benchmarks)]
    for method in methods:
        cells = []
        for benchmark in benchmarks:
            entry = table[benchmark].get(method)
            cells.append("–" if not entry else "<br>".join(
                f"seed {r['seed']}: {_knobs(r['chosen'])} ({r['health']})" for r in entry["runs"]))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
