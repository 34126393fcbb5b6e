"""MaskTune's label-free choices, made on validation with labels only (worst-class accuracy, ties by accuracy):
the candidates of the `select` stage, whether another masking round runs, and the record of both for the report.

Taghanaki et al. ("MaskTune: Mitigating Spurious Correlations by Forcing to Explore", NeurIPS 2022,
arXiv:2210.00055) tune the fine-tuning on validation; here the learning rate, batch size and threshold k are
chosen among one-epoch fine-tunings of the ERM model and the ERM model itself, then the number of rounds round by
round: a round runs only while the previous one improved. Pure functions of the config and the records; the
trainer runs the candidates and the rounds.
"""

from __future__ import annotations

from ...core.health import selection_score


def candidate_grid(args) -> list[dict] | None:
    """The candidates of the `select` stage for a `MaskTuneConfig`: the ERM model itself, then one-epoch
    fine-tunings for every combination of the knobs the user left unset (the set ones fixed); None when there is
    nothing to choose."""
    unset = [args.finetune_learning_rate is None, args.finetune_batch_size is None, args.mask_threshold_std is None]
    if args.masktune_selection == "off" or not any(unset):
        return None
    lrs = ([args.finetune_learning_rate] if args.finetune_learning_rate is not None
           else [float(f"{f * args.learning_rate:.6g}") for f in args.selection_learning_rate_factors])
    sizes = ([args.finetune_batch_size] if args.finetune_batch_size is not None
             else [max(1, args.per_device_train_batch_size // d) for d in args.selection_batch_size_divisors])
    ks = [args.mask_threshold_std] if args.mask_threshold_std is not None else list(args.selection_thresholds)
    grid = [{"finetune": False}]
    for k in dict.fromkeys(ks):
        for lr in dict.fromkeys(lrs):
            for size in dict.fromkeys(sizes):
                grid.append({"finetune": True, "finetune_learning_rate": float(lr), "finetune_batch_size": int(size),
                             "mask_threshold_std": float(k)})
    return grid


def round_improves(record: dict, previous_rounds: list[dict]) -> bool:
    """Whether a round's validation record beats the previous round's (the selection's rule); the first round
    does."""
    if not previous_rounds:
        return True
    return selection_score(record["validation"]) > selection_score(previous_rounds[-1]["validation"])


def record_with_rounds(
    selection: dict | None, rounds: list[dict], stopped_after: int | None, knobs: dict, split: str
) -> dict | None:
    """The selection's record with the rounds chosen after it: each round after the first as a candidate (the
    chosen candidate's knobs and `iterations`), the kept round chosen. Without a `select` stage (`selection` None:
    its knobs set, given as `knobs`), the rounds alone. `rounds`: one validation record per round run;
    `stopped_after`: the round kept when a later one did not improve."""
    if not rounds:
        return selection
    kept = stopped_after or rounds[-1]["iteration"]
    if selection is not None:
        base, first = list(selection["candidates"]), selection["chosen"]
        base[first] = {**base[first], "knobs": {**base[first]["knobs"], "iterations": 1}}
        knobs = base[first]["knobs"]
        later = rounds[1:]
    else:
        base, first = [], 0
        later = rounds
    candidates = [{"knobs": {**knobs, "iterations": r["iteration"]}, "validation": r["validation"],
                   "seconds": r["seconds"]} for r in later]
    if selection is None:
        chosen = kept - 1
    else:
        chosen = first if kept == 1 else len(base) + kept - 2
    return {"metric": "worst_class_accuracy (ties: accuracy)", "split": split,
            **(selection or {}), "candidates": base + candidates, "chosen": chosen}
