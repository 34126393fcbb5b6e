"""Counterfactual distillation (Xiao et al., CVPR 2023): fine-tune a zero-shot model while a frozen copy of it
teaches the student's image embedding on masked-and-refilled ("counterfactual") images; plus WiSE-FT.

Stages: `zero_shot` (the starting model, evaluated and kept) [-> `vanilla` (the CE-only baseline, with
`compare_vanilla`)] [-> `select` (with `distill_weight` unset: the label-free selection of beta)] -> `distill` ->
`wise_ft` (weight-space ensembles with the zero-shot model, evaluated over `wise_ft_alphas`).

`select` fine-tunes one student per beta of `selection_distill_weights` (30, the paper's value for every
experiment, and 10), each from the zero-shot model, and scores them, with the vanilla fine-tuning (beta = 0, the
`vanilla` stage's model, not retrained) as the first candidate when `compare_vanilla`, by worst-CLASS accuracy on
the validation split (labels only; `RobustTrainer.run_candidates`). `distill` then keeps the chosen candidate's
weights instead of training; when the vanilla fine-tuning wins, the run keeps it and says so. The paper fixes
beta = 30; the selection is our departure from it, by the criterion GradTune and FairDropout select with.

One distillation step, for a batch (x, y):
1. CAM of the STUDENT for the LABEL logit: for ViTs (transformers ViT, CLIP) gradient-weighted attention rollout
   from the attention maps of the step's own forward pass (`hf_robust.explain.rollout`); for CNNs XGrad-CAM at the
   adapter's CAM layer (`hf_robust.explain.cam.xgradcam`); normalised by the per-image maximum;
2. patch masks (`object` / `context` / `random`) and refills (`none` / `single` / `multi`) in pixel space
   (`hf_robust.methods.counterfactual.counterfactuals`): x_cf;
3. loss = CE(student(x), y) + beta * MSE(f_student(x_cf), f_teacher(x_cf)), f = the image embedding (for CLIP
   the projected embedding before normalisation); the teacher runs in eval mode under no_grad and is never
   wrapped for DDP. CE and the distillation term are logged separately (`ce_loss`, `distill_loss`).

The student's forward on x_cf goes through the unwrapped module: a DDP model is run forward once per step (on
x), and the single backward then reduces the gradients of both forward passes. Draws (random masks, donors) come
from a generator keyed by (seed, step): the same on every process, after resume, and, with the default
`donor_pool="global"`, the counterfactuals of N processes are those of one.
Inspired by the authors' code (github.com/Coxy7/robust-finetuning) for the order of operations; written here.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...models.adapter import get_adapter, unwrap_model
from ...explain.cam import xgradcam
from .counterfactuals import MASK_STRATEGIES, REFILL_STRATEGIES, make_counterfactuals
from .embedding import image_embedding
from ...data.core import DataValidationError
from ...explain.rollout import gradient_weighted_rollout, normalize_by_max, patch_relevance_map, rollout_relevance
from .wise_ft import interpolate_state_dicts
from ...core.trainer import RobustTrainer, Stage
from ...models.timm_wrap import maybe_wrap_timm
from .config import CounterfactualDistillConfig

logger = logging.getLogger(__name__)


# the paper the model card cites
PAPER = {
    "title": "Masked Images Are Counterfactual Samples for Robust Fine-tuning",
    "url": "https://arxiv.org/abs/2303.03052",
    "citation": (
        "@inproceedings{xiao2023masked,\n"
        "  title={Masked Images Are Counterfactual Samples for Robust Fine-tuning},\n"
        "  author={Xiao, Yao and Tang, Ziyi and Wei, Pengxu and Liu, Cong and Lin, Liang},\n"
        "  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition},\n"
        "  year={2023}\n}"
    ),
}


class TeacherMismatchError(ValueError):
    """The teacher cannot supervise the student: it reads other inputs or has another embedding size."""


class CounterfactualDistillTrainer(RobustTrainer):
    """See the module docstring. Args as [`RobustTrainer`], with a [`CounterfactualDistillConfig`], and:

    teacher: the model whose image embeddings the student matches on counterfactual images (default: a frozen
        copy of `model` as it is now, i.e. the zero-shot model; or `args.teacher_model`). It must read the
        same `pixel_values` and have an image embedding of the student's size.
    """

    _tag_names = ["hf_robust", "counterfactual-distillation", "wise-ft"]
    _config_class = CounterfactualDistillConfig
    _name = "CounterfactualDistill"
    _paper = PAPER
    _summary = (
        "Counterfactual distillation fine-tunes a pre-trained (zero-shot CLIP) model with cross-entropy while a "
        "frozen copy of it supervises the student's image embedding on counterfactual images: the patches the "
        "student's class activation map points at are masked and refilled with patches of other images. The "
        "student may learn the task but not drift from the pre-trained features on images where the shortcut and "
        "the object are pulled apart."
    )
    _input_kinds = ("image",)

    def __init__(self, model, args: CounterfactualDistillConfig | None = None, *pargs, teacher=None, **kwargs):
        super().__init__(model, args, *pargs, **kwargs)
        if self.train_dataset is None:
            raise DataValidationError("CounterfactualDistillTrainer needs a train_dataset to fine-tune on.")
        student = self.accelerator.unwrap_model(self.model)
        # the teacher is copied before the student switches to eager attention: it needs no attention maps
        teacher = self._build_teacher(teacher, student)
        if self.args.mask_strategy != "random" or self.adapter.patch_grid is None:
            if self.adapter.cam_method == "attention_rollout":
                self.adapter.enable_attention_maps()
            else:
                self.adapter.require("cam_layer")
        self.teacher_adapter = get_adapter(teacher)
        self._check_teacher(student, teacher)
        self.teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        self._distill = True
        self._metrics: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._draw_step, self._draw_index = -1, 0
        self._grid: tuple[int, int] | None = None
        self.wise_ft_results: dict = {}
        # beta of the loss: the fixed one, or during the selection each candidate's, then the chosen one's
        self.distill_weight: float = self.args.fixed_distill_weight

    # ------------------------------------------------------------------ teacher
    def _build_teacher(self, teacher, student):
        if teacher is None and self.args.teacher_model:
            from transformers import AutoModelForImageClassification

            from ...models import clip  # noqa: F401  (registers CLIPZeroShotClassifier with the Auto classes)

            if not Path(self.args.teacher_model).is_dir():
                raise FileNotFoundError(f"teacher_model={self.args.teacher_model!r} is not a folder of a saved model.")
            teacher = AutoModelForImageClassification.from_pretrained(self.args.teacher_model)
        if teacher is None:
            teacher = copy.deepcopy(student)
        teacher = unwrap_model(maybe_wrap_timm(teacher))
        teacher.requires_grad_(False)
        _fastest_attention(teacher)
        dtype = getattr(torch, self.args.teacher_dtype) if self.args.teacher_dtype else None
        return teacher.to(device=self.args.device, dtype=dtype).eval()

    def teacher_embedding(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The teacher's image embedding (B, D) of `pixel_values`, in float32, outside any autograd graph (run in
        inference mode, in the teacher's dtype)."""
        dtype = next(self.teacher_adapter.model.parameters()).dtype
        with torch.inference_mode():
            embedding = image_embedding(self.teacher_adapter, {"pixel_values": pixel_values.to(dtype)}).float()
        return embedding.clone()  # a normal tensor: the loss may save it for its backward

    def _check_teacher(self, student, teacher) -> None:
        """One training image through both: the teacher must read it and embed it in the student's space."""
        batch = self._prepare_inputs(self.eval_collator([self.train_dataset[0]]))
        inputs = {"pixel_values": batch["pixel_values"]}
        with torch.no_grad(), self.eval_mode(student):
            f_student = image_embedding(self.adapter, inputs)
            try:
                f_teacher = self.teacher_embedding(inputs["pixel_values"])
            except Exception as error:
                raise TeacherMismatchError(
                    f"The teacher {type(teacher).__name__} cannot read the student's inputs (pixel_values of shape "
                    f"{tuple(inputs['pixel_values'].shape)}): {type(error).__name__}: {error}. Use a teacher with the "
                    "student's image size and preprocessing (by default the trainer copies the student)."
                ) from error
        if f_teacher.shape[1:] != f_student.shape[1:]:
            raise TeacherMismatchError(
                f"The teacher {type(teacher).__name__} embeds images in {f_teacher.shape[1]} dimensions and the student "
                f"{type(student).__name__} in {f_student.shape[1]}: the distillation loss compares the two embeddings, "
                "so the teacher must be the same kind of image encoder (e.g. the same CLIP model the student starts "
                "from, which is the default when no teacher is given)."
            )

    # ------------------------------------------------------------------ stages
    def stages(self) -> list[Stage]:
        stages = [Stage("zero_shot", self._run_zero_shot, self._load_zero_shot)]
        if self.args.compare_vanilla:
            stages.append(Stage("vanilla", self._run_vanilla, self.load_stage_results))
        if self.args.selects_distill_weight:
            stages.append(Stage("select", self._run_select, self._load_select))
        stages.append(Stage("distill", self._run_distill, self.load_model_state))
        stages.append(Stage("wise_ft", self._run_wise_ft, self._load_wise_ft))
        return stages

    def health_reference(self) -> tuple[str, str] | None:
        """Vanilla fine-tuning from the same zero-shot model (the ERM of this method) when it is run, else the
        zero-shot model the method starts from."""
        return ("Vanilla FT", "vanilla") if self.args.compare_vanilla else ("Zero-shot", "zero_shot")

    def _run_zero_shot(self, stage_dir: Path, resume: bool) -> None:
        self.save_model_state(stage_dir)
        self.evaluate_stage("Zero-shot", stage_dir)

    def _load_zero_shot(self, stage_dir: Path) -> None:
        self.load_model_state(stage_dir)
        self.load_stage_results(stage_dir)

    def _run_vanilla(self, stage_dir: Path, resume: bool) -> None:
        self._distill = False
        try:
            self.train_stage(stage_dir, resume)
        finally:
            self._distill = True
        self.save_model_state(stage_dir)
        self.evaluate_stage("Vanilla FT", stage_dir)
        self.load_model_state(self.stage_dir("zero_shot"))  # the method starts from the zero-shot model too

    def _run_distill(self, stage_dir: Path, resume: bool) -> None:
        if self.selection is not None:  # the chosen candidate, already trained
            self.load_model_state(self.candidate_folder(self.stage_dir("select"), self.selection["chosen"]))
        else:
            self.train_stage(stage_dir, resume)
        self.save_model_state(stage_dir)

    # ------------------------------------------------------------------ label-free selection of beta
    def selection_grid(self) -> list[dict]:
        """The vanilla fine-tuning (beta = 0) when it is run, then each beta of `selection_distill_weights`."""
        grid = [{"distill_weight": 0.0}] if self.args.compare_vanilla else []
        return grid + [{"distill_weight": float(b)} for b in dict.fromkeys(self.args.selection_distill_weights)]

    def _run_select(self, stage_dir: Path, resume: bool) -> None:
        def train(knobs: dict, folder: Path, resume_candidate: bool) -> None:
            if knobs["distill_weight"] == 0.0:  # the vanilla fine-tuning, trained by the `vanilla` stage
                self.load_model_state(self.stage_dir("vanilla"))
                return
            self.load_model_state(self.stage_dir("zero_shot"))  # every candidate starts from the zero-shot model
            self.distill_weight = knobs["distill_weight"]
            self.train_stage(folder, resume_candidate)

        self.selection = self.run_candidates(stage_dir, self.selection_grid(), train, resume)
        self.save_stage_json(stage_dir, "selection", self.selection)
        self._apply_selection()

    def _load_select(self, stage_dir: Path) -> None:
        self.selection = self.load_stage_json(stage_dir, "selection")
        self._apply_selection()

    def _apply_selection(self) -> None:
        self.distill_weight = float(self.selection["candidates"][self.selection["chosen"]]["knobs"]["distill_weight"])
        if self.distill_weight == 0.0 and self.is_world_process_zero():
            logger.warning(
                "Counterfactual distillation did not help on validation: vanilla fine-tuning (beta = 0) had the best "
                "worst-class accuracy of the %d candidates, so the run keeps the vanilla fine-tuned model (see "
                "results.json 'selection').",
                len(self.selection["candidates"]),
            )

    def selection_outcome(self, knobs: dict) -> tuple[bool, str]:
        if knobs["distill_weight"] != 0.0:
            return True, f"counterfactual distillation with beta = {knobs['distill_weight']:g} was chosen on validation"
        return False, ("counterfactual distillation did not help on validation (worst-class accuracy): the vanilla "
                       "fine-tuned model was kept")

    def _stage_state(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_model

        model = copy.deepcopy(self.accelerator.unwrap_model(self.model))
        load_model(model, str(self.stage_dir(name) / "model.safetensors"), device="cpu")  # copied into place
        return model.state_dict()

    def _run_wise_ft(self, stage_dir: Path, resume: bool) -> None:
        alphas = sorted(set(self.args.wise_ft_alphas))
        model = self.accelerator.unwrap_model(self.model)
        if alphas and any(".lora_A." in key for key in model.state_dict()):
            logger.warning("WiSE-FT stage skipped: a LoRA student's weights cannot be interpolated adapter by adapter "
                           "(use hf_robust.wise_ft on the saved models: it merges copies of them).")
            alphas = []
        if not alphas or self.eval_dataset is None:
            self.wise_ft_results = {}
            self.save_stage_json(stage_dir, "wise_ft", self.wise_ft_results)
            return
        model = self.accelerator.unwrap_model(self.model)
        final = {k: v.detach().clone() for k, v in model.state_dict().items()}
        zero_shot = self._stage_state("zero_shot")
        fine_tuned = {"counterfactual": final}
        if self.args.compare_vanilla:
            fine_tuned = {"vanilla": self._stage_state("vanilla"), **fine_tuned}
        sweep: dict[str, dict[str, dict]] = {}
        try:
            for name, state in fine_tuned.items():
                sweep[name] = {}
                for alpha in alphas:
                    model.load_state_dict(interpolate_state_dicts(zero_shot, state, alpha))
                    self.eval_results = {}
                    self.evaluate()
                    sweep[name][str(alpha)] = copy.deepcopy(self.eval_results)
        finally:
            model.load_state_dict(final)
            self.eval_results = {}
        middle = str(min(alphas, key=lambda a: abs(a - 0.5)))  # WiSE-FT's default mixing is 0.5
        self.wise_ft_results = {"alphas": alphas, "reported_alpha": float(middle), "sweep": sweep}
        labels = {"vanilla": "WiSE-FT", "counterfactual": "WiSE-CF"}
        for name in sweep:
            self.stage_results[labels[name]] = sweep[name][middle]
        self.save_stage_json(stage_dir, "wise_ft", self.wise_ft_results)
        self.save_stage_json(stage_dir, "eval_results", {labels[n]: sweep[n][middle] for n in sweep})

    def _load_wise_ft(self, stage_dir: Path) -> None:
        self.wise_ft_results = self.load_stage_json(stage_dir, "wise_ft")
        self.load_stage_results(stage_dir)

    # ------------------------------------------------------------------ the distillation step
    def _generator(self) -> torch.Generator:
        """Draws keyed by (seed, step, micro-batch): identical on every process (unless donors are local) and
        after resume."""
        step = self.state.global_step
        if step != self._draw_step:
            self._draw_step, self._draw_index = step, 0
        key = [self.args.seed, step, self._draw_index]
        if self.args.donor_pool == "local":
            key.append(self.args.process_index)
        self._draw_index += 1
        digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)

    def _global_rows(self, pixel_values: torch.Tensor) -> tuple[list[int], int]:
        """(batch size of every process, offset of this process's images in the global batch); this batch alone
        when donors are local or there is one process."""
        if self.args.donor_pool == "local" or self.accelerator.num_processes == 1:
            return [pixel_values.shape[0]], 0
        sizes = self.accelerator.gather(torch.tensor([pixel_values.shape[0]], device=pixel_values.device)).tolist()
        return sizes, int(sum(sizes[: self.accelerator.process_index]))

    def _donor_pool(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(pool, offset of this process's images in it): the global batch unless donors are local."""
        sizes, offset = self._global_rows(pixel_values)
        if len(sizes) == 1:
            return pixel_values, 0
        gathered = self.accelerator.gather(self.accelerator.pad_across_processes(pixel_values, dim=0))
        width = max(sizes)
        return torch.cat([gathered[i * width : i * width + n] for i, n in enumerate(sizes)]), offset

    @torch.no_grad()
    def counterfactuals(self, pixel_values: torch.Tensor, cam: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(counterfactual images, patch mask) of this process's batch for the training step. The random draws
        (random masks, donors) are made for the global batch and this process's rows taken, so N processes
        make the counterfactuals of one process (with `donor_pool="global"`)."""
        args = self.args
        pool, pool_size, offset = None, None, 0
        if args.refill_strategy != "none":
            pool, offset = self._donor_pool(pixel_values)
        elif args.mask_strategy == "random":  # no donors, but the random masks are drawn for the global batch
            sizes, offset = self._global_rows(pixel_values)
            pool_size = sum(sizes)
        counterfactual, mask, _ = make_counterfactuals(
            pixel_values, args.mask_strategy, args.refill_strategy, cam=cam, threshold=args.cam_threshold,
            probability=args.random_mask_probability, grid=self._patch_grid(cam), generator=self._generator(),
            pool=pool, offset=offset, pool_size=pool_size,
        )
        return counterfactual, mask

    def _patch_grid(self, cam: torch.Tensor | None) -> tuple[int, int]:
        if cam is not None:
            return tuple(cam.shape[-2:])
        if self._grid is None:
            self._grid = self.adapter.patch_grid or self._cam_grid()
        return self._grid

    def _cam_grid(self) -> tuple[int, int]:
        """The CAM layer's spatial size for this model's inputs (CNNs: known only by running it)."""
        batch = self._prepare_inputs(self.eval_collator([self.train_dataset[0]]))
        store = {}
        handle = self.adapter.cam_layer.register_forward_hook(lambda m, a, out: store.setdefault("out", out))
        try:
            with torch.no_grad():
                self.adapter.model(pixel_values=batch["pixel_values"])
        finally:
            handle.remove()
        return tuple(self.adapter.activation_to_map(store["out"]).shape[-2:])

    def student_cam(self, model, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """CAM (B, h, w) of `model` for the labels, normalised by the per-image max, in eval mode (for plots and
        analysis; the training step reuses its own forward pass instead)."""
        if self.adapter.cam_method == "attention_rollout":
            cam, _ = gradient_weighted_rollout(model, {"pixel_values": pixel_values}, labels,
                                               self.adapter.num_prefix_tokens, self.adapter.patch_grid)
            return cam
        adapter = self.adapter if model is self.adapter.model else get_adapter(
            model, classifier=self.args.classifier_layer, target_layer=self.args.cam_target_layer)
        cam, _ = xgradcam(model, adapter, {"pixel_values": pixel_values}, target=labels)
        return normalize_by_max(cam)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not (self._distill and model.training):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        args = self.args
        model_inputs = self.model_inputs(inputs)
        labels = model_inputs.pop("labels")
        pixel_values = model_inputs["pixel_values"]
        needs_cam = args.mask_strategy != "random"
        rollout = needs_cam and self.adapter.cam_method == "attention_rollout"
        cam = None
        if needs_cam and not rollout:
            cam = normalize_by_max(xgradcam(self.adapter.model, self.adapter, {"pixel_values": pixel_values}, labels)[0])

        # the unwrapped module's own outputs: a DDP wrapper hands back copies of them that are not connected to
        # each other in the autograd graph (its output sink), so the CAM gradients are taken on the originals
        inner = {}
        handle = self.adapter.model.register_forward_hook(lambda module, args, output: inner.setdefault("out", output))
        try:
            outputs = model(**model_inputs, **({"output_attentions": True} if rollout else {}))
        finally:
            handle.remove()
        ce = F.cross_entropy(outputs["logits"], labels)
        if rollout:
            # the CAM is read off this very forward pass: its attention maps and their gradients for the label
            attentions = inner["out"]["attentions"]
            if not attentions or attentions[0] is None:
                raise ValueError("The student returned no attention maps: attention rollout needs eager attention.")
            score = inner["out"]["logits"].gather(1, labels[:, None]).sum()
            gradients = torch.autograd.grad(score, attentions, retain_graph=True)
            relevance = rollout_relevance([a.detach() for a in attentions], gradients)
            cam = patch_relevance_map(relevance, self.adapter.num_prefix_tokens, self.adapter.patch_grid)

        counterfactual, mask = self.counterfactuals(pixel_values, cam)
        # through the unwrapped student: DDP sees one forward per step, the backward reduces both
        f_student = image_embedding(self.adapter, {"pixel_values": counterfactual})
        f_teacher = self.teacher_embedding(counterfactual)
        distill = F.mse_loss(f_student.float(), f_teacher)
        loss = ce + self.distill_weight * distill

        self._metrics["ce_loss"].append(ce.detach())
        self._metrics["distill_loss"].append(distill.detach())
        self._metrics["masked_fraction"].append(mask.float().mean())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        # training logs carry "loss": add the averaged terms since the last log (every process calls this there)
        if "loss" in logs and self._metrics:
            for key, values in self._metrics.items():
                value = torch.stack(values).mean()[None]
                logs[key] = round(self.accelerator.gather(value).mean().item(), 6)
            self._metrics.clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ report
    def results(self) -> dict:
        results = super().results()
        results["counterfactual"] = {
            "mask_strategy": self.args.mask_strategy, "refill_strategy": self.args.refill_strategy,
            "cam_threshold": self.args.cam_threshold, "distill_weight": self.distill_weight,
            "cam_method": self.adapter.cam_method, "donor_pool": self.args.donor_pool,
        }
        if self.wise_ft_results:
            results["wise_ft"] = self.wise_ft_results
        runtimes = {stage: next((e["train_runtime"] for e in reversed(history) if "train_runtime" in e), None)
                    for stage, history in self.stage_log_history.items()}
        results["train_runtime_seconds"] = {stage: t for stage, t in runtimes.items() if t is not None}
        return results

    def write_report(self, output_dir: str | None = None) -> None:
        if self.is_world_process_zero() and self.args.save_plots and self.args.plot_examples > 0:
            self.plot_counterfactuals(Path(output_dir or self.args.output_dir) / "plots" / "counterfactuals.png")
        super().write_report(output_dir)

    def plot_counterfactuals(self, path: Path) -> Path:
        """Training examples (one per group first), the student's CAM for the label, and the counterfactual of
        every mask x refill strategy (donors drawn from the examples shown)."""
        from ...reporting.plots import plot_counterfactual_grid

        data = self.train_dataset
        groups = np.asarray(data["group"][: min(len(data), 2000)])
        chosen = [int(np.flatnonzero(groups == g)[0]) for g in sorted(set(groups.tolist()))]
        chosen += [i for i in range(len(groups)) if i not in chosen]
        chosen = chosen[: max(2, self.args.plot_examples)]
        rows = [data[i] for i in chosen]
        batch = self._prepare_inputs(self.eval_collator(rows))
        pixels, labels = batch["pixel_values"], batch["labels"]
        model = self.accelerator.unwrap_model(self.model)
        cam = self.student_cam(model, pixels, labels).detach()
        preprocessing = self.eval_collator.image_preprocessing
        grid = self._patch_grid(cam)
        generator = torch.Generator().manual_seed(self.args.seed)
        counterfactuals = {}
        for mask_strategy in MASK_STRATEGIES:
            for refill_strategy in REFILL_STRATEGIES:
                images, _, _ = make_counterfactuals(
                    pixels, mask_strategy, refill_strategy, cam=cam, threshold=self.args.cam_threshold,
                    probability=self.args.random_mask_probability, grid=grid, generator=generator,
                )
                counterfactuals[(mask_strategy, refill_strategy)] = _to_uint8(images, preprocessing)
        names = data.features["group"].names if hasattr(data.features["group"], "names") else None
        titles = [names[g] if names and g >= 0 else str(g) for g in groups[chosen].tolist()]
        return plot_counterfactual_grid(_to_uint8(pixels, preprocessing), cam.cpu(), counterfactuals, titles, path,
                                        threshold=self.args.cam_threshold)


def _fastest_attention(model) -> None:
    """A transformers model that runs eager attention (the student's, copied with it) switches to SDPA where it
    supports it: the teacher returns no attention maps. Anything else is left as it is."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "eager" or not hasattr(model, "set_attn_implementation"):
        return
    try:
        model.set_attn_implementation("sdpa")
    except (ValueError, ImportError, NotImplementedError) as error:
        logger.info("The teacher keeps eager attention (%s).", error)


def _to_uint8(pixel_values: torch.Tensor, preprocessing) -> torch.Tensor:
    """Model inputs back to displayable uint8 images (inverse of the normalisation)."""
    mean = torch.tensor(preprocessing.mean, device=pixel_values.device).view(1, -1, 1, 1)
    std = torch.tensor(preprocessing.std, device=pixel_values.device).view(1, -1, 1, 1)
    images = (pixel_values * std + mean) / preprocessing.rescale_factor
    return images.round().clamp(0, 255).to(torch.uint8).cpu()
