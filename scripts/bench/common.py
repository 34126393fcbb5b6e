"""Helpers shared by scripts/benchmark.py and the per-method modules it imports (scripts/bench/*.py)."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
_TRAIN_MODULE = "hf_robust_train_script"


def train_script():
    """scripts/train.py as a module (imported once per process): its `main(argv)` runs the main job in-process."""
    if _TRAIN_MODULE not in sys.modules:
        spec = importlib.util.spec_from_file_location(_TRAIN_MODULE, HERE.parent / "train.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[_TRAIN_MODULE] = module
        spec.loader.exec_module(module)
    return sys.modules[_TRAIN_MODULE]


def interleaved(functions: dict, repeats: int, warmup: int = 0) -> tuple[dict, dict[str, list[float]]]:
    """Run the functions in turn, `repeats` rounds (after `warmup` untimed ones), so that machine load hits them
    alike: ({name: last result}, {name: [seconds of each round]})."""
    for _ in range(warmup):
        for fn in functions.values():
            fn()
    results, times = {}, {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return results, times


def inference_summary(results: dict) -> dict | None:
    """The run's group inference (`results["group_inference"]`), without its shown examples: per rule, the size of
    the inferred minority and, where the true groups are known, its precision and recall per group."""
    report = results.get("group_inference")
    if not report:
        return None
    summary = {}
    for rule, entry in report.items():
        if not isinstance(entry, dict) or "per_group" not in entry:
            summary[rule] = entry if not isinstance(entry, dict) else {k: entry[k] for k in ("status", "reason")
                                                                          if k in entry}
            continue
        summary[rule] = {"split": entry.get("split"), "size": entry.get("size"),
                         "examples_scored": entry.get("examples_scored"),
                         "per_group": {group: {"precision": v.get("precision"), "recall": v.get("recall")}
                                       for group, v in (entry.get("per_group") or {}).items()}}
    return summary
