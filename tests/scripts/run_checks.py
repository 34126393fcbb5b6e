"""Run several tests/scripts/*_distributed.py checks in one process (under `accelerate launch`, one per rank):
starting a process (torch, transformers, the process group) costs about as much as a check itself, so the suite
starts one process for every 1-process check and one launch for every 2-process check (tests/conftest.py,
`distributed_checks`). argv[1]: a JSON list of [script path, argument, ...]; each script's `main(*arguments)` runs
in turn, in list order."""

import importlib.util
import json
import sys
from pathlib import Path


def main(plan_path: str) -> None:
    for path, *arguments in json.loads(Path(plan_path).read_text()):
        spec = importlib.util.spec_from_file_location(Path(path).stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        print(f"== {Path(path).name}", flush=True)
        module.main(*arguments)


if __name__ == "__main__":
    main(sys.argv[1])
