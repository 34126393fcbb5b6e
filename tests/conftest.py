"""Shared fixtures: offline environment, tiny models built from configs, small data in the hf_robust data model."""

import os
import tempfile

# Offline, with a throw-away HF_HOME, before anything imports huggingface_hub / datasets / transformers.
_HF_HOME = tempfile.mkdtemp(prefix="hf_robust_tests_home_")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HOME"] = _HF_HOME
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IMAGE_FAMILIES = ["hf_vit", "hf_resnet", "timm_resnet", "timm_vit", "timm_wrapper_resnet"]
TEXT_FAMILIES = ["hf_bert"]


def tiny_tokenizer(tmp_dir: Path):
    """A WordPiece tokenizer over the words of `spurious_text` (no download)."""
    from transformers import BertTokenizerFast

    from hf_robust.data import embedded

    words = set()
    for group in (embedded._SUBJECTS, embedded._POSITIVE, embedded._NEGATIVE, embedded._TEMPLATES):
        for text in group:
            words.update(text.replace("{subject}", " ").replace("{word}", " ").replace(",", " ").replace(".", " ").split())
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", ":", "spoiler"] + sorted(words)
    path = Path(tmp_dir) / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab_file=str(path), do_lower_case=True)


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
            architecture="resnet18", num_labels=num_labels, model_args={"channels": [8, 16, 32, 32]},
            pretrained_cfg={"input_size": [3, 32, 32], "crop_pct": 1.0, "mean": [0.5] * 3, "std": [0.5] * 3},
        )
        return TimmWrapperForImageClassification(config), None
    raise ValueError(family)


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
            "train": digits["train"].shuffle(seed=0).select(range(256)),
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
