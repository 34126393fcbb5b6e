"""Shared fixtures: offline environment, tiny models built from configs, small data in the hf_robust data model."""

import os
import atexit
import json
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass

# Offline, with a throw-away HF_HOME, before anything imports huggingface_hub / datasets / transformers.
_HF_HOME = tempfile.mkdtemp(prefix="hf_robust_tests_home_")
atexit.register(shutil.rmtree, _HF_HOME, True)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HOME"] = _HF_HOME
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# the model families of the adapters (tiny models of each: make_model); the ONE list of them in the tests
TEXT_FAMILIES = ["hf_bert"]
IMAGE_FAMILIES = ["hf_vit", "hf_resnet", "timm_resnet", "timm_vit", "timm_wrapper_resnet"]
FAMILIES = TEXT_FAMILIES + IMAGE_FAMILIES
# models one method or benchmark needs, built by make_model too: MaskTune's biased-MNIST CNN, counterfactual
# distillation's CLIP zero-shot classifier (student and teacher)
PRESET_FAMILIES = ["mnist_cnn", "clip_zero_shot"]
# the raw timm families: timm.create_model's arguments beyond the architecture's defaults (a ViT's img_size is
# found by itself), which a saved folder needs to rebuild the model (`maybe_wrap_timm(model, model_args=...)`).
# The ResNet's data config is the digits' 32x32, as every other family's (its architecture's says 224); the ViT's
# says 224 and is read at its img_size, 32, by hf_robust (tests/test_adapters.py).
TIMM_RESNET_DATA_CONFIG = {"input_size": (3, 32, 32), "crop_pct": 1.0, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
TIMM_MODELS = {"timm_resnet": ("resnet18", {"channels": [8, 16, 32, 32]}),
               "timm_vit": ("vit_tiny_patch16_224", {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2})}


def tiny_tokenizer(tmp_dir: Path):
    """A WordPiece tokenizer over the words of `spurious_text` (no download)."""
    from transformers import BertTokenizerFast

    from hf_robust.data import embedded

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", ":", "'"] + embedded.spurious_text_words()
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(str(tmp_dir))  # (and loadable from disk like a real one)
    return tokenizer


def make_model(family: str, num_labels: int = 2, vocab_size: int = 200, seed: int = 0):
    """(model, image processor or None) — tiny random models of every family (FAMILIES, PRESET_FAMILIES)."""
    torch.manual_seed(seed)
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        ResNetConfig,
        ResNetForImageClassification,
        TimmWrapperConfig,
        TimmWrapperForImageClassification,
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessor,
    )

    processor = ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_resize=True
    )
    if family == "hf_bert":
        config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)
        return BertForSequenceClassification(config), None
    if family == "hf_vit":
        config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, num_labels=num_labels)
        return ViTForImageClassification(config), processor
    if family == "hf_resnet":
        config = ResNetConfig(hidden_sizes=[8, 16, 32, 32], embedding_size=8, depths=[1, 1, 1, 1], num_labels=num_labels)
        return ResNetForImageClassification(config), processor
    if family in TIMM_MODELS:
        import timm

        architecture, model_args = TIMM_MODELS[family]
        size = {"img_size": 32} if family == "timm_vit" else {"pretrained_cfg_overlay": TIMM_RESNET_DATA_CONFIG}
        return timm.create_model(architecture, pretrained=False, num_classes=num_labels, **size, **model_args), None
    if family == "timm_wrapper_resnet":
        config = TimmWrapperConfig(
            # output_stride 8 keeps a 4x4 last map at 32x32, as the digits preset: CAMs have a spatial extent
            architecture="resnet18", num_labels=num_labels, model_args={"channels": [8, 16, 32, 32], "output_stride": 8},
            pretrained_cfg={"input_size": [3, 32, 32], "crop_pct": 1.0, "mean": [0.5] * 3, "std": [0.5] * 3},
        )
        return TimmWrapperForImageClassification(config), None
    if family == "mnist_cnn":  # MaskTune's biased-MNIST CNN (hf_robust.models.mnist_cnn), here at 32x32
        from hf_robust.models.mnist_cnn import MnistCnnConfig, MnistCnnForImageClassification, mnist_cnn_processor

        return MnistCnnForImageClassification(MnistCnnConfig(image_size=32, num_labels=num_labels)), mnist_cnn_processor(32)
    if family == "clip_zero_shot":  # a tiny CLIP's zero-shot classifier of the two biased_digits classes
        from counterfactual_helpers import tiny_clip_classifier

        return tiny_clip_classifier(seed=seed)
    raise ValueError(family)


