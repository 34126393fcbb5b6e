"""FairDropout's benchmark (the "fairdropout" entry of scripts/benchmark.py): quality on biased_digits and speed.

Quality, with the main job's defaults for biased_digits (hf_robust.recipes.DATASET_RECIPES; dataset seed 0):
1. selection on the FIRST training seed, by worst-CLASS accuracy on `validation` (no group labels, never the
   test splits): the positions dp2..dp5 at the default p_gen = p_mem = 0.2, then, at the best position, the
   paper's grid p_gen in {0.2, 0.4, 0.5} x p_mem = 0.1 (appendix, Table 4), then the evaluation-time rescaling
   of the generalising neurons (`rescale_generalising`) at the best of those (test numbers of every candidate
   are reported, never used);
2. the chosen configuration on every seed (the selection run is reused for the first), FairDropout-DFR on each
   of those models (`--erm_checkpoint`: the same FairDropout model, then DFR's last-layer stages), and ERM on
   the same seeds, all through `scripts/train.py`.

Speed, ratios measured side by side in this one process (medians of interleaved repetitions):
- a FairDropout training step (forward, backward, optimizer step) over the ERM step, same model and batch;
- mask generation: the vectorised counter-based hash over a per-example reseeding loop like the authors'
  `ExampleTiedDropout` (torch.manual_seed + bernoulli per example, masks of the (B, C, H, W) activation);
- inference of the exported stock model over inference of the ERM model (same architecture: equal by design),
  and of the hooked model for reference.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import interleaved
from hf_robust.recipes import DATASET_RECIPES

POSITIONS = ["dp2", "dp3", "dp4", "dp5"]
DEFAULT_P = (0.2, 0.2)
P_GRID = [(0.2, 0.1), (0.4, 0.1), (0.5, 0.1)]
SPLITS = ("validation", "test_biased", "test_original")


def _summarise(results: dict) -> dict:
    out = {}
    for split, report in results["splits"].items():
        out[split] = {k: report.get(k) for k in ("accuracy", "worst_group_accuracy", "worst_class_accuracy")}
    return out


def _run(train, method: str, seed: int, output_dir: str, extra: list[str]) -> dict:
    argv = ["--method", method, "--seed", str(seed), "--output_dir", output_dir, "--disable_tqdm", "true",
            "--save_strategy", "no", "--save_plots", "false", *extra]
    start = time.perf_counter()
    results = train.main(argv)
    summary = _summarise(results)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    for stage, splits in results.get("stages", {}).items():
        summary.setdefault("stages", {})[stage] = _summarise({"splits": splits})
    if "last_layer" in results:
        summary["last_layer"] = {k: results["last_layer"].get(k) for k in ("C", "selection_half")}
    return summary


def _options(positions: list[str], p_gen: float, p_mem: float) -> list[str]:
    return ["--fair_dropout_positions", *positions, "--p_gen", str(p_gen), "--p_mem", str(p_mem)]


def _mean(runs: list[dict], split: str, key: str = "worst_group_accuracy") -> dict:
    values = [run[split][key] for run in runs]
    return {"mean": statistics.mean(values), "per_seed": values}


def quality(train, seeds: list[int], work_dir: str | None = None, log=print) -> dict:
    """Selection on validation worst-class accuracy, then FairDropout, FairDropout-DFR and ERM on every seed."""
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        tmp = Path(tmp)
        first = seeds[0]
        candidates: list[dict] = []

        def candidate(positions, p_gen, p_mem, rescale=False):
            folder = tmp / f"fd-{'+'.join(positions)}-{p_gen}-{p_mem}-{int(rescale)}-seed{first}"
            options = _options(positions, p_gen, p_mem) + ["--rescale_generalising", str(rescale).lower()]
            run = _run(train, "fairdropout", first, str(folder), options + ["--export_model", "false"])
            entry = {"positions": positions, "p_gen": p_gen, "p_mem": p_mem, "rescale_generalising": rescale,
                     "folder": str(folder), "options": options,
                     "validation_worst_class_accuracy": run["validation"]["worst_class_accuracy"],
                     # reported only, never used to choose
                     "test_biased_worst_group_accuracy": run["test_biased"]["worst_group_accuracy"], "run": run}
            candidates.append(entry)
            log(f"  selection: {positions} p_gen={p_gen} p_mem={p_mem} rescale={rescale}: validation worst-class "
                f"{entry['validation_worst_class_accuracy']:.3f}")
            return entry

        def best(entries):  # ties: the earlier candidate (the paper's default order)
            return max(entries, key=lambda e: (e["validation_worst_class_accuracy"], -entries.index(e)))

        by_position = [candidate([position], *DEFAULT_P) for position in POSITIONS]
        position = best(by_position)["positions"]
        by_p = [next(e for e in by_position if e["positions"] == position)]
        by_p += [candidate(position, p_gen, p_mem) for p_gen, p_mem in P_GRID]
        chosen = best(by_p)
        # the evaluation-time rescaling of the generalising neurons (the authors' "drop" mode), at that choice
        chosen = best([chosen, candidate(chosen["positions"], chosen["p_gen"], chosen["p_mem"], rescale=True)])
        options = chosen["options"]
        log(f"  chosen: {options}")

        fairdropout, fairdropout_dfr, erm = [], [], []
        for seed in seeds:
            if seed == first:
                run, folder = chosen["run"], chosen["folder"]
            else:
                folder = str(tmp / f"fd-chosen-seed{seed}")
                run = _run(train, "fairdropout", seed, folder, options + ["--export_model", "false"])
            fairdropout.append(run)
            fairdropout_dfr.append(_run(train, "fairdropout_dfr", seed, str(tmp / f"fddfr-seed{seed}"),
                                        options + ["--erm_checkpoint", folder, "--export_model", "false"]))
            erm.append(_run(train, "erm", seed, str(tmp / f"erm-seed{seed}"), []))
            log(f"  seed {seed}: test_biased worst-group ERM {erm[-1]['test_biased']['worst_group_accuracy']:.3f}, "
                f"FairDropout {run['test_biased']['worst_group_accuracy']:.3f}, FairDropout-DFR "
                f"{fairdropout_dfr[-1]['test_biased']['worst_group_accuracy']:.3f}")

    summary = {name: {split: _mean(runs, split) for split in SPLITS}
               for name, runs in (("erm", erm), ("fairdropout", fairdropout), ("fairdropout_dfr", fairdropout_dfr))}
    gain = summary["fairdropout"]["test_biased"]["mean"] - summary["erm"]["test_biased"]["mean"]
    return {
        "seeds": seeds,
        "settings": {"dataset": "biased_digits (dataset seed 0)", **DATASET_RECIPES["biased_digits"]},
        # the layout of the other methods' entries: FairDropout's per split mean over seeds
        "mean": {split: {key: _mean(fairdropout, split, key) for key in ("worst_group_accuracy", "accuracy")}
                 for split in SPLITS},
        "selection": {
            "criterion": "worst-class accuracy on validation (no group labels), training seed %d" % first,
            "candidates": [{k: v for k, v in c.items() if k not in ("run", "folder", "options")} for c in candidates],
            "chosen": {k: chosen[k] for k in ("positions", "p_gen", "p_mem", "rescale_generalising")},
        },
        "worst_group_accuracy": summary,
        "fairdropout_minus_erm_test_biased_points": round(100 * gain, 2),
        "runs": {"erm": erm, "fairdropout": fairdropout, "fairdropout_dfr": fairdropout_dfr},
    }


# ----------------------------------------------------------------------------------------------- speed
def _ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> dict:
    """The ratio of two interleaved timings: median of the per-repetition ratios (robust to load that drifts)
    and the ratio of the fastest calls (the least disturbed ones)."""
    paired = [a / b for a, b in zip(times[numerator], times[denominator])]
    return {"median_paired": round(statistics.median(paired), 3),
            "fastest": round(min(times[numerator]) / min(times[denominator]), 3)}


def _ms(values: list[float]) -> float:
    return round(1e3 * statistics.median(values), 3)


def maini_style_masks(example_idx, shape, p_gen: float, p_mem: float):
    """The authors' way (ExampleTiedDropout, epoch 0): reseed the global RNG per example and draw its memorising
    channels, broadcast over H, W. The global RNG state is restored afterwards (it is not, in their code)."""
    import torch

    state = torch.get_rng_state()
    batch, channels = shape[0], shape[1]
    mask = torch.zeros(shape)
    fixed = int(p_gen * channels)
    mask[:, :fixed] = 1
    for i in range(batch):
        torch.manual_seed(int(example_idx[i].item()))
        row = torch.bernoulli(torch.full((1, channels - fixed), p_mem))
        mask[i][fixed:] = row.view(-1, 1, 1)
    torch.set_rng_state(state)
    return mask


def timing(repeats: int = 30, position: str = "dp4") -> dict:
    import torch
    import transformers

    from hf_robust.data import load_benchmark
    from hf_robust.methods.fair_dropout.inject import FairDropoutConfig, export_fair_dropout, inject_fair_dropout
    from hf_robust.methods.fair_dropout import fair_dropout_mask
    from hf_robust.models import load_model
    from hf_robust.data.preprocessing import GroupDataCollator, ImagePreprocessing

    transformers.logging.set_verbosity_error()
    data = load_benchmark("biased_digits")
    transformers.set_seed(0)
    erm, _ = load_model("digits-resnet18", 2, data["train"].features["label"].names)
    collator = GroupDataCollator("image", image_preprocessing=ImagePreprocessing.for_model(erm, None))
    batch = collator([data["train"][i] for i in range(128)])
    fd = inject_fair_dropout(copy.deepcopy(erm), FairDropoutConfig(positions=[position]))
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in (("erm", erm), ("fd", fd))}

    def step(model, optimizer, **extra):
        def run():
            model.train()
            optimizer.zero_grad(set_to_none=True)
            out = model(pixel_values=batch["pixel_values"], labels=batch["labels"], **extra)
            out.loss.backward()
            optimizer.step()
        return run

    _, steps = interleaved({"erm": step(erm, optimizers["erm"]),
                            "fairdropout": step(fd, optimizers["fd"], example_idx=batch["example_idx"])},
                           repeats, warmup=3)

    # mask generation for this position's activation (B, C, H, W), B = 128 and 512
    features = {}
    with torch.no_grad():
        handle = fd.fair_dropout.layers[position]

        def grab(module, args, output):
            features["shape"] = tuple(output.shape)

        from hf_robust.methods.fair_dropout.positions import get_position
        from hf_robust.models.adapter import get_adapter

        hook = get_position(get_adapter(fd), position).module.register_forward_hook(grab)
        fd.eval()(pixel_values=batch["pixel_values"][:2])
        hook.remove()
    _, channels, height, width = features["shape"]
    masks = {}
    for size in (128, 512):
        idx = torch.arange(size) * 7 + 3
        _, generation = interleaved(
            {"vectorised": lambda: fair_dropout_mask(idx, channels, handle.p_gen, handle.p_mem, handle.seed),
             "per_example_reseed_loop": lambda: maini_style_masks(idx, (size, channels, height, width),
                                                                   handle.p_gen, handle.p_mem)},
            max(5, repeats // 3), warmup=3,
        )
        masks[f"batch_{size}"] = {
            "vectorised_ms": _ms(generation["vectorised"]),
            "per_example_reseed_loop_ms": _ms(generation["per_example_reseed_loop"]),
            "speedup": _ratio(generation, "per_example_reseed_loop", "vectorised"),
        }

    # inference: ERM model vs the exported stock model vs the hooked model, eval mode, no grad
    stock = export_fair_dropout(fd).eval()
    erm.eval(), fd.eval()
    eval_batch = collator([data["test_original"][i] for i in range(256)])["pixel_values"]

    def infer(model):
        def run():
            with torch.no_grad():
                model(pixel_values=eval_batch)
        return run

    _, inference = interleaved({"erm": infer(erm), "exported": infer(stock), "hooked": infer(fd)}, repeats,
                               warmup=3)
    return {
        "model": "digits-resnet18 (biased_digits preset)",
        "position": position,
        "activation_shape": [128, channels, height, width],
        "torch_threads": torch.get_num_threads(),
        "train_step": {
            "batch_size": 128,
            "erm_ms": _ms(steps["erm"]),
            "fairdropout_ms": _ms(steps["fairdropout"]),
            "fairdropout_over_erm": _ratio(steps, "fairdropout", "erm"),
        },
        "mask_generation": masks,
        "inference": {
            "batch_size": 256,
            "erm_ms": _ms(inference["erm"]),
            "exported_ms": _ms(inference["exported"]),
            "hooked_ms": _ms(inference["hooked"]),
            "exported_over_erm": _ratio(inference, "exported", "erm"),
            "hooked_over_erm": _ratio(inference, "hooked", "erm"),
        },
        "repeats": repeats,
    }
