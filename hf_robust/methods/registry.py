"""The one list of methods: name -> config class, trainer class, its public names and its recipes.

Each trainer names its own paper (`_paper`: title, arXiv link, BibTeX), which its model card cites.

The CLI (`scripts/train.py`), the package exports (`hf_robust.<Name>`), the tests' method matrix and the benchmarks
read this list; a method is added by writing its package under `hf_robust/methods/` and one `MethodSpec` here.
Classes are named by import path ("module:attribute") and imported on first use, so that building the CLI's
parser does not load every trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module


def load_object(path: str):
    """'package.module:Name' -> the object."""
    module, _, name = path.partition(":")
    return getattr(import_module(module), name)


@dataclass(frozen=True)
class MethodSpec:
    name: str  # the CLI's --method
    config: str  # "module:Class" of its TrainingArguments subclass
    trainer: str  # "module:Class" of its Trainer subclass
    # public names of the method's package, re-exported by `hf_robust` (name -> module)
    exports: dict[str, str] = field(default_factory=dict)
    # the method's own defaults over a dataset's recipe: key None for every dataset, else a dataset name
    recipes: dict[str | None, dict] = field(default_factory=dict)
    # "module:function" run by every trainer before it loads a saved model folder as the plain weights of its
    # model (`erm_checkpoint`): function(folder, model, trainer_name) -> why the folder must not be loaded
    # (e.g. it holds the method's extra layers, which the model lacks), or None
    checkpoint_check: str | None = None

    def config_class(self):
        return load_object(self.config)

    def trainer_class(self):
        return load_object(self.trainer)


_M = "hf_robust.methods."
DIGITS_BENCHMARKS = ("biased_digits", "scene_digits", "tinted_digits")

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    # ERM is the core trainer with no method stages
    MethodSpec("erm", "hf_robust.core.config:RobustConfig", "hf_robust.core.trainer:RobustTrainer"),
    MethodSpec(
        "masktune", _M + "masktune.config:MaskTuneConfig", _M + "masktune.trainer:MaskTuneTrainer",
        exports={"MaskStore": _M + "masktune.masks", "SelectiveClassifier": _M + "masktune.selective"},
        # MaskTune's CAMs need an 8x8 map to single out the 4-pixel square (the 32x32 model's 4x4 map does not);
        # its fine-tuning knobs (learning rate, batch size, k, rounds) are chosen inside the run on validation
        # (labels only). On biased_mnist the paper's protocol is reproduced as published (README, "MaskTune on
        # real MNIST"): the fine-tuning epoch at ERM's final learning rate and batch size, k = 2, no selection.
        recipes={**{name: dict(model="digits-resnet18-64") for name in DIGITS_BENCHMARKS},
                 "biased_mnist": dict(masktune_selection="off")},
    ),
    MethodSpec(
        "gradtune", _M + "gradtune.config:GradTuneConfig", _M + "gradtune.trainer:GradTuneTrainer",
    ),
    MethodSpec(
        "dfr", _M + "dfr.config:DFRConfig", _M + "dfr.trainer:DFRTrainer",
    ),
    MethodSpec(
        "fairdropout", _M + "fair_dropout.config:FairDropoutTrainingConfig",
        _M + "fair_dropout.trainer:FairDropoutTrainer",
        exports={"FairDropout": _M + "fair_dropout.layer", "FairDropoutConfig": _M + "fair_dropout.inject",
                 "inject_fair_dropout": _M + "fair_dropout.inject", "remove_fair_dropout": _M + "fair_dropout.inject",
                 "load_fair_dropout": _M + "fair_dropout.inject", "export_fair_dropout": _M + "fair_dropout.inject"},
        checkpoint_check=_M + "fair_dropout.checkpoint:refuse_without_fair_dropout",
    ),
    MethodSpec(
        "fairdropout_dfr", _M + "fair_dropout.config:FairDropoutDFRConfig",
        _M + "fair_dropout.trainer:FairDropoutDFRTrainer",
    ),
    MethodSpec(
        "counterfactual", _M + "counterfactual.config:CounterfactualDistillConfig",
        _M + "counterfactual.trainer:CounterfactualDistillTrainer",
        exports={"wise_ft": _M + "counterfactual.wise_ft", "CLIPZeroShotClassifier": "hf_robust.models.clip",
                 "load_clip_zero_shot": "hf_robust.models.clip"},
        recipes={
            None: dict(model="openai/clip-vit-base-patch32", optim="adamw_torch", optim_args=None,
                       learning_rate=3e-5, weight_decay=0.1, lr_scheduler_type="cosine", warmup_steps=0.02,
                       train_augmentation="none", compare_vanilla=True),
            # the embedded digits benchmarks: the digits CLIP pre-trained here; the schedule with the best
            # validation accuracy of the method (lr in 3e-5..1e-3, 3 epochs), shared by the vanilla fine-tuning
            **{name: dict(model="digits-clip", learning_rate=1e-3, num_train_epochs=3) for name in DIGITS_BENCHMARKS},
        },
    ),
    # the baselines every peer library ships (issue 16): group DRO and the balancing rules use train group labels
    # (refused before training without them), JTT and class balancing do not
    MethodSpec("group_dro", _M + "group_dro.config:GroupDROConfig", _M + "group_dro.trainer:GroupDROTrainer"),
    MethodSpec("jtt", _M + "jtt.config:JTTConfig", _M + "jtt.trainer:JTTTrainer"),
    MethodSpec("reweight", _M + "balancing.config:ReweightConfig", _M + "balancing.trainer:ReweightTrainer"),
    MethodSpec("subg", _M + "balancing.config:SUBGConfig", _M + "balancing.trainer:SUBGTrainer"),
)}
DEFAULT_METHOD = "masktune"  # the no-argument main job: ERM, then MaskTune, on biased_digits


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise KeyError(f"Unknown method {name!r}: expected one of {sorted(METHODS)}.")
    return METHODS[name]


def trainer_exports() -> dict[str, str]:
    """Every method's config and trainer class name -> module, then its package's other public names."""
    names: dict[str, str] = {}
    for spec in METHODS.values():
        for path in (spec.config, spec.trainer):
            module, _, attr = path.partition(":")
            names[attr] = module
        names.update(spec.exports)
    return names


def checkpoint_refusal(folder, model, trainer_name: str) -> str | None:
    """The first method's `checkpoint_check` that refuses loading the saved model folder `folder` as the plain
    weights of `model` (its reason), or None when every check lets it load."""
    for spec in METHODS.values():
        if spec.checkpoint_check is not None:
            reason = load_object(spec.checkpoint_check)(folder, model, trainer_name)
            if reason:
                return reason
    return None


# Reports every run carries whatever its method, as "module:Class": Class(trainer) with `after_stage(name,
# stage_dir)`, `results() -> dict` (merged into results.json) and `write_plots(output_dir)`; the core builds and calls
# them without naming them (`StageEngine.run_hooks`). Group inference: the minority the ERM stage points to.
RUN_HOOKS: tuple[str, ...] = ("hf_robust.inference.group_inference:GroupInferenceHook",)


def run_hook_classes() -> list:
    """The classes of RUN_HOOKS."""
    return [load_object(path) for path in RUN_HOOKS]
