"""What a finished run publishes: `results.json`, the plots, the model card, and the push to the Hub.
`RunReport` is a mixin of `RobustTrainer` (it reads the trainer's results, stages and arguments)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from .config import RobustConfig
from .files import atomic_write_bytes, atomic_write_json
from .run_folder import RESULTS_NAME
from .stages import STAGES_DIR

# what a push leaves out: the stages' outputs, the Trainer's checkpoints, temporary files
HUB_IGNORE_PATTERNS = ("_*", "checkpoint-*", f"{STAGES_DIR}/*", f"{STAGES_DIR}/**")


class HubPushError(RuntimeError):
    """Pushing to the Hub failed; everything was saved locally first."""


class RunReport:
    """`write_report` (plots, card, results.json last), the model card's parts, and `push_to_hub`."""

    def write_report(self, output_dir: str | None = None) -> None:
        if not self.is_world_process_zero():
            return
        output_dir = Path(output_dir or self.args.output_dir)
        plot_files = []
        for hook in self.run_hooks() if self.args.save_plots else ():
            hook.write_plots(output_dir)
        if self.args.save_plots and self.eval_results:
            from ..reporting.plots import plot_group_accuracies

            runs = {stage: splits for stage, splits in self.stage_results.items()}
            runs[self._name] = self.eval_results
            plot_group_accuracies(runs, output_dir / "plots" / "group_accuracy.png", title=self.dataset_name)
            selection = self.selection_record()
            if selection is not None:
                from ..reporting.plots import plot_selection

                plot_selection(selection, output_dir / "plots" / "selection.png",
                               title=f"{self._name}: label-free selection (candidate 0 = the unchanged model)")
        if self.args.save_plots:
            plot_files = sorted(str(p.relative_to(output_dir)) for p in (output_dir / "plots").glob("*.png"))
        results = self.results()
        card = self.create_model_card_object(results, plot_files, output_dir=output_dir)
        atomic_write_bytes(output_dir / "README.md", str(card).encode())
        atomic_write_json(output_dir / RESULTS_NAME, results, strict=True)  # last: marks a finished report

    def data_provenance(self) -> dict:
        """Where the data came from, recorded in `results()` after `dataset`: `dataset_revision` (Hub repo and
        commit, or None) and `dataset_fingerprint` (each split's `datasets` fingerprint; `hf_robust.data.hub`)."""
        from ..data.hub import dataset_provenance

        splits = {"train": self.train_dataset}
        evals = self.eval_dataset
        splits.update(evals if isinstance(evals, dict) else {"eval": evals} if evals is not None else {})
        return dataset_provenance(splits)

    def method_hyperparameters(self) -> dict:
        """Hyperparameters shown in the model card: the method's own config fields and the main training ones."""
        base = {f.name for f in fields(RobustConfig)}
        mine = {f.name: getattr(self.args, f.name) for f in fields(self.args) if f.name not in base}
        common = (
            "learning_rate", "num_train_epochs", "per_device_train_batch_size", "weight_decay", "lr_scheduler_type",
            "warmup_steps", "seed", "optim", "balanced_sampling", "train_augmentation",
        )
        hyper = {k: getattr(self.args, k) for k in common}
        hyper["world_size"] = self.args.world_size
        hyper.update(mine)
        return {k: v for k, v in hyper.items() if v is not None}

    def usage_snippet(self, repo: str) -> str:
        """The model card's "how to use" code for the saved model."""
        auto = "AutoModelForImageClassification" if self.input_kind == "image" else "AutoModelForSequenceClassification"
        return f'from transformers import {auto}\n\nmodel = {auto}.from_pretrained("{repo}")'

    def create_model_card_object(
        self, results: dict | None = None, plot_files: list[str] | None = None, output_dir: str | Path | None = None
    ):
        """The model card of the model saved in `output_dir` (default: the run's output_dir)."""
        from ..reporting.modelcard import build_model_card

        results = results or self.results()
        if self._staging_dir is not None and output_dir is not None and Path(output_dir) == self._staging_dir:
            output_dir = self._final_output_dir  # the card names the folder it is saved for, not its staging
        repo = self.args.hub_model_id or Path(output_dir or self.args.output_dir).absolute().name
        usage = self.usage_snippet(repo)
        baseline = next(iter(self.stage_results), None)
        return build_model_card(
            model_name=repo.split("/")[-1],
            results=results,
            trainer_class=type(self).__name__,
            method_name=self._name,
            method_summary=self._summary,
            tags=list(dict.fromkeys(self._tag_names + list(getattr(self.model, "model_tags", None) or []))),
            paper=self._paper,
            dataset_name=self.dataset_name,
            base_model=self.model_name_or_path,
            task_type="image-classification" if self.input_kind == "image" else "text-classification",
            hyperparameters=self.method_hyperparameters(),
            usage=usage,
            plot_files=plot_files or [],
            baseline_name=baseline,
        )

    def create_model_card(self, *args, **kwargs) -> None:
        """Trainer calls this on push; hf_robust's card (written by `write_report`) replaces the generic one."""
        self.write_report()

    # ------------------------------------------------------------------ Hub
    def init_hf_repo(self, token=None, private=None) -> None:
        # The Trainer creates the Hub repo at __init__ when push_to_hub=True: with no network that would fail
        # before training. hf_robust creates it in push_to_hub(), after everything is saved locally.
        return None

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # Checkpoints are not pushed while training (hub_strategy is ignored): a run pushes once, at the end.
        return None

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, token=None,
                    revision=None, private=None, **kwargs):
        """Save the model, results, plots and card locally, then upload `output_dir` (no stages/checkpoints).

        Raises `HubPushError` (with what was saved and how to push later) if the upload fails, e.g. offline.
        """
        self.save_model()
        if not self.is_world_process_zero():
            return None
        from huggingface_hub import HfApi

        repo_id = self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        token = token if token is not None else self.args.hub_token
        try:
            api = HfApi()
            repo = api.create_repo(repo_id, token=token, private=private or self.args.hub_private_repo, exist_ok=True)
            return api.upload_folder(
                repo_id=repo.repo_id,
                folder_path=self.args.output_dir,
                commit_message=commit_message,
                token=token,
                revision=revision or self.args.hub_revision,
                run_as_future=not blocking,
                ignore_patterns=list(HUB_IGNORE_PATTERNS),
            )
        except Exception as error:  # offline (OfflineModeIsEnabled is an OSError; httpx errors are not), auth, ...
            raise HubPushError(
                f"Could not push {self.args.output_dir} to the Hub as {repo_id!r}: {type(error).__name__}: {error}. "
                f"The model, results.json, plots and README.md are saved in {self.args.output_dir}; push them "
                f"later with `hf upload {repo_id} {self.args.output_dir} "
                + " ".join(f"--exclude '{p}'" for p in HUB_IGNORE_PATTERNS) + "` (the stages and checkpoints stay local)."
            ) from error
