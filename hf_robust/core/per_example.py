"""The distributed per-example pass: a function of the model applied to every example of a dataset, sharded over
processes and gathered, in `example_idx` order, on every process — so N processes give exactly the result of one.
Per-example outputs of a method's stages (attributions, scores, features) and the health check's predictions are
computed with it. `PerExamplePass` is a mixin of `RobustTrainer`."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader, SequentialSampler


class PerExamplePass:
    """`compute_per_example` and the evaluation-mode context it runs in."""

    def compute_per_example(
        self,
        dataset: Dataset,
        fn: Callable[[nn.Module, dict], dict[str, torch.Tensor]],
        description: str = "Computing",
        batch_size: int | None = None,
        collator=None,
    ) -> dict[str, torch.Tensor]:
        """Apply `fn(model, batch) -> {name: (B, ...) tensor}` to every example, sharded over processes.

        Returns, on every process, each output concatenated over the whole dataset and ordered by `example_idx`
        (plus `example_idx` itself): exactly what one process computes. Outputs with more than one dimension are
        padded with zeros to the longest across processes along dim 1 (e.g. token-level outputs).
        `fn` receives the unwrapped model (no DDP) in eval mode (its mode is restored afterwards; gradients stay
        enabled for functions that need them, e.g. gradient-based attributions) and a batch already on the device.
        """
        loader = DataLoader(
            dataset,
            batch_size=batch_size or self.args.per_device_eval_batch_size,
            sampler=SequentialSampler(dataset),
            collate_fn=collator or self.eval_collator,
            num_workers=self.args.dataloader_num_workers,
        )
        loader = self.accelerator.prepare_data_loader(loader)
        model = self.accelerator.unwrap_model(self.model).to(self.args.device)
        chunks: dict[str, list[torch.Tensor]] = defaultdict(list)
        start = time.perf_counter()
        from tqdm.auto import tqdm

        progress = tqdm(loader, desc=description, disable=not self.is_local_process_zero() or self.args.disable_tqdm)
        with self.eval_mode(model):
            for batch in progress:
                self._gather_batch(chunks, fn(model, self._prepare_inputs(batch)), batch)
        outputs = {}
        for key, values in chunks.items():
            width = max(v.shape[1] for v in values) if values[0].ndim > 1 else None
            if width is not None:
                values = [torch.nn.functional.pad(v, (0, 0) * (v.ndim - 2) + (0, width - v.shape[1])) for v in values]
            outputs[key] = torch.cat(values)
        order = torch.argsort(outputs["example_idx"], stable=True)
        outputs = {k: v[order] for k, v in outputs.items()}
        keep = torch.ones(len(order), dtype=torch.bool)
        keep[1:] = outputs["example_idx"][1:] != outputs["example_idx"][:-1]  # duplicates padded in by sharding
        outputs = {k: v[keep] for k, v in outputs.items()}
        if len(outputs["example_idx"]) != len(dataset):
            raise RuntimeError(
                f"{description}: gathered {len(outputs['example_idx'])} examples for a dataset of {len(dataset)}."
            )
        if self.state is not None and self.is_world_process_zero():
            elapsed = time.perf_counter() - start
            self.log({f"{description.lower().replace(' ', '_')}_seconds": round(elapsed, 3)})
        return outputs

    def _gather_batch(self, chunks: dict, result: dict, batch: dict) -> None:
        result = dict(result)
        result["example_idx"] = batch["example_idx"].to(self.args.device)
        result = {k: self.accelerator.pad_across_processes(v, dim=1) if v.ndim > 1 else v for k, v in result.items()}
        for key, value in self.accelerator.gather_for_metrics(result).items():
            chunks[key].append(value.detach().cpu())

    @contextlib.contextmanager
    def eval_mode(self, model: nn.Module):
        """Temporarily put `model` in eval mode, restoring its previous mode."""
        was_training = model.training
        model.eval()
        try:
            yield model
        finally:
            model.train(was_training)


def per_example_cross_entropy(trainer, model, inputs) -> tuple[torch.Tensor, object]:
    """(the cross-entropy of every example of a training batch, from the model's logits and with the config's
    label smoothing, whatever loss the model computes itself; the model's outputs): for losses that weight examples
    or groups."""
    model_inputs = trainer.model_inputs(inputs)
    labels = model_inputs.pop("labels")
    outputs = model(**model_inputs)
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    losses = nn.functional.cross_entropy(logits.float(), labels, reduction="none",
                                         label_smoothing=trainer.args.label_smoothing_factor)
    return losses, outputs
