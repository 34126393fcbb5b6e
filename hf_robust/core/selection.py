"""The health check every run ends with, and the label-free selection among candidate settings, both judged on
the validation split with labels only (never group labels). The verdicts are the pure functions of
`hf_robust.core.health`; `HealthAndSelection`, a mixin of `RobustTrainer`, computes the predictions they judge
(with the distributed per-example pass) and applies `on_worse`."""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from datasets import Dataset
from torch import nn

from ..data.core import DataValidationError, label_names
from .health import HealthCheckError, assess, format_health, prediction_summary, selection_score

logger = logging.getLogger(__name__)


class HealthAndSelection:
    """The health check (`run_health_check`) and the label-free selection (`run_candidates`)."""

    # the label-free selection's record (`run_candidates`), set by a method's `select` stage
    selection: dict | None = None

    # ------------------------------------------------------------------ health check
    def health_reference(self) -> tuple[str, str] | None:
        """(label, stage) of the model the final one is compared with by the health check: the ERM stage of a
        method that starts from ERM (`erm_baseline_stage`); None for ERM itself (only the collapse check). A
        method without an ERM stage returns its own (e.g. a comparison stage), or `("the model as given",
        INITIAL_STAGE)`: the model is then saved before training, as the stage `initial`."""
        if self._uses_erm_baseline:
            return ("ERM", "erm")
        return None

    def health_reference_model(self, stage: str, model: nn.Module) -> nn.Module:
        """`model` (a copy of the final model, or the model itself for a fallback) turned into the reference: the
        weights the reference stage saved."""
        self.load_model_state(self.stage_dir(stage), model)
        return model

    def health_dataset(self) -> Dataset | None:
        """The split the health check runs on: the `health_split` eval split (None when there is none)."""
        if isinstance(self.eval_dataset, dict):
            return self.eval_dataset.get(self.args.health_split)
        return None  # one unnamed split may be the test split: it is not used to judge the run

    def _predictions(self, model: nn.Module, dataset: Dataset) -> dict[str, torch.Tensor]:
        def fn(_, batch):
            with torch.no_grad():
                out = model(**{k: v for k, v in self.model_inputs(batch).items() if k != "labels"})
            logits = out.logits if hasattr(out, "logits") else out
            return {"prediction": logits.argmax(-1), "finite": torch.isfinite(logits).all(-1).to(torch.uint8),
                    "labels": batch["labels"]}

        with self.eval_mode(model):  # (compute_per_example puts only the trained model in eval mode)
            return self.compute_per_example(dataset, fn, description="Health check")

    def run_health_check(self) -> dict:
        """Compare the final model with its reference (`health_reference`) on `health_dataset` with labels only,
        record the verdict in `self.health` (results.json, the card, the script's table) and apply `on_worse`."""
        dataset = self.health_dataset()
        split = self.args.health_split
        if dataset is None or len(dataset) == 0:
            self.health = {"status": "unknown", "split": split, "action": "kept",
                           "reason": f"no {split!r} eval split to check the model on (set health_split, or pass "
                                     f"eval_dataset={{{split!r}: ...}})"}
            if self.is_world_process_zero():
                logger.warning("Health check not run: %s.", self.health["reason"])
            return self.health
        final = self.accelerator.unwrap_model(self.model)
        names = label_names(dataset)
        method = self.validation_summary(final, dataset)
        reference, ref_label = None, None
        ref = self.health_reference()
        if ref is not None and (self.stage_dir(ref[1]) / "model.safetensors").is_file():
            ref_label = ref[0]
            ref_model = self.health_reference_model(ref[1], copy.deepcopy(final))
            reference = self.validation_summary(ref_model, dataset)
            del ref_model
        status, reason = assess(method, reference, names, ref_label or "", margin=self.args.health_margin)
        health = {"status": status, "reason": reason, "split": split, "num_examples": len(dataset),
                  "reference": ref_label, "margin": self.args.health_margin, "on_worse": self.args.on_worse,
                  "erm": reference, "method": method, "action": "kept"}
        if status in ("worse_than_erm", "collapsed"):
            if self.args.on_worse == "error":
                self.health = health
                raise HealthCheckError(
                    f"{self._name} health check: {status}: {reason}. Nothing was saved as a finished run (on_worse="
                    "'error'); the stages in output_dir/stages are kept. Try the method's label-free selection (leave "
                    "its knobs unset), other settings, or on_worse='fallback_to_erm' / 'warn'."
                )
            if self.args.on_worse == "fallback_to_erm" and ref_label is not None:
                self.health_reference_model(ref[1], self.accelerator.unwrap_model(self.model))
                health["action"] = f"fell back to the {ref_label} model"
            elif self.args.on_worse == "fallback_to_erm":
                health["action"] = "kept (no reference model to fall back to)"
            if self.args.on_worse != "keep" and self.is_world_process_zero():
                logger.warning("%s: %s", self._name, format_health(health))
        self.health = health
        return health

    # ------------------------------------------------------------------ label-free selection
    def validation_summary(self, model: nn.Module | None = None, dataset: Dataset | None = None) -> dict | None:
        """`prediction_summary` (labels only) of `model` (default: the trained model) on the health split."""
        dataset = dataset if dataset is not None else self.health_dataset()
        if dataset is None or len(dataset) == 0:
            return None
        model = model if model is not None else self.accelerator.unwrap_model(self.model)
        out = self._predictions(model, dataset)
        return prediction_summary(out["prediction"].numpy(), out["labels"].numpy(),
                                  self.adapter.classifier.out_features, finite=out["finite"].numpy())

    def run_candidates(
        self, stage_dir: Path, candidates: list[dict], train: Callable[[dict, Path, bool], None], resume: bool
    ) -> dict:
        """Label-free selection among `candidates` (dicts of knob values): by worst-CLASS accuracy on the validation
        split (`health_split`; a model-selection criterion that needs no group labels), ties broken by accuracy,
        then by order (list the unchanged model first: it is kept on an exact tie).

        `train(knobs, folder, resume)` leaves the candidate's model in `self.model`; it is scored, saved into
        `stage_dir/candidate_<i>/` with its record, and marked finished, so a resumed run skips it. Returns
        `{"metric", "split", "candidates": [{"knobs", "validation", "seconds"}], "chosen": i}`; the chosen
        candidate's weights are in `candidate_folder(stage_dir, i)`.
        """
        if self.health_dataset() is None:
            raise DataValidationError(
                f"{self._name} chooses its settings on the {self.args.health_split!r} eval split (labels only), but "
                f"eval_dataset has none: pass eval_dataset={{{self.args.health_split!r}: ...}}, or set the method's "
                "knobs yourself to skip the selection."
            )
        records = []
        for i, knobs in enumerate(candidates):
            folder = self.candidate_folder(stage_dir, i)
            record_file = folder / "candidate.json"
            if resume and record_file.is_file():
                record = json.loads(record_file.read_text())
                if record["knobs"] == json.loads(json.dumps(knobs)):
                    records.append(record)
                    continue
            start = time.perf_counter()
            train(knobs, folder, resume)
            self.save_model_state(folder)
            record = {"knobs": knobs, "validation": self.validation_summary(),
                      "seconds": round(time.perf_counter() - start, 3)}
            self.save_stage_json(folder, "candidate", record)
            records.append(record)
        score = [(*selection_score(r["validation"]), -i) for i, r in enumerate(records)]
        chosen = max(range(len(records)), key=lambda i: score[i])
        return {"metric": "worst_class_accuracy (ties: accuracy)", "split": self.args.health_split,
                "candidates": records, "chosen": chosen}

    @staticmethod
    def candidate_folder(stage_dir: Path, index: int) -> Path:
        return stage_dir / f"candidate_{index}"

    def selection_outcome(self, knobs: dict) -> tuple[bool, str]:
        """(whether the chosen `knobs` are the method, not its unchanged model; the note that says so), for the
        report of a method with a `select` stage."""
        raise NotImplementedError(f"{type(self).__name__} has a selection but no selection_outcome().")

    def selection_record(self) -> dict | None:
        """The selection as reported (results.json, plots/selection.png): `self.selection` unless a method adds
        choices made after its `select` stage."""
        return self.selection
