"""biased_mnist (MaskTune's protocol on real MNIST), the mnist-cnn preset and RandMask — on a tiny MNIST copy in
the layout of the Hub's `ylecun/mnist`, written here (the tests never need the real digits)."""

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image

from hf_robust.data import DataValidationError, load_benchmark, validate_group_dataset
from hf_robust.methods.masktune.masks import random_window_masks

N_TRAIN, N_TEST = 300, 60


def write_tiny_mnist(root, n_train=N_TRAIN, n_test=N_TEST, seed=0):
    """`<root>/mnist/{train,test}-00000-of-00001.parquet`, as ylecun/mnist: grey 28x28 `image`, ClassLabel `label`.
    Each digit is drawn as a blob whose brightness encodes its label, so pixels can be traced back."""
    rng = np.random.default_rng(seed)
    features = Features({"image": Image(), "label": ClassLabel(names=[str(i) for i in range(10)])})
    folder = root / "mnist"
    folder.mkdir(parents=True)
    raw = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 50, (n, 28, 28), dtype=np.uint8)
        images[:, 8:20, 8:20] += (100 + 15 * labels).astype(np.uint8)[:, None, None]
        Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features=features).to_parquet(
            str(folder / f"{split}-00000-of-00001.parquet"))
        raw[split] = (images, labels)
    return raw


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return root, write_tiny_mnist(root)


def _pixels(split):
    return np.stack([np.asarray(image) for image in split["image"]])


def test_biased_mnist_protocol(tiny_mnist, monkeypatch):
    root, raw = tiny_mnist
    monkeypatch.setenv("HF_ROBUST_DATA", str(root))  # <root>/mnist: the Hub dataset's own name
    data = load_benchmark("biased_mnist")
    assert list(data) == ["train", "validation", "test_biased", "test_original"]
    assert (len(data["train"]), len(data["validation"])) == (240, 60)  # 12,000 of 60,000 -> 20%
    assert len(data["test_biased"]) == len(data["test_original"]) == N_TEST
    for split in data.values():
        assert validate_group_dataset(split, num_labels=2) == "image"
        assert split["example_idx"] == list(range(len(split)))
        digit, label = np.asarray(split["digit"]), np.asarray(split["label"])
        np.testing.assert_array_equal(label, digit >= 5)
        np.testing.assert_array_equal(split["group"], label * 2 + np.asarray(split["attribute"]))
    assert data["train"].features["group"].names == ["digit 0-4,no square", "digit 0-4,square",
                                                     "digit 5-9,no square", "digit 5-9,square"]
    # every training digit once, in train or validation; squares on exactly 99% of class 0 and 1% of class 1
    train_digits, train_labels = raw["train"][1], raw["train"][1] >= 5
    sources = np.concatenate([data["train"]["source_idx"], data["validation"]["source_idx"]])
    assert sorted(sources.tolist()) == list(range(N_TRAIN))
    square = np.zeros(N_TRAIN, dtype=bool)
    for name in ("train", "validation"):
        square[data[name]["source_idx"]] = np.asarray(data[name]["attribute"], dtype=bool)
        np.testing.assert_array_equal(data[name]["digit"], train_digits[data[name]["source_idx"]])
    assert square[~train_labels].sum() == round(0.99 * (~train_labels).sum())
    assert square[train_labels].sum() == round(0.01 * train_labels.sum()) >= 1
    # the authors' structure: the conflicting digits sit at the class boundary (class 0's bare ones are its highest
    # digits, 4s; class 1's squared ones its lowest, 5s), as their digit-sorted order puts them
    assert set(train_digits[~train_labels & ~square].tolist()) == {4}
    assert set(train_digits[train_labels & square].tolist()) == {5}
    # test: the square on every 5-9 and no 0-4 (biased); none at all (original)
    test_labels = raw["test"][1] >= 5
    np.testing.assert_array_equal(data["test_biased"]["attribute"], test_labels)
    assert data["test_original"]["attribute"] == [0] * N_TEST


def test_biased_mnist_pixels_are_the_digits_plus_the_red_square(tiny_mnist):
    root, raw = tiny_mnist
    data = load_benchmark("biased_mnist", path=root)
    for name, source in (("train", "train"), ("test_biased", "test"), ("test_original", "test")):
        pixels = _pixels(data[name])
        assert pixels.shape[1:] == (28, 28, 3) and pixels.dtype == np.uint8
        grey = raw[source][0][data[name]["source_idx"]]
        square = np.asarray(data[name]["attribute"], dtype=bool)
        expected = np.repeat(grey[..., None], 3, axis=3)
        expected[square, :4, :4] = (255, 0, 0)  # the authors' corner: rows 0-3, columns 0-3, no margin
        np.testing.assert_array_equal(pixels, expected)


