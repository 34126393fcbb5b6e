"""Train a classifier that does not lean on a spurious correlation, and report its worst-group accuracy.

Usage:

    # the embedded default: biased_digits (MaskTune's biased-MNIST protocol), no download, CPU, a few minutes
    accelerate launch scripts/train.py

    # a method on a benchmark, a model, an output folder (any RobustConfig / TrainingArguments flag works)
    accelerate launch scripts/train.py --method erm --dataset biased_digits --model digits-resnet18 \
        --output_dir runs/erm --num_train_epochs 5 --learning_rate 1e-3

    # the same from a YAML or JSON file; flags given on the command line override the file
    accelerate launch scripts/train.py --config run.yaml

    # MaskTune's biased MNIST on the real digits (a local copy of ylecun/mnist in <root>/mnist): the CPU default,
    # or the paper's recipe (100 epochs)
    HF_ROBUST_DATA=<root> accelerate launch scripts/train.py --dataset biased_mnist
    HF_ROBUST_DATA=<root> accelerate launch scripts/train.py --config scripts/recipes/biased_mnist_paper.yaml

    # several processes (GPUs, or CPU with gloo): the same selections, masks and metrics as one process
    accelerate launch --multi_gpu --num_processes 2 scripts/train.py

Datasets: a benchmark name (biased_digits, biased_mnist, scene_digits, tinted_digits, spurious_text, waterbirds, celeba, multinli, civilcomments,
cifar10, svhn), the path of a local dataset or a Hub dataset id (owner/name, with --label_column / --attribute_column;
--dataset_kwargs '{"config": ..., "revision": ...}'); `--dataset_path` points a Hub benchmark at a local copy.
Models: a preset (digits-resnet18, mnist-cnn, minilm), a transformers model id or folder, `timm/<name>` or a timm
architecture name. Every run writes the model, results.json, plots/ and a model card README.md into
--output_dir; `--push_to_hub --hub_model_id <id>` then uploads them.

An output folder belongs to one run at a time (a second run into it stops at once, naming the first); a folder
holding a finished run is replaced only with --overwrite_output_dir (the old run stays until the new one has saved
everything) or continued with --resume_from_checkpoint true.

Exit codes: 0 the run finished and everything is saved; 2 a problem you can fix (bad flag or config, data that
does not fit the data model, a model that cannot be loaded, a missing extra, an output folder in use, finished,
unwritable or out of space, a failed push after saving): one `error:` line says what and how, nothing that looks
like a finished run is left; 1 an unexpected failure (a traceback: please report it).
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import sys
from dataclasses import dataclass, field

from hf_robust.methods.registry import DEFAULT_METHOD, METHODS  # the one list of methods
from hf_robust.recipes import recipe  # defaults per dataset and method (flags and config files override them)


@dataclass
class ScriptArguments:
    """What to train on: the method, the data and the model."""

    method: str = field(default=DEFAULT_METHOD, metadata={"help": f"One of {sorted(METHODS)}."})
    dataset: str = field(default="biased_digits", metadata={"help": "Benchmark name or local dataset path."})
    dataset_path: str | None = field(default=None, metadata={"help": "Local copy of a Hub benchmark (same layout)."})
    dataset_seed: int = field(default=0, metadata={"help": "Seed of generated benchmarks and derived splits."})
    dataset_kwargs: str | None = field(
        default=None, metadata={"help": "More arguments of the benchmark's loader, as JSON (e.g. '{\"num_squares\": 2}' "
                                        "for biased_mnist's two squares)."}
    )
    label_column: str = field(default="label", metadata={"help": "Label column of a local or Hub dataset."})
    attribute_column: str = field(
        default="attribute", metadata={"help": "Spurious-attribute column of a local dataset (absent: no groups)."}
    )
    model: str | None = field(default=None, metadata={"help": "Preset, transformers id/folder or timm name."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_splits: str | None = field(
        default=None, metadata={"help": "Comma-separated splits to evaluate (default: every other split)."}
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Train on N examples: a random subset seeded by --dataset_seed, stratified by label (each "
                          "class keeps its share), not the first N rows."},
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={"help": "Evaluate on N examples per split: a random subset seeded by --dataset_seed, stratified by "
                          "group (by label where groups are unknown)."},
    )
    remap_labels: bool = field(
        default=False,
        metadata={"help": "Renumber integer labels with gaps (e.g. 0, 2, 5) as 0..K-1 (refused otherwise)."},
    )
    config: str | None = field(default=None, metadata={"help": "YAML or JSON file with any of these flags."})


def _read_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        sys.exit(f"error: --config {path}: no such file.")
    with open(path) as handle:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(handle) or {}
        else:
            import json

            data = json.load(handle)
    if not isinstance(data, dict):
        sys.exit(f"error: --config {path} must hold a mapping of flag names to values.")
    return data


def parse_args(argv: list[str] | None = None):
    """(script_args, method config). Defaults: dataset defaults < config file < command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--method", default=None)
    peek.add_argument("--dataset", default=None)
    peek.add_argument("--config", default=None)
    known, _ = peek.parse_known_args(argv)
    file_values = _read_config_file(known.config) if known.config else {}
    method = known.method or file_values.get("method") or DEFAULT_METHOD
    if method not in METHODS:
        sys.exit(f"error: --method {method!r} is not one of {sorted(METHODS)}.")
    dataset = known.dataset or file_values.get("dataset") or "biased_digits"

    from transformers import HfArgumentParser

    config_class = METHODS[method].config_class()
    parser = HfArgumentParser((ScriptArguments, config_class), description=__doc__.split("\n\n")[0])
    defaults = recipe(method, dataset)
    defaults["output_dir"] = os.path.join("runs", f"{os.path.basename(os.path.normpath(dataset))}-{method}")
    if not _has_accelerator():
        # without use_cpu, TrainingArguments on a machine with no GPU sets every process up alone: N processes of
        # `accelerate launch --multi_gpu` would each train on all the data, never forming a (gloo) process group
        defaults["use_cpu"] = True
    defaults.update(file_values)
    defaults["method"] = method
    known_flags = {action.dest for action in parser._actions}
    unknown = sorted(set(defaults) - known_flags)
    if unknown and known.config:
        sys.exit(f"error: --config {known.config}: unknown keys {unknown} for --method {method}.")
    parser.set_defaults(**{k: v for k, v in defaults.items() if k in known_flags})
    try:
        script_args, config = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # a config's own checks (e.g. p_gen out of range)
        sys.exit(f"error: {error}")
    if isinstance(script_args.eval_splits, (list, tuple)):  # a YAML list
        script_args.eval_splits = ",".join(map(str, script_args.eval_splits))
    return script_args, config


