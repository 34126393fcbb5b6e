"""The shared head training of the last-layer methods: a linear head `z = W h + b` trained on cached penultimate
features (`train_linear_head`), and written into the model's classifier (`write_head`).

GradTune fine-tunes the ERM head with it (Kenfack et al., "GradTune: Last-Layer Fine-Tuning for Group Robustness
without Group Annotation": 500 epochs, class-balanced sampling, SGD lr 3e-3 cosine for images / AdamW lr 1e-5
linear for text, weight decay 1e-4); DFR uses it with `dfr_head="sgd"`. Pure functions: no trainer needed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .scores import HEAD_STREAM, seeded_generator, worst_class_accuracy


@dataclass
class HeadTrainingResult:
    weight: torch.Tensor
    bias: torch.Tensor | None
    history: list[dict]
    best_epoch: int
    seconds: float


def _schedule(kind: str, total_steps: int) -> Callable[[int], float]:
    if kind == "cosine":
        return lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps))
    if kind == "linear":
        return lambda step: 1 - step / total_steps
    return lambda step: 1.0


def train_linear_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    epochs: int = 500,
    batch_size: int = 32,
    optimizer: str = "sgd",
    learning_rate: float = 3e-3,
    lr_scheduler: str = "cosine",
    weight_decay: float = 1e-4,
    momentum: float = 0.9,
    class_balanced: bool = True,
    seed: int = 0,
    eval_features: torch.Tensor | None = None,
    eval_labels: torch.Tensor | None = None,
    eval_every: int = 0,
    keep_best: bool = False,
) -> HeadTrainingResult:
    """Train a linear head `z = W h + b` on cached features with softmax cross-entropy, on CPU.

    Each epoch draws `len(features)` examples (class-balanced: with replacement, probability 1/count of the
    class, as a weighted sampler; otherwise a permutation) in batches of `batch_size`; every epoch's draw is made
    up front from one seeded generator. The gradient of the mean loss is written out in closed form
    (G = (softmax(z) - Y) / B; dW = G^T H, db = sum G) and applied in place with PyTorch's update rules: SGD with
    momentum or AdamW, weight decay on W only, the learning rate following `lr_scheduler` per step (cosine or
    linear decay to 0). No autograd and no optimizer object: a step is a dozen small array operations, so 500
    epochs over 500 examples take well under a second.

    With `eval_features`/`eval_labels`, the head's worst-class accuracy on them is recorded every `eval_every`
    epochs (and at the end); `keep_best` returns the head with the best one (ties: the later epoch) instead of
    the last.
    """
    start = time.perf_counter()
    features = torch.as_tensor(features, dtype=torch.float32).cpu()
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    if features.ndim != 2 or len(features) != len(labels) or len(labels) == 0:
        raise ValueError(
            f"Expected features (N, D) and labels (N,), N > 0; got {tuple(features.shape)}, {tuple(labels.shape)}."
        )
    num_classes, dim = weight.shape
    if features.shape[1] != dim:
        raise ValueError(f"Features have {features.shape[1]} dimensions, the head expects {dim}.")
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer={optimizer!r}: expected 'sgd' or 'adamw'.")
    n = len(labels)
    batch_size = min(batch_size, n)
    steps_per_epoch = math.ceil(n / batch_size)
    generator = seeded_generator(seed, HEAD_STREAM)
    if class_balanced:
        counts = torch.bincount(labels, minlength=num_classes).double()
        probabilities = (1.0 / counts.clamp_min(1))[labels]
        draws = torch.multinomial(probabilities, epochs * n, replacement=True, generator=generator).view(epochs, n)
    else:
        draws = torch.stack([torch.randperm(n, generator=generator) for _ in range(epochs)])
    targets = torch.nn.functional.one_hot(labels, num_classes).float()
    factor = _schedule(lr_scheduler, epochs * steps_per_epoch)
    rates = [learning_rate * factor(step) for step in range(epochs * steps_per_epoch)]

    evaluate = eval_features is not None and eval_labels is not None and len(eval_labels) > 0
    if evaluate:
        eval_features = torch.as_tensor(eval_features, dtype=torch.float32).cpu()
        eval_labels = torch.as_tensor(eval_labels, dtype=torch.long).cpu()

    # numpy for the loop: a step is a dozen operations on (B, D) arrays, where numpy's per-call overhead is a
    # fraction of torch's; one BLAS thread, since tiny products only lose to thread synchronisation
    x, y = features.numpy(), targets.numpy()
    W = weight.detach().to("cpu", torch.float32).numpy().copy()
    has_bias = bias is not None
    b = bias.detach().to("cpu", torch.float32).numpy().copy() if has_bias else np.zeros(num_classes, np.float32)
    eval_x = eval_features.numpy() if evaluate else None
    eval_y = eval_labels if evaluate else None
    # SGD: momentum buffers; AdamW: first and second moments
    moment_w, moment_b, second_w, second_b = np.zeros_like(W), np.zeros_like(b), np.zeros_like(W), np.zeros_like(b)
    beta1, beta2, eps = 0.9, 0.999, 1e-8

    def worst_class() -> float:
        return worst_class_accuracy(torch.from_numpy(eval_x @ W.T + b), eval_y)

    history: list[dict] = []
    best = (-1.0, 0, W.copy(), b.copy())
    with _single_blas_thread():
        if evaluate:
            history.append({"epoch": 0, "worst_class_accuracy": worst_class()})
            best = (history[-1]["worst_class_accuracy"], 0, W.copy(), b.copy())
        step = 0
        for epoch in range(epochs):
            order = draws[epoch].numpy()
            H, Y = x[order], y[order]
            for first in range(0, n, batch_size):
                h = H[first : first + batch_size]
                z = h @ W.T
                z += b
                z -= z.max(1, keepdims=True)
                np.exp(z, out=z)
                z /= z.sum(1, keepdims=True)
                z -= Y[first : first + batch_size]
                z /= len(h)  # the gradient of the mean loss w.r.t. the logits
                grad_w, grad_b = z.T @ h, z.sum(0)
                lr = rates[step]
                step += 1
                if optimizer == "sgd":  # PyTorch's SGD: buf = m * buf + (g + wd * W); W -= lr * buf
                    grad_w += weight_decay * W
                    moment_w *= momentum
                    moment_w += grad_w
                    W -= lr * moment_w
                    if has_bias:
                        moment_b *= momentum
                        moment_b += grad_b
                        b -= lr * moment_b
                else:  # PyTorch's AdamW (decoupled weight decay, bias-corrected moments)
                    W *= 1 - lr * weight_decay
                    correction1, correction2 = 1 - beta1**step, 1 - beta2**step
                    pairs = [(W, grad_w, moment_w, second_w)] + ([(b, grad_b, moment_b, second_b)] if has_bias else [])
                    for param, grad, first_moment, second_moment in pairs:
                        first_moment *= beta1
                        first_moment += (1 - beta1) * grad
                        second_moment *= beta2
                        second_moment += (1 - beta2) * grad * grad
                        param -= (lr / correction1) * first_moment / (np.sqrt(second_moment / correction2) + eps)
            if evaluate and ((eval_every and (epoch + 1) % eval_every == 0) or epoch + 1 == epochs):
                accuracy = worst_class()
                history.append({"epoch": epoch + 1, "worst_class_accuracy": accuracy})
                if accuracy >= best[0]:
                    best = (accuracy, epoch + 1, W.copy(), b.copy())
    best_epoch = epochs
    if keep_best and evaluate:
        _, best_epoch, W, b = best
    return HeadTrainingResult(torch.from_numpy(W), torch.from_numpy(b) if has_bias else None, history, best_epoch,
                              time.perf_counter() - start)


def _single_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # threadpoolctl comes with scikit-learn; without it, leave BLAS as it is
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def write_head(classifier: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Copy a trained head into the model's classifier layer (in place: the model saves and pushes as usual)."""
    if tuple(weight.shape) != tuple(classifier.weight.shape):
        raise ValueError(
            f"Head weight {tuple(weight.shape)} does not fit the classifier {tuple(classifier.weight.shape)}."
        )
    with torch.no_grad():
        classifier.weight.copy_(weight.to(classifier.weight))
        if classifier.bias is not None:
            classifier.bias.copy_((bias if bias is not None else torch.zeros(len(weight))).to(classifier.bias))
