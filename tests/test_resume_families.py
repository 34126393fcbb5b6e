"""A training stage interrupted midway and resumed from its last checkpoint ends where the uninterrupted run ends, for
every model family; a checkpoint whose weights do not fit the model stops the resume with a clear error.

transformers 5 saves checkpoints under its models' original key names (a ViT's `vit.layers.0.attention.q_proj` as
`vit.encoder.layer.0.attention.attention.query`) and its Trainer resumed with `load_state_dict(strict=False)`: a
resumed tiny ViT trained on from the weights the new process started with, with a log line only."""

import pytest
import torch
from conftest import FAMILIES, TEXT_FAMILIES, make_trainer
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from hf_robust.core.checkpoints import RunSetupError

STEPS, SAVE_STEPS, INTERRUPT_AT = 4, 2, 3


class Interrupt(TrainerCallback):
    """Kills the run (as Ctrl-C would) at the end of a step: after the checkpoint of step SAVE_STEPS."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == INTERRUPT_AT:
            raise KeyboardInterrupt("interrupted")


@pytest.fixture(scope="module")
def data(small_digits, text_data):
    return {"image": {"train": small_digits["train"].select(range(64))},
            "text": {"train": text_data["train"].select(range(64))}}


def _trainer(family, data, tokenizer, output_dir, model_seed, callbacks=()):
    text = family in TEXT_FAMILIES
    return make_trainer(
        "erm", family, data["text" if text else "image"], output_dir, tokenizer=tokenizer if text else None,
        model_seed=model_seed, eval_splits=[], per_device_train_batch_size=16, max_steps=STEPS,
        save_strategy="steps", save_steps=SAVE_STEPS, logging_steps=1, trainer_kwargs={"callbacks": list(callbacks)},
    )


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}


def _losses(trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def _interrupted(family, data, tokenizer, output_dir):
    cut = _trainer(family, data, tokenizer, output_dir, model_seed=0, callbacks=[Interrupt()])
    with pytest.raises(KeyboardInterrupt):
        cut.train()
    stage = output_dir / "stages" / "erm"
    assert sorted(p.name for p in stage.glob("checkpoint-*")) == [f"checkpoint-{SAVE_STEPS}"]
    assert not (stage / "stage.json").exists()
    return stage / f"checkpoint-{SAVE_STEPS}"


@pytest.mark.parametrize("family", FAMILIES)
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(family, data, tokenizer, tmp_path):
    full = _trainer(family, data, tokenizer, tmp_path / "full", model_seed=0)
    full.train()
    _interrupted(family, data, tokenizer, tmp_path / "cut")
    # a new process builds the model afresh: here other random weights, which the checkpoint must replace whole
    resumed = _trainer(family, data, tokenizer, tmp_path / "cut", model_seed=1)
    before = _weights(resumed)
    resumed.train(resume_from_checkpoint=True)
    expected, got = _weights(full), _weights(resumed)
    assert any(not torch.equal(before[k], v) for k, v in expected.items())  # the resumed run started elsewhere
    assert got.keys() == expected.keys()
    differ = [k for k, v in expected.items() if not torch.equal(got[k], v)]
    assert not differ, f"{len(differ)} of {len(expected)} weights differ from the uninterrupted run's, e.g. {differ[:3]}"
    # the steps after the checkpoint too (the ones before are the checkpoint's own log)
    assert _losses(resumed) == _losses(full) and sorted(_losses(full)) == list(range(1, STEPS + 1))


def test_a_checkpoint_whose_weights_do_not_fit_stops_the_resume(data, tokenizer, tmp_path):
    checkpoint = _interrupted("hf_vit", data, tokenizer, tmp_path)
    weights = checkpoint / "model.safetensors"
    state = load_file(str(weights))
    assert "vit.encoder.layer.0.attention.attention.query.weight" in state  # transformers' original names on disk
    state["vit.encoder.layer.0.attention.attention.qry.weight"] = state.pop(
        "vit.encoder.layer.0.attention.attention.query.weight")
    save_file(state, str(weights), metadata={"format": "pt"})
    resumed = _trainer("hf_vit", data, tokenizer, tmp_path, model_seed=1)
    with pytest.raises(RunSetupError, match=(
            r"checkpoint-2 does not hold the weights of this ViTForImageClassification: 1 of its weights are missing "
            r"\(e\.g\. \['vit\.layers\.0\.attention\.q_proj\.weight'\]\) and 1 saved ones are not the model's "
            r"\(e\.g\. \['vit\.encoder\.layer\.0\.attention\.attention\.qry\.weight'\]\): training would go on from "
            r"weights that were never loaded\. Resume with the model the run was started with")):
        resumed.train(resume_from_checkpoint=True)
    assert not (tmp_path / "stages" / "erm" / "stage.json").exists()


def test_a_saved_vit_folder_loads_as_plain_weights(data, tokenizer, tmp_path):
    """`erm_checkpoint` read without from_pretrained (a FairDropout folder: layers no stock class has) maps the
    original key names transformers writes back onto the model's own."""
    saved = _trainer("hf_vit", data, tokenizer, tmp_path / "saved", model_seed=2).model
    saved.save_pretrained(tmp_path / "folder")
    trainer = _trainer("hf_vit", data, tokenizer, tmp_path / "run", model_seed=1)
    trainer.load_checkpoint_weights(tmp_path / "folder", via_from_pretrained=False)
    expected, got = saved.state_dict(), _weights(trainer)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())
