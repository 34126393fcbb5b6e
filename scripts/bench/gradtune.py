"""GradTune and DFR benchmark, used by scripts/benchmark.py (entries "gradtune" and "dfr").

    python scripts/benchmark.py --methods gradtune,dfr            # seeds 0 1 2; ERM is trained once per seed

Quality: per training seed, the main job trains ERM with the biased_digits defaults (`--method erm`), then
GradTune and DFR run from that ERM checkpoint (`--erm_checkpoint`; the same model the methods' own `erm` stage
would train, seeded identically), so the ERM baseline, GradTune and DFR share one ERM model per seed. Reported:
every split per group (mean over seeds), the ERM baseline beside, and the per-group composition of the
fine-tuning set. DFR runs as in its paper (`--dfr_balance group`) and class-balanced (no group labels).

Timing (one process, side by side, the ERM model of seed 0 and the held-out half of `validation`; ratios of the
fastest of several rounds, the scoring and inference passes interleaved round by round, since the machine
is shared):
- the scoring pass (features, logits, closed-form norms) vs a plain inference pass over the same examples;
- the straightforward way: a backward pass through the whole model per example (batch size 1), timed on a
  subset (interleaved with the two passes above) and scaled to the held-out size;
- `torch.func` per-example gradients of the head on the cached features (vmap of grad);
- the last-layer stage: 500 epochs over the 500 selected cached examples.
"""

from __future__ import annotations

import atexit
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import interleaved, train_script

_ERM_DIRS: dict[int, str] = {}
_WORK = None


def _work_dir() -> Path:
    global _WORK
    if _WORK is None:
        _WORK = tempfile.mkdtemp(prefix="bench_gradtune_")
        atexit.register(shutil.rmtree, _WORK, True)
    return Path(_WORK)


def erm_checkpoint(seed: int) -> str:
    """The main job's ERM model for `seed` (biased_digits defaults), trained once per benchmark process."""
    if seed not in _ERM_DIRS:
        out = _work_dir() / f"erm_seed{seed}"
        train_script().main(["--method", "erm", "--seed", str(seed), "--output_dir", str(out), "--disable_tqdm",
                              "true", "--save_strategy", "no"])
        _ERM_DIRS[seed] = str(out)
    return _ERM_DIRS[seed]


def _mean(values):
    return statistics.mean(values) if values else None


def _summarise(runs: list[dict]) -> dict:
    splits = list(runs[0]["splits"])

    def summary(source):
        out = {}
        for split in splits:
            out[split] = {}
            for key in ("worst_group_accuracy", "accuracy", "worst_class_accuracy"):
                values = [source(run)[split][key] for run in runs]
                out[split][key] = {"mean": _mean(values), "per_seed": values}
            groups = list(source(runs[0])[split]["groups"])
            out[split]["groups"] = {
                g: _mean([source(run)[split]["groups"][g]["accuracy"] for run in runs]) for g in groups
            }
        return out

    composition = {}
    for group in runs[0].get("finetune_set", {}).get("per_group", {}):
        rows = [run["finetune_set"]["per_group"][group] for run in runs]
        composition[group] = {key: _mean([row[key] for row in rows]) for key in rows[0]}
    return {
        "mean": summary(lambda run: run["splits"]),
        "stages_mean": {"ERM": summary(lambda run: run["stages"]["ERM"])},
        "finetune_set_mean": composition,
        "last_layer": [run.get("last_layer") for run in runs],
    }


def quality(method: str, seeds: list[int], extra: list[str] | None = None) -> dict:
    train = train_script()
    runs = []
    for seed in seeds:
        checkpoint = erm_checkpoint(seed)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            argv = ["--method", method, "--seed", str(seed), "--output_dir", tmp, "--disable_tqdm", "true",
                    "--save_strategy", "no", "--erm_checkpoint", checkpoint, *(extra or [])]
            results = train.main(argv)
            results["seconds"] = round(time.perf_counter() - start, 1)
            runs.append(results)
    keep = ("seed", "splits", "stages", "seconds", "finetune_set", "last_layer")
    return {"seeds": seeds, "arguments": extra or [], **_summarise(runs),
            "runs": [{k: run[k] for k in keep if k in run} for run in runs]}


def _timed(fn, repeats: int = 3):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, min(times), statistics.median(times)