def quick_config(config_class, output_dir, **kwargs):
    """A config for fast CPU tests: 1 epoch, no checkpoints, no reporting, seed 0; kwargs override."""
    base = dict(
        output_dir=str(output_dir), num_train_epochs=1, per_device_train_batch_size=32,
        per_device_eval_batch_size=64, learning_rate=1e-3, save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, logging_steps=1, seed=0,
    )
    base.update(kwargs)
    return config_class(**base)


@pytest.fixture(scope="session")
def digits():
    """The embedded biased_digits benchmark (generated once per test session into the temporary HF_HOME)."""
    from hf_robust.data import load_benchmark

    return load_benchmark("biased_digits")


@pytest.fixture(scope="session")
def small_digits(digits):
    """Small, fixed subsets of biased_digits for fast trainer tests (every group of validation present)."""
    from datasets import DatasetDict

    return DatasetDict(
        {
            "train": digits["train"].shuffle(seed=0).select(range(160)),
            "validation": digits["validation"].shuffle(seed=0).select(range(96)),
            "test_biased": digits["test_biased"].select(range(0, 540, 10)),
        }
    )


@pytest.fixture(scope="session")
def tiny_digits(small_digits):
    """The smallest biased_digits splits a method runs on (one training step of 32, both classes in every split):
    the matrix cases of tests/test_methods.py that no other test reads."""
    from datasets import DatasetDict

    return DatasetDict({"train": small_digits["train"].select(range(32)),
                        "validation": small_digits["validation"].select(range(32))})


@pytest.fixture(scope="session")
def clip_data(small_digits):
    """small_digits with 48 validation examples: counterfactual distillation's runs (a CLIP model per candidate)."""
    from datasets import DatasetDict

    return DatasetDict({"train": small_digits["train"], "validation": small_digits["validation"].select(range(48)),
                        "test_biased": small_digits["test_biased"]})


@pytest.fixture(scope="session")
def text_data():
    from datasets import DatasetDict

    from hf_robust.data import make_spurious_text

    data = make_spurious_text(train_size=128, validation_size=48, test_size=48)
    return DatasetDict(dict(data))


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


# ----------------------------------------------------------------------------- one trainer factory
# each method's test settings unless a test says otherwise: the paper's method (the method's label-free selection
# off), short runs
METHOD_TEST_DEFAULTS = {
    "erm": dict(logging_steps=100),
    "masktune": dict(masktune_selection="off"),
    "gradtune": dict(finetune_set_size=30, last_layer_epochs=100, logging_steps=100),
    "dfr": dict(),
    "fairdropout": dict(logging_steps=100, fairdropout_selection="off"),
    "fairdropout_dfr": dict(logging_steps=100, fairdropout_selection="off"),
    # beta = 30 (the paper's), no selection of beta
    "counterfactual": dict(learning_rate=1e-3, warmup_steps=0, wise_ft_alphas=[0.5], plot_examples=3,
                           counterfactual_selection="off"),
    "group_dro": dict(logging_steps=100),
    "jtt": dict(logging_steps=100),
    "reweight": dict(logging_steps=100),
    "subg": dict(logging_steps=100),
}


def method_config(method: str, output_dir, **kwargs):
    """`quick_config` of the registry's config class of `method`, with its METHOD_TEST_DEFAULTS; kwargs override."""
    from hf_robust.methods.registry import get_method

    return quick_config(get_method(method).config_class(), output_dir, **{**METHOD_TEST_DEFAULTS[method], **kwargs})


def make_trainer(method: str, family: str, data, output_dir, *, model=None, processor=None, tokenizer=None,
                 model_seed: int = 0, eval_splits=None, trainer_kwargs: dict | None = None, **config_kwargs):
    """The registry's trainer of `method` on a tiny `family` model (`make_model(family, seed=model_seed)`, or the given
    `model` and `processor`), trained on data["train"] and evaluated on `eval_splits` (default: every other split
    of `data`), with `method_config(method, output_dir, **config_kwargs)`. Text families read `tokenizer`; raw
    timm models are wrapped with the arguments they were built with (TIMM_MODELS), so that their saved folder
    reloads. `trainer_kwargs` go to the trainer (dataset_name=, teacher=, heldout_dataset=, ...)."""
    from hf_robust.models.timm_wrap import maybe_wrap_timm
    from hf_robust.methods.registry import get_method

    if model is None:
        model, processor = make_model(family, seed=model_seed,
                                      **({"vocab_size": tokenizer.vocab_size} if tokenizer else {}))
        if family in TIMM_MODELS:
            model = maybe_wrap_timm(model, model_args=TIMM_MODELS[family][1])
    if tokenizer is not None:
        processor = tokenizer
    if eval_splits is None:
        eval_splits = [name for name in data if name != "train"]
    eval_dataset = {name: data[name] for name in eval_splits} or None
    return get_method(method).trainer_class()(
        model, method_config(method, output_dir, **config_kwargs), train_dataset=data["train"],
        eval_dataset=eval_dataset, processing_class=processor, **(trainer_kwargs or {}),
    )


