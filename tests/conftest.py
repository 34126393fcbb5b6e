"""Shared fixtures: offline environment, tiny models built from configs, small data in the hf_robust data model."""

import os
import atexit
import json
import shutil
import subprocess
import sys
import tempfile

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


def tiny_tokenizer(tmp_dir: Path):
    """A WordPiece tokenizer over the words of `spurious_text` (no download)."""
    from transformers import BertTokenizerFast

    from hf_robust.data import embedded

    words = set()
    for group in (embedded._SUBJECTS, embedded._POSITIVE, embedded._NEGATIVE, embedded._TEMPLATES):
        for text in group:
            words.update(text.replace("{subject}", " ").replace("{word}", " ").replace(",", " ").replace(".", " ").split())
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", ":", "spoiler"] + sorted(words)
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(str(tmp_dir))  # (and loadable from disk like a real one)
    return tokenizer


def make_model(family: str, num_labels: int = 2, vocab_size: int = 200, seed: int = 0):
    """(model, image processor or None) — tiny random models for every adapter family."""
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
    if family == "timm_resnet":
        import timm

        return timm.create_model("resnet18", pretrained=False, num_classes=num_labels, channels=(8, 16, 32, 32)), None
    if family == "timm_vit":
        import timm

        return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_labels, img_size=32,
                                 patch_size=8, embed_dim=32, depth=2, num_heads=2), None
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
def text_data():
    from datasets import DatasetDict

    from hf_robust.data import make_spurious_text

    data = make_spurious_text(train_size=128, validation_size=48, test_size=48)
    return DatasetDict(dict(data))


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


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


LAUNCH_TWO_PROCESSES = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def shared_erm_checkpoint(erm_dir: str, family: str, data, common: dict) -> None:
    """The ERM checkpoint that the one- and two-process runs of a tests/scripts/*_distributed.py script start
    from: trained (1 epoch, batch 32, lr 1e-3) and saved by the first, one-process run; the second finds it."""
    if Path(erm_dir).is_dir():
        return
    from hf_robust.methods import RobustConfig, RobustTrainer

    model, processor = make_model(family, seed=0)
    config = RobustConfig(output_dir=erm_dir + "_run", num_train_epochs=1, per_device_train_batch_size=32,
                          learning_rate=1e-3, **common)
    RobustTrainer(model, config, train_dataset=data["train"], processing_class=processor).train()
    model.save_pretrained(erm_dir)


# every 2-process check of the suite (tests/scripts/<name>.py, `main(out_json, work_dir[, erm_dir])`); the two
# that start from a shared ERM checkpoint get its folder as a third argument
DISTRIBUTED_CHECKS = ("distributed_check", "batchnorm_distributed", "fair_dropout_distributed",
                      "counterfactual_distributed", "gradtune_distributed", "masktune_distributed")
_CHECKS_WITH_ERM = ("gradtune_distributed", "masktune_distributed")


@pytest.fixture(scope="session")
def distributed_checks(tmp_path_factory, digits):  # `digits` caches the benchmark before two processes read it
    """{check: (1-process output, 2-process output)}: every check of DISTRIBUTED_CHECKS run as one process, then
    as two under `accelerate launch --multi_gpu` (CPU, gloo; `--cpu --num_processes 2` would silently run one).
    All checks share one process (one launch): the start-up of a process is about half of a check's time."""
    tmp = tmp_path_factory.mktemp("distributed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    runner = Path(__file__).parent / "scripts" / "run_checks.py"
    for world, prefix in (("one", [sys.executable]), ("two", LAUNCH_TWO_PROCESSES)):
        plan = []
        for name in DISTRIBUTED_CHECKS:
            folder = tmp / name
            folder.mkdir(exist_ok=True)
            extra = [str(folder / "erm")] if name in _CHECKS_WITH_ERM else []  # trained by the 1-process run
            plan.append([str(runner.parent / f"{name}.py"), str(folder / f"{world}.json"), str(folder / world), *extra])
        (tmp / f"{world}_plan.json").write_text(json.dumps(plan))
        result = subprocess.run(prefix + [str(runner), str(tmp / f"{world}_plan.json")], env=env, capture_output=True,
                                text=True, timeout=1800, cwd=tmp)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return {name: tuple(json.loads((tmp / name / f"{world}.json").read_text()) for world in ("one", "two"))
            for name in DISTRIBUTED_CHECKS}


@pytest.fixture(scope="session")
def train_script_help() -> str:
    """`python scripts/train.py --help`, run once (a fresh interpreter: the help must not need the heavy imports)."""
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
