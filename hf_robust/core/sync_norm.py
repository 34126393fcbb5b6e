"""BatchNorm statistics over all processes, on CPU (gloo) as on GPU.

N processes of a data-parallel run each see 1/N of the global batch. A BatchNorm layer that normalises with its
own process's statistics is not the layer of a one-process run at the same global batch, and its running
statistics drift apart between processes. `torch.nn.SyncBatchNorm` fixes that on GPUs only; this module does it
with `torch.distributed.nn.functional.all_reduce` (differentiable), so the gradients of the shared statistics
flow back to every process's inputs, as in one process.

`sync_batch_norm(model)` switches the plain `nn.BatchNorm1d/2d/3d` layers of a model to the synced subclasses
in place (same parameters and buffers, same state-dict keys: a saved model loads into the stock class). Outside
training, or in a single process, they are the stock layers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _SyncedBatchNorm:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats and _distributed()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, channels] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() // channels], dtype=x.dtype, device=x.device)
        totals = all_reduce(torch.cat([x.sum(dims), count]))  # sums over every process's examples
        n = totals[-1]
        mean = totals[:channels] / n
        centered = x - mean.view(shape)
        var = all_reduce(centered.pow(2).sum(dims)) / n  # two passes, as precise as one process's
        y = centered * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
            unbiased = var.detach() * n / (n - 1).clamp_min(1)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        return y


class SyncedBatchNorm1d(_SyncedBatchNorm, nn.BatchNorm1d):
    pass


class SyncedBatchNorm2d(_SyncedBatchNorm, nn.BatchNorm2d):
    pass


class SyncedBatchNorm3d(_SyncedBatchNorm, nn.BatchNorm3d):
    pass


_SYNCED = {nn.BatchNorm1d: SyncedBatchNorm1d, nn.BatchNorm2d: SyncedBatchNorm2d, nn.BatchNorm3d: SyncedBatchNorm3d}


def sync_batch_norm(model: nn.Module) -> list[str]:
    """Switch the model's plain BatchNorm layers to process-synced ones (in place); returns the names of the
    BatchNorm-like layers left as they are (subclasses such as timm's BatchNormAct2d, which fuse more)."""
    others = []
    for name, module in model.named_modules():
        synced = _SYNCED.get(type(module))
        if synced is not None:
            module.__class__ = synced
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
            module, (_SyncedBatchNorm, nn.SyncBatchNorm)
        ):
            others.append(name)
    return others
