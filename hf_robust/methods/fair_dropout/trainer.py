"""FairDropout (example-tied dropout against spurious correlations) and FairDropout-DFR.

- `FairDropoutTrainer`: ERM on the model with FairDropout injected (`hf_robust.methods.fair_dropout.inject`): every training
  example keeps the generalising neurons and its own fixed subset of memorising neurons at the chosen positions,
  so what only a few examples need — the minority groups' atypical examples — gets memorised by neurons that
  evaluation drops. Stages: `select` (when p_gen / p_mem are unset: ERM and the FairDropout candidates — positions x
  (p_gen, p_mem) pairs — trained from the same initial weights, chosen on validation worst-class accuracy, labels
  only; the ERM candidate, bit for bit plain ERM of the same seed and recipe, is reported as "ERM" on every eval
  split) -> `fairdropout`. Saves the model with `fair_dropout_config.json` (reload with
  `load_fair_dropout`) and, in `exported/`, the stock model with the evaluation-time masks folded in.
- `FairDropoutDFRTrainer`: the same, then DFR's last-layer retraining (the component of
  `hf_robust.methods.last_layer.retraining`, shared with GradTune and DFR, with DFR's rule
  `hf_robust.methods.dfr.rule.DFRRule`) on the FairDropout model's evaluation-mode features of a class-balanced
  held-out set. Stages: `fairdropout` -> `heldout` -> `scores` -> `select` -> `last_layer`.

The paper gives no code; the layer follows the authors of example-tied dropout (Maini et al., ICML 2023,
github.com/pratyushmaini/localizing-memorization) and the paper's description (positions after residual
stages, a new projection before a text classifier, memorising neurons dropped at test time).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ...data.core import DataValidationError
from .inject import (
    ATTRIBUTE,
    CONFIG_NAME,
    FairDropoutConfig,
    UnsupportedModelError,
    export_fair_dropout,
    fair_dropout_modules,
    inject_fair_dropout,
    remove_fair_dropout,
)
from ...core.checkpoints import RunSetupError
from ...core.config import erm_checkpoint_of
from ...core.files import atomic_write_bytes
from ...core.stages import INITIAL_STAGE, Stage
from ...core.trainer import RobustTrainer
from ...models.timm_wrap import maybe_wrap_timm
from ..dfr.rule import DFRRule
from ..last_layer.retraining import LastLayerRetraining
from ..last_layer.trainer import LastLayerHost
from .config import FairDropoutDFRConfig, FairDropoutTrainingConfig

logger = logging.getLogger(__name__)

EXPORT_DIR = "exported"

_FAIRDROPOUT_PAPER = {
    "title": "FairDropout: Using Example-Tied Dropout to Enhance Generalization of Minority Groups",
    "url": "https://arxiv.org/abs/2502.06695",
    "citation": (
        "@article{nanfack2025fairdropout,\n"
        "  title={FairDropout: Using Example-Tied Dropout to Enhance Generalization of Minority Groups},\n"
        "  author={Nanfack, Geraldin and Belilovsky, Eugene},\n  journal={arXiv preprint arXiv:2502.06695},\n"
        "  year={2025}\n}"
    ),
}


class FairDropoutTrainer(RobustTrainer):
    """ERM with FairDropout injected: see the module docstring. Args as [`RobustTrainer`], with a
    [`FairDropoutTrainingConfig`]. A model that already has FairDropout (e.g. from `load_fair_dropout`) keeps it,
    if its configuration matches the arguments."""

    _tag_names = ["hf_robust", "fairdropout"]
    _name = "FairDropout"
    _paper = _FAIRDROPOUT_PAPER
    _summary = (
        "FairDropout trains with example-tied dropout: at the chosen layers a fixed share of neurons is seen by "
        "every example (generalising) and each example also keeps its own fixed random subset of the other "
        "(memorising) neurons. What only a few examples need — typically the minority groups that contradict the "
        "shortcut — is memorised by neurons that are dropped at test time."
    )
    _config_class = FairDropoutTrainingConfig

    def __init__(self, model, args: FairDropoutTrainingConfig | None = None, *pargs, **kwargs):
        args = self._resolve_args(args)  # needed before the base __init__: the hooks go in first
        checkpoint = erm_checkpoint_of(args)  # (FairDropout-DFR's config has one)
        if checkpoint and args.p_gen is None and args.p_mem is None and Path(checkpoint).is_dir():
            try:  # a saved FairDropout model: its p values and positions (it was trained with them; nothing to select)
                saved = FairDropoutConfig.from_pretrained(checkpoint)
                args.p_gen, args.p_mem = saved.p_gen, saved.p_mem
                if args.fair_dropout_positions is None:
                    args.fair_dropout_positions = list(saved.positions)
            except FileNotFoundError:
                pass  # refused below with the checkpoint check
        model = maybe_wrap_timm(model)
        wanted = args.fair_dropout_config()
        existing = fair_dropout_modules(model)
        if existing is None:
            inject_fair_dropout(model, wanted)  # unknown positions fail here, before any training
        else:
            given = {k: v for k, v in existing.config.to_dict().items() if k != "positions"}
            asked = {k: v for k, v in wanted.to_dict().items() if k != "positions"}
            if given != asked or (wanted.positions and wanted.positions != existing.config.positions):
                raise ValueError(
                    f"The model already has FairDropout {existing.config} but the arguments ask for {wanted}: pass a "
                    "model without FairDropout, or arguments that match it."
                )
        super().__init__(model, args, *pargs, **kwargs)
        if self.train_dataset is None and not erm_checkpoint_of(args):
            raise DataValidationError(f"{type(self).__name__} needs a train_dataset: FairDropout is a training method.")

    @property
    def fair_dropout_config(self) -> FairDropoutConfig:
        return fair_dropout_modules(self.model).config

    # ------------------------------------------------------------------ stages
    # the knob selection's stage; not "select", which FairDropout-DFR's last-layer stages use for the held-out sets
    SELECT_STAGE = "select_fair_dropout"

    def stages(self) -> list[Stage]:
        stages = [Stage("fairdropout", self._run_fairdropout, self._load_fairdropout)]
        if self.selects:
            stages.insert(0, Stage(self.SELECT_STAGE, self._run_select_knobs, self._load_select_knobs))
        return stages

    @property
    def selects(self) -> bool:
        return self.args.selects_fair_dropout and not erm_checkpoint_of(self.args)

    # ------------------------------------------------------------------ label-free selection
    def selection_positions(self) -> list[list[str]]:
        """The position sets the selection tries: the named positions (not searched), else each of
        `selection_positions` (default: the family's two, `positions.POSITIONS`) alone."""
        if self.args.fair_dropout_positions:
            return [list(self.args.fair_dropout_positions)]
        from ...models.adapter import get_adapter
        from .positions import positions_for, selection_positions

        adapter = get_adapter(self.accelerator.unwrap_model(self.model))
        names = self.args.selection_positions or list(selection_positions(adapter))
        known = positions_for(adapter)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UnsupportedModelError(
                f"selection_positions={names}: {unknown} is not a FairDropout position of this "
                f"{adapter.name} model; its positions are {sorted(known)}."
            )
        return [[name] for name in names]

    def selection_grid(self) -> list[dict]:
        """Plain ERM (p_gen = p_mem = 1: every neuron always on, at the first position: the layer is then the
        identity), then each position x each (p_gen, p_mem) pair of the config."""
        positions = self.selection_positions()
        pairs = list(zip(self.args.selection_p_gen, self.args.selection_p_mem))
        return [{"positions": positions[0], "p_gen": 1.0, "p_mem": 1.0}] + [
            {"positions": where, "p_gen": float(g), "p_mem": float(m)} for where in positions for g, m in pairs
        ]

    def use_candidate(self, model, knobs: dict) -> None:
        """Put `model`'s FairDropout at the candidate's positions and p values (re-injected when the positions
        differ: same seed, so the same masks and, for a projection position, the same initial projection)."""
        from dataclasses import replace

        modules = fair_dropout_modules(model)
        positions = knobs.get("positions") or list(modules.config.positions)
        if list(modules.config.positions) != list(positions):
            config = replace(modules.config, positions=list(positions))
            remove_fair_dropout(model)
            inject_fair_dropout(model, config)
        self.set_p(model, knobs["p_gen"], knobs["p_mem"])

    @staticmethod
    def set_p(model, p_gen: float, p_mem: float) -> None:
        """Switch the injected FairDropout of `model` to other p values (same positions, masks and seed)."""
        from dataclasses import replace

        modules = fair_dropout_modules(model)
        modules.config = replace(modules.config, p_gen=float(p_gen), p_mem=float(p_mem))
        for layer in modules.layers.values():
            layer.p_gen, layer.p_mem = float(p_gen), float(p_mem)

    def _run_select_knobs(self, stage_dir: Path, resume: bool) -> None:
        initial = stage_dir / "initial"
        if not (resume and (initial / "model.safetensors").is_file()):
            self.save_model_state(initial)  # every candidate starts from these weights

        def train(knobs: dict, folder: Path, resume_candidate: bool) -> None:
            self.use_candidate(self.accelerator.unwrap_model(self.model), knobs)
            self._load_initial(initial)
            self.train_stage(folder, resume_candidate)

        self.selection = self.run_candidates(stage_dir, self.selection_grid(), train, resume)
        self.save_stage_json(stage_dir, "selection", self.selection)
        # the ERM candidate (p_gen = 1: bit for bit plain ERM of this seed and recipe) on every eval split, reported
        # as "ERM" beside the run's result, as the methods with an ERM stage report theirs
        model = self.accelerator.unwrap_model(self.model)
        self.use_candidate(model, self.selection["candidates"][0]["knobs"])
        self.load_model_state(self.candidate_folder(stage_dir, 0))
        self.evaluate_stage("ERM", stage_dir)
        self._apply_selection()

    def _load_initial(self, folder: Path) -> None:
        """The shared initial weights; the FairDropout state of another position (a projection) is not in them and
        keeps its seeded initialisation."""
        from safetensors.torch import load_model

        device = "cpu" if self.args.device.type == "cpu" else str(self.args.device)
        missing, unexpected = load_model(self.accelerator.unwrap_model(self.model), str(folder / "model.safetensors"),
                                         strict=False, device=device)
        stray = [k for k in [*missing, *unexpected] if ATTRIBUTE not in k.split(".")]
        if stray:
            raise RunSetupError(f"{folder} does not hold this model's initial weights: {stray[:5]} do not match.")

    def _load_select_knobs(self, stage_dir: Path) -> None:
        self.selection = self.load_stage_json(stage_dir, "selection")
        self.load_stage_results(stage_dir)
        self._apply_selection()

    def _apply_selection(self) -> None:
        chosen = self.selection["candidates"][self.selection["chosen"]]["knobs"]
        self.use_candidate(self.accelerator.unwrap_model(self.model), chosen)
        if chosen["p_gen"] == 1.0 and self.is_world_process_zero():
            logger.warning(
                "FairDropout did not help on validation: plain ERM (p_gen = 1) had the best worst-class accuracy of "
                "the %d candidates, so the run keeps the ERM model (see results.json 'selection').",
                len(self.selection["candidates"]),
            )

    def health_reference(self) -> tuple[str, str] | None:
        """With the selection, its ERM candidate (p_gen = 1, same recipe and initial weights); without, the model as
        given (saved before training)."""
        if self.selects:
            return ("ERM (p_gen = 1)", f"{self.SELECT_STAGE}/{self.candidate_folder(Path(), 0)}")
        return ("the model as given", INITIAL_STAGE)

    def health_reference_model(self, stage: str, model):
        if self.selects:  # the ERM candidate: every neuron on (at its position, whose state its weights hold)
            self.use_candidate(self.accelerator.unwrap_model(model), self.selection["candidates"][0]["knobs"])
        return super().health_reference_model(stage, model)

    def _run_fairdropout(self, stage_dir: Path, resume: bool) -> None:
        if self.selects:  # the chosen candidate, already trained
            self.load_model_state(self.candidate_folder(self.stage_dir(self.SELECT_STAGE), self.selection["chosen"]))
            self.save_model_state(stage_dir)
        else:
            self.train_or_load_checkpoint(stage_dir, resume, load=self._load_fairdropout_checkpoint)
        if self.is_world_process_zero():
            self.fair_dropout_config.save_pretrained(stage_dir)
        self.accelerator.wait_for_everyone()

    def _refuse_other_config(self, folder: Path, message: str) -> None:
        """RunSetupError (`message` formatted with the saved and the asked config) unless `folder`'s
        FairDropout config is this run's."""
        saved = FairDropoutConfig.from_pretrained(folder)
        if saved != self.fair_dropout_config:
            raise RunSetupError(message.format(saved=saved, asked=self.fair_dropout_config))

    def _load_fairdropout(self, stage_dir: Path) -> None:
        self._refuse_other_config(stage_dir, f"{stage_dir} holds a FairDropout stage trained with {{saved}}, this run "
                                             "asks for {asked}: resume with the same settings, or use a new output_dir.")
        self.load_model_state(stage_dir)

    def _load_fairdropout_checkpoint(self, folder: Path) -> None:
        self._refuse_other_config(folder, f"erm_checkpoint {folder} was trained with FairDropout {{saved}}, but this "
                                          "run asks for {asked}: use the same positions, p_gen, p_mem and seed.")
        self.load_checkpoint_weights(folder, via_from_pretrained=False)  # the added projection is no stock key

    # ------------------------------------------------------------------ saving
    def _save(self, output_dir: str | None = None, state_dict=None):
        """Every save (checkpoints included) writes `fair_dropout_config.json` next to the weights."""
        super()._save(output_dir, state_dict)
        self.fair_dropout_config.save_pretrained(output_dir or self.args.output_dir)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Save the FairDropout model (+ its config); from user code also the report and, with `export_model`,
        the stock model in `output_dir/exported`."""
        # from user code the base class saves everything into a staging folder (`_staging_dir`) and swaps it in:
        # the export goes there, with the rest
        if not _internal_call and self._staging_dir is not None and self.args.export_model and self.is_world_process_zero():
            self.export(Path(output_dir or self.args.output_dir) / EXPORT_DIR)
        super().save_model(output_dir, _internal_call)

    def export(self, folder: str | Path) -> Path | None:
        """Save the stock model (evaluation-time masks folded into the weights, hooks and projection removed)
        and the processor into `folder`; None (with a warning) if a position cannot be folded."""
        try:
            stock = export_fair_dropout(self.accelerator.unwrap_model(self.model))
        except UnsupportedModelError as error:
            logger.warning("Not exporting a stock model: %s", error)
            return None
        folder = Path(folder)
        stock.save_pretrained(str(folder))
        if self.processing_class is not None and hasattr(self.processing_class, "save_pretrained"):
            self.processing_class.save_pretrained(str(folder))
        return folder

    def write_report(self, output_dir: str | None = None) -> None:
        super().write_report(output_dir)
        if not self.is_world_process_zero():
            return
        readme = Path(output_dir or self.args.output_dir) / "README.md"
        if readme.is_file():
            atomic_write_bytes(readme, (readme.read_text() + self._usage_section(readme.parent)).encode())

    def usage_snippet(self, repo: str) -> str:
        """The stock export when there is one (same predictions, plain transformers), else the FairDropout model
        with its layers re-applied: a plain `from_pretrained` of the folder would run with every neuron on."""
        auto = "AutoModelForImageClassification" if self.input_kind == "image" else "AutoModelForSequenceClassification"
        if (Path(self._staging_dir or self.args.output_dir) / EXPORT_DIR).is_dir():
            return (f"from transformers import {auto}\n\n# the stock export: evaluation-time masks folded into the "
                    f'weights\nmodel = {auto}.from_pretrained("{repo}", subfolder="{EXPORT_DIR}")')
        return (f"from transformers import {auto}\nfrom hf_robust.methods.fair_dropout.inject import load_fair_dropout\n\n"
                f'model = load_fair_dropout({auto}.from_pretrained("{repo}"), "{repo}").eval()')

    def _usage_section(self, folder: Path) -> str:
        auto = "AutoModelForImageClassification" if self.input_kind == "image" else "AutoModelForSequenceClassification"
        exported = (folder / EXPORT_DIR).is_dir()
        lines = [
            "\n## Loading the FairDropout model\n",
            f"This folder holds the model with its FairDropout layers ({CONFIG_NAME}: "
            f"{self.fair_dropout_config.to_dict()}). A plain `from_pretrained` of it gives the model WITHOUT them "
            "(all neurons on); re-apply them with:\n",
            "```python",
            f"from transformers import {auto}",
            "from hf_robust.methods.fair_dropout.inject import load_fair_dropout\n",
            f'model = load_fair_dropout({auto}.from_pretrained("<this folder>"), "<this folder>").eval()',
            "```\n",
        ]
        if exported:
            lines += [
                f"`{EXPORT_DIR}/` holds the same model with the evaluation-time masks folded into its weights: a "
                "stock model with the same predictions, no hooks, no overhead:\n",
                "```python",
                f'model = {auto}.from_pretrained("<this folder>/{EXPORT_DIR}")',
                "```\n",
            ]
        return "\n".join(lines)

    def results(self) -> dict:
        results = super().results()
        results["fair_dropout"] = self.fair_dropout_config.to_dict()
        return results

    def selection_outcome(self, knobs: dict) -> tuple[bool, str]:
        if knobs["p_gen"] != 1.0:
            return True, "a FairDropout model was chosen on validation"
        return False, "FairDropout did not help on validation (worst-class accuracy): the ERM model was kept"


class FairDropoutDFRTrainer(LastLayerHost, FairDropoutTrainer):
    """FairDropout, then DFR's last-layer retraining on its evaluation-mode features: see the module docstring.
    Args as [`FairDropoutTrainer`], with a [`FairDropoutDFRConfig`], plus `heldout_dataset` (default: the
    `heldout_split` entry of `eval_dataset`). The last-layer component is `self.last_layer`."""

    _tag_names = ["hf_robust", "fairdropout", "dfr"]
    _name = "FairDropout-DFR"
    _summary = FairDropoutTrainer._summary + (
        " FairDropout-DFR then retrains the last layer on the frozen FairDropout features of a class-balanced "
        "held-out set (DFR), with L1-regularised logistic regression."
    )
    _config_class = FairDropoutDFRConfig

    def __init__(self, model, args: FairDropoutDFRConfig | None = None, *pargs, heldout_dataset=None, **kwargs):
        super().__init__(model, args, *pargs, **kwargs)
        # checks the held-out split (and DFR's group labels) before any training
        self.last_layer = LastLayerRetraining(self, DFRRule.from_args(self.args), heldout_dataset)

    def stages(self) -> list[Stage]:
        return super().stages() + self.last_layer.stages()

    def _run_fairdropout(self, stage_dir: Path, resume: bool) -> None:
        super()._run_fairdropout(stage_dir, resume)
        self.evaluate_stage("FairDropout", stage_dir)  # the model before its last layer is retrained

    def _load_fairdropout(self, stage_dir: Path) -> None:
        super()._load_fairdropout(stage_dir)
        self.load_stage_results(stage_dir)

    def health_reference(self) -> tuple[str, str] | None:
        """The FairDropout model before its last layer was retrained."""
        return ("FairDropout", "fairdropout")

