"""Last-layer retraining on cached penultimate features: the machinery GradTune, DFR and FairDropout-DFR share.

A model trained by ERM learns the core features but weighs the spurious ones too much in its last layer
(Kirichenko et al., "Last Layer Re-Training is Sufficient for Robustness to Spurious Correlations", ICLR
2023). Re-weighing them takes only the last linear layer, trained on a small well-chosen held-out set, with the
backbone frozen. The stages, each written atomically into `output_dir/stages/<name>/` (so a resumed run skips
them):

- `heldout`: a seeded `heldout_fraction` of the `heldout_split` evaluation split (by `example_idx`); the rest is
  the model-selection half, judged by worst-CLASS accuracy only (no group labels).
- `scores`: ONE inference pass over that split (backbone in eval mode, `compute_per_example`: sharded over
  processes, gathered by `example_idx`) that caches the classifier's input `h` (`adapter.penultimate`), the
  logits `z`, labels, groups, and the per-example norm of the cross-entropy gradient w.r.t. the last layer
  (W, b), in closed form: for `z = W h + b`, dL/dW = (p - e_y) h^T and dL/db = p - e_y, so
  `||grad|| = ||softmax(z) - onehot(y)|| * sqrt(||h||^2 + 1)` (without a bias: `* ||h||`). No backward pass.
- `select`: the fine-tuning set(s), as example indices: GradTune's top-k + norm-proportional draw
  (`select_by_gradient_norm`) or DFR's group-/class-balanced subsets (`balanced_subsets`), seeded.
- `last_layer`: the head trained on the cached features of the fine-tuning set (`train_linear_head`: fully
  vectorised on CPU, class-balanced sampling, 500 epochs, SGD lr 3e-3 cosine for images / AdamW lr 1e-5 linear
  for text, weight decay 1e-4, from the ERM head or from zero with `reset_last_layer`), or DFR's L1 logistic
  regression (`fit_logistic_l1_head`); then written into `adapter.classifier`, so the model saves, evaluates
  and pushes as a normal model. Every process computes the same head from the same gathered features.

Reusing the stages in another trainer (e.g. FairDropout-DFR = FairDropout training, then DFR)::

    from hf_robust.methods.dfr.config import DFRConfig            # LastLayerArguments + DFR's fields
    from hf_robust.methods.last_layer.mixin import LastLayerMixin

    @dataclass
    class FairDropoutDFRConfig(DFRConfig, FairDropoutTrainingConfig): ...

    class FairDropoutDFRTrainer(LastLayerMixin, FairDropoutTrainer):   # the mixin FIRST in the bases
        def __init__(self, model, args, *pargs, heldout_dataset=None, **kwargs):
            super().__init__(model, args, *pargs, **kwargs)
            self.setup_last_layer(heldout_dataset)       # checks the held-out split before any training

        def stages(self):
            return super().stages() + self.dfr_stages()   # [..., heldout, scores, select, last_layer]

The mixin adds the held-out / selection summary to `results()` and the gradient-norm plot to `write_report()`.

`dfr_stages()` reads the DFR fields of the config (`dfr_balance`, `dfr_head`, `dfr_num_subsets`,
`dfr_regularization`); `gradtune_stages()` reads GradTune's (`finetune_set_size`, `top_k`);
`last_layer_stages(select, fit_head)` takes any selection rule `select(LastLayerData) -> (R, n) example_idx`
and head fitter. `erm_baseline_stage()` (RobustTrainer) is the `erm` stage of GradTune and DFR (trains ERM or loads `erm_checkpoint`,
then records the "ERM" baseline). The first stage of the host trainer must leave the model to retrain in
`self.model`, and, when the host's own stages do not restore the model on resume, their `load` must.

The pure functions (`split_heldout`, `last_layer_gradient_norms`, `select_by_gradient_norm`,
`balanced_subsets`, `train_linear_head`, `fit_logistic_l1`, `write_head`) work on tensors and need no trainer.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...data.core import DataValidationError, group_names, label_names
from ...core.trainer import RunSetupError, Stage
from .config import LastLayerArguments

logger = logging.getLogger(__name__)

# offsets that give each seeded step its own random stream from the one `seed`
_HELDOUT_STREAM, _SELECT_STREAM, _HEAD_STREAM = 1_000_003, 2_000_003, 3_000_017


def _generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 7_919 + stream)


# ----------------------------------------------------------------------------- pure functions
def split_heldout(example_idx: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of a split's example indices: (held-out, model-selection), each sorted.

    The held-out part has `round(fraction * N)` examples (at least 1). It depends only on the set of indices and
    the seed, not on the row order.
    """
    ordered = torch.sort(torch.as_tensor(example_idx, dtype=torch.long)).values
    size = min(len(ordered), max(1, int(round(fraction * len(ordered)))))
    perm = torch.randperm(len(ordered), generator=_generator(seed, _HELDOUT_STREAM))
    heldout = torch.sort(ordered[perm[:size]]).values
    selection = torch.sort(ordered[perm[size:]]).values
    return heldout, selection