def timing(seed: int = 0, naive_examples: int = 60) -> dict:
    """Scoring vs inference vs per-example backward vs torch.func, and the last-layer stage, in one process."""
    import torch
    import torch.nn.functional as F
    import transformers
    from torch.func import functional_call, grad, vmap

    from hf_robust.data import load_benchmark
    from hf_robust.models import load_model
    from hf_robust.recipes import COMMON_DEFAULTS, DATASET_RECIPES
    from hf_robust.methods import GradTuneConfig, GradTuneTrainer
    from hf_robust.methods.gradtune.rule import select_by_gradient_norm
    from hf_robust.methods.last_layer.linear_head import train_linear_head

    transformers.logging.set_verbosity_error()
    train = train_script()
    defaults = {**COMMON_DEFAULTS, **DATASET_RECIPES["biased_digits"]}
    data = load_benchmark("biased_digits")
    model, processor = load_model(defaults["model"], 2, data["train"].features["label"].names)
    with tempfile.TemporaryDirectory() as tmp:
        args = GradTuneConfig(output_dir=tmp, erm_checkpoint=erm_checkpoint(seed), report_to="none",
                              disable_tqdm=True, per_device_eval_batch_size=defaults["per_device_eval_batch_size"],
                              seed=seed)
        trainer = GradTuneTrainer(model, args, train_dataset=data["train"], processing_class=processor,
                                  eval_dataset={"validation": data["validation"]})
        trainer.load_checkpoint_weights(Path(args.erm_checkpoint))
        validation = data["validation"]
        position = {idx: i for i, idx in enumerate(validation["example_idx"])}
        heldout = validation.select([position[i] for i in trainer.last_layer.heldout_idx.tolist()])

        def inference(_, batch):
            with torch.no_grad():
                return {"logits": trainer.model(pixel_values=batch["pixel_values"]).logits}

        classifier = trainer.adapter.classifier

        def per_example_backward(model_, batch):
            model_.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model_(pixel_values=batch["pixel_values"]).logits, batch["labels"])
            loss.backward()
            norm = torch.sqrt(classifier.weight.grad.pow(2).sum() + classifier.bias.grad.pow(2).sum())
            return {"norms": norm.detach()[None]}

        naive_subset = heldout.select(range(naive_examples))
        trainer.compute_per_example(heldout, inference, description="Warm-up")
        passes, seconds = interleaved({
            "inference": lambda: trainer.compute_per_example(heldout, inference, description="Inference"),
            "scoring": lambda: trainer.last_layer.compute_data(heldout),
            "naive": lambda: trainer.compute_per_example(naive_subset, per_example_backward, batch_size=1,
                                                         description="Per-example backward"),
        }, repeats=5)
        scores, naive = passes["scoring"], passes["naive"]
        trainer.model.zero_grad(set_to_none=True)
        infer_min, infer_median = min(seconds["inference"]), statistics.median(seconds["inference"])
        score_min, score_median = min(seconds["scoring"]), statistics.median(seconds["scoring"])
        naive_min, naive_median = min(seconds["naive"]), statistics.median(seconds["naive"])
        ratios = [s / i for s, i in zip(seconds["scoring"], seconds["inference"])]
        naive_scale = len(heldout) / naive_examples
        agreement = float((naive["norms"].double() - scores.norms[:naive_examples]).abs().max()
                          / scores.norms[:naive_examples].max())

        weight, bias = classifier.weight.detach(), classifier.bias.detach()

        def head_loss(params, h, y):
            return F.cross_entropy(functional_call(classifier, params, (h[None],)), y[None])

        def func_grads():
            grads = vmap(grad(head_loss), in_dims=(None, 0, 0))({"weight": weight, "bias": bias}, scores.features,
                                                              scores.labels)
            return torch.sqrt(grads["weight"].flatten(1).pow(2).sum(1) + grads["bias"].pow(2).sum(1))

        func_norms, func_min, func_median = _timed(func_grads)
        func_agreement = float((func_norms.double() - scores.norms).abs().max() / scores.norms.max())

        chosen = select_by_gradient_norm(scores.norms, 500, None, seed)
        settings = trainer.last_layer.settings()
        head, head_min, head_median = _timed(
            lambda: train_linear_head(scores.features[chosen], scores.labels[chosen], weight, bias, seed=seed,
                                      **settings)
        )
    return {
        "model": defaults["model"],
        "heldout_examples": len(heldout),
        "eval_batch_size": defaults["per_device_eval_batch_size"],
        "inference_pass_seconds": {"min": round(infer_min, 3), "median": round(infer_median, 3)},
        "scoring_pass_seconds": {"min": round(score_min, 3), "median": round(score_median, 3)},
        "scoring_over_inference": round(score_min / infer_min, 3),
        "scoring_over_inference_per_round": [round(r, 3) for r in ratios],
        "per_example_backward_seconds": {
            "measured_examples": naive_examples, "min": round(naive_min, 3), "median": round(naive_median, 3),
            "scaled_to_heldout": round(naive_median * naive_scale, 2),
        },
        "scoring_speedup_over_per_example_backward": round(naive_min * naive_scale / score_min, 1),
        "torch_func_head_grads_seconds": {"min": round(func_min, 4), "median": round(func_median, 4)},
        "scoring_pass_over_torch_func_head": round(score_min / func_min, 1),
        "closed_form_vs_backward_max_relative_difference": agreement,
        "closed_form_vs_torch_func_max_relative_difference": func_agreement,
        "last_layer_500_epochs_500_examples_seconds": {"min": round(head_min, 3), "median": round(head_median, 3),
                                                       "steps": 500 * -(-500 // settings["batch_size"])},
        "last_layer_settings": settings,
    }


def benchmark_gradtune(seeds: list[int]) -> dict:
    return {"quality": quality("gradtune", seeds), "timing": timing(seeds[0])}


def benchmark_dfr(seeds: list[int]) -> dict:
    return {"quality": quality("dfr", seeds, ["--dfr_balance", "group"]),
            "quality_class_balanced": quality("dfr", seeds, ["--dfr_balance", "class"])}