# ----------------------------------------------------------------------------- the method x family matrix's runs
DATA_FIXTURES = ("small_digits", "tiny_digits", "clip_data", "text_data")
DATASET_NAMES = {"small_digits": "biased_digits", "tiny_digits": "biased_digits", "clip_data": "biased_digits",
                 "text_data": "spurious_text"}


def case_id(case) -> str:
    """`<method>-<family>[-<variant>]`: the id of a (method, family, data fixture, config kwargs[, variant]) case of
    tests/test_methods.py."""
    return "-".join([case[0], case[1], *case[4:]])


@dataclass(frozen=True)
class RunDir:
    """A config value of a case: the output folder of the case `case_id`, trained first (e.g. the FairDropout
    model a FairDropout-DFR case starts from: `erm_checkpoint=RunDir("fairdropout-timm_wrapper_resnet")`)."""

    case_id: str


@dataclass
class MethodRun:
    """A case of tests/test_methods.py CASES trained (`train()`, `evaluate()`, `save_model()`) into `output_dir`."""

    case: tuple
    trainer: object
    metrics: dict  # what evaluate() returned after training
    output_dir: Path
    initial_state: dict  # state dicts before training: "model" and, for a method with one, "teacher"


class MethodRuns:
    """`runs[case_id]`: a case of tests/test_methods.py CASES, trained on first use and kept for the session (the
    common tester and the method's own tests read the same run)."""

    def __init__(self, tmp_path_factory, data: dict, tokenizer):
        self._tmp, self.data, self.tokenizer, self._runs = tmp_path_factory, data, tokenizer, {}

    @staticmethod
    def cases() -> dict:
        import test_methods  # the matrix lives with its tester; imported here when only a method's file runs

        return {case_id(case): case for case in test_methods.CASES}

    def new_trainer(self, key: str, output_dir) -> object:
        """A fresh, untrained trainer of the case `key` (its method, model, data and config) into `output_dir`."""
        method, family, data_name, config = self.cases()[key][:4]
        config = {k: str(self[v.case_id].output_dir) if isinstance(v, RunDir) else v for k, v in config.items()}
        return make_trainer(method, family, self.data[data_name], output_dir,
                            tokenizer=self.tokenizer if family in TEXT_FAMILIES else None,
                            trainer_kwargs={"dataset_name": DATASET_NAMES[data_name]}, **config)

    def __getitem__(self, key: str) -> MethodRun:
        if key not in self._runs:
            out = self._tmp.mktemp(key)
            trainer = self.new_trainer(key, out)
            initial = {name: {k: v.detach().clone() for k, v in getattr(trainer, name).state_dict().items()}
                       for name in ("model", "teacher") if hasattr(trainer, name)}
            trainer.train()
            metrics = trainer.evaluate()
            trainer.save_model()
            self._runs[key] = MethodRun(self.cases()[key], trainer, metrics, out, initial)
        return self._runs[key]

    def release(self, key: str) -> None:
        """Drop the run (its folder stays): a run no other test reads."""
        self._runs.pop(key, None)


@pytest.fixture(scope="session", autouse=True)
def _no_garbage_collection_before_each_training_loop():
    """transformers' Trainer.train() starts with accelerate's `free_memory()`, whose `gc.collect()` frees device
    memory: on CPU there is none, and a full collection in a session that holds many runs costs up to 0.6 s per
    training loop (each stage of each method). The tests skip that collection (Python's own still runs)."""
    import accelerate.accelerator

    original = accelerate.accelerator.release_memory
    accelerate.accelerator.release_memory = lambda *objects: [None] * len(objects)
    yield
    accelerate.accelerator.release_memory = original


@pytest.fixture(scope="session")
def method_runs(tmp_path_factory, request, tokenizer) -> MethodRuns:
    return MethodRuns(tmp_path_factory, {name: request.getfixturevalue(name) for name in DATA_FIXTURES}, tokenizer)


LAUNCH_TWO_PROCESSES = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
# every 2-process check of the suite, in the order they run: name -> (script in tests/scripts, its arguments before
# out_json and work_dir). A method's check is method_distributed.py <method> (which also gets the folder of the
# shared ERM model its check may start from); batchnorm_distributed.py checks the core's BatchNorm synchronisation.
DISTRIBUTED_CHECKS = {
    "erm": ("method_distributed.py", ["erm"]),
    "batchnorm": ("batchnorm_distributed.py", []),
    "fairdropout": ("method_distributed.py", ["fairdropout"]),
    "counterfactual": ("method_distributed.py", ["counterfactual"]),
    "gradtune": ("method_distributed.py", ["gradtune"]),
    "masktune": ("method_distributed.py", ["masktune"]),
    "masktune_authors": ("method_distributed.py", ["masktune_authors"]),
    "group_dro": ("method_distributed.py", ["group_dro"]),
    "jtt": ("method_distributed.py", ["jtt"]),
    "reweight": ("method_distributed.py", ["reweight"]),
    "subg": ("method_distributed.py", ["subg"]),
    "group_inference": ("group_inference_distributed.py", []),
    "overlapping_groups": ("overlapping_distributed.py", []),
}
NEEDS_ERM_FOLDER = ("method_distributed.py", "group_inference_distributed.py")  # scripts given a shared ERM folder


