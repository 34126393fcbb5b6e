"""JTT, Just Train Twice (Liu et al., "Just Train Twice: Improving Group Robustness without Training Group
Information", ICML 2021, arXiv:2107.09044): the examples an ERM model gets wrong stand in for the minority groups;
a second model, trained from the same initial weights, sees them `lambda` times as often.

Stages: `initial` (the model as given: the retraining starts from it) -> `erm` (the identification model, T =
`jtt_identification_epochs` epochs, default 1; or `erm_checkpoint`; evaluated as the "ERM"
baseline and the health check's reference) -> `error_set` (the identification model's predictions on the train
split, without augmentation, by the distributed per-example pass: gathered and ordered by `example_idx`, so N
processes find exactly the one-process error set; error set = argmax != label) -> `retrain` (the initial weights
trained for `jtt_retrain_epochs`, default `num_train_epochs`, on the train split with every error-set example
repeated `jtt_upweight` times in all, shuffled like any training set).

No group labels are used in training. When the train split has them, results.json (`jtt`) reports per group how
much of the error set it is (precision) and how much of it the error set holds (recall).

Defaults: T = 1 epoch, lambda = 20 (the paper tunes T and lambda (6-100) per dataset; see `JTTConfig`). Departures:
none in the algorithm; the paper's T and lambda come from a grid scored on validation worst-GROUP accuracy, which
needs group labels; here they are the user's, or lambda is chosen from `jtt_upweight_grid` on validation
worst-CLASS accuracy (labels only, the core's `run_candidates`: one retraining per value, in
`stages/retrain/candidate_<i>`, resumable; recorded as results.json `selection`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ...core.config import erm_checkpoint_of
from ...core.stages import INITIAL_STAGE, Stage
from ...core.trainer import RobustTrainer
from ...data.core import DataValidationError
from .config import JTTConfig
from .error_set import error_set, error_set_by_group, upsampled_positions

logger = logging.getLogger(__name__)

PAPER = {
    "title": "Just Train Twice: Improving Group Robustness without Training Group Information",
    "url": "https://arxiv.org/abs/2107.09044",
    "citation": (
        "@inproceedings{liu2021just,\n"
        "  title={Just Train Twice: Improving Group Robustness without Training Group Information},\n"
        "  author={Liu, Evan Z. and Haghgoo, Behzad and Chen, Annie S. and Raghunathan, Aditi and Koh, Pang Wei "
        "and Sagawa, Shiori and Liang, Percy and Finn, Chelsea},\n"
        "  booktitle={International Conference on Machine Learning},\n  year={2021}\n}"
    ),
}


class JTTTrainer(RobustTrainer):
    """ERM, then JTT: see the module docstring. Args as [`RobustTrainer`], with a [`JTTConfig`]. `errors` holds the
    error set (positions in the train split) after the `error_set` stage."""

    _tag_names = ["hf_robust", "jtt"]
    _config_class = JTTConfig
    _name = "JTT"
    _paper = PAPER
    _summary = (
        "JTT (Just Train Twice) trains an ERM model, takes the training examples it misclassifies as the error set "
        "(mostly the minority groups the shortcut gets wrong), and trains a second model from the same initial "
        "weights with the error set upsampled lambda times. It uses no group labels."
    )

    def __init__(self, model, args: JTTConfig | None = None, *pargs, **kwargs):
        super().__init__(model, args, *pargs, **kwargs)
        if self.train_dataset is None:
            raise DataValidationError("JTTTrainer needs a train_dataset: the error set is found on it, and it retrains "
                                      "on it.")
        checkpoint = erm_checkpoint_of(self.args)
        if checkpoint is not None and not Path(checkpoint).is_dir():
            raise FileNotFoundError(f"erm_checkpoint={checkpoint!r} is not a folder of a saved model.")
        self.errors: torch.Tensor | None = None
        self.error_report: dict = {}

    # ------------------------------------------------------------------ stages
    def stages(self) -> list[Stage]:
        self._uses_erm_baseline = True  # the identification model is the report's "ERM" and the health reference
        return [
            Stage(INITIAL_STAGE, lambda stage_dir, resume: self.save_model_state(stage_dir), None),
            Stage("erm", self._run_identification, self._load_erm_baseline),
            Stage("error_set", self._run_error_set, self._load_error_set),
            Stage("retrain", self._run_retrain, self._load_retrain),
        ]

    def _run_identification(self, stage_dir: Path, resume: bool) -> None:
        checkpoint = erm_checkpoint_of(self.args)
        if checkpoint:
            self.load_checkpoint_weights(Path(checkpoint))
        else:
            epochs = self.args.jtt_identification_epochs
            self.train_stage(stage_dir, resume, **({} if epochs is None else {"num_train_epochs": epochs}))
        self.save_model_state(stage_dir)
        self.evaluate_stage("ERM", stage_dir)

    def _run_error_set(self, stage_dir: Path, resume: bool) -> None:
        def predict(model, batch):
            with torch.no_grad():
                out = model(**{k: v for k, v in self.model_inputs(batch).items() if k != "labels"})
            logits = out["logits"] if isinstance(out, dict) else out[0]
            return {"prediction": logits.argmax(-1), "label": batch["labels"], "group": batch["group"]}

        out = self.compute_per_example(self.train_dataset, predict, description="JTT error set")
        position = self._positions(out["example_idx"])
        self.save_stage_tensors(stage_dir, {**out, "error": out["prediction"] != out["label"],
                                            "position": torch.as_tensor(position)})
        self._set_errors(out, position)
        self.save_stage_json(stage_dir, "error_set", self.error_report)

    def _load_error_set(self, stage_dir: Path) -> None:
        out = self.load_stage_tensors(stage_dir)
        self._set_errors(out, out["position"].numpy())

    def _positions(self, example_idx: torch.Tensor) -> np.ndarray:
        """Rows of the train split holding these `example_idx` values."""
        idx = np.asarray(self.train_dataset["example_idx"], dtype=np.int64)
        order = np.argsort(idx, kind="stable")
        found = order[np.searchsorted(idx[order], example_idx.numpy())]
        if not np.array_equal(idx[found], example_idx.numpy()):
            raise DataValidationError("The train split's example_idx values are not unique: JTT needs one per example.")
        return found

    def _set_errors(self, out: dict, position: np.ndarray) -> None:
        wrong = error_set(out["prediction"], out["label"])
        self.errors = torch.as_tensor(np.sort(position[wrong.numpy()]))
        n = len(out["prediction"])
        report = {"identification_epochs": self.args.jtt_identification_epochs or self.args.num_train_epochs,
                  "identification_model": erm_checkpoint_of(self.args) or "trained (stage erm)",
                  "upweight": self.args.jtt_upweight, "train_size": n, "error_set_size": len(wrong),
                  "error_rate": len(wrong) / n if n else None,
                  "retrain_size": n + (self.args.jtt_upweight - 1) * len(wrong)}
        groups = out["group"]
        if len(groups) and (groups >= 0).all():
            feature = self.train_dataset.features["group"]
            names = list(getattr(feature, "names", None) or [str(g) for g in range(int(groups.max()) + 1)])
            report["by_group"] = error_set_by_group(wrong, groups, names)
        self.error_report = report

    def _run_retrain(self, stage_dir: Path, resume: bool) -> None:
        if len(self.errors) == 0 and self.is_world_process_zero():
            logger.warning("JTT: the identification model misclassifies no training example; the retraining is "
                           "plain ERM. Train it for fewer epochs (jtt_identification_epochs).")
        grid = self.args.jtt_upweight_grid
        if grid is None:
            self._retrain(self.args.jtt_upweight, stage_dir, resume)
        else:  # one retraining per lambda, chosen on validation worst-class accuracy (labels only)
            candidates = [{"jtt_upweight": value} for value in grid]
            train = lambda knobs, folder, again: self._retrain(knobs["jtt_upweight"], folder, again)  # noqa: E731
            self.selection = self.run_candidates(stage_dir, candidates, train, resume)
            self.save_stage_json(stage_dir, "selection", self.selection)
            self.load_model_state(self.candidate_folder(stage_dir, self.selection["chosen"]))
            self._apply_selection()
        self.save_model_state(stage_dir)

    def _retrain(self, upweight: int, folder: Path, resume: bool) -> None:
        self.load_model_state(self.stage_dir(INITIAL_STAGE))  # the same initial weights as the identification model
        positions = upsampled_positions(len(self.train_dataset), self.errors.numpy(), upweight)
        epochs = self.args.jtt_retrain_epochs
        self.train_stage(folder, resume, train_dataset=self.train_dataset.select(positions),
                         **({} if epochs is None else {"num_train_epochs": epochs}))

    def _load_retrain(self, stage_dir: Path) -> None:
        self.load_model_state(stage_dir)
        if (stage_dir / "selection.json").is_file():
            self.selection = self.load_stage_json(stage_dir, "selection")
            self._apply_selection()

    def _apply_selection(self) -> None:
        upweight = self.selection["candidates"][self.selection["chosen"]]["knobs"]["jtt_upweight"]
        self.error_report = {**self.error_report, "upweight": upweight,
                             "retrain_size": self.error_report["train_size"]
                             + (upweight - 1) * self.error_report["error_set_size"]}

    def selection_outcome(self, knobs: dict) -> tuple[bool, str]:
        return True, (f"lambda = {knobs['jtt_upweight']} of {self.args.jtt_upweight_grid}, by validation worst-class "
                      "accuracy (labels only)")

    # ------------------------------------------------------------------ report
    def results(self) -> dict:
        results = super().results()
        results["jtt"] = self.error_report
        return results