def test_biased_mnist_two_squares_seed_and_cache(tiny_mnist, monkeypatch):
    root, _ = tiny_mnist
    one = load_benchmark("biased_mnist", path=root)
    two = load_benchmark("biased_mnist", path=root, num_squares=2)
    assert two["train"].features["attribute"].names == ["no square", "squares"]
    pixels, square = _pixels(two["test_biased"]), np.asarray(two["test_biased"]["attribute"], dtype=bool)
    assert (pixels[square, :4, -4:] == (0, 0, 255)).all() and (pixels[square, :4, :4] == (255, 0, 0)).all()
    np.testing.assert_array_equal(pixels[~square], _pixels(one["test_original"])[~square])
    assert two["train"]["attribute"] == one["train"]["attribute"]  # the second square goes on the same digits

    with pytest.raises(ValueError, match="conflicting_digits='some'"):
        load_benchmark("biased_mnist", path=root, conflicting_digits="some")
    other = load_benchmark("biased_mnist", path=root, seed=1)
    assert other["validation"]["source_idx"] != one["validation"]["source_idx"]
    # generated once per (copy, arguments): a second load reads the cache, whatever the generator would do now
    import hf_robust.data.biased_mnist as module

    monkeypatch.setattr(module, "_images", lambda *a, **k: pytest.fail("regenerated"))
    again = load_benchmark("biased_mnist", path=root)
    assert again["validation"]["source_idx"] == one["validation"]["source_idx"]


@pytest.mark.parametrize("mode", ["authors", "all"])
def test_conflicting_digits_at_the_class_boundary_or_everywhere(mode):
    """10% conflicting examples per class, to see where they come from: the authors' boundary digits (class 0's
    highest, 4 then 3; class 1's lowest, 5 then 6), or every digit."""
    from datasets import DatasetDict

    from hf_robust.data import make_biased_mnist

    features = Features({"image": Image(), "label": ClassLabel(names=[str(i) for i in range(10)])})
    digits = np.repeat(np.arange(10), [300, 300, 300, 60, 50, 50, 60, 300, 300, 300])  # few 3-6: spill over
    split = lambda n: Dataset.from_dict({"image": [np.zeros((8, 8), np.uint8)] * n,  # noqa: E731
                                         "label": digits[:n].tolist()}, features=features)
    data = make_biased_mnist(DatasetDict({"train": split(len(digits)), "test": split(10)}), seed=2, square_size=2,
                             majority_fraction=0.9, minority_fraction=0.1, conflicting_digits=mode)
    digit = np.concatenate([data["train"]["digit"], data["validation"]["digit"]])
    square = np.concatenate([data["train"]["attribute"], data["validation"]["attribute"]]).astype(bool)
    bare_zero, squared_one = digit[(digit < 5) & ~square], digit[(digit >= 5) & square]
    assert (len(bare_zero), len(squared_one)) == (101, 101)  # 10% of 1,010 per class
    if mode == "authors":  # all 50 4s, then 51 of the 60 3s; all 50 5s, then 51 of the 60 6s
        assert np.bincount(bare_zero, minlength=10).tolist()[:5] == [0, 0, 0, 51, 50]
        assert np.bincount(squared_one, minlength=10).tolist()[5:] == [50, 51, 0, 0, 0]
    else:
        assert set(bare_zero.tolist()) == {0, 1, 2, 3, 4} and set(squared_one.tolist()) == {5, 6, 7, 8, 9}


