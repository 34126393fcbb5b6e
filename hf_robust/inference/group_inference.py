"""Group inference shown to the user: which examples an ERM model treats as the minority, and what it looks at.

Two label-free rules (`hf_robust.inference.rules`) each give an inferred minority from one inference pass:

- `error_set`: the TRAINING examples the ERM model misclassifies (JTT: Liu et al., "Just Train Twice: Improving
  Group Robustness without Training Group Information", ICML 2021, arXiv:2107.09044);
- `gradient_norm`: the HELD-OUT examples GradTune (Kenfack et al., "GradTune: Last-Layer Fine-Tuning for Group
  Robustness without Group Annotation") fine-tunes on: its own selection from the closed-form per-example norm of
  the last-layer cross-entropy gradient, on the seeded held-out half of the validation split, with GradTune's
  settings (M' = 500, k = 400; a GradTune or DFR run's own `heldout_*`, `finetune_set_size`, `top_k`). In a
  GradTune run the set IS the run's fine-tuning set (same pass, same selection).

For each rule the report holds the set's size, its composition by class, and when the data has group labels the
precision and recall of every group; and always a few members of the set with where the model looked: the image's
XGrad-CAM (the explainer MaskTune uses, at the adapter's CAM layer, for the predicted class) or the text's top
tokens by gradient x input on the token embeddings. Departures: JTT's error set comes from an ERM model trained
for a tuned, small number of epochs T; here it is the run's ERM model as trained (which may fit its training set
and leave a small error set: the report says how many examples it holds). Both rules read the predictions of the
ERM model in eval mode, with no augmentation.

Where it runs:
- in a run: `GroupInferenceHook`, one of the run hooks of `hf_robust.methods.registry.RUN_HOOKS` (the core calls
  them without naming them), after the `erm` stage of every method that has one, unless the config's
  `group_inference="off"`. Its passes are the trainer's distributed per-example pass (sharded, gathered by
  `example_idx`), so N processes report what one does. Its outputs are kept in `output_dir/stages/group_inference/`
  (written last: `report.json`); a resumed run reloads them instead of recomputing them when its settings match.
  `results.json` gets `"group_inference": {"error_set": {...}, "gradient_norm": {...}}`, the card a section,
  and `plots/group_inference.png` the examples.
- on any trained model: `infer_groups(model, dataset, rule=...)`, one process.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data.core import group_names, label_names
from .rules import (
    RULES, class_table, error_set, example_order, gradient_norm_defaults, gradient_norm_set, group_table,
    last_layer_gradient_norms,
)

logger = logging.getLogger(__name__)

STAGE_NAME = "erm"  # the stage after which a run infers the groups
FOLDER = "group_inference"  # its outputs, under output_dir/stages/
EXAMPLES_PER_RULE = 8
TOP_TOKENS = 5
PLOT_NAME = "group_inference.png"
SETTINGS = ("finetune_set_size", "top_k", "heldout_split", "heldout_fraction", "seed")  # the gradient-norm rule's
RULE_TITLES = {
    "error_set": "error set (JTT): training examples the ERM model misclassifies",
    "gradient_norm": "gradient norm (GradTune): held-out examples with the largest last-layer gradient norms",
}


# ---------------------------------------------------------------------------------------------- one pass
def score_batch(adapter, model_inputs=None):
    """`fn(model, batch)` for a per-example pass: the logits, the closed-form last-layer gradient norm
    (GradTune's `last_layer_gradient_norms`), labels and groups of a batch, in one forward (no backward)."""

    def fn(model, batch: dict) -> dict[str, torch.Tensor]:
        inputs = model_inputs(batch) if model_inputs is not None else batch
        inputs = {k: v for k, v in inputs.items() if k not in ("labels", "group")}
        with torch.no_grad():
            features, logits = adapter.penultimate(inputs)
        norms = last_layer_gradient_norms(features, logits, batch["labels"], bias=adapter.classifier.bias is not None)
        return {"logits": logits.float(), "norms": norms.double(), "labels": batch["labels"], "groups": batch["group"]}

    return fn


def _rule_outputs(rule: str, outputs: dict, settings: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(in_set (N,) bool, score (N,) to order the examples shown) of `rule` over the pass `outputs`."""
    if rule == "error_set":
        logits, labels = outputs["logits"].double(), outputs["labels"].long()
        loss = torch.logsumexp(logits, -1) - logits.gather(1, labels[:, None])[:, 0]
        return error_set(logits, labels), loss
    chosen = gradient_norm_set(outputs["norms"], settings["finetune_set_size"], settings["top_k"], settings["seed"])
    return chosen, outputs["norms"]


# ---------------------------------------------------------------------------------------------- the examples
def explain_rows(model: nn.Module, adapter, rows: list[dict], collator, device, model_inputs=None) -> dict:
    """Where the model looks for `rows` (dataset rows), for its predicted class: images -> {"images": uint8
    (B, 3, H, W), "maps": XGrad-CAM at the input size in [0, 1] (None when the model has no CAM layer)};
    texts -> {"tokens": [[(token, attribution), ...] the TOP_TOKENS largest positive attributions per row (special
    tokens and padding left out)], "texts": [...]}. Plus "predictions"."""
    from ..explain.cam import normalize_per_image, token_attributions, upsample, xgradcam
    from ..models.adapter import UnsupportedModelError

    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collator(rows).items()}
    inputs = model_inputs(batch) if model_inputs is not None else batch
    inputs = {k: v for k, v in inputs.items() if k not in ("labels", "group")}
    if collator.input_kind == "image":
        images = collator.image_preprocessing.to_uint8([row["image"] for row in rows])
        try:
            cam, logits = xgradcam(model, adapter, inputs)
            maps = normalize_per_image(upsample(normalize_per_image(cam.float()), tuple(images.shape[-2:]))).cpu()
            if cam.shape[-2] * cam.shape[-1] == 1:  # one value per image: it cannot say where the model looks
                logger.info("Group inference shows the examples without CAMs: the CAM layer gives a 1x1 map.")
                maps = None
        except UnsupportedModelError as error:  # a model without a CAM layer: the examples without their maps
            logger.info("Group inference shows the examples without CAMs: %s", error)
            with torch.no_grad():
                outputs = model(**inputs)
            logits, maps = (outputs.logits if hasattr(outputs, "logits") else outputs), None
        return {"images": images, "maps": maps, "predictions": logits.argmax(-1).cpu()}
    scores, logits = token_attributions(model, adapter, inputs)
    tokenizer = collator.tokenizer
    special = set(tokenizer.all_special_ids or [])
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    tokens = []
    for ids, row_scores, valid in zip(batch["input_ids"].cpu(), scores.detach().float().cpu(), mask.cpu()):
        keep = valid & torch.as_tensor([int(i) not in special for i in ids.tolist()]) & (row_scores > 0)
        positions = torch.nonzero(keep).flatten()
        top = positions[torch.sort(row_scores[positions], descending=True, stable=True).indices[:TOP_TOKENS]]
        tokens.append([(tokenizer.convert_ids_to_tokens(int(ids[p])), float(f"{float(row_scores[p]):.4g}"))
                       for p in top.tolist()])
    texts = [" / ".join(str(row[k]) for k in ("text", "premise", "hypothesis") if k in row) for row in rows]
    return {"tokens": tokens, "texts": texts, "predictions": logits.argmax(-1).cpu()}


# ---------------------------------------------------------------------------------------------- one rule's report
@dataclass
class InferredGroups:
    """One rule's inferred minority: `example_idx` (sorted) of the set, the `report` (as in results.json) and the
    examples' pictures (`images`, `maps`) for image data."""

    rule: str
    example_idx: torch.Tensor
    report: dict
    images: torch.Tensor | None = None
    maps: torch.Tensor | None = None
    in_set: torch.Tensor | None = field(default=None, repr=False)  # (N,) over the scored examples

    def plot(self, path: str | Path) -> Path:
        """The examples (images with their CAM, or texts with their top tokens) as a PNG."""
        return plot_inferred(({self.rule: self.report}, {f"{self.rule}_images": self.images,
                                                         f"{self.rule}_maps": self.maps}), path)


def rule_report(rule: str, outputs: dict, dataset, settings: dict, explain, split: str, part: str) -> InferredGroups:
    """The report of `rule` over the pass `outputs` (ordered by example_idx) of `dataset`'s examples; `explain(rows)`
    gives the examples' maps or tokens (`explain_rows`)."""
    in_set, scores = _rule_outputs(rule, outputs, settings)
    labels, groups, example_idx = outputs["labels"].long(), outputs["groups"].long(), outputs["example_idx"].long()
    predictions = outputs["logits"].argmax(-1)
    shown = example_order(in_set, scores, labels, EXAMPLES_PER_RULE)
    report = {
        "rule": RULE_TITLES[rule], "split": split, "part": part, "examples_scored": int(len(in_set)),
        "size": int(in_set.sum()), "fraction": float(in_set.double().mean()) if len(in_set) else None,
        "settings": {k: settings[k] for k in SETTINGS if k in settings} if rule == "gradient_norm" else {},
        "groups_known": bool(len(groups)) and bool((groups >= 0).all()),
    }
    if rule == "gradient_norm":
        size = min(int(settings["finetune_set_size"]), len(in_set))
        top_k = settings["top_k"]
        report["settings"]["top_k_effective"] = min(int(round(0.8 * size)) if top_k is None else int(top_k), size)
    table = group_table(in_set, groups, group_names(dataset))
    if table is not None:
        report["per_group"] = table
    report["per_class"] = class_table(in_set, labels, label_names(dataset))
    images = maps = None
    examples = []
    if len(shown):
        position = {idx: i for i, idx in enumerate(dataset["example_idx"])}
        rows = [dataset[position[int(example_idx[i])]] for i in shown.tolist()]
        explained = explain(rows)
        images, maps = explained.get("images"), explained.get("maps")
        gnames, lnames = group_names(dataset), label_names(dataset)
        for j, i in enumerate(shown.tolist()):
            g, y, p = int(groups[i]), int(labels[i]), int(predictions[i])
            entry = {"example_idx": int(example_idx[i]), "label": lnames[y] if y < len(lnames) else y,
                     "prediction": lnames[p] if p < len(lnames) else p,
                     "group": (gnames[g] if g < len(gnames) else g) if g >= 0 else None,
                     "score": float(scores[i])}
            if "tokens" in explained:
                entry["text"] = explained["texts"][j][:300]
                entry["top_tokens"] = [list(t) for t in explained["tokens"][j]]
            examples.append(entry)
    report["examples"] = examples
    report["shown_by"] = "largest loss among the misclassified" if rule == "error_set" else "largest gradient norm"
    return InferredGroups(rule, torch.sort(example_idx[in_set]).values, report, images, maps, in_set)


def plot_inferred(stored: tuple[dict, dict], path: str | Path) -> Path:
    """`plots.plot_inferred_minority` from a report ({rule: report}) and its tensors ({rule_images, rule_maps})."""
    from ..reporting.plots import plot_inferred_minority

    reports, tensors = stored
    panels = {}
    for rule, report in reports.items():
        if not isinstance(report, dict) or "examples" not in report:
            continue
        captions = [f"y={e['label']} pred={e['prediction']}" + (f"\n{e['group']}" if e["group"] is not None else "")
                    for e in report["examples"]]
        title = f"{RULE_TITLES[rule]} ({report['size']} of {report['examples_scored']} {report['split']})"
        panels[title] = {"captions": captions, "images": tensors.get(f"{rule}_images"),
                         "maps": tensors.get(f"{rule}_maps"),
                         "tokens": [e.get("top_tokens") for e in report["examples"]] if report["examples"] and
                         "top_tokens" in report["examples"][0] else None}
    return plot_inferred_minority(panels, path)


# ---------------------------------------------------------------------------------------------- in a run
class GroupInferenceHook:
    """A run hook (`hf_robust.methods.registry.RUN_HOOKS`): after the run's `erm` stage (trained, loaded from
    `erm_checkpoint`, or restored on resume), infer the groups with both rules from the ERM model. See the module
    docstring."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.reports: dict | None = None
        self.tensors: dict[str, torch.Tensor] = {}

    # -- what a run's core calls
    def after_stage(self, name: str, stage_dir: Path) -> None:
        trainer = self.trainer
        if name != STAGE_NAME:
            return
        self.reports, self.tensors = None, {}  # (a report of an earlier train() of this trainer no longer holds)
        if getattr(trainer.args, "group_inference", "on") == "off":
            return
        folder = Path(trainer.args.output_dir) / "stages" / FOLDER
        settings = self.settings()
        trainer.accelerator.wait_for_everyone()
        marker = folder / "report.json"
        if marker.is_file():
            saved = json.loads(marker.read_text())
            if saved.get("settings") == settings:
                self.reports = saved["reports"]
                tensors = folder / "tensors.safetensors"
                self.tensors = trainer.load_stage_tensors(folder, "tensors") if tensors.is_file() else {}
                return
        from ..models.adapter import UnsupportedModelError

        try:
            self.reports, self.tensors = self.compute(settings)
        except UnsupportedModelError as error:  # e.g. a classifier on every token: the same on every process
            logger.warning("Group inference is skipped: %s", error)
            self.reports = {rule: {"skipped": f"the model does not allow it ({error})"} for rule in RULES}
            self.tensors = {}
        if self.tensors:
            trainer.save_stage_tensors(folder, self.tensors, "tensors")
        trainer.save_stage_json(folder, "report", {"settings": settings, "reports": self.reports})  # last

    def results(self) -> dict:
        return {"group_inference": self.reports} if self.reports else {}

    def write_plots(self, output_dir: str | Path) -> None:
        if self.reports and self.trainer.args.save_plots and self.trainer.is_world_process_zero():
            plot_inferred((self.reports, self.tensors), Path(output_dir) / "plots" / PLOT_NAME)

    # -- the computation
    def settings(self) -> dict:
        """What the report depends on besides the ERM model: a resumed run recomputes it when they differ."""
        trainer = self.trainer
        return {**gradient_norm_defaults(trainer.args), "seed": trainer.args.seed, "examples": EXAMPLES_PER_RULE,
                "train_examples": None if trainer.train_dataset is None else len(trainer.train_dataset)}

    def _heldout(self, settings: dict):
        """(held-out split's dataset, held-out example_idx, split name), or (None, None, why not)."""
        trainer = self.trainer
        retraining = getattr(trainer, "last_layer", None)  # a last-layer method: its own held-out half
        if retraining is not None and getattr(retraining, "heldout_idx", None) is not None:
            return retraining.heldout_dataset, retraining.heldout_idx, settings["heldout_split"]
        from ..methods.last_layer.scores import split_heldout

        split, evaluation = settings["heldout_split"], trainer.eval_dataset
        if not isinstance(evaluation, dict) or split not in evaluation:
            return None, None, f"no eval split {split!r} to draw the held-out half from (heldout_split)"
        dataset = evaluation[split]
        heldout, _ = split_heldout(torch.as_tensor(dataset["example_idx"]), settings["heldout_fraction"],
                                   settings["seed"])
        return dataset, heldout, split

    def compute(self, settings: dict) -> tuple[dict, dict]:
        trainer = self.trainer
        fn = score_batch(trainer.adapter, trainer.model_inputs)
        model = trainer.accelerator.unwrap_model(trainer.model)

        def explain(rows):
            return explain_rows(model, trainer.adapter, rows, trainer.eval_collator, trainer.args.device,
                                trainer.model_inputs)

        reports, tensors = {}, {}
        results = []
        if trainer.train_dataset is not None:
            outputs = trainer.compute_per_example(trainer.train_dataset, fn, description="Group inference train")
            results.append(rule_report("error_set", outputs, trainer.train_dataset, settings, explain, "train", "all"))
        else:
            reports["error_set"] = {"skipped": "no training split (the ERM model came from erm_checkpoint)"}
        dataset, heldout, split = self._heldout(settings)
        if dataset is not None:
            # the whole split, as GradTune's `scores` stage passes it (the same batches, hence the same norms)
            outputs = trainer.compute_per_example(dataset, fn, description="Group inference held-out")
            rows = torch.searchsorted(outputs["example_idx"], heldout.to(outputs["example_idx"].dtype))
            outputs = {k: v[rows] for k, v in outputs.items()}
            part = f"held-out {settings['heldout_fraction']:g} of the split (GradTune's, seed {settings['seed']})"
            results.append(rule_report("gradient_norm", outputs, dataset, settings, explain, split, part))
        else:
            reports["gradient_norm"] = {"skipped": split}
        for result in results:
            reports[result.rule] = result.report
            tensors[f"{result.rule}_idx"] = result.example_idx
            for key in ("images", "maps"):
                if getattr(result, key) is not None:
                    tensors[f"{result.rule}_{key}"] = getattr(result, key).contiguous()
            logger.info("Group inference, %s: %d of %d %s examples", result.rule, result.report["size"],
                        result.report["examples_scored"], result.report["split"])
        reports = {rule: reports[rule] for rule in RULES if rule in reports}
        return json.loads(json.dumps(reports)), tensors


# ---------------------------------------------------------------------------------------------- on any model
def infer_groups(
    model: nn.Module,
    dataset,
    rule: str = "error_set",
    *,
    processing_class=None,
    batch_size: int = 64,
    finetune_set_size: int | None = None,
    top_k: int | None = None,
    seed: int = 0,
    max_length: int = 128,
    classifier: str | None = None,
    target_layer: str | None = None,
    split: str = "dataset",
) -> InferredGroups:
    """The minority a trained classifier points to in `dataset` (a split in the hf_robust data model), by `rule`:

    - `"error_set"` (JTT, arXiv:2107.09044): the examples the model misclassifies — pass the training data;
    - `"gradient_norm"` (GradTune): GradTune's selection by last-layer gradient norm (`finetune_set_size`, default
      500, of which `top_k`, default 0.8 of it, are the largest norms, the rest drawn in proportion to the norm,
      seeded by `seed`) — pass held-out data the model was not trained on. Every example of `dataset` is a
      candidate (a run draws its held-out half of validation first).

    Returns an `InferredGroups`: `.example_idx` of the set, `.report` (size, composition by class, precision and
    recall per group when `dataset` has group labels, and examples with their top tokens), and `.plot(path)`
    (images with their XGrad-CAM, or texts with their top tokens). One process, on the model's device, in eval
    mode; `processing_class` is the tokenizer (text) or image processor (images; optional for timm models).
    """
    from ..data.core import validate_group_dataset
    from ..data.preprocessing import GroupDataCollator, ImagePreprocessing
    from ..models.adapter import EXAMPLE_IDX_FLAG, get_adapter, unwrap_model
    from ..models.timm_wrap import maybe_wrap_timm

    if rule not in RULES:
        raise ValueError(f"rule={rule!r}: expected one of {RULES}.")
    model = maybe_wrap_timm(model)
    adapter = get_adapter(model, classifier=classifier, target_layer=target_layer)
    kind = validate_group_dataset(dataset, split, num_labels=adapter.classifier.out_features)
    if (kind == "image") != (adapter.input_kind == "image"):
        raise ValueError(f"{split} has {kind} inputs but the model takes {adapter.input_kind} inputs.")
    if kind == "image":
        collator = GroupDataCollator(kind, image_preprocessing=ImagePreprocessing.for_model(model, processing_class))
    else:
        if processing_class is None:
            raise ValueError("Text data needs its tokenizer: pass processing_class=<tokenizer>.")
        collator = GroupDataCollator(kind, tokenizer=processing_class, max_length=max_length)
    base = unwrap_model(model)
    device = next(base.parameters()).device
    uses_idx = getattr(base, EXAMPLE_IDX_FLAG, False)

    def model_inputs(batch):
        return {k: v for k, v in batch.items() if k != "group" and (uses_idx or k != "example_idx")}

    fn = score_batch(adapter, model_inputs)
    chunks: dict[str, list] = {}
    was_training = base.training
    base.eval()
    try:
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(device) for k, v in collator(rows).items()}
            out = {**fn(base, batch), "example_idx": batch["example_idx"]}
            for key, value in out.items():
                chunks.setdefault(key, []).append(value.detach().cpu())
        outputs = {k: torch.cat(v) for k, v in chunks.items()}
        order = torch.argsort(outputs["example_idx"], stable=True)
        outputs = {k: v[order] for k, v in outputs.items()}
        defaults = gradient_norm_defaults()
        settings = {"finetune_set_size": finetune_set_size or defaults["finetune_set_size"],
                    "top_k": top_k if top_k is not None else defaults["top_k"], "seed": seed}
        return rule_report(rule, outputs, dataset, settings,
                           lambda rows: explain_rows(base, adapter, rows, collator, device, model_inputs),
                           split, "all")
    finally:
        base.train(was_training)