def free_port() -> int:
    """A TCP port free on this machine now (the OS picks it)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class DistributedChecks(threading.Thread):
    """Every check of DISTRIBUTED_CHECKS run as one process, then as two under `accelerate launch --multi_gpu` (CPU,
    gloo; `--cpu --num_processes 2` would silently run one), in a background thread: started with the session's
    first test (`_background`), its processes overlap the single-process tests, which keep about one of
    two cores busy. All checks share one process (one launch): the start-up of a process is about half of a check's
    time."""

    def __init__(self, tmp: Path):
        super().__init__(name="distributed-checks", daemon=True)
        self.tmp, self.error, self.process, self.stopped = tmp, None, None, False

    def run(self) -> None:
        try:
            self._run()
        except Exception:  # (reported by the tests that read the checks)
            import traceback

            self.error = traceback.format_exc()

    def _run(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        scripts = Path(__file__).parent / "scripts"
        # (its own free port: a test's launch may run at the same time, on accelerate's default one)
        two = LAUNCH_TWO_PROCESSES + ["--main_process_port", str(free_port())]
        for world, prefix in (("one", [sys.executable]), ("two", two)):
            plan = []
            for name, (script, arguments) in DISTRIBUTED_CHECKS.items():
                folder = self.tmp / name
                folder.mkdir(exist_ok=True)
                outputs = [str(folder / f"{world}.json"), str(folder / world)]
                if script in NEEDS_ERM_FOLDER:  # the shared ERM model, trained by the 1-process run if needed
                    outputs.append(str(folder / "erm"))
                plan.append([str(scripts / script), *arguments, *outputs])
            (self.tmp / f"{world}_plan.json").write_text(json.dumps(plan))
            if self.stopped:
                return
            self.process = subprocess.Popen(prefix + [str(scripts / "run_checks.py"), str(self.tmp / f"{world}_plan.json")],
                                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=self.tmp)
            try:
                stdout, stderr = self.process.communicate(timeout=1800)
            except subprocess.TimeoutExpired:
                self.process.kill()
                stdout, stderr = self.process.communicate()
            if self.process.returncode != 0:
                self.error = f"{world} process(es) exited with {self.process.returncode}\n{stdout[-3000:]}{stderr[-5000:]}"
                return

    def stop(self) -> None:
        self.stopped = True
        if self.process is not None and self.process.poll() is None:
            self.process.kill()


def pytest_collection_modifyitems(session, config, items):
    """The tests that read the distributed checks run last, so that the checks run in the background meanwhile."""
    items.sort(key=lambda item: "distributed_checks" in getattr(item, "fixturenames", ()))


def _help_process() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "scripts" / "train.py"), "--help"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="session", autouse=True)
def _background(request, tmp_path_factory):
    """The suite's slow subprocesses, started with the first test when a collected test reads them (so that they
    overlap the single-process tests): {"distributed": DistributedChecks, "help": `train.py --help`} or None each."""
    needed = set().union(*(getattr(item, "fixturenames", ()) for item in request.session.items))
    started = {"distributed": None, "help": _help_process() if "train_script_help" in needed else None}
    if "distributed_checks" in needed:
        request.getfixturevalue("digits")  # caches the benchmark before the checks' processes read it
        started["distributed"] = DistributedChecks(tmp_path_factory.mktemp("distributed"))
        started["distributed"].start()
    yield started
    if started["distributed"] is not None:
        started["distributed"].stop()
    if started["help"] is not None and started["help"].poll() is None:
        started["help"].kill()


@pytest.fixture(scope="session")
def distributed_checks(_background):
    """{check: (1-process output, 2-process output)}, from the background run of every check (DistributedChecks)."""
    checks = _background["distributed"]
    checks.join()
    assert checks.error is None, checks.error
    return {name: tuple(json.loads((checks.tmp / name / f"{world}.json").read_text()) for world in ("one", "two"))
            for name in DISTRIBUTED_CHECKS}


@pytest.fixture(scope="session")
def train_script_help(_background) -> str:
    """`python scripts/train.py --help` (a fresh interpreter: the help must not need the heavy imports), started in
    the background with the session."""
    process = _background["help"] or _help_process()
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    return stdout