def test_biased_mnist_without_a_copy_says_where_to_put_one(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ROBUST_DATA", str(tmp_path))  # a root without mnist/
    with pytest.raises(DataValidationError, match=r"ylecun/mnist.*HF_ROBUST_DATA=<root> with the copy in <root>/mnist"):
        load_benchmark("biased_mnist")
    features = Features({"picture": Image(), "label": ClassLabel(names=[str(i) for i in range(10)])})
    (tmp_path / "bad").mkdir()
    for split in ("train", "test"):
        Dataset.from_dict({"picture": [np.zeros((28, 28), np.uint8)], "label": [3]}, features=features).to_parquet(
            str(tmp_path / "bad" / f"{split}-00000-of-00001.parquet"))
    with pytest.raises(DataValidationError, match=r"split 'train' lacks \['image'\]"):
        load_benchmark("biased_mnist", path=tmp_path / "bad")


# ----------------------------------------------------------------------------- the mnist-cnn preset
def test_mnist_cnn_preset_layout_saves_and_loads(tmp_path):
    from hf_robust.models.adapter import get_adapter
    from hf_robust.explain.cam import xgradcam
    from hf_robust.models import load_model
    from hf_robust.data.preprocessing import ImagePreprocessing

    torch.manual_seed(0)
    model, processor = load_model("mnist-cnn", 2, ["digit 0-4", "digit 5-9"])
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 16, 32, 32] and all(c.kernel_size == (3, 3) for c in convs)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(512, 256), (256, 2)]
    adapter = get_adapter(model)
    assert adapter.classifier is model.classifier  # GradTune's and DFR's last layer
    assert adapter.linear_head is model.classifier
    model.eval()
    x = torch.rand(3, 3, 28, 28)
    cam, _ = xgradcam(model, adapter, {"pixel_values": x})
    assert cam.shape == (3, 8, 8)  # the CAM on the last convolution block
    features, logits = adapter.penultimate({"pixel_values": x})
    assert features.shape == (3, 256) and torch.allclose(model.classifier(features), logits, atol=1e-6)
    preprocessing = ImagePreprocessing.for_model(model, processor)  # pixels in [0, 1], no normalisation
    assert preprocessing.size == (28, 28) and preprocessing.mean == (0.0,) * 3 and preprocessing.std == (1.0,) * 3

    model.save_pretrained(tmp_path / "cnn")
    processor.save_pretrained(tmp_path / "cnn")
    reloaded, reloaded_processor = load_model(str(tmp_path / "cnn"), 2, ["digit 0-4", "digit 5-9"])
    assert type(reloaded) is type(model) and reloaded_processor is not None
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=x).logits, model(pixel_values=x).logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------- RandMask
def test_random_windows_sizes_positions_and_determinism():
    idx = torch.arange(4000)
    masks = random_window_masks(idx, (28, 28), seed=3)
    rows, cols = masks.any(2), masks.any(1)
    side = rows.sum(1)
    assert torch.equal(side, cols.sum(1)) and torch.equal(masks.flatten(1).sum(1), side * side)  # one square each
    assert set(side.tolist()) == set(range(2, 15))  # 2x2 .. 14x14 (half of 28), each size drawn
    counts = torch.bincount(side)[2:].float()
    assert counts.min() > 0.7 * counts.mean()  # about uniform over the 13 sizes (~308 each)
    top = rows.float().argmax(1)
    assert top.min() == 0 and (top + side).max() == 28  # windows reach both borders, never beyond
    assert torch.equal(random_window_masks(idx[[7, 3, 3000]], (28, 28), seed=3), masks[[7, 3, 3000]])  # per example
    assert not torch.equal(random_window_masks(idx, (28, 28), seed=4), masks)
    narrow = random_window_masks(idx[:500], (28, 28), seed=3, min_side=5, max_side=6).flatten(1).sum(1)
    assert set(narrow.tolist()) == {25, 36}
    with pytest.raises(ValueError, match="do not fit"):
        random_window_masks(idx[:2], (8, 8), min_side=2, max_side=9)


def _tiny_biased(tiny_mnist):
    from datasets import DatasetDict

    root, _ = tiny_mnist
    data = load_benchmark("biased_mnist", path=root)
    return DatasetDict({"train": data["train"], "validation": data["validation"], "test_biased": data["test_biased"]})


def test_randmask_trains_on_random_windows_of_every_image(tmp_path, tiny_mnist):
    from conftest import quick_config

    from hf_robust.models import load_model
    from hf_robust.methods import MaskTuneConfig, MaskTuneTrainer

    data = _tiny_biased(tiny_mnist)
    torch.manual_seed(0)
    model, processor = load_model("mnist-cnn", 2, data["train"].features["label"].names)
    args = quick_config(MaskTuneConfig, tmp_path / "rand", mask_method="random", masktune_iterations=2,
                        accumulative_masking=False, optim="sgd", learning_rate=0.01, masktune_selection="off")
    trainer = MaskTuneTrainer(model, args, train_dataset=data["train"], eval_dataset=dict(data),
                              processing_class=processor)
    trainer.train()
    masks = trainer.masks.masks()
    side = masks.any(2).sum(1)
    assert len(masks) == len(data["train"]) and side.min() >= 2 and side.max() <= 14
    assert torch.equal(masks.flatten(1).sum(1), side * side)  # one window per image, nothing from a CAM
    expected = random_window_masks(trainer.masks.example_idx, (28, 28), seed=0 * 1000 + 2)  # iteration 2's windows
    assert torch.equal(masks, expected)
    trainer.evaluate()
    results = trainer.results()
    assert {"validation", "test_biased"} <= set(results["splits"])