def last_layer_gradient_norms(
    features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, bias: bool = True
) -> torch.Tensor:
    """Per-example L2 norm of the cross-entropy gradient w.r.t. a linear head (W, b), in closed form.

    For `z = W h + b`: dL/dW = (p - e_y) h^T and dL/db = p - e_y, so the norm over (W, b) is
    `||p - e_y|| * sqrt(||h||^2 + 1)` (`||p - e_y|| * ||h||` without a bias). Computed in float64, with
    `p_y - 1 = -sum_{c != y} p_c` so that confident examples keep a non-zero, exact norm.
    """
    if features.ndim != 2 or logits.ndim != 2 or len(features) != len(logits) or len(labels) != len(logits):
        raise ValueError(
            f"Expected features (N, D), logits (N, K) and labels (N,); got {tuple(features.shape)}, "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}."
        )
    labels = labels.to(device=logits.device, dtype=torch.long)
    probs = torch.softmax(logits.double(), dim=-1)
    target = torch.nn.functional.one_hot(labels, logits.shape[-1]).bool()
    residual = torch.where(target, -(probs.masked_fill(target, 0).sum(-1, keepdim=True)), probs)
    scale = features.double().pow(2).sum(-1) + (1.0 if bias else 0.0)
    return residual.norm(dim=-1) * scale.sqrt()


def select_by_gradient_norm(
    norms: torch.Tensor, size: int = 500, top_k: int | None = None, seed: int = 0
) -> torch.Tensor:
    """GradTune's fine-tuning set: positions (sorted) of the `top_k` largest norms, plus `size - top_k` drawn
    without replacement from the others with probability proportional to their norm.

    `size` is capped by the number of examples and `top_k` (default `round(0.8 * size)`) by `size`. The draw is
    successive sampling (each next pick proportional to the norm among those left), done in one pass with
    Efraimidis-Spirakis keys `log(u) / norm`; zero norms come last, in seeded random order.
    """
    norms = torch.as_tensor(norms, dtype=torch.float64).flatten().cpu()
    if (norms < 0).any() or not torch.isfinite(norms).all():
        raise ValueError("Gradient norms must be finite and non-negative.")
    size = min(int(size), len(norms))
    top_k = min(int(round(0.8 * size)) if top_k is None else int(top_k), size)
    if size < 0 or top_k < 0:
        raise ValueError(f"size={size} and top_k={top_k} must be >= 0.")
    order = torch.sort(norms, descending=True, stable=True).indices
    top, rest = order[:top_k], order[top_k:]
    generator = _generator(seed, _SELECT_STREAM)
    u = torch.rand(len(rest), generator=generator, dtype=torch.float64).clamp_min(1e-300)
    tie_break = torch.rand(len(rest), generator=generator, dtype=torch.float64)
    weights = norms[rest]
    positive = (weights > 0).nonzero().flatten()
    zero = (weights == 0).nonzero().flatten()
    keys = u[positive].log() / weights[positive]
    ranked = torch.cat([
        positive[torch.sort(keys, descending=True, stable=True).indices],
        zero[torch.argsort(tie_break[zero])],  # zero norms: after every positive one, in seeded random order
    ])
    drawn = rest[ranked[: size - top_k]]
    return torch.sort(torch.cat([top, drawn])).values


