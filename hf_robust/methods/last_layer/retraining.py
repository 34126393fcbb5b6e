"""Last-layer retraining on cached penultimate features, as a component of a trainer: the stages GradTune, DFR and
FairDropout-DFR share, with the method's own choices in a rule object.

A model trained by ERM learns the core features but weighs the spurious ones too much in its last layer
(Kirichenko et al., "Last Layer Re-Training is Sufficient for Robustness to Spurious Correlations", ICLR 2023,
arXiv:2204.02937). Re-weighing them takes only the last linear layer, trained on a small well-chosen held-out set,
with the backbone frozen. The stages, each written atomically into `output_dir/stages/<name>/` (so a resumed run
skips them):

- `heldout`: a seeded `heldout_fraction` of the `heldout_split` evaluation split (by `example_idx`); the rest is
  the model-selection half, judged by worst-CLASS accuracy only (no group labels).
- `scores`: ONE inference pass over that split (backbone in eval mode, `compute_per_example`: sharded over
  processes, gathered by `example_idx`) that caches the classifier's input `h` (`adapter.penultimate`), the
  logits `z`, labels, groups, and the per-example norm of the cross-entropy gradient w.r.t. the last layer
  (`scores.last_layer_gradient_norms`, closed form, no backward pass).
- `select`: the fine-tuning set(s), as example indices: `rule.select`.
- `last_layer`: the head fitted on the cached features of the fine-tuning set(s) (`rule.fit_head`; by default
  `train_head`, the shared trainer of `linear_head.train_linear_head` with the `LastLayerArguments` settings),
  then written into `adapter.classifier`, so the model saves, evaluates and pushes as a normal model. Every
  process computes the same head from the same gathered features.

A method plugs in with a `LastLayerRule` (GradTune's in `hf_robust.methods.gradtune.rule`, DFR's in
`hf_robust.methods.dfr.rule`), passed explicitly. A trainer that starts with ERM subclasses
`hf_robust.methods.last_layer.trainer.LastLayerTrainer`; any other holds the component and mixes in
`LastLayerHost` (same module: results, plots and the health split handed to the component), e.g. FairDropout-DFR
(FairDropout training, then DFR)::

    class FairDropoutDFRTrainer(LastLayerHost, FairDropoutTrainer):
        def __init__(self, model, args, *pargs, heldout_dataset=None, **kwargs):
            super().__init__(model, args, *pargs, **kwargs)
            # checks the held-out split (and the rule's needs) before any training
            self.last_layer = LastLayerRetraining(self, DFRRule.from_args(self.args), heldout_dataset)

        def stages(self):
            return super().stages() + self.last_layer.stages()   # [..., heldout, scores, select, last_layer]

The host's config mixes in `LastLayerArguments`. The stages before `heldout` must leave the model to retrain in
`trainer.model` and, when they do not restore the model on resume, their `load` must.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...core.trainer import RunSetupError, Stage
from ...data.core import DataValidationError, group_names, label_names
from .config import LastLayerArguments
from .linear_head import train_linear_head, write_head
from .scores import LastLayerData, last_layer_gradient_norms, split_heldout, worst_class_accuracy

Head = tuple[torch.Tensor, torch.Tensor | None, dict]  # (weight (K, D), bias (K,) or None, info for the report)


class LastLayerRule:
    """A method's choices in the last-layer stages. Subclass it and override `select` (and `fit_head`, `check`
    where the method needs); each method receives the `LastLayerRetraining` it serves, for its held-out halves,
    settings and shared head training."""

    def check(self, retraining: LastLayerRetraining) -> None:
        """Refuse, before any training, held-out data the rule cannot use. By default nothing is refused."""

    def select(self, retraining: LastLayerRetraining, data: LastLayerData) -> torch.Tensor:
        """The fine-tuning set(s) among `retraining.heldout_idx`: (R, n) example indices (or (n,) for one set)."""
        raise NotImplementedError

    def fit_head(self, retraining: LastLayerRetraining, data: LastLayerData, finetune_sets: torch.Tensor) -> Head:
        """The new head from the cached features of the fine-tuning sets. By default the shared head training
        (`retraining.train_head`)."""
        return retraining.train_head(data, finetune_sets)


class LastLayerRetraining:
    """The last-layer stages of `trainer` (a `RobustTrainer` whose config mixes in `LastLayerArguments`), with
    `rule` deciding the selection and the head. Built in the trainer's `__init__`: it finds and checks the held-out
    split and computes its seeded halves before any training (module docstring)."""

    def __init__(self, trainer, rule: LastLayerRule, heldout_dataset=None):
        self.trainer = trainer
        self.rule = rule
        if not isinstance(trainer.args, LastLayerArguments):
            raise TypeError(
                f"{type(trainer).__name__} needs a config that mixes in LastLayerArguments, got "
                f"{type(trainer.args).__name__}."
            )
        trainer.adapter.require("linear_head")  # the head is read and rewritten as one linear layer
        if self.args.erm_checkpoint is not None and not Path(self.args.erm_checkpoint).is_dir():
            raise FileNotFoundError(f"erm_checkpoint={self.args.erm_checkpoint!r} is not a folder of a saved model.")
        self.heldout_dataset = self._find_heldout_dataset(heldout_dataset)
        self.heldout_idx, self.selection_idx = split_heldout(
            torch.as_tensor(self.heldout_dataset["example_idx"]), self.args.heldout_fraction, self.args.seed
        )
        self._check_two_classes()
        rule.check(self)
        self.data: LastLayerData | None = None  # the `scores` stage's cache
        self.finetune_sets: torch.Tensor | None = None  # the `select` stage's (R, n) example indices
        self.info: dict = {}  # the `last_layer` stage's record

    @property
    def args(self):
        return self.trainer.args

    @property
    def classifier(self) -> torch.nn.Linear:
        return self.trainer.adapter.linear_head

    # -- setup
    def _find_heldout_dataset(self, heldout_dataset):
        name, split = self.trainer._name, self.args.heldout_split
        eval_dataset = self.trainer.eval_dataset
        if heldout_dataset is not None:
            from ...data.core import validate_group_dataset

            kind = validate_group_dataset(heldout_dataset, "heldout_dataset", num_labels=self.classifier.out_features)
            if kind != self.trainer.input_kind:
                raise DataValidationError(
                    f"heldout_dataset has {kind} inputs; the training data has {self.trainer.input_kind} inputs."
                )
            return heldout_dataset
        if isinstance(eval_dataset, dict):
            if split not in eval_dataset:
                raise DataValidationError(
                    f"{name} draws its held-out set from the eval split {split!r}, but eval_dataset has "
                    f"{sorted(eval_dataset)}: pass eval_dataset={{{split!r}: ...}}, set heldout_split to one "
                    "of them, or pass heldout_dataset=."
                )
            return eval_dataset[split]
        if eval_dataset is not None:
            # one unnamed Dataset may be the test split: training the head on it would inflate every number
            # reported on it, so the held-out split must be named
            raise DataValidationError(
                f"{name} retrains the last layer on half of the held-out split {split!r}, but eval_dataset "
                f"is one unnamed {type(eval_dataset).__name__}, so which split it is is unknown: pass "
                f"eval_dataset={{{split!r}: <validation data>, ...}} or heldout_dataset=<validation data>."
            )
        raise DataValidationError(
            f"{name} needs held-out data (half of a validation split) to retrain the last layer: pass "
            f"eval_dataset={{{split!r}: ...}} or heldout_dataset=."
        )

    def _check_two_classes(self) -> None:
        labels = np.asarray(self.heldout_dataset["label"])
        position = {idx: i for i, idx in enumerate(self.heldout_dataset["example_idx"])}
        held_labels = labels[[position[i] for i in self.heldout_idx.tolist()]]
        if len(np.unique(held_labels)) < 2:
            raise DataValidationError(
                f"The held-out part of {self.args.heldout_split!r} ({len(held_labels)} examples) holds only "
                f"class(es) {np.unique(held_labels).tolist()}: the last layer needs examples of at least two "
                "classes. Use a larger split or a larger heldout_fraction."
            )

    def health_dataset(self):
        """The model-selection half of the held-out split when the health check runs on that split (the head was
        trained on the other half, and on all of it when heldout_fraction is 1); None otherwise."""
        if self.args.health_split == self.args.heldout_split and len(self.selection_idx):
            position = {idx: i for i, idx in enumerate(self.heldout_dataset["example_idx"])}
            return self.heldout_dataset.select([position[i] for i in self.selection_idx.tolist()])
        return None

    # -- the shared head training; its settings depend on the input kind (images: the vision recipe; text: the
    # language recipe)
    def settings(self) -> dict:
        text = self.trainer.input_kind != "image"
        args = self.args
        return dict(
            epochs=args.last_layer_epochs,
            batch_size=args.last_layer_batch_size or (16 if text else 32),
            optimizer=args.last_layer_optimizer or ("adamw" if text else "sgd"),
            learning_rate=args.last_layer_learning_rate or (1e-5 if text else 3e-3),
            lr_scheduler=args.last_layer_lr_scheduler or ("linear" if text else "cosine"),
            weight_decay=args.last_layer_weight_decay,
            momentum=args.last_layer_momentum,
            class_balanced=args.last_layer_balance == "class",
        )

    def train_head(self, data: LastLayerData, finetune_sets: torch.Tensor) -> Head:
        """`train_linear_head` on each fine-tuning set (heads averaged over sets), from the ERM head or zero."""
        weight = self.classifier.weight.detach().cpu().float()
        bias = self.classifier.bias.detach().cpu().float() if self.classifier.bias is not None else None
        if self.args.reset_last_layer:
            weight = torch.zeros_like(weight)
            bias = torch.zeros_like(bias) if bias is not None else None
        settings = self.settings()
        evaluation = {}
        if len(self.selection_idx):
            rows = data.rows(self.selection_idx)
            evaluation = dict(eval_features=data.features[rows], eval_labels=data.labels[rows],
                              eval_every=self.args.last_layer_eval_epochs,
                              keep_best=self.args.last_layer_model_selection == "worst_class")
        results = []
        for i, subset in enumerate(finetune_sets):
            rows = data.rows(subset)
            results.append(train_linear_head(data.features[rows], data.labels[rows], weight, bias,
                                             seed=self.args.seed + i, **settings, **evaluation))
        new_weight = torch.stack([r.weight for r in results]).mean(0)
        new_bias = torch.stack([r.bias for r in results]).mean(0) if bias is not None else None
        info = {"head": "train_linear_head", **settings,
                "reset_last_layer": self.args.reset_last_layer,
                "model_selection": self.args.last_layer_model_selection,
                "best_epoch": [r.best_epoch for r in results], "history": results[0].history,
                "train_seconds": round(sum(r.seconds for r in results), 3)}
        return new_weight, new_bias, info

    # -- stages
    def stages(self) -> list[Stage]:
        """`heldout`, `scores`, `select` and `last_layer`."""
        return [
            Stage("heldout", self._run_heldout, self._load_heldout),
            Stage("scores", self._run_scores, self._load_scores),
            Stage("select", self._run_select, self._load_select),
            Stage("last_layer", self._run_last_layer, self._load_last_layer),
        ]

    def _run_heldout(self, stage_dir: Path, resume: bool) -> None:
        split = {"heldout_idx": self.heldout_idx, "selection_idx": self.selection_idx}
        self.trainer.save_stage_tensors(stage_dir, split, "split")

    def _load_heldout(self, stage_dir: Path) -> None:
        saved = self.trainer.load_stage_tensors(stage_dir, "split")
        if not torch.equal(saved["heldout_idx"], self.heldout_idx):
            raise RunSetupError(
                f"{stage_dir} holds a different held-out split than this run computes (another dataset, "
                "heldout_fraction or seed): resume with the same settings, or use a new output_dir."
            )
        self.selection_idx = saved["selection_idx"]

    def _score_batch(self, model, batch: dict) -> dict[str, torch.Tensor]:
        inputs = {k: v for k, v in self.trainer.model_inputs(batch).items() if k != "labels"}
        with torch.no_grad():
            features, logits = self.trainer.adapter.penultimate(inputs)
        labels = batch["labels"]
        norms = last_layer_gradient_norms(features, logits, labels, bias=self.classifier.bias is not None)
        return {"features": features.float(), "logits": logits.float(), "norms": norms, "labels": labels,
                "groups": batch["group"]}

    def compute_data(self, dataset=None) -> LastLayerData:
        """One eval-mode pass over the held-out split (all processes, gathered): features, logits, norms."""
        outputs = self.trainer.compute_per_example(
            dataset if dataset is not None else self.heldout_dataset, self._score_batch, description="Scoring held-out"
        )
        return LastLayerData(outputs["example_idx"].long(), outputs["features"], outputs["logits"],
                             outputs["labels"].long(), outputs["groups"].long(), outputs["norms"].double())

    def _run_scores(self, stage_dir: Path, resume: bool) -> None:
        self.data = self.compute_data()
        self.trainer.save_stage_tensors(stage_dir, self.data.tensors(), "scores")

    def _load_scores(self, stage_dir: Path) -> None:
        self.data = LastLayerData(**self.trainer.load_stage_tensors(stage_dir, "scores"))

    def _run_select(self, stage_dir: Path, resume: bool) -> None:
        self.finetune_sets = torch.as_tensor(self.rule.select(self, self.data), dtype=torch.long)
        if self.finetune_sets.ndim == 1:
            self.finetune_sets = self.finetune_sets[None]
        self.trainer.save_stage_tensors(stage_dir, {"finetune_sets": self.finetune_sets}, "selection")
        self.trainer.save_stage_json(stage_dir, "composition", self.selection_composition())

    def _load_select(self, stage_dir: Path) -> None:
        self.finetune_sets = self.trainer.load_stage_tensors(stage_dir, "selection")["finetune_sets"]

    def _run_last_layer(self, stage_dir: Path, resume: bool) -> None:
        data = self.data
        weight, bias, info = self.rule.fit_head(self, data, self.finetune_sets)
        if len(self.selection_idx):
            rows = data.rows(self.selection_idx)
            logits = data.features[rows] @ weight.T + (bias if bias is not None else 0)
            info["selection_half"] = {
                "size": int(len(rows)),
                "erm_worst_class_accuracy": worst_class_accuracy(data.logits[rows], data.labels[rows]),
                "worst_class_accuracy": worst_class_accuracy(logits, data.labels[rows]),
            }
        write_head(self.classifier, weight, bias)
        tensors = {"weight": weight}
        if bias is not None:
            tensors["bias"] = bias
        self.trainer.save_stage_tensors(stage_dir, tensors, "head")
        self.trainer.save_stage_json(stage_dir, "last_layer", info)
        self.info = info

    def _load_last_layer(self, stage_dir: Path) -> None:
        head = self.trainer.load_stage_tensors(stage_dir, "head")
        write_head(self.classifier, head["weight"], head.get("bias"))
        self.info = self.trainer.load_stage_json(stage_dir, "last_layer")

    # -- report
    def selected_idx(self) -> torch.Tensor:
        """Every example index in the fine-tuning set(s), sorted, once."""
        return torch.unique(self.finetune_sets)

    def selection_composition(self) -> dict:
        """Per group (by name; per class where groups are unknown) of the held-out half: how many examples, how
        many selected, and their mean gradient norm — for the report, never for training."""
        data = self.data
        rows = data.rows(self.heldout_idx)
        chosen = torch.isin(self.heldout_idx, self.selected_idx())
        groups, labels, norms = data.groups[rows], data.labels[rows], data.norms[rows]
        names = group_names(self.heldout_dataset)
        classes = label_names(self.heldout_dataset)
        table = {}
        keys = groups if (groups >= 0).all() else labels
        for key in torch.unique(keys).tolist():
            members = keys == key
            if (groups >= 0).all():
                name = names[key] if key < len(names) else f"group_{key}"
            else:
                name = f"{classes[key] if key < len(classes) else key} (group unknown)"
            table[name] = {
                "heldout": int(members.sum()),
                "selected": int((members & chosen).sum()),
                "mean_gradient_norm": float(norms[members].mean()),
            }
        return {"heldout_size": int(len(rows)), "selected_size": int(chosen.sum()),
                "num_finetune_sets": int(len(self.finetune_sets)), "per_group": table}

    def results(self) -> dict:
        """The held-out / selection summary (`finetune_set`) and the head's record (`last_layer`) for results.json."""
        results = {}
        if self.finetune_sets is not None and self.data is not None:
            results["finetune_set"] = self.selection_composition()
        if self.info:
            results["last_layer"] = {k: v for k, v in self.info.items() if k != "history"}
        return results

    def write_plots(self, output_dir: str | Path | None = None) -> None:
        """On the main process, with `save_plots`: the per-group histogram of held-out gradient norms, selected
        examples marked (GradTune's Figure 2), into `output_dir/plots/gradient_norms.png`."""
        trainer = self.trainer
        if not (trainer.is_world_process_zero() and self.args.save_plots):
            return
        if self.data is None or self.finetune_sets is None:
            return
        from ...reporting.plots import plot_gradient_norms

        data = self.data
        rows = data.rows(self.heldout_idx)
        plot_gradient_norms(
            data.norms[rows].numpy(), data.groups[rows].numpy(),
            torch.isin(self.heldout_idx, self.selected_idx()).numpy(),
            Path(output_dir or self.args.output_dir) / "plots" / "gradient_norms.png",
            group_names=group_names(self.heldout_dataset), labels=data.labels[rows].numpy(),
            label_names=label_names(self.heldout_dataset), title=f"{trainer._name}: held-out gradient norms",
        )


# the name of this component before it was one (a mixin of the trainer's bases)
LastLayerMixin = LastLayerRetraining
