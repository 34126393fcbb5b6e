"""BatchNorm layers kept on their running statistics while the rest of a model trains (MaskTune's optional
fine-tuning with frozen normalisation statistics, `finetune_freeze_norm_statistics`)."""

from __future__ import annotations

import contextlib

from torch import nn


@contextlib.contextmanager
def frozen_norm_statistics(model: nn.Module):
    """Within the block, BatchNorm layers of `model` stay in evaluation mode even when the Trainer calls
    `model.train()`: they normalise with, and keep, their running statistics (their affine weights still train).
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in layers]

    def eval_only(self, mode: bool = True):
        return nn.Module.train(self, False)

    for layer in layers:
        layer.train = eval_only.__get__(layer)
        layer.training = False
    try:
        yield layers
    finally:
        for layer, mode in zip(layers, modes):
            del layer.train
            layer.training = mode