def test_randmask_refuses_text_and_windows_larger_than_the_image(tmp_path, tiny_mnist):
    from conftest import quick_config

    from hf_robust.models import load_model
    from hf_robust.methods import MaskTuneConfig, MaskTuneTrainer

    with pytest.raises(ValueError, match="mask_method='bogus'"):
        quick_config(MaskTuneConfig, tmp_path, mask_method="bogus")
    data = _tiny_biased(tiny_mnist)
    model, processor = load_model("mnist-cnn", 2, data["train"].features["label"].names)
    args = quick_config(MaskTuneConfig, tmp_path, mask_method="random", random_mask_max_side=40)
    with pytest.raises(ValueError, match="do not fit 28x28"):
        MaskTuneTrainer(model, args, train_dataset=data["train"], processing_class=processor)


@pytest.mark.parametrize("method", ["masktune", "gradtune", "dfr", "fairdropout"])
def test_every_method_runs_on_the_mnist_cnn(tmp_path, tiny_mnist, method):
    """Each method through the adapters on the preset: ERM stage + its own stages, evaluated by group."""
    from conftest import quick_config

    from hf_robust.methods.registry import get_method
    from hf_robust.models import load_model

    extra = {"gradtune": {"finetune_set_size": 20, "top_k": 10}, "fairdropout": {"fair_dropout_positions": ["conv3"]}}
    spec = get_method(method)  # with the method's own defaults (its label-free selection where it has one)
    data = _tiny_biased(tiny_mnist)
    torch.manual_seed(0)
    model, processor = load_model("mnist-cnn", 2, data["train"].features["label"].names)
    args = quick_config(spec.config_class(), tmp_path / method, **extra.get(method, {}))
    trainer = spec.trainer_class()(model, args, train_dataset=data["train"], eval_dataset=dict(data),
                                   processing_class=processor)
    trainer.train()
    trainer.evaluate()
    results = trainer.results()
    assert 0 <= results["splits"]["test_biased"]["worst_group_accuracy"] <= 1


# ----------------------------------------------------------------------------- recipes (scripts/train.py)
@pytest.fixture(scope="module")
def train_script():
    import importlib.util
    import sys

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("hf_robust_train_script", REPO / "scripts" / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_biased_mnist_recipes(train_script):
    from conftest import REPO

    _, cpu = train_script.parse_args(["--dataset", "biased_mnist", "--method", "masktune"])
    assert (cpu.optim, cpu.learning_rate, cpu.weight_decay, cpu.per_device_train_batch_size) == ("sgd", 0.01, 1e-4, 128)
    assert cpu.optim_args == "momentum=0.9" and cpu.lr_scheduler_type == "constant" and cpu.num_train_epochs == 3
    script, paper = train_script.parse_args(["--config", str(REPO / "scripts" / "recipes" / "biased_mnist_paper.yaml")])
    assert (script.dataset, script.model, script.method) == ("biased_mnist", "mnist-cnn", "masktune")
    assert (paper.num_train_epochs, paper.lr_step_epochs, paper.lr_step_gamma) == (100, 25, 0.5)
    assert (paper.optim, paper.learning_rate, paper.per_device_train_batch_size) == ("sgd", 0.01, 128)


def test_main_job_on_a_local_mnist_copy_with_two_squares(tmp_path, tiny_mnist, train_script, capsys):
    root, _ = tiny_mnist
    results = train_script.main([
        "--method", "erm", "--dataset", "biased_mnist", "--dataset_path", str(root), "--dataset_kwargs",
        '{"num_squares": 2}', "--num_train_epochs", "1", "--output_dir", str(tmp_path / "run"), "--use_cpu",
        "--disable_tqdm", "true", "--save_strategy", "no", "--save_plots", "false",
    ])
    assert set(results["splits"]) == {"validation", "test_biased", "test_original"}
    assert "digit 5-9,squares" in capsys.readouterr().out  # the two-square dataset's group names in the table
    with pytest.raises(SystemExit, match="dataset_kwargs.*not JSON"):
        train_script.main(["--dataset", "biased_mnist", "--dataset_path", str(root), "--dataset_kwargs", "{num: 2}"])


def test_step_schedule_halves_the_learning_rate_every_epoch(tmp_path, tiny_mnist):
    from conftest import quick_config

    from hf_robust.models import load_model
    from hf_robust.methods import RobustConfig, RobustTrainer

    data = _tiny_biased(tiny_mnist)
    model, processor = load_model("mnist-cnn", 2, data["train"].features["label"].names)
    args = quick_config(RobustConfig, tmp_path, num_train_epochs=3, per_device_train_batch_size=80, learning_rate=0.08,
                        lr_step_epochs=1, lr_step_gamma=0.5, optim="sgd")  # 3 steps per epoch
    trainer = RobustTrainer(model, args, train_dataset=data["train"], processing_class=processor)
    trainer.train()
    rates = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert rates == pytest.approx([0.08] * 3 + [0.04] * 3 + [0.02] * 3)
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.01)  # the final rate MaskTune fine-tunes at
    with pytest.raises(ValueError, match="lr_step_epochs=0"):
        quick_config(RobustConfig, tmp_path, lr_step_epochs=0)


