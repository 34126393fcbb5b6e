"""FairDropout's checkpoint check (`MethodSpec.checkpoint_check`), which every trainer runs before it loads a
saved model folder as the plain weights of its model (`RobustTrainer.load_checkpoint_weights`)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .inject import CONFIG_NAME, fair_dropout_modules


def refuse_without_fair_dropout(folder: Path, model: nn.Module, trainer_name: str) -> str | None:
    """Why `folder` must not be loaded into `model`: it holds a FairDropout model and `model` has no FairDropout
    layers; None otherwise."""
    if not (Path(folder) / CONFIG_NAME).is_file() or fair_dropout_modules(model) is not None:
        return None
    # its weights load into the plain model, but without the FairDropout layers every memorising neuron would
    # stay on (and an added `fc` projection would be dropped): not the model that was trained
    return (
        f"erm_checkpoint {folder} is a FairDropout model ({CONFIG_NAME}), and {trainer_name} would load it without "
        f"its FairDropout layers. Pass its stock export instead (erm_checkpoint={str(Path(folder) / 'exported')!r}, "
        "written with export_model=True), or use --method fairdropout_dfr for DFR on a FairDropout model."
    )
