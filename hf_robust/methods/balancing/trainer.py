"""Data balancing baselines, the ones every group-robustness library ships beside its own methods.

- `ReweightTrainer`: ERM with each group (`balance_by="group"`, needs train group labels) or class (`"class"`)
  weighing the same, by loss reweighting (`balance_mode="reweight"`: weight `N / (K * n_k)` per example, the loss
  the batch mean of weighted losses) or by resampling (`"resample"`: draws with probability proportional to
  `1 / n_k`, with replacement, N per epoch, seeded per epoch: the same draw on N processes and after a resume).
  Stages: `initial` (the model as given, the health check's reference) -> `train`.
- `SUBGTrainer`: SUBG (Idrissi et al., "Simple data balancing achieves competitive worst-group-accuracy", CLeaR
  2022, arXiv:2110.14503): every group subsampled, once before training and seeded, to the size of the smallest
  group, then ERM on that subset (`balance_by="class"`: SUBY, the paper's class-only variant). Stages: `initial`
  -> `subsample` (the kept rows and per-group sizes, recorded in results.json `balancing`) -> `train`.

Group-based variants refuse a train split without group labels before training. Departure from SUBG's paper: the
paper tunes the epochs on the small subset per dataset; here the default keeps ERM's number of optimizer steps.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ...core.per_example import per_example_cross_entropy
from ...core.sampling import balanced_sampler
from ...core.stages import INITIAL_STAGE, Stage
from ...core.trainer import RobustTrainer
from .config import ReweightConfig, SUBGConfig
from .rules import balance_keys, balanced_weights, subsample_positions

SUBG_PAPER = {
    "title": "Simple data balancing achieves competitive worst-group-accuracy",
    "url": "https://arxiv.org/abs/2110.14503",
    "citation": (
        "@inproceedings{idrissi2022simple,\n"
        "  title={Simple data balancing achieves competitive worst-group-accuracy},\n"
        "  author={Idrissi, Badr Youbi and Arjovsky, Martin and Pezeshki, Mohammad and Lopez-Paz, David},\n"
        "  booktitle={Conference on Causal Learning and Reasoning},\n  year={2022}\n}"
    ),
}
# the data-balancing baselines are compared in the same paper (its RWG / RWY / SUBG / SUBY)
PAPER = SUBG_PAPER


def _names(dataset, column: str, keys: np.ndarray) -> list[str]:
    feature = dataset.features[column]
    return list(getattr(feature, "names", None) or [str(k) for k in range(int(keys.max(initial=-1)) + 1)])


class _Balancing(RobustTrainer):
    """What both trainers share: the keys checked before training, the model as given as the health reference."""

    def _validate_datasets(self, model, train_dataset, eval_dataset) -> str:
        kind = super()._validate_datasets(model, train_dataset, eval_dataset)
        if train_dataset is None:
            from ...data.core import DataValidationError

            raise DataValidationError(f"{type(self).__name__} needs a train_dataset.")
        self.balance_keys = balance_keys(train_dataset, self._balance_by, self._name)
        self.key_names = _names(train_dataset, "group" if self._balance_by == "group" else "label", self.balance_keys)
        return kind

    def __init__(self, model, args=None, *pargs, **kwargs):
        args = self._resolve_args(args)
        self._balance_by = args.balance_by  # (the keys are checked with the data, before the Trainer is built)
        super().__init__(model, args, *pargs, **kwargs)

    def health_reference(self) -> tuple[str, str] | None:
        return ("the model as given", INITIAL_STAGE)

    def _sizes(self, keys: np.ndarray) -> dict[str, int]:
        counts = np.bincount(keys, minlength=len(self.key_names))
        return {name: int(n) for name, n in zip(self.key_names, counts) if n > 0}


class ReweightTrainer(_Balancing):
    """Group- or class-balanced ERM by loss reweighting or resampling: see the module docstring. Args as
    [`RobustTrainer`], with a [`ReweightConfig`]."""

    _tag_names = ["hf_robust", "reweight"]
    _config_class = ReweightConfig
    _name = "Reweight"
    _paper = PAPER
    _summary = (
        "Balanced ERM: every group (or class) gets the same total weight in the loss, by reweighting each example's "
        "loss inversely to its group's (class's) size or by resampling the training data; the simplest "
        "group-robustness baseline. By group it needs the group labels of the training data."
    )

    def __init__(self, model, args: ReweightConfig | None = None, *pargs, **kwargs):
        super().__init__(model, args, *pargs, **kwargs)
        weights = balanced_weights(self.balance_keys)
        # weight per example_idx, looked up in each batch
        self._weight_of = dict(zip(np.asarray(self.train_dataset["example_idx"]).tolist(), weights.tolist()))

    def stages(self) -> list[Stage]:
        return [Stage("train", self._run_train, self.load_model_state)]

    def _run_train(self, stage_dir: Path, resume: bool) -> None:
        self.train_stage(stage_dir, resume)
        self.save_model_state(stage_dir)

    def _get_train_sampler(self, train_dataset=None):
        if self.args.balance_mode != "resample":
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return balanced_sampler(dataset, self.args.balance_by, seed=self.args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not (model.training and self.args.balance_mode == "reweight"):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        losses, outputs = per_example_cross_entropy(self, model, inputs)
        weights = torch.tensor([self._weight_of[i] for i in inputs["example_idx"].tolist()],
                               dtype=losses.dtype, device=losses.device)
        loss = (weights * losses).mean()
        return (loss, outputs) if return_outputs else loss

    def results(self) -> dict:
        results = super().results()
        weights = balanced_weights(self.balance_keys)
        per_key = {name: float(weights[np.flatnonzero(self.balance_keys == k)[0]])
                   for k, name in enumerate(self.key_names) if (self.balance_keys == k).any()}
        results["balancing"] = {"balance_by": self.args.balance_by, "balance_mode": self.args.balance_mode,
                                "sizes": self._sizes(self.balance_keys),
                                **({"weights": per_key} if self.args.balance_mode == "reweight" else
                                   {"sampling_probability": {n: w / len(self.balance_keys)
                                                             for n, w in per_key.items()}})}
        return results


class SUBGTrainer(_Balancing):
    """SUBG (SUBY with `balance_by="class"`): see the module docstring. Args as [`RobustTrainer`], with a
    [`SUBGConfig`]. `kept` holds the rows of the train split it trains on."""

    _tag_names = ["hf_robust", "subg"]
    _config_class = SUBGConfig
    _name = "SUBG"
    _paper = SUBG_PAPER
    _summary = (
        "SUBG subsamples the training data once, before training, so that every group has as many examples as the "
        "smallest group, then trains ERM on that balanced subset (SUBY: the same by class). By group it needs the "
        "group labels of the training data."
    )

    def __init__(self, model, args: SUBGConfig | None = None, *pargs, **kwargs):
        super().__init__(model, args, *pargs, **kwargs)
        self.kept: np.ndarray | None = None

    def stages(self) -> list[Stage]:
        return [Stage("subsample", self._run_subsample, self._load_subsample),
                Stage("train", self._run_train, self.load_model_state)]

    def _run_subsample(self, stage_dir: Path, resume: bool) -> None:
        self.kept = subsample_positions(self.balance_keys, self.args.seed)
        example_idx = np.asarray(self.train_dataset["example_idx"], dtype=np.int64)[self.kept]
        self.save_stage_tensors(stage_dir, {"position": torch.as_tensor(self.kept),
                                            "example_idx": torch.as_tensor(example_idx)})

    def _load_subsample(self, stage_dir: Path) -> None:
        self.kept = self.load_stage_tensors(stage_dir)["position"].numpy()

    def _run_train(self, stage_dir: Path, resume: bool) -> None:
        self.train_stage(stage_dir, resume, train_dataset=self.train_dataset.select(self.kept), **self.schedule())
        self.save_model_state(stage_dir)

    def schedule(self) -> dict:
        """The training length over the subsample: `subg_epochs`, else the optimizer steps of `num_train_epochs`
        over the whole train split (`max_steps` when it is set)."""
        if self.args.subg_epochs is not None:
            return {"num_train_epochs": self.args.subg_epochs}
        if self.args.max_steps > 0:
            return {}
        batches = math.ceil(len(self.train_dataset) / (self.args.per_device_train_batch_size * self.args.world_size))
        steps_per_epoch = max(batches // self.args.gradient_accumulation_steps, 1)
        return {"max_steps": math.ceil(steps_per_epoch * self.args.num_train_epochs)}

    def results(self) -> dict:
        results = super().results()
        results["balancing"] = {
            "steps": self.schedule().get("max_steps"), "subg_epochs": self.args.subg_epochs,
            "balance_by": self.args.balance_by, "balance_mode": "subsample",
            "sizes": self._sizes(self.balance_keys),
            "kept_sizes": None if self.kept is None else self._sizes(self.balance_keys[self.kept]),
            "kept": None if self.kept is None else int(len(self.kept)),
        }
        return results
