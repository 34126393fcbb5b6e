"""MaskTune (Taghanaki et al., "MaskTune: Mitigating Spurious Correlations by Forcing to Explore", NeurIPS 2022,
arXiv:2210.00055): mask what the ERM model looks at, then fine-tune for one epoch.

Stages: `erm` (or `erm_checkpoint`) [-> `select`] -> `masks_1` -> `finetune_1` [-> `masks_2` -> `finetune_2` ...] ->
`selective`.
- select (the default, labels only): the fine-tuning's learning rate, batch size and k chosen among one-epoch
  fine-tunings of the ERM model and the ERM model itself; then the number of rounds, round by round (a round
  runs only if the previous one improved on validation; later rounds that were not run are skipped stages).
  The candidates, the rule and the record are in `selection`.
- masks: for every training example, XGrad-CAM at the adapter's CAM layer for the PREDICTED class, model in
  eval mode, min-max normalised per image, upsampled bilinearly to the input size; pixels above
  `mean + k * std` of the image's positive values are masked. Computed in batches on the device and gathered
  across processes by `example_idx`; stored as packed bits (`MaskStore`). Text models: gradient x input on the
  token embeddings, top tokens replaced by the mask token (beyond the paper).
  With `mask_method="random"`: RandMask, the paper's baseline, one random square window per image instead.
  The per-batch mask computations and the store are in `masks`.
- finetune: the ERM model trained for exactly one epoch on the masked training set (masked pixels black, before
  augmentation), at a small constant learning rate (default: ERM's final learning rate).
  Two details of the authors' code are options (`finetune_continue_optimizer`, `mask_erm_model`): see `authors`.
- selective: the ERM x MaskTune ensemble as a selective classifier (paper section 2.2), thresholds calibrated
  on validation; the softmax response of ERM as the baseline.

Inspired by the authors' code (github.com/aliasgharkhani/Masktune) for the order of operations; written here.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ...explain.cam import xgradcam
from ...data.core import DataValidationError
from .masks import MaskStore, cam_at_input_size, image_masks, random_window_masks, token_masks
from .selective import ensemble_response, risk_coverage_curve, selective_report, softmax_response
from ...core.trainer import RobustTrainer, Stage
from .authors import AuthorsFinetuning
from .frozen_norm import frozen_norm_statistics
from .config import MaskTuneConfig
from .selection import candidate_grid, record_with_rounds, round_improves

logger = logging.getLogger(__name__)


# the paper the model card cites
PAPER = {
    "title": "MaskTune: Mitigating Spurious Correlations by Forcing to Explore",
    "url": "https://arxiv.org/abs/2210.00055",
    "citation": (
        "@inproceedings{taghanaki2022masktune,\n"
        "  title={MaskTune: Mitigating Spurious Correlations by Forcing to Explore},\n"
        "  author={Taghanaki, Saeid Asgari and Khani, Aliasghar and Khani, Fereshte and Gholami, Ali and "
        "Tran, Linh and Mahdavi-Amiri, Ali and Hamarneh, Ghassan},\n"
        "  booktitle={Advances in Neural Information Processing Systems},\n  year={2022}\n}"
    ),
}


class MaskTuneTrainer(AuthorsFinetuning, RobustTrainer):
    """ERM, then MaskTune: see the module docstring. Args as [`RobustTrainer`], with a [`MaskTuneConfig`]."""

    _tag_names = ["hf_robust", "masktune"]
    _config_class = MaskTuneConfig
    _name = "MaskTune"
    _paper = PAPER
    _summary = (
        "MaskTune trains ERM, masks for every training example the input region its explanation (XGrad-CAM for "
        "the predicted class) relies on most, and fine-tunes for a single epoch on the masked data: the model "
        "has to find other features than the shortcut. With the ERM model it also forms a selective classifier "
        "that abstains when the two disagree."
    )

    def __init__(self, model, args: MaskTuneConfig | None = None, *pargs, **kwargs):
        super().__init__(model, args, *pargs, **kwargs)
        if self.train_dataset is None:
            raise DataValidationError("MaskTuneTrainer needs a train_dataset: the masks are computed on it.")
        if self.args.mask_method == "random" and self.input_kind != "image":
            raise DataValidationError("mask_method='random' (RandMask) masks image windows; this run has "
                                      f"{self.input_kind} inputs. Use mask_method='xgradcam'.")
        if self.input_kind != "image" and getattr(self.processing_class, "mask_token_id", None) is None:
            raise DataValidationError(
                f"MaskTune on text replaces tokens by the tokenizer's mask token, and "
                f"{type(self.processing_class).__name__} has none: use a tokenizer with a mask token (BERT-style)."
            )
        if self.args.erm_checkpoint is not None and not Path(self.args.erm_checkpoint).is_dir():
            raise FileNotFoundError(f"erm_checkpoint={self.args.erm_checkpoint!r} is not a folder of a saved model.")
        self._check_authors_options()
        self.masks: MaskStore | None = None
        self.finetune_learning_rate: float | None = None  # set by the erm stage (or the selection)
        self.finetune_batch_size = self.args.finetune_batch_size or self.args.per_device_train_batch_size
        self.mask_threshold = self.args.mask_threshold_std if self.args.mask_threshold_std is not None else 2.0
        self.masktune_kept_erm = False
        if self.input_kind == "image":  # a CAM that cannot localise (a 1x1 map) fails here, not after ERM
            batch = self.eval_collator([self.train_dataset[0]])
            if self.args.mask_method == "random":  # windows that do not fit the input fail here too
                random_window_masks(batch["example_idx"], tuple(batch["pixel_values"].shape[-2:]), 0,
                                    self.args.random_mask_min_side, self.args.random_mask_max_side)
            else:
                image_masks(self.adapter.model, self.adapter, batch["pixel_values"].to(self.args.device),
                            self.mask_threshold)
        self._mask_iteration = 1
        # the rounds chosen on validation: one record per round run, and the round the run stopped after
        self.iteration_records: list[dict] = []
        self.stopped_after: int | None = None
        self.selective_results: dict = {}
        self._erm_model = None
        self._continue_optimizer_from: Path | None = None  # the next create_optimizer loads this folder's state
        self.erm_epochs: dict | None = None  # mask_erm_model="best_validation_accuracy": the ERM epochs' record

    def required_adapter_pieces(self, input_kind: str) -> tuple[str, ...]:
        return ("cam_layer",) if input_kind == "image" else ("embedding_layer",)

    # ------------------------------------------------------------------ stages
    def stages(self) -> list[Stage]:
        stages = [self.erm_baseline_stage()]
        if self.selection_grid() is not None:
            stages.append(Stage("select", self._run_select, self._load_select))
        for i in range(1, self.max_iterations + 1):
            stages.append(Stage(f"masks_{i}", partial(self._run_masks, i), self._load_masks))
            stages.append(Stage(f"finetune_{i}", partial(self._run_finetune, i), self._load_finetune))
        stages.append(Stage("selective", self._run_selective, self._load_selective))
        return stages

    @property
    def chooses_iterations(self) -> bool:
        """Whether the number of rounds is chosen on validation (unset, with the selection on)."""
        return self.args.masktune_iterations is None and self.args.masktune_selection == "auto"

    @property
    def max_iterations(self) -> int:
        if self.args.masktune_iterations is not None:
            return self.args.masktune_iterations
        return self.args.selection_max_iterations if self.chooses_iterations else 1

    def _run_erm_baseline(self, stage_dir: Path, resume: bool) -> None:
        # (the authors' options score its epochs and keep its optimizer state: `authors`)
        self.train_erm_with_options(stage_dir, partial(super()._run_erm_baseline, stage_dir, resume))
        # ERM's final learning rate (none when the model came from erm_checkpoint): the fine-tuning default
        trained = not self.args.erm_checkpoint and self.lr_scheduler is not None
        final_lr = float(self.lr_scheduler.get_last_lr()[0]) if trained else None
        self.finetune_learning_rate = self._choose_finetune_lr(final_lr)
        self.save_stage_json(stage_dir, "stage_info", {"finetune_learning_rate": self.finetune_learning_rate})

    def _load_erm_baseline(self, stage_dir: Path) -> None:
        super()._load_erm_baseline(stage_dir)
        self.finetune_learning_rate = self.load_stage_json(stage_dir, "stage_info")["finetune_learning_rate"]
        if (stage_dir / "erm_epochs.json").is_file():  # mask_erm_model="best_validation_accuracy"
            self.erm_epochs = self.load_stage_json(stage_dir, "erm_epochs")

    def _choose_finetune_lr(self, erm_final_lr: float | None) -> float:
        if self.args.finetune_learning_rate is not None:
            return self.args.finetune_learning_rate
        if erm_final_lr is None or erm_final_lr <= 1e-3 * self.args.learning_rate:
            fallback = self.args.learning_rate / 10
            if self.selection_grid() is None:
                logger.warning(
                    "ERM's schedule ends at a learning rate of %s, too small to fine-tune with; MaskTune fine-tunes at "
                    "learning_rate / 10 = %s. Set finetune_learning_rate to choose.", erm_final_lr, fallback,
                )
            return fallback
        return erm_final_lr

    # ------------------------------------------------------------------ label-free selection
    def selection_grid(self) -> list[dict] | None:
        """The candidates of the `select` stage (`selection.candidate_grid`); None when there is nothing to choose."""
        return candidate_grid(self.args)

    def _run_select(self, stage_dir: Path, resume: bool) -> None:
        grid = self.selection_grid()
        masks: dict[float, MaskStore] = {}
        for k in dict.fromkeys(c["mask_threshold_std"] for c in grid if c["finetune"]):
            name = f"masks_k{k:g}"
            if resume and (stage_dir / f"{name}.safetensors").is_file():
                masks[k] = MaskStore.from_state_dict(self.load_stage_tensors(stage_dir, name))
            else:
                with self._round_one_mask_weights():
                    masks[k] = self._compute_masks(k, None, f"Masking (k={k:g})")
                self.save_stage_tensors(stage_dir, masks[k].state_dict(), name=name)

        def train(knobs: dict, folder: Path, resume_candidate: bool) -> None:
            self.load_model_state(self.stage_dir("erm"))
            if knobs["finetune"]:
                self.masks = masks[knobs["mask_threshold_std"]]
                self._finetune(folder, resume_candidate, knobs["finetune_learning_rate"], knobs["finetune_batch_size"],
                               continue_from=self.stage_dir("erm"))

        self.selection = self.run_candidates(stage_dir, grid, train, resume)
        self.save_stage_json(stage_dir, "selection", self.selection)
        self._apply_selection()
        self.load_model_state(self.stage_dir("erm"))  # the chosen candidate is restored by finetune_1

    def _load_select(self, stage_dir: Path) -> None:
        self.selection = self.load_stage_json(stage_dir, "selection")
        self._apply_selection()

    def _apply_selection(self) -> None:
        chosen = self.selection["candidates"][self.selection["chosen"]]["knobs"]
        self.masktune_kept_erm = not chosen["finetune"]
        if chosen["finetune"]:
            self.finetune_learning_rate = chosen["finetune_learning_rate"]
            self.finetune_batch_size = chosen["finetune_batch_size"]
            self.mask_threshold = chosen["mask_threshold_std"]
        elif self.is_world_process_zero():
            logger.warning(
                "MaskTune did not help on validation: the ERM model had the best worst-class accuracy of the %d "
                "candidates, so the run keeps the ERM model (see results.json 'selection').",
                len(self.selection["candidates"]),
            )

    def _compute_masks(self, k: float, previous: MaskStore | None, description: str) -> MaskStore:
        collator = self.eval_collator
        if previous is not None:  # later rounds look at the images as the model was trained on them
            collator = collator.with_options(example_transform=self._transform(previous))
        outputs = self.compute_per_example(
            self.train_dataset, partial(self._mask_batch, k=k), description=description, collator=collator
        )
        store = MaskStore(outputs["mask"], outputs["example_idx"])
        return previous.union(store) if previous is not None else store

    def _run_masks(self, iteration: int, stage_dir: Path, resume: bool) -> None:
        self._mask_iteration = iteration  # RandMask draws new windows each iteration
        if self.masktune_kept_erm:  # the selection kept the ERM model: nothing to mask
            self.masks = None
            self.save_stage_json(stage_dir, "masks", {"kept_erm": True})
            return
        if self.stopped_after is not None:  # an earlier round did not improve on validation: no more rounds
            self.save_stage_json(stage_dir, "masks", {"stopped_after": self.stopped_after})
            return
        if iteration == 1 and self.selection is not None:  # computed by the selection for the chosen k
            name = f"masks_k{self.mask_threshold:g}"
            store = MaskStore.from_state_dict(self.load_stage_tensors(self.stage_dir("select"), name))
        else:
            previous = self.masks if (self.args.accumulative_masking and iteration > 1) else None
            weights = self._round_one_mask_weights() if iteration == 1 else contextlib.nullcontext()
            with weights:
                store = self._compute_masks(self.mask_threshold, previous, f"Masking {iteration}")
        self.save_stage_tensors(stage_dir, store.state_dict(), name="masks")
        self.masks = store
        fraction = store.masked_fraction()
        self.log({f"masks_{iteration}/masked_fraction_mean": float(fraction.mean()),
                  f"masks_{iteration}/unmasked_examples": float((fraction == 0).float().mean())})

    def _load_masks(self, stage_dir: Path) -> None:
        if self.stopped_after is not None:  # a skipped round: the kept round's masks stay
            return
        if (stage_dir / "masks.safetensors").is_file():
            self.masks = MaskStore.from_state_dict(self.load_stage_tensors(stage_dir, "masks"))
        else:
            self.masks = None

    def _mask_batch(self, model, batch: dict, k: float) -> dict[str, torch.Tensor]:
        if self.args.mask_method == "random":  # RandMask: a new window per image and iteration
            seed = self.args.seed * 1000 + self._mask_iteration
            size = tuple(batch["pixel_values"].shape[-2:])
            return {"mask": random_window_masks(batch["example_idx"], size, seed, self.args.random_mask_min_side,
                                                self.args.random_mask_max_side)}
        if self.input_kind == "image":
            return {"mask": image_masks(model, self.adapter, batch["pixel_values"], k)}
        inputs = {key: value for key, value in self.model_inputs(batch).items() if key != "labels"}
        masks = token_masks(model, self.adapter, inputs, self.processing_class.all_special_ids, k,
                            self.args.min_masked_tokens)
        return {"mask": masks}

    def _transform(self, store: MaskStore):
        if self.input_kind == "image":
            return store.apply_to_pixels
        return store.token_transform(self.processing_class.mask_token_id)

    def _run_finetune(self, iteration: int, stage_dir: Path, resume: bool) -> None:
        if self.stopped_after is not None:  # a skipped round (the kept round's model is in place)
            self.save_stage_json(stage_dir, "iteration", {"iteration": iteration, "stopped_after": self.stopped_after})
            return
        if self.masktune_kept_erm:  # the selection kept the ERM model: no round to report or to repeat
            if iteration == 1:
                self.load_model_state(self.stage_dir("erm"))
                self.save_model_state(stage_dir)
            else:
                self.save_stage_json(stage_dir, "iteration", {"iteration": iteration, "kept_erm": True})
            return
        start = time.perf_counter()
        if iteration == 1 and self.selection is not None:  # the chosen candidate, already fine-tuned
            chosen = self.candidate_folder(self.stage_dir("select"), self.selection["chosen"])
            self.load_model_state(chosen)
            self.carry_optimizer_state(chosen, stage_dir)  # finetune_continue_optimizer: round 2 goes on from it
        else:
            previous = self.stage_dir("erm" if iteration == 1 else f"finetune_{iteration - 1}")
            self._finetune(stage_dir, resume, self.finetune_learning_rate, self.finetune_batch_size,
                           continue_from=previous)
        self.save_model_state(stage_dir)
        record = None
        if self.chooses_iterations:
            if iteration == 1 and self.selection is not None:  # scored by the selection
                summary = self.selection["candidates"][self.selection["chosen"]]["validation"]
            else:
                summary = self._round_summary()
            record = {"iteration": iteration, "validation": summary, "seconds": round(time.perf_counter() - start, 3)}
        # each round's model is reported (as "MaskTune <i>") but the final one's (the run's own result)
        if iteration < self.max_iterations or (record is not None and not self._improves(record)):
            self.evaluate_stage(f"MaskTune {iteration}", stage_dir)
        if record is not None:
            self.save_stage_json(stage_dir, "iteration", record)
            self._add_iteration(record)

    def _round_summary(self) -> dict | None:
        """A round's validation record (labels only): what decides whether another round runs."""
        return self.validation_summary()

    def _improves(self, record: dict) -> bool:
        """Whether a round beats the previous one on validation (the selection's rule); the first round does."""
        return round_improves(record, self.iteration_records)

    def _add_iteration(self, record: dict) -> None:
        """Keep a round's validation record; a round that does not improve on the previous one (worst-class
        accuracy, ties by accuracy: the selection's rule) ends the rounds, and the previous round's model and masks
        are restored."""
        improves = self._improves(record)
        self.iteration_records.append(record)
        if improves:
            return
        previous = self.iteration_records[-2]
        kept = previous["iteration"]
        self.stopped_after = kept
        self.load_model_state(self.stage_dir(f"finetune_{kept}"))
        self.masks = MaskStore.from_state_dict(self.load_stage_tensors(self.stage_dir(f"masks_{kept}"), "masks"))
        if self.is_world_process_zero():
            logger.info("MaskTune round %d did not improve on round %d on validation (worst-class accuracy %.4f vs "
                        "%.4f): the run keeps round %d.", record["iteration"], kept,
                        record["validation"]["worst_class_accuracy"], previous["validation"]["worst_class_accuracy"],
                        kept)

    def _load_finetune(self, stage_dir: Path) -> None:
        info = stage_dir / "iteration.json"
        record = self.load_stage_json(stage_dir, "iteration") if info.is_file() else None
        if record is not None and "stopped_after" in record:  # a skipped round
            self.stopped_after = record["stopped_after"]
            return
        if record is not None and record.get("kept_erm"):  # no round after the kept ERM model
            return
        self.load_model_state(stage_dir)
        self.load_stage_results(stage_dir)
        if record is not None:
            self._add_iteration(record)

    def selection_record(self) -> dict | None:
        """The selection's record with the rounds chosen after it (`selection.record_with_rounds`)."""
        knobs = {"finetune": True, "finetune_learning_rate": self.finetune_learning_rate,
                 "finetune_batch_size": self.finetune_batch_size, "mask_threshold_std": self.mask_threshold}
        return record_with_rounds(self.selection, self.iteration_records, self.stopped_after, knobs,
                                  self.args.health_split)

    def _finetune(self, stage_dir: Path, resume: bool, learning_rate: float, batch_size: int,
                  continue_from: Path | None = None) -> None:
        """One epoch on the masked training set (`self.masks`) at a constant learning rate; with
        `finetune_continue_optimizer`, from the optimizer state saved in `continue_from` (and its own saved after)."""
        continued = self.args.finetune_continue_optimizer
        if continued:
            self._continue_optimizer_from = continue_from
        plain = self.train_collator
        self.train_collator = plain.with_options(example_transform=self._transform(self.masks))
        freeze = self.args.finetune_freeze_norm_statistics
        norm_context = frozen_norm_statistics(self.accelerator.unwrap_model(self.model)) if freeze else contextlib.nullcontext()
        try:
            with norm_context:
                self.train_stage(
                    stage_dir, resume, num_train_epochs=1, max_steps=-1, learning_rate=learning_rate,
                    lr_scheduler_type="constant", warmup_steps=0, per_device_train_batch_size=batch_size,
                )
        finally:
            self.train_collator = plain
            self._continue_optimizer_from = None
        if continued:
            self._save_optimizer_state(stage_dir)

    # ------------------------------------------------------------------ selective classification
    def erm_model(self):
        """The ERM model (a copy restored from the `erm` stage), for the ensemble and the CAM plots."""
        if self._erm_model is None:
            model = copy.deepcopy(self.accelerator.unwrap_model(self.model))
            self.load_model_state(self.stage_dir("erm"), model)
            self._erm_model = model.eval()
        return self._erm_model

    def _eval_splits(self) -> dict:
        if self.eval_dataset is None:
            return {}
        return dict(self.eval_dataset) if isinstance(self.eval_dataset, dict) else {"eval": self.eval_dataset}

    def _run_selective(self, stage_dir: Path, resume: bool) -> None:
        splits = self._eval_splits()
        calibration = self.args.selective_calibration_split
        if calibration not in splits:
            logger.warning("No %r eval split: selective classification is not evaluated.", calibration)
            self.save_stage_json(stage_dir, "selective", {})
            return

        def logits_of(model):
            def fn(_, batch):
                with torch.no_grad():
                    out = model(**{k: v for k, v in self.model_inputs(batch).items() if k != "labels"})
                return {"logits": out.logits, "labels": batch["labels"]}

            return fn

        erm, final = self.erm_model(), self.accelerator.unwrap_model(self.model)
        responses = {"masktune_ensemble": {}, "erm_softmax_response": {}, "masktune_softmax_response": {}}
        curves = {name: {} for name in responses}
        for name, dataset in splits.items():
            a = self.compute_per_example(dataset, logits_of(erm), description=f"ERM logits {name}")
            b = self.compute_per_example(dataset, logits_of(final), description=f"MaskTune logits {name}")
            labels = a["labels"]
            for key, (pred, conf) in {
                "masktune_ensemble": ensemble_response(a["logits"], b["logits"]),
                "erm_softmax_response": softmax_response(a["logits"]),
                "masktune_softmax_response": softmax_response(b["logits"]),
            }.items():
                responses[key][name] = (pred, conf, labels)
                coverage, risk = risk_coverage_curve(pred == labels, conf)
                curves[key][name] = {"coverage": coverage[:: max(1, len(coverage) // 200)].tolist(),
                                     "risk": risk[:: max(1, len(risk) // 200)].tolist()}
        report = {key: selective_report(value, calibration, self.args.selective_coverages)
                  for key, value in responses.items()}
        self.selective_results = {"calibration_split": calibration, "report": report, "curves": curves}
        self.save_stage_json(stage_dir, "selective", self.selective_results)

    def _load_selective(self, stage_dir: Path) -> None:
        self.selective_results = self.load_stage_json(stage_dir, "selective")

    # ------------------------------------------------------------------ report
    def selection_outcome(self, knobs: dict) -> tuple[bool, str]:
        if knobs.get("finetune", True):
            rounds = knobs.get("iterations")
            if rounds is None:
                return True, "a MaskTune fine-tuning was chosen on validation"
            tried = len(self.iteration_records)
            return True, (f"a MaskTune fine-tuning was chosen on validation, with {rounds} accumulative round(s) "
                          f"({tried} tried: a round runs while the previous one improved)")
        return False, "MaskTune did not help on validation (worst-class accuracy): the ERM model was kept"

    def results(self) -> dict:
        results = super().results()
        results["finetune_learning_rate"] = self.finetune_learning_rate
        results["finetune_batch_size"] = self.finetune_batch_size
        results["mask_threshold_std"] = self.mask_threshold
        if self.erm_epochs is not None:
            results["erm_mask_model"] = self.erm_epochs
        if self.masks is not None:
            results["masked_fraction_mean"] = float(self.masks.masked_fraction().mean())
        if self.selective_results:
            results["selective"] = {k: v for k, v in self.selective_results.items() if k != "curves"}
        return results

    def write_report(self, output_dir: str | None = None) -> None:
        if self.is_world_process_zero() and self.args.save_plots:
            out = Path(output_dir or self.args.output_dir) / "plots"
            from ...reporting.plots import plot_risk_coverage

            if self.selective_results.get("curves"):
                plot_risk_coverage(self.selective_results["curves"], out / "risk_coverage.png")
            if self.input_kind == "image" and self.masks is not None:
                self._plot_cams(out / "cam_overlays.png")
        super().write_report(output_dir)

    def _plot_cams(self, path: Path) -> None:
        from ...reporting.plots import plot_cam_overlays

        data = self.train_dataset
        groups = np.asarray(data["group"])
        chosen = []
        for g in sorted(set(groups.tolist())):
            chosen += np.flatnonzero(groups == g)[: self.args.cam_examples_per_group].tolist()
        rows = [data[i] for i in chosen]
        batch = self._prepare_inputs(self.eval_collator(rows))
        pixels = self.eval_collator.image_preprocessing.to_uint8([row["image"] for row in rows])
        size = tuple(pixels.shape[-2:])
        maps = {}
        erm = self.erm_model()
        for name, model, adapter in (("ERM", erm, self._adapter_for(erm)),
                                     (self._name, self.accelerator.unwrap_model(self.model), self.adapter)):
            cam, _ = xgradcam(model, adapter, {"pixel_values": batch["pixel_values"]})
            maps[name] = cam_at_input_size(cam, size).cpu()
        masks = self.masks[batch["example_idx"].cpu()]
        names = data.features["group"].names if hasattr(data.features["group"], "names") else None
        labels = [names[g] if names and g >= 0 else str(g) for g in groups[chosen].tolist()]
        plot_cam_overlays(pixels, maps, masks, labels, path)

    def _adapter_for(self, model):
        from ...models.adapter import get_adapter

        return get_adapter(model, classifier=self.args.classifier_layer, target_layer=self.args.cam_target_layer)