def balanced_subsets(keys: torch.Tensor, num_subsets: int = 1, seed: int = 0) -> torch.Tensor:
    """DFR's balanced subsets: (num_subsets, n_min * K) positions (each row sorted), where each of the K present
    keys (groups or classes) contributes `n_min` = the smallest key count examples, drawn without replacement."""
    keys = torch.as_tensor(keys, dtype=torch.long).cpu()
    if (keys < 0).any():
        raise DataValidationError("balanced_subsets got keys of -1 (unknown group): every example needs a key.")
    present = torch.unique(keys)
    members = [torch.nonzero(keys == k).flatten() for k in present.tolist()]
    n_min = min(len(m) for m in members)
    generator = _generator(seed, _SELECT_STREAM)
    rows = []
    for _ in range(num_subsets):
        chosen = [m[torch.randperm(len(m), generator=generator)[:n_min]] for m in members]
        rows.append(torch.sort(torch.cat(chosen)).values)
    return torch.stack(rows)


def worst_class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    correct = (logits.argmax(-1) == labels).double()
    return min(correct[labels == c].mean().item() for c in torch.unique(labels).tolist())


def worst_group_accuracy(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> float:
    correct = (logits.argmax(-1) == labels).double()
    return min(correct[groups == g].mean().item() for g in torch.unique(groups).tolist())


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
    generator = _generator(seed, _HEAD_STREAM)
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


def fit_logistic_l1(
    features: torch.Tensor, labels: torch.Tensor, subsets: torch.Tensor, C: float, num_classes: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """DFR's head: features standardised (statistics of all `features`), one L1-regularised logistic regression
    (liblinear, inverse strength `C`) per row of `subsets`, coefficients averaged, the standardisation folded
    back in. Returns (weight (K, D), bias (K,)) for `z = W h + b`; with two classes the single logit `w.h + c` is
    split as `(-(w.h + c) / 2, (w.h + c) / 2)`, which gives the same probabilities and predictions; with more,
    one-vs-rest regressions, whose argmax is the prediction."""
    from sklearn.linear_model import LogisticRegression

    x = torch.as_tensor(features, dtype=torch.float64).cpu().numpy()
    y = torch.as_tensor(labels).cpu().numpy()
    mean, std = x.mean(0), x.std(0)
    # constant features, and features whose spread is float32 rounding noise (next to their own size or to the
    # widest feature's spread), are not scaled up: 1/std would blow the folded-back head up to ~1e8
    std[(std <= 1e-6 * np.abs(mean)) | (std <= 1e-6 * std.max(initial=0.0))] = 1.0
    x = (x - mean) / std
    penalty = {"l1_ratio": 1.0} if _sklearn_l1_ratio() else {"penalty": "l1"}
    coefs, intercepts = [], []
    for row in torch.as_tensor(subsets).reshape(-1, subsets.shape[-1]).tolist():
        xs, ys = x[row], y[row]
        # liblinear is binary: more classes are one-vs-rest, as DFR's (older) scikit-learn did implicitly
        tasks = [(0, ys == 1)] if num_classes == 2 else [(c, ys == c) for c in range(num_classes)]
        coef = np.zeros((len(tasks), x.shape[1]))
        intercept = np.zeros(len(tasks))
        for i, target in tasks:
            if target.all() or not target.any():  # a class absent from the subset keeps a zero row
                continue
            model = LogisticRegression(C=C, solver="liblinear", random_state=seed, **penalty).fit(xs, target)
            coef[i], intercept[i] = model.coef_[0], model.intercept_[0]
        coefs.append(coef)
        intercepts.append(intercept)
    coef, intercept = np.mean(coefs, 0) / std, np.mean(intercepts, 0)
    intercept = intercept - coef @ mean
    if num_classes == 2:
        coef = np.concatenate([-coef / 2, coef / 2])
        intercept = np.concatenate([-intercept / 2, intercept / 2])
    return torch.as_tensor(coef, dtype=torch.float32), torch.as_tensor(intercept, dtype=torch.float32)


def _sklearn_l1_ratio() -> bool:
    """scikit-learn >= 1.8 spells an L1 penalty `l1_ratio=1` (`penalty=` is deprecated)."""
    import sklearn

    major, minor = (int(part) for part in sklearn.__version__.split(".")[:2])
    return (major, minor) >= (1, 8)


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


# ----------------------------------------------------------------------------- cached data
@dataclass
class LastLayerData:
    """The `scores` stage's outputs for the whole held-out split, ordered by `example_idx`."""

    example_idx: torch.Tensor
    features: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    groups: torch.Tensor
    norms: torch.Tensor

    def rows(self, example_idx: torch.Tensor) -> torch.Tensor:
        """Row positions of the given example indices."""
        example_idx = torch.as_tensor(example_idx, dtype=torch.long)
        rows = torch.searchsorted(self.example_idx, example_idx).clamp_max(len(self.example_idx) - 1)
        if not torch.equal(self.example_idx[rows], example_idx):
            missing = example_idx[self.example_idx[rows] != example_idx][:5].tolist()
            raise KeyError(f"example_idx {missing} are not in the cached held-out split.")
        return rows

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ("example_idx", "features", "logits", "labels", "groups", "norms")}


# ----------------------------------------------------------------------------- the stages, for a RobustTrainer
class LastLayerMixin:
    """Last-layer stages for a `RobustTrainer` subclass whose config mixes in `LastLayerArguments` (module
    docstring). Put it before the trainer class in the bases and call `setup_last_layer()` in `__init__`."""

    def results(self) -> dict:
        return {**super().results(), **self.last_layer_results()}

    def write_report(self, output_dir: str | None = None) -> None:
        if self.is_world_process_zero() and self.args.save_plots:
            self.plot_last_layer(Path(output_dir or self.args.output_dir))
        super().write_report(output_dir)

    def setup_last_layer(self, heldout_dataset=None) -> None:
        """Find and check the held-out split, and compute its seeded split, before any training."""
        if not isinstance(self.args, LastLayerArguments):
            raise TypeError(
                f"{type(self).__name__} needs a config that mixes in LastLayerArguments, got "
                f"{type(self.args).__name__}."
            )
        self.adapter.require("linear_head")  # the head is read and rewritten as one linear layer
        if self.args.erm_checkpoint is not None and not Path(self.args.erm_checkpoint).is_dir():
            raise FileNotFoundError(f"erm_checkpoint={self.args.erm_checkpoint!r} is not a folder of a saved model.")
        split = self.args.heldout_split
        if heldout_dataset is None:
            if isinstance(self.eval_dataset, dict):
                if split not in self.eval_dataset:
                    raise DataValidationError(
                        f"{self._name} draws its held-out set from the eval split {split!r}, but eval_dataset has "
                        f"{sorted(self.eval_dataset)}: pass eval_dataset={{{split!r}: ...}}, set heldout_split to one "
                        "of them, or pass heldout_dataset=."
                    )
                heldout_dataset = self.eval_dataset[split]
            elif self.eval_dataset is not None:
                # one unnamed Dataset may be the test split: training the head on it would inflate every number
                # reported on it, so the held-out split must be named
                raise DataValidationError(
                    f"{self._name} retrains the last layer on half of the held-out split {split!r}, but eval_dataset "
                    f"is one unnamed {type(self.eval_dataset).__name__}, so which split it is is unknown: pass "
                    f"eval_dataset={{{split!r}: <validation data>, ...}} or heldout_dataset=<validation data>."
                )
            else:
                raise DataValidationError(
                    f"{self._name} needs held-out data (half of a validation split) to retrain the last layer: pass "
                    f"eval_dataset={{{split!r}: ...}} or heldout_dataset=."
                )
        else:
            from ...data.core import validate_group_dataset

            num_labels = self.adapter.linear_head.out_features
            kind = validate_group_dataset(heldout_dataset, "heldout_dataset", num_labels=num_labels)
            if kind != self.input_kind:
                raise DataValidationError(
                    f"heldout_dataset has {kind} inputs; the training data has {self.input_kind} inputs."
                )
        self.heldout_dataset = heldout_dataset
        self.heldout_idx, self.selection_idx = split_heldout(
            torch.as_tensor(heldout_dataset["example_idx"]), self.args.heldout_fraction, self.args.seed
        )
        labels = np.asarray(heldout_dataset["label"])
        position = {idx: i for i, idx in enumerate(heldout_dataset["example_idx"])}
        held_labels = labels[[position[i] for i in self.heldout_idx.tolist()]]
        if len(np.unique(held_labels)) < 2:
            raise DataValidationError(
                f"The held-out part of {split!r} ({len(held_labels)} examples) holds only class(es) "
                f"{np.unique(held_labels).tolist()}: the last layer needs examples of at least two classes. Use a "
                "larger split or a larger heldout_fraction."
            )
        if getattr(self.args, "dfr_balance", None) == "group" and (np.asarray(heldout_dataset["group"]) < 0).any():
            raise DataValidationError(
                "dfr_balance='group' balances the held-out set by group, but the held-out split has examples with "
                "an unknown group (-1). Use dfr_balance='class' (no group labels needed), or add the attribute "
                "with as_group_dataset(..., attribute_column=...)."
            )
        self.last_layer_data: LastLayerData | None = None
        self.finetune_sets: torch.Tensor | None = None
        self.last_layer_info: dict = {}

    def health_dataset(self):
        """The model-selection half of the held-out split when the health check runs on that split: the head was
        trained on the other half (and on all of it when heldout_fraction is 1)."""
        if self.args.health_split == self.args.heldout_split and len(self.selection_idx):
            position = {idx: i for i, idx in enumerate(self.heldout_dataset["example_idx"])}
            return self.heldout_dataset.select([position[i] for i in self.selection_idx.tolist()])
        return super().health_dataset()

    # -- settings that depend on the input kind (images: the vision recipe; text: the language recipe)
    def last_layer_settings(self) -> dict:
        text = self.input_kind != "image"
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

    # -- stage lists
    def last_layer_stages(
        self,
        select: Callable[[LastLayerData], torch.Tensor],
        fit_head: Callable[[LastLayerData, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None, dict]] | None = None,
    ) -> list[Stage]:
        """`heldout`, `scores`, `select` (`select(data) -> (R, n) example_idx`) and `last_layer`
        (`fit_head(data, finetune_sets) -> (weight, bias, info)`, default `fit_sgd_head`)."""
        self._select_rule = select
        self._fit_head = fit_head or self.fit_sgd_head
        return [
            Stage("heldout", self._run_heldout, self._load_heldout),
            Stage("scores", self._run_scores, self._load_scores),
            Stage("select", self._run_select, self._load_select),
            Stage("last_layer", self._run_last_layer, self._load_last_layer),
        ]

    def gradtune_stages(self) -> list[Stage]:
        return self.last_layer_stages(self.select_top_gradient_norms)

    def dfr_stages(self) -> list[Stage]:
        head = self.fit_logistic_l1_head if self.args.dfr_head == "logistic_l1" else self.fit_sgd_head
        return self.last_layer_stages(self.select_balanced, head)

    # -- heldout
    def _run_heldout(self, stage_dir: Path, resume: bool) -> None:
        split = {"heldout_idx": self.heldout_idx, "selection_idx": self.selection_idx}
        self.save_stage_tensors(stage_dir, split, "split")

    def _load_heldout(self, stage_dir: Path) -> None:
        saved = self.load_stage_tensors(stage_dir, "split")
        if not torch.equal(saved["heldout_idx"], self.heldout_idx):
            raise RunSetupError(
                f"{stage_dir} holds a different held-out split than this run computes (another dataset, "
                "heldout_fraction or seed): resume with the same settings, or use a new output_dir."
            )
        self.selection_idx = saved["selection_idx"]

    # -- scores
    def _score_batch(self, model, batch: dict) -> dict[str, torch.Tensor]:
        inputs = {k: v for k, v in self.model_inputs(batch).items() if k != "labels"}
        with torch.no_grad():
            features, logits = self.adapter.penultimate(inputs)
        labels = batch["labels"]
        norms = last_layer_gradient_norms(features, logits, labels, bias=self.adapter.linear_head.bias is not None)
        return {"features": features.float(), "logits": logits.float(), "norms": norms, "labels": labels,
                "groups": batch["group"]}

    def compute_last_layer_data(self, dataset=None) -> LastLayerData:
        """One eval-mode pass over the held-out split (all processes, gathered): features, logits, norms."""
        outputs = self.compute_per_example(
            dataset if dataset is not None else self.heldout_dataset, self._score_batch, description="Scoring held-out"
        )
        return LastLayerData(outputs["example_idx"].long(), outputs["features"], outputs["logits"],
                             outputs["labels"].long(), outputs["groups"].long(), outputs["norms"].double())

    def _run_scores(self, stage_dir: Path, resume: bool) -> None:
        self.last_layer_data = self.compute_last_layer_data()
        self.save_stage_tensors(stage_dir, self.last_layer_data.tensors(), "scores")

    def _load_scores(self, stage_dir: Path) -> None:
        self.last_layer_data = LastLayerData(**self.load_stage_tensors(stage_dir, "scores"))

    # -- select
    def select_top_gradient_norms(self, data: LastLayerData) -> torch.Tensor:
        """GradTune: the top-k + norm-proportional set among the held-out examples, as (1, M') example_idx."""
        rows = data.rows(self.heldout_idx)
        chosen = select_by_gradient_norm(data.norms[rows], self.args.finetune_set_size, self.args.top_k, self.args.seed)
        return self.heldout_idx[chosen][None]

    def select_balanced(self, data: LastLayerData) -> torch.Tensor:
        """DFR: `dfr_num_subsets` group- (or class-) balanced subsets of the held-out examples, (R, n) example_idx."""
        rows = data.rows(self.heldout_idx)
        keys = data.groups[rows] if self.args.dfr_balance == "group" else data.labels[rows]
        if (keys < 0).any():
            raise DataValidationError(
                "dfr_balance='group' needs the group of every held-out example, and some are -1 (unknown). Use "
                "dfr_balance='class' for data without group labels."
            )
        positions = balanced_subsets(keys, self.args.dfr_num_subsets, self.args.seed)
        return self.heldout_idx[positions]

    def _run_select(self, stage_dir: Path, resume: bool) -> None:
        self.finetune_sets = torch.as_tensor(self._select_rule(self.last_layer_data), dtype=torch.long)
        if self.finetune_sets.ndim == 1:
            self.finetune_sets = self.finetune_sets[None]
        self.save_stage_tensors(stage_dir, {"finetune_sets": self.finetune_sets}, "selection")
        self.save_stage_json(stage_dir, "composition", self.selection_composition())

    def _load_select(self, stage_dir: Path) -> None:
        self.finetune_sets = self.load_stage_tensors(stage_dir, "selection")["finetune_sets"]

    def selected_idx(self) -> torch.Tensor:
        """Every example index in the fine-tuning set(s), sorted, once."""
        return torch.unique(self.finetune_sets)

    def selection_composition(self) -> dict:
        """Per group (by name; per class where groups are unknown) of the held-out half: how many examples, how
        many selected, and their mean gradient norm — for the report, never for training."""
        data = self.last_layer_data
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

    # -- last layer
    def fit_sgd_head(self, data: LastLayerData, finetune_sets: torch.Tensor):
        """The shared head trainer on each fine-tuning set (heads averaged over sets), from the ERM head or zero."""
        classifier = self.adapter.linear_head
        weight = classifier.weight.detach().cpu().float()
        bias = classifier.bias.detach().cpu().float() if classifier.bias is not None else None
        if self.args.reset_last_layer:
            weight = torch.zeros_like(weight)
            bias = torch.zeros_like(bias) if bias is not None else None
        settings = self.last_layer_settings()
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

    def fit_logistic_l1_head(self, data: LastLayerData, finetune_sets: torch.Tensor):
        """DFR's head: L1 logistic regression on standardised features, averaged over the subsets, with the
        inverse regularisation C chosen on the model-selection half (worst-group accuracy with
        `dfr_balance='group'`, worst-class accuracy otherwise)."""
        heldout = data.rows(self.heldout_idx)
        num_classes = self.adapter.linear_head.out_features
        # the standardisation statistics are the held-out half's; subsets index into it
        subsets = torch.searchsorted(heldout, torch.stack([data.rows(s) for s in finetune_sets]))
        grid = list(self.args.dfr_regularization)
        scores = {}
        fits = {}
        use_groups = self.args.dfr_balance == "group"
        selection = data.rows(self.selection_idx) if len(self.selection_idx) else None
        start = time.perf_counter()
        for C in grid:
            fits[C] = fit_logistic_l1(data.features[heldout], data.labels[heldout], subsets, C, num_classes,
                                      self.args.seed)
            if selection is not None and len(grid) > 1:
                logits = data.features[selection] @ fits[C][0].T + fits[C][1]
                if use_groups and (data.groups[selection] >= 0).all():
                    scores[C] = worst_group_accuracy(logits, data.labels[selection], data.groups[selection])
                else:
                    scores[C] = worst_class_accuracy(logits, data.labels[selection])
        best = max(grid, key=lambda c: (scores.get(c, 0.0), -grid.index(c))) if scores else grid[0]
        weight, bias = fits[best]
        info = {"head": "logistic_l1", "C": best, "selection_scores": {str(c): s for c, s in scores.items()},
                "selection_metric": "worst_group" if use_groups else "worst_class",
                "train_seconds": round(time.perf_counter() - start, 3)}
        return weight, bias if self.adapter.linear_head.bias is not None else None, info

    def _run_last_layer(self, stage_dir: Path, resume: bool) -> None:
        data = self.last_layer_data
        weight, bias, info = self._fit_head(data, self.finetune_sets)
        if len(self.selection_idx):
            rows = data.rows(self.selection_idx)
            logits = data.features[rows] @ weight.T + (bias if bias is not None else 0)
            info["selection_half"] = {
                "size": int(len(rows)),
                "erm_worst_class_accuracy": worst_class_accuracy(data.logits[rows], data.labels[rows]),
                "worst_class_accuracy": worst_class_accuracy(logits, data.labels[rows]),
            }
        write_head(self.adapter.linear_head, weight, bias)
        tensors = {"weight": weight}
        if bias is not None:
            tensors["bias"] = bias
        self.save_stage_tensors(stage_dir, tensors, "head")
        self.save_stage_json(stage_dir, "last_layer", info)
        self.last_layer_info = info

    def _load_last_layer(self, stage_dir: Path) -> None:
        head = self.load_stage_tensors(stage_dir, "head")
        write_head(self.adapter.linear_head, head["weight"], head.get("bias"))
        self.last_layer_info = self.load_stage_json(stage_dir, "last_layer")

    # -- report
    def last_layer_results(self) -> dict:
        results = {}
        if self.finetune_sets is not None and self.last_layer_data is not None:
            results["finetune_set"] = self.selection_composition()
        if self.last_layer_info:
            results["last_layer"] = {k: v for k, v in self.last_layer_info.items() if k != "history"}
        return results

    def plot_last_layer(self, output_dir: Path) -> None:
        """The per-group histogram of held-out gradient norms, selected examples marked (GradTune's Figure 2)."""
        if self.last_layer_data is None or self.finetune_sets is None:
            return
        from ...reporting.plots import plot_gradient_norms

        data = self.last_layer_data
        rows = data.rows(self.heldout_idx)
        plot_gradient_norms(
            data.norms[rows].numpy(), data.groups[rows].numpy(),
            torch.isin(self.heldout_idx, self.selected_idx()).numpy(), output_dir / "plots" / "gradient_norms.png",
            group_names=group_names(self.heldout_dataset), labels=data.labels[rows].numpy(),
            label_names=label_names(self.heldout_dataset), title=f"{self._name}: held-out gradient norms",
        )
