"""`LastLayerTrainer`: ERM (or a saved `erm_checkpoint`), then last-layer retraining with a method's rule — the
trainer GradTune and DFR share; each names its config, its paper and its `LastLayerRule`."""

from __future__ import annotations

from ...core.trainer import RobustTrainer, Stage
from ...data.core import DataValidationError
from .retraining import LastLayerRetraining, LastLayerRule


class LastLayerHost:
    """What a trainer that holds a `LastLayerRetraining` as `self.last_layer` hands to it: the results, the plots
    (before the card lists them) and the health check's split. Mixed in before the trainer class."""

    def results(self) -> dict:
        return {**super().results(), **self.last_layer.results()}

    def write_report(self, output_dir: str | None = None) -> None:
        self.last_layer.write_plots(output_dir)  # before the card lists the plots
        super().write_report(output_dir)

    def health_dataset(self):
        held = self.last_layer.health_dataset()
        return held if held is not None else super().health_dataset()


class LastLayerTrainer(LastLayerHost, RobustTrainer):
    """Stages: `erm` (trains ERM or loads `erm_checkpoint`, then records the "ERM" baseline) -> `heldout` ->
    `scores` -> `select` -> `last_layer` (`hf_robust.methods.last_layer.retraining`).

    A subclass sets `_config_class` (a config that mixes in `LastLayerArguments`) and returns its rule from
    `last_layer_rule()`. Args as [`RobustTrainer`], plus `heldout_dataset` (default: the `heldout_split` entry of
    `eval_dataset`, "validation"). The component is `self.last_layer` (held-out halves, cached scores, fine-tuning
    sets, the head's record)."""

    def __init__(self, model, args=None, *pargs, heldout_dataset=None, **kwargs):
        super().__init__(model, args, *pargs, **kwargs)
        if self.train_dataset is None and self.args.erm_checkpoint is None:
            raise DataValidationError(
                f"{type(self).__name__} needs a train_dataset for its ERM stage (or an erm_checkpoint)."
            )
        self.last_layer = LastLayerRetraining(self, self.last_layer_rule(), heldout_dataset)

    def last_layer_rule(self) -> LastLayerRule:
        """The method's selection and head (built from `self.args`)."""
        raise NotImplementedError(f"{type(self).__name__} must return its LastLayerRule from last_layer_rule().")

    def stages(self) -> list[Stage]:
        return [self.erm_baseline_stage(), *self.last_layer.stages()]