def _dataset_kwargs(text) -> dict:
    """--dataset_kwargs as a dict (a YAML config may give a mapping directly)."""
    if not text:
        return {}
    if isinstance(text, dict):
        return text
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        sys.exit(f"error: --dataset_kwargs {text!r} is not JSON ({error}); e.g. '{{\"num_squares\": 2}}'.")
    if not isinstance(value, dict):
        sys.exit(f"error: --dataset_kwargs {text!r}: expected a JSON object of loader arguments.")
    return value


def _has_accelerator() -> bool:
    import torch

    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def _use_the_cores_of_a_single_cpu_process() -> None:
    """`accelerate launch` without a config file sets OMP_NUM_THREADS=1 for every process, which leaves a
    single-process CPU run on one core of the machine (about half the speed on 2 cores). For that one case
    (launched by accelerate, one process, no GPU, OMP_NUM_THREADS=1) use every core this process may run on;
    multi-process runs keep accelerate's setting. `HF_ROBUST_KEEP_THREADS=1` keeps one thread."""
    import torch

    launched = "ACCELERATE_DYNAMO_BACKEND" in os.environ
    single = int(os.environ.get("WORLD_SIZE", "1")) == 1
    if (launched and single and os.environ.get("OMP_NUM_THREADS") == "1" and not torch.cuda.is_available()
            and not os.environ.get("HF_ROBUST_KEEP_THREADS")):
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))


def _errors_as_one_line(run):
    """Failures the user can fix, wherever they surface, as one `error:` line (SystemExit) instead of a traceback:
    the library's own refusals, a missing package (an extra not installed), a folder that cannot be written, a full
    disk. Anything else is a bug and keeps its traceback."""

    @functools.wraps(run)
    def wrapper(*args, **kwargs):
        from hf_robust.data.core import DataValidationError
        from hf_robust.core.run_folder import OutputDirError, is_disk_full
        from hf_robust.core.checkpoints import RunSetupError
        from hf_robust.core.report import HubPushError
        from hf_robust.core.trainer import OutputWriteError

        try:
            return run(*args, **kwargs)
        except (OutputDirError, OutputWriteError, DataValidationError, RunSetupError, HubPushError) as error:
            sys.exit(f"error: {error}")
        except ImportError as error:
            sys.exit(f"error: a package this run needs is not installed: {error}")
        except Exception as error:
            if is_disk_full(error):
                where = getattr(error, "filename", None)
                sys.exit(
                    f"error: no space left on the device{f' of {where}' if where else ''} (output_dir "
                    f"{_output_dir(args, kwargs)}): {error}. Free some space or pick another --output_dir, then "
                    "resume with --resume_from_checkpoint true (finished stages are kept)."
                )
            if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                sys.exit(f"error: cannot write {error.filename or _output_dir(args, kwargs)} ({error.strerror}): "
                         "pick a --output_dir you can write to, or fix its permissions.")
            raise

    return wrapper


def _output_dir(args, kwargs) -> str:
    argv = list(kwargs.get("argv") or (args[0] if args else None) or sys.argv[1:])
    return argv[argv.index("--output_dir") + 1] if "--output_dir" in argv[:-1] else "(see --output_dir)"


