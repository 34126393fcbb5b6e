"""Run several 2-process checks of tests/scripts in one process (under `accelerate launch`, one per rank): starting a
process (torch, transformers, the process group) costs about as much as a check itself, so the suite starts one
process for every 1-process check and one launch for every 2-process check (tests/conftest.py,
`distributed_checks`). argv[1]: a JSON list of [script path, argument, ...]; each script's `main(*arguments)` runs
in turn, in list order (a script used by several checks, method_distributed.py, is loaded once)."""

import importlib.util
import json
import sys
from pathlib import Path


def main(plan_path: str) -> None:
    modules = {}
    for path, *arguments in json.loads(Path(plan_path).read_text()):
        if path not in modules:
            spec = importlib.util.spec_from_file_location(Path(path).stem, path)
            modules[path] = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # (for its dataclasses)
            spec.loader.exec_module(modules[path])
        print(f"== {Path(path).name} {' '.join(arguments[:1])}", flush=True)
        modules[path].main(*arguments)


if __name__ == "__main__":
    main(sys.argv[1])
