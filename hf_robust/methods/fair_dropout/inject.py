"""FairDropout on a model you already have: inject by hooks, save/restore, export to a stock model.

    from hf_robust.methods.fair_dropout.inject import FairDropoutConfig, inject_fair_dropout, export_fair_dropout

    model = inject_fair_dropout(model, FairDropoutConfig(positions=["dp4"], p_gen=0.2, p_mem=0.2))
    model.train(); loss = model(pixel_values=x, labels=y, example_idx=idx).loss   # masks tied to idx
    model.eval();  logits = model(pixel_values=x).logits                            # memorising neurons off
    stock = export_fair_dropout(model)   # the same eval outputs, no hooks: save_pretrained / timm state dict

How it sits in a model (no change to its class or forward signature):
- one parameter-free `FairDropout` layer per named position (`positions.POSITIONS` lists them per model
  family: ResNet `dp2..dp5` after stage 1..4, ViT `block{i}` / `pooled`, BERT `pooled` / `fc`), applied by a
  forward hook on the module's output or a forward pre-hook on the classifier's input; `fc` inserts a NEW
  Linear(D, D) projection there and applies FairDropout to its output (the paper's choice for BERT-like models:
  the pretrained features stay intact);
- the layers live in a submodule `model.fair_dropout`, so `model.train()` / `model.eval()` switch them and the
  projection's weights are saved, trained, moved and checkpointed with the model;
- a top-level forward pre-hook takes `example_idx` out of the call's keyword arguments and keeps it as the
  context the layers read. It stays set until the next forward, so activation checkpointing, which re-runs
  layers during the backward pass, recomputes exactly the same masks (they are a pure function of the seed,
  the index and the neuron). `EXAMPLE_IDX_FLAG` on the model tells hf_robust's trainers to pass `example_idx`.

Persistence: `save_fair_dropout_config(model, folder)` writes `fair_dropout_config.json` next to the weights
(FairDropoutTrainer does it on every save); `load_fair_dropout(model, folder)` re-injects it into the plain
model loaded from that folder and restores the projection's weights.

Export: in evaluation FairDropout multiplies the neurons by a fixed vector (0 on memorising neurons), so it
folds into the weights that read them — the first convs of the next ResNet stage (main path and downsampling
shortcut), or the classifier (after the channel-wise global pooling, or directly). For `fc` there is no
nonlinearity between projection, mask and classifier: `W diag(s) (A h + c) + b` is one Linear, which replaces
the classifier, and the projection disappears. The result is a stock transformers/timm model. Positions
inside the residual stream of a transformer (ViT `block{i}`, read by LayerNorms) or before an identity
shortcut cannot be folded; exporting them raises an error that says so.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ...core.files import publish
from ...models.adapter import EXAMPLE_IDX_FLAG, UnsupportedModelError, active_module, get_adapter, unwrap_model
from .layer import FairDropout, num_generalising, position_seed
from .positions import default_positions, get_position, natural_order, positions_for

CONFIG_NAME = "fair_dropout_config.json"
ATTRIBUTE = "fair_dropout"


@dataclass
class FairDropoutConfig:
    """Where and how FairDropout acts (saved as `fair_dropout_config.json`).

    Args:
        positions: position names of the model's family (`positions.POSITIONS`; e.g. `["dp4"]`, `["fc"]`,
            `["pooled"]`); `None` = the family's default (ResNet `dp4`, after the third stage as in the paper's
            CelebA run; BERT `fc`; ViT `pooled`).
        p_gen: fraction of generalising (always-on) neurons at each position, `round(p_gen * C)` of them.
        p_mem: probability that a memorising neuron is kept for an example in training.
        seed: seed of the example-tied masks (each position mixes in its name).
        rescale_generalising: at evaluation, multiply the generalising neurons by the mean activation mass of
            training, `(g + (C - g) * p_mem) / g` (the authors' "drop" mode, corrected); default off, as in the
            paper's description (memorising neurons dropped, nothing else changed).
    """

    positions: list[str] | None = None
    p_gen: float = 0.2
    p_mem: float = 0.2
    seed: int = 0
    rescale_generalising: bool = False
    library: str = field(default="hf_robust", repr=False)

    def __post_init__(self):
        if isinstance(self.positions, str):
            self.positions = [p.strip() for p in self.positions.split(",") if p.strip()]
        if self.positions is not None:
            if not self.positions:
                raise ValueError("FairDropoutConfig.positions is empty: name at least one position, or pass None.")
            if len(set(self.positions)) != len(self.positions):
                raise ValueError(f"FairDropoutConfig.positions={self.positions} names a position twice.")
            self.positions = list(self.positions)
        if not 0 < self.p_gen <= 1:
            raise ValueError(f"p_gen={self.p_gen}: the fraction of generalising neurons must be in (0, 1].")
        if not 0 <= self.p_mem <= 1:
            raise ValueError(f"p_mem={self.p_mem}: the keep probability of memorising neurons must be in [0, 1].")

    def to_dict(self) -> dict:
        return asdict(self)

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{CONFIG_NAME}.")
        with os.fdopen(fd, "w") as handle:
            json.dump(self.to_dict(), handle, indent=2)
        publish(tmp, folder / CONFIG_NAME)  # atomic: a checkpoint never holds half a config

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> FairDropoutConfig:
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{folder} has no {CONFIG_NAME}: it does not hold a model trained with FairDropout (or the file was "
                "not copied with the weights)."
            )
        values = json.loads(path.read_text())
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path} has keys this version of hf_robust does not know: {unknown}.")
        return cls(**values)


class FairDropoutModules(nn.Module):
    """What `inject_fair_dropout` adds to a model (as `model.fair_dropout`): the layers, the `fc` projections,
    the hook handles and the current example indices."""

    def __init__(self, config: FairDropoutConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleDict()
        self.projections = nn.ModuleDict()
        self.example_idx: torch.Tensor | None = None
        self._handles: list = []
        self._open_calls = 0
        self._ran: set[str] = set()

    def extra_repr(self) -> str:
        return f"positions={list(self.layers)}"

    def apply(self, name: str, x: torch.Tensor) -> torch.Tensor:
        self._ran.add(name)
        if name in self.projections:
            x = self.projections[name](x)
        return self.layers[name](x, self.example_idx)


def fair_dropout_modules(model: nn.Module) -> FairDropoutModules | None:
    """The injected FairDropout of `model` (looking through peft/DDP wrappers), or None."""
    module = getattr(unwrap_model(model), ATTRIBUTE, None)
    return module if isinstance(module, FairDropoutModules) else None


def _output_hook(modules: FairDropoutModules, name: str):
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (modules.apply(name, output[0]),) + tuple(output[1:])
        return modules.apply(name, output)

    return hook


def _input_hook(modules: FairDropoutModules, name: str):
    def hook(module, args):
        return (modules.apply(name, args[0]),) + tuple(args[1:])

    return hook


def _enter_hook(modules: FairDropoutModules):
    """Take `example_idx` out of the call (the model's forward never sees it). A call without it clears the
    context, except inside an outer call that set it (peft's wrapper calling the base model)."""

    def hook(module, args, kwargs):
        if "example_idx" in kwargs:
            modules.example_idx = kwargs.pop("example_idx")
        elif modules._open_calls == 0:
            modules.example_idx = None
        if modules._open_calls == 0:
            modules._ran = set()
        modules._open_calls += 1
        return args, kwargs

    return hook


def _exit_hook(modules: FairDropoutModules):
    # the indices stay set after the call: the backward pass may recompute checkpointed layers with them
    def hook(module, args, output):
        modules._open_calls -= 1
        skipped = [name for name in modules.layers if name not in modules._ran]
        if modules._open_calls == 0 and output is not None and skipped:
            # a forward that goes around the hooked module (another code path of the model) would silently
            # train or evaluate without FairDropout
            raise RuntimeError(
                f"FairDropout at {skipped} did not run in this forward pass of {type(module).__name__}: the model "
                "did not call the module it is attached to (a different code path, e.g. a backbone called directly)."
            )

    return hook


def _new_projection(dim: int, reference: nn.Module, seed: int) -> nn.Linear:
    """Linear(dim, dim), PyTorch's default initialisation drawn from its own seeded generator (the global RNG is
    left alone, and the projection is the same whatever ran before)."""
    generator = torch.Generator().manual_seed(int(seed))
    layer = nn.Linear(dim, dim)
    bound = 1 / math.sqrt(dim)
    with torch.no_grad():  # nn.Linear.reset_parameters: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), ..)
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.uniform_(-bound, bound, generator=generator)
    weight = next(reference.parameters(), None)
    if weight is not None:
        layer.to(device=weight.device, dtype=weight.dtype)
    return layer


def _positions(base: nn.Module, names: list[str]):
    adapter = get_adapter(base)
    return adapter, {name: get_position(adapter, name) for name in names}  # unknown -> lists valid ones


def _attach(model: nn.Module, modules: FairDropoutModules) -> None:
    base = unwrap_model(model)
    _, positions = _positions(base, list(modules.layers))
    base.add_module(ATTRIBUTE, modules)
    for name, position in positions.items():
        if position.where == "output":
            modules._handles.append(position.module.register_forward_hook(_output_hook(modules, name)))
        else:
            modules._handles.append(position.module.register_forward_pre_hook(_input_hook(modules, name)))
    # the example indices enter at the outermost model the caller uses (peft's wrappers call the base model's
    # forward directly, without its hooks) and at the base model itself
    for target in dict.fromkeys([model, base]):
        modules._handles.append(target.register_forward_pre_hook(_enter_hook(modules), with_kwargs=True, prepend=True))
        modules._handles.append(target.register_forward_hook(_exit_hook(modules), always_call=True))
    setattr(base, EXAMPLE_IDX_FLAG, True)


def _detach(model: nn.Module) -> FairDropoutModules:
    base = unwrap_model(model)
    modules = fair_dropout_modules(base)
    if modules is None:
        raise ValueError(f"{type(base).__name__} has no FairDropout.")
    for handle in modules._handles:
        handle.remove()
    modules._handles = []
    modules._open_calls = 0
    delattr(base, ATTRIBUTE)
    if hasattr(base, EXAMPLE_IDX_FLAG):
        delattr(base, EXAMPLE_IDX_FLAG)
    return modules


def inject_fair_dropout(model: nn.Module, config: FairDropoutConfig | None = None) -> nn.Module:
    """Add FairDropout to `model` at `config.positions` (in place; returns the model).

    Call the model with `example_idx=<(B,) LongTensor>` in training; in evaluation it is not needed. Raises
    `UnsupportedModelError` for a position the model does not have (listing the valid ones), and `ValueError`
    if the model already has FairDropout.
    """
    config = config or FairDropoutConfig()
    base = unwrap_model(model)
    if fair_dropout_modules(base) is not None:
        raise ValueError(
            f"{type(base).__name__} already has FairDropout at {list(fair_dropout_modules(base).layers)}: call "
            "remove_fair_dropout(model) first."
        )
    adapter = get_adapter(base)
    names = config.positions or list(default_positions(adapter))
    if not names:
        raise UnsupportedModelError(
            f"{type(base).__name__} ({adapter.name}) has no default FairDropout position: name one of "
            f"{sorted(positions_for(adapter), key=natural_order)}."
        )
    _, positions = _positions(base, names)
    if base is not model and hasattr(model, "peft_config"):
        added = [name for name, position in positions.items() if position.projection]
        if added:  # peft saves its adapters and modules_to_save, not a layer added after it wrapped the model
            every = positions_for(adapter)
            raise UnsupportedModelError(
                f"FairDropout at {added} adds a new trained projection, which a peft model would not save (only "
                "its adapters and modules_to_save are). On a peft model use a position without one (e.g. "
                f"{[n for n in sorted(every, key=natural_order) if not every[n].projection]})."
            )
    for name, position in positions.items():  # a layer with no generalising neuron fails here, not at evaluation
        dim = position.num_features or (active_module(position.module).in_features if position.projection else None)
        if dim:
            num_generalising(dim, config.p_gen)
    modules = FairDropoutModules(FairDropoutConfig(**{**config.to_dict(), "positions": names}))
    for name, position in positions.items():
        modules.layers[name] = FairDropout(config.p_gen, config.p_mem, position.layout,
                                           position_seed(config.seed, name), config.rescale_generalising)
        if position.projection:
            dim = position.num_features or active_module(position.module).in_features
            modules.projections[name] = _new_projection(dim, position.module, position_seed(config.seed, name))
    modules.train(base.training)
    _attach(model, modules)
    return model


def remove_fair_dropout(model: nn.Module) -> nn.Module:
    """Undo `inject_fair_dropout` (hooks, layers, projections, flag); the model is as before (in place)."""
    _detach(model)
    return model


# ---------------------------------------------------------------------------------------------- persistence
def save_fair_dropout_config(model: nn.Module, folder: str | Path) -> None:
    """Write `fair_dropout_config.json` of the injected model into `folder` (next to its weights)."""
    modules = fair_dropout_modules(model)
    if modules is None:
        raise ValueError(f"{type(unwrap_model(model)).__name__} has no FairDropout: nothing to save.")
    modules.config.save_pretrained(folder)


def _saved_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    state = {}
    for file in files:
        state.update({k: v for k, v in load_file(str(file)).items() if k.startswith(ATTRIBUTE + ".")})
    return state


def load_fair_dropout(model: nn.Module, folder: str | Path) -> nn.Module:
    """Re-apply the FairDropout saved in `folder` to `model` (the plain model loaded from that folder, e.g. by
    `from_pretrained`, which skips the `fair_dropout.*` weights): inject it, then restore those weights."""
    folder = Path(folder)
    config = FairDropoutConfig.from_pretrained(folder)
    inject_fair_dropout(model, config)
    modules = fair_dropout_modules(model)
    expected = {f"{ATTRIBUTE}.{k}" for k in modules.state_dict()}
    state = _saved_state(folder)
    missing = sorted(expected - set(state))
    if missing:
        raise ValueError(
            f"{folder} has {CONFIG_NAME} but its weights lack {missing}: save the model with the FairDropout "
            "injected (save_pretrained of the injected model, or FairDropoutTrainer.save_model)."
        )
    modules.load_state_dict({k[len(ATTRIBUTE) + 1 :]: v for k, v in state.items() if k in expected})
    return model


# ---------------------------------------------------------------------------------------------- export
def _fold_into(consumer: nn.Module, scale: torch.Tensor, where: str) -> None:
    layer = active_module(consumer)
    if not isinstance(layer, (nn.Linear, nn.Conv2d)) or (isinstance(layer, nn.Conv2d) and layer.groups != 1):
        raise UnsupportedModelError(f"Cannot fold FairDropout at {where} into a {type(layer).__name__}.")
    if layer.weight.shape[1] != scale.numel():
        raise UnsupportedModelError(
            f"Cannot fold FairDropout at {where}: {type(layer).__name__} reads {layer.weight.shape[1]} inputs, the "
            f"position has {scale.numel()} neurons (a pooling that changes the width sits in between)."
        )
    shape = (1, -1) + (1,) * (layer.weight.ndim - 2)
    with torch.no_grad():
        layer.weight.mul_(scale.to(layer.weight).view(shape))


def _fold_projection(classifier: nn.Module, projection: nn.Linear, scale: torch.Tensor) -> None:
    """classifier(s * (A h + c)) -> one Linear: W' = (W diag s) A, b' = (W diag s) c + b."""
    layer = active_module(classifier)
    if layer.bias is None:
        raise UnsupportedModelError("Cannot fold the `fc` projection into a classifier without a bias.")
    with torch.no_grad():
        weight = layer.weight * scale.to(layer.weight)[None, :]
        bias = weight @ projection.bias.to(weight) + layer.bias
        layer.weight.copy_(weight @ projection.weight.to(weight))
        layer.bias.copy_(bias)


def export_fair_dropout(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A stock model (no hooks, no projection, the model's own class) whose evaluation outputs equal the
    FairDropout model's: each position's eval-time factor folded into the weights that read it.

    Returns a copy (`model` is left as it is), or, with `inplace=True`, `model` itself (unwrapped) turned
    stock. Save it with `save_pretrained` and load it with plain `from_pretrained` (raw timm models:
    `timm.create_model(...)` + `load_state_dict`). peft adapters must be merged first (`merge_and_unload()`).
    """
    base = unwrap_model(model)
    modules = fair_dropout_modules(base)
    if modules is None:
        raise ValueError(f"{type(base).__name__} has no FairDropout to export.")
    if any(hasattr(m, "base_layer") or hasattr(m, "modules_to_save") for m in base.modules()):
        raise UnsupportedModelError("The model has unmerged peft adapters: merge them (model.merge_and_unload()) "
                                    "and export the merged model.")
    adapter, positions = _positions(base, list(modules.layers))
    blocked = {name: p.fold_error for name, p in positions.items() if p.fold_error or not p.consumers}
    if blocked:
        reasons = "; ".join(f"{name}: {reason or 'no layer reads it'}" for name, reason in blocked.items())
        foldable = sorted((n for n, p in positions_for(adapter).items() if p.consumers and not p.fold_error),
                          key=natural_order)
        raise UnsupportedModelError(
            f"Cannot export FairDropout of {type(base).__name__} to a stock model ({reasons}). Positions that "
            f"export: {foldable}. The injected model itself still runs (save it with its {CONFIG_NAME})."
        )
    if inplace:
        target = base
        _detach(base)
    else:  # copy the model without the hooks (their closures and handles belong to the original)
        original = _detach(model)
        try:
            target = copy.deepcopy(base)
            modules = copy.deepcopy(original)
        finally:
            _attach(model, original)
        _, positions = _positions(target, list(modules.layers))
    # hooks on one module run in registration order: fold the one nearest to the consumer first
    for name in reversed(list(modules.layers)):
        position = positions[name]
        num_features = active_module(position.consumers[0]).weight.shape[1]
        scale = modules.layers[name].eval_scale(num_features)
        if name in modules.projections:
            _fold_projection(position.consumers[0], modules.projections[name], scale)
        else:
            for consumer in position.consumers:
                _fold_into(consumer, scale, name)
    return target