def test_bench_mnist_says_when_no_copy_is_found(tmp_path, monkeypatch, capsys):
    import importlib.util
    import sys

    from conftest import REPO

    monkeypatch.setenv("HF_ROBUST_DATA", str(tmp_path))
    spec = importlib.util.spec_from_file_location("bench_mnist", REPO / "scripts" / "bench" / "mnist.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    output = tmp_path / "results.json"
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--rows", "masktune", "--seeds", "0", "--output", str(output)])
    assert exit_info.value.code == 2 and not output.exists()
    message = capsys.readouterr().err
    assert "no local copy" in message and "HF_ROBUST_DATA=<root> with <root>/mnist" in message
    with pytest.raises(SystemExit, match="expected rows from"):
        bench.main(["--rows", "nope"])


def test_bench_mnist_summary_and_table():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("bench_mnist", REPO / "scripts" / "bench" / "mnist.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def run(biased, original):
        split = lambda acc: {"accuracy": acc, "worst_group_accuracy": acc - 0.1, "worst_class_accuracy": acc}  # noqa: E731
        return {"splits": {"test_biased": split(biased), "test_original": split(original), "validation": split(0.99)},
                "stages": {"ERM": {"test_biased": split(0.2), "test_original": split(0.6), "validation": split(0.99)}}}

    runs = [run(0.97, 0.98), run(0.99, 0.98)]
    entry = bench.summarise(runs, [0, 1])
    assert entry["test_biased_accuracy"]["mean"] == pytest.approx(0.98)
    assert entry["test_biased_accuracy"]["std"] == pytest.approx(0.0141421, rel=1e-4)  # sample std, as the paper's +-
    assert entry["test_biased_worst_group"]["per_seed"] == pytest.approx([0.87, 0.89])
    assert bench.summarise(runs, [0, 1], stage="ERM")["test_original_accuracy"]["mean"] == pytest.approx(0.6)
    entry.update(seconds={"mean": 600.0}, cpu_seconds={"mean": 500.0}, paper=bench.PAPER["masktune"])
    table = bench.markdown_table({"masktune": entry})
    assert "| masktune | 2 | 98.00 +- 1.41 | 88.00 +- 1.41 | 98.00 +- 0.00 | 98.26 +- 0.27 | 98.46 +- 0.21 | 600 (500) |" in table

    other = bench.summarise([run(0.95, 0.97)], [2])
    merged = bench.merge_entries(bench.summarise(runs, [0, 1]), other)
    assert merged["seeds"] == [0, 1, 2] and merged["test_biased_accuracy"]["per_seed"] == pytest.approx([0.97, 0.99, 0.95])
    assert merged["test_biased_accuracy"]["std"] == pytest.approx(0.02)
    with pytest.raises(ValueError, match="Both entries have seeds"):
        bench.merge_entries(merged, other)


def test_bench_two_squares_checks_its_input_before_training(tmp_path, monkeypatch, capsys):
    import importlib.util

    from conftest import REPO

    monkeypatch.setenv("HF_ROBUST_DATA", str(tmp_path))
    spec = importlib.util.spec_from_file_location("bench_two_squares", REPO / "scripts" / "bench" / "mnist_two_squares.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit, match="expected some of"):
        bench.main(["--variants", "nope", "--work_dir", str(tmp_path / "work")])
    output = tmp_path / "results.json"
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--seeds", "0", "--work_dir", str(tmp_path / "work"), "--output", str(output)])
    assert exit_info.value.code == 2 and not output.exists() and not (tmp_path / "work").exists()
    assert "no local copy" in capsys.readouterr().err