@_errors_as_one_line
def main(argv: list[str] | None = None) -> dict:
    script_args, config = parse_args(argv)
    _use_the_cores_of_a_single_cpu_process()

    import transformers

    from hf_robust.data import load_benchmark
    from hf_robust.data.core import DataValidationError, input_kind, label_names, stratified_subset
    from hf_robust.models import load_model
    from hf_robust.reporting import format_group_table
    from hf_robust.data.benchmarks import BENCHMARKS as BENCHMARK_NAMES
    from hf_robust.models import PRESETS
    from hf_robust.core.checkpoints import RunSetupError
    from hf_robust.core.report import HubPushError
    from hf_robust.core.health import HealthCheckError, format_health, format_selection

    transformers.logging.set_verbosity_warning()
    trainer_class = METHODS[script_args.method].trainer_class()
    try:
        if script_args.dataset not in BENCHMARK_NAMES:  # a local folder or a Hub dataset id
            data = load_benchmark(script_args.dataset, label_column=script_args.label_column,
                                  attribute_column=script_args.attribute_column, remap_labels=script_args.remap_labels,
                                  **_dataset_kwargs(script_args.dataset_kwargs))
        else:
            extra = _dataset_kwargs(script_args.dataset_kwargs)
            data = load_benchmark(script_args.dataset, path=script_args.dataset_path, seed=script_args.dataset_seed,
                                  **extra)
    except (DataValidationError, TypeError) as error:
        sys.exit(f"error: {error}")
    if script_args.train_split not in data:
        sys.exit(f"error: --train_split {script_args.train_split!r} is not a split of {script_args.dataset} ({list(data)}).")
    eval_names = (
        [s.strip() for s in script_args.eval_splits.split(",") if s.strip()]
        if script_args.eval_splits
        else [s for s in data if s != script_args.train_split]
    )
    missing = [s for s in eval_names if s not in data]
    if missing:
        sys.exit(f"error: --eval_splits {missing} are not splits of {script_args.dataset} ({list(data)}).")
    train = data[script_args.train_split]
    if script_args.max_train_samples:
        train = stratified_subset(train, script_args.max_train_samples, seed=script_args.dataset_seed)
    evals = {s: data[s] for s in eval_names}
    if script_args.max_eval_samples:
        evals = {s: stratified_subset(d, script_args.max_eval_samples, seed=script_args.dataset_seed,
                                      by="group" if len(d) and min(d["group"]) >= 0 else "label")
                 for s, d in evals.items()}

    kind = input_kind(train)
    names = label_names(train)
    model_name = script_args.model or ("digits-resnet18" if kind == "image" else "minilm")
    transformers.set_seed(config.seed)  # before the model is built: its random init is part of the run
    try:
        model, processor = load_model(model_name, len(names), names, input_kind="image" if kind == "image" else "text")
    except (OSError, ValueError) as error:
        sys.exit(
            f"error: --model {model_name!r} could not be loaded ({type(error).__name__}: {' '.join(str(error).split())}) "
            "Expected a preset "
            f"({', '.join(sorted(PRESETS))}), a local model folder, a timm model name, or a Hub id that is cached "
            "(this machine may be offline)."
        )
    try:
        trainer = trainer_class(
            model=model,
            args=config,
            train_dataset=train,
            eval_dataset=evals,
            processing_class=processor,
            dataset_name=script_args.dataset,
            model_name_or_path=model_name,
        )
    except (DataValidationError, ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    resume = config.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "1", "yes"):
        resume = True
    try:
        trainer.train(resume_from_checkpoint=resume or None)
    except RunSetupError as error:  # raised before any training: a resume or checkpoint that does not fit
        sys.exit(f"error: {error}")
    except HealthCheckError as error:  # on_worse="error": the final model failed its health check, nothing saved
        sys.exit(f"error: {error}")
    trainer.evaluate()
    trainer.save_model()
    results = trainer.results()
    if trainer.is_world_process_zero():
        runs = {**results["stages"], results["method"]: results["splits"]}
        print(f"\n{results['method']} on {script_args.dataset} ({model_name}), per-group accuracy:")
        print(format_group_table(runs))
        if results.get("selection"):
            print(format_selection(results["selection"]))
        if results.get("health"):
            print(format_health(results["health"]))
        print(f"\nSaved model, results.json, plots/ and README.md in {config.output_dir}")
    if config.push_to_hub:
        try:
            trainer.push_to_hub()
        except HubPushError as error:
            sys.exit(f"error: {error}")
    return results


if __name__ == "__main__":
    try:
        main()
    except SystemExit as stop:  # the `error:` lines: a problem the user can fix, exit code 2
        if isinstance(stop.code, str) and stop.code.startswith("error:"):
            print(stop.code, file=sys.stderr)
            sys.exit(2)
        raise
