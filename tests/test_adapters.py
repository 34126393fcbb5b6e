"""Adapters: one matrix over every supported family (HF BERT/ViT/ResNet, timm ResNet/ViT raw and wrapped, peft)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, make_model, quick_config
from torch import nn

from hf_robust.methods.fair_dropout.positions import get_position, positions_for
from hf_robust.models.adapter import UnsupportedModelError, get_adapter
from hf_robust.models.timm_wrap import maybe_wrap_timm

POSITIONS = {
    "hf_bert": ["fc", "pooled"],
    "hf_vit": ["block0", "block1", "pooled"],
    "hf_resnet": ["dp2", "dp3", "dp4", "dp5"],
    "timm_resnet": ["dp2", "dp3", "dp4", "dp5"],
    "timm_vit": ["block0", "block1", "pooled"],
    "timm_wrapper_resnet": ["dp2", "dp3", "dp4", "dp5"],
    "mnist_cnn": ["conv1", "conv2", "conv3", "conv4", "hidden"],
}
# (B, C, H, W) of the CAM map for a 32x32 input
CAM_SHAPES = {
    "hf_vit": (2, 32, 4, 4),
    "hf_resnet": (2, 32, 1, 1),
    "timm_resnet": (2, 32, 1, 1),
    "timm_vit": (2, 32, 4, 4),
    "timm_wrapper_resnet": (2, 32, 4, 4),
    "mnist_cnn": (2, 32, 10, 10),  # (8x8 at MNIST's 28x28)
}


def _lora(model, family):
    from peft import LoraConfig, get_peft_model

    if family == "hf_bert":
        return get_peft_model(model, LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], r=4))
    return get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"], r=4))


CASES = [(family, False) for family in [*FAMILIES, "mnist_cnn"]] + [("hf_bert", True), ("hf_vit", True)]


def _inputs(family):
    torch.manual_seed(1)
    if family == "hf_bert":
        return {"input_ids": torch.randint(5, 200, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    return {"pixel_values": torch.randn(2, 3, 32, 32)}


@pytest.mark.parametrize("family, lora", CASES, ids=[f"{f}{'-lora' if lora else ''}" for f, lora in CASES])
def test_adapter_matrix(family, lora):
    model, _ = make_model(family, num_labels=3)
    model = maybe_wrap_timm(model)  # raw timm models are trained through transformers' TimmWrapper
    if lora:
        model = _lora(model, family)
    model.eval()
    adapter = get_adapter(model)
    assert adapter.input_kind == ("text" if family == "hf_bert" else "image")
    assert isinstance(adapter.classifier, nn.Linear) and adapter.classifier.out_features == 3
    assert sorted(positions_for(adapter)) == POSITIONS[family]

    inputs = _inputs(family)
    features, logits = adapter.penultimate(inputs)
    assert features.shape == (2, adapter.classifier.in_features)
    assert torch.allclose(adapter.classifier(features), logits, atol=1e-5)  # h really is the classifier's input
    assert adapter.linear_head is adapter.classifier  # a full (not LoRA-wrapped) head: GradTune/DFR can rewrite it
    assert torch.allclose(model(**inputs).logits, logits)

    if family == "hf_bert":
        assert adapter.embedding_layer is model.get_input_embeddings()
        with pytest.raises(UnsupportedModelError, match="token attributions"):
            adapter.cam_layer
        return
    captured = {}
    handle = adapter.cam_layer.register_forward_hook(lambda m, i, o: captured.setdefault("act", o))
    model(**inputs)
    handle.remove()
    cam_map = adapter.activation_to_map(captured["act"])
    assert tuple(cam_map.shape) == CAM_SHAPES[family]


def test_lora_inside_the_head_is_not_the_classifier():
    """With LoRA on every Linear, HF ResNet's head Sequential(Flatten, Linear) holds LoRA's own lora_A/lora_B
    Linears: the classifier is the LoRA-wrapped head Linear, and the methods that rewrite the head refuse it."""
    from peft import LoraConfig, get_peft_model

    model, _ = make_model("hf_resnet", num_labels=3)
    in_features = model.classifier[1].in_features
    model = get_peft_model(model, LoraConfig(target_modules="all-linear", r=2)).eval()
    adapter = get_adapter(model)
    names = {module: name for name, module in adapter.model.named_modules()}
    assert names[adapter.classifier_module] == "classifier.1"
    features, logits = adapter.penultimate(_inputs("hf_resnet"))
    assert features.shape == (2, in_features) and logits.shape == (2, 3)
    with pytest.raises(UnsupportedModelError, match="wrapped by LoRA.*modules_to_save"):
        adapter.linear_head


def test_vit_cam_layer_reaches_the_logits():
    # a ViT's last-block output for patch tokens does not reach the CLS logits; its first norm does
    model, _ = make_model("hf_vit")
    adapter = get_adapter(model)
    store = {}

    def keep(module, args, output):
        output.retain_grad()
        store["act"] = output

    handle = adapter.cam_layer.register_forward_hook(keep)
    model(pixel_values=torch.randn(1, 3, 32, 32)).logits[0, 0].backward()
    handle.remove()
    patch_grads = adapter.activation_to_map(store["act"].grad)
    assert patch_grads.abs().sum() > 0


def test_wrapped_timm_model_gives_the_raw_outputs():
    raw, _ = make_model("timm_resnet")
    raw.eval()
    x = torch.randn(2, 3, 32, 32)
    wrapped = maybe_wrap_timm(raw)
    assert wrapped.timm_model is raw
    assert torch.equal(wrapped(pixel_values=x).logits, raw(x))
    assert wrapped.config.num_labels == 2


def test_unsupported_model_names_what_is_missing():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(UnsupportedModelError, match=r"no adapter for Sequential.*classifier=.*target_layer="):
        get_adapter(model)
    adapter = get_adapter(model, classifier="3", target_layer="0")
    assert adapter.classifier is model[3] and adapter.cam_layer is model[0]
    with pytest.raises(UnsupportedModelError, match=r"target_layer='conv9' is not a module of Sequential"):
        get_adapter(model, classifier="3", target_layer="conv9")
    with pytest.raises(UnsupportedModelError, match="no CAM target layer"):
        get_adapter(model, classifier="3").require("cam_layer")


class TinyTextClassifier(nn.Module):
    """A text classifier no family knows (not a transformers model): a BERT encoder built from a config, and a
    linear head named `head` on its pooled output."""

    def __init__(self, vocab_size: int, num_labels: int = 2):
        super().__init__()
        from transformers import BertConfig, BertModel

        self.encoder = BertModel(BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=32, max_position_embeddings=64))
        self.head = nn.Linear(16, num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        pooled = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).pooler_output
        logits = self.head(pooled)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def test_a_custom_text_model_named_by_its_classifier_trains(tmp_path, text_data, tokenizer):
    """The README's promise: a model hf_robust does not know runs with `classifier_layer=` in the config. Its
    input kind comes from its forward (`input_ids`), not a default of "image"."""
    from hf_robust.methods import RobustConfig, RobustTrainer

    torch.manual_seed(0)
    model = TinyTextClassifier(len(tokenizer))
    with pytest.raises(UnsupportedModelError, match="no adapter for TinyTextClassifier"):
        get_adapter(model)
    adapter = get_adapter(model, classifier="head")
    assert (adapter.family, adapter.input_kind, adapter.main_input_name) == ("custom", "text", "input_ids")
    assert adapter.classifier is model.head
    batch = dict(tokenizer(["a fine film", "spoiler: a dull film"], padding=True, return_tensors="pt"))
    features, logits = adapter.penultimate(batch)
    assert features.shape == (2, 16) and torch.allclose(model.head(features), logits)

    config = quick_config(RobustConfig, tmp_path / "out", classifier_layer="head", max_steps=2,
                          per_device_train_batch_size=8, logging_steps=100)
    trainer = RobustTrainer(model, config, train_dataset=text_data["train"].select(range(16)),
                            eval_dataset={"validation": text_data["validation"].select(range(16))},
                            processing_class=tokenizer)
    assert trainer.input_kind == "text" and trainer.adapter.input_kind == "text"
    before = model.head.weight.detach().clone()
    trainer.train()
    assert trainer.state.global_step == 2 and not torch.equal(model.head.weight, before)
    metrics = trainer.evaluate()
    assert 0 <= metrics["eval_validation_worst_group_accuracy"] <= metrics["eval_validation_accuracy"] <= 1


def test_the_input_kind_of_a_custom_model():
    image = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    assert get_adapter(image, classifier="3").input_kind == "image"  # forward(input) tells nothing: "image"
    text = get_adapter(image, classifier="3", input_kind="text")
    assert text.input_kind == "text" and text.main_input_name == "input_ids"

    class ByMainInput(nn.Module):  # a forward that takes anything: its main_input_name decides
        main_input_name = "input_ids"

        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(10, 4), nn.Linear(4, 2)

        def get_input_embeddings(self):
            return self.embed

        def forward(self, **inputs):
            return self.head(self.embed(inputs["input_ids"]).mean(1))

    model = ByMainInput()
    adapter = get_adapter(model, classifier="head")
    assert adapter.input_kind == "text" and adapter.embedding_layer is model.embed
    with pytest.raises(ValueError, match="input_kind='audio'"):
        get_adapter(image, classifier="3", input_kind="audio")
    bert, _ = make_model("hf_bert")
    with pytest.raises(UnsupportedModelError, match=r"input_kind='image', but BertForSequenceClassification \(hf_bert\)"):
        get_adapter(bert, input_kind="image")


def test_unknown_fair_dropout_position_lists_valid_ones():
    model, _ = make_model("hf_resnet")
    with pytest.raises(UnsupportedModelError, match=r"'dp9'.*valid positions are \['dp2', 'dp3', 'dp4', 'dp5'\]"):
        get_position(get_adapter(model), "dp9")
    model, _ = make_model("hf_vit")
    with pytest.raises(UnsupportedModelError, match=r"\['block0', 'block1', 'pooled'\]"):
        get_position(get_adapter(model), "fc")


def test_method_knowledge_left_the_adapter_and_says_where_it_went():
    from hf_robust.methods.fair_dropout import positions

    adapter = get_adapter(make_model("hf_resnet")[0])
    for attribute, new_home in (("fair_dropout_positions", "positions_for"), ("default_positions", "default_positions"),
                                ("image_embedding", "counterfactual.embedding.image_embedding")):
        with pytest.raises(AttributeError, match=f"moved to the method that uses it: .*{new_home}"):
            getattr(adapter, attribute)
    with pytest.warns(DeprecationWarning, match="moved to hf_robust.methods.fair_dropout.positions"):
        from hf_robust.models.adapter import FairDropoutPosition
    assert FairDropoutPosition is positions.FairDropoutPosition


def test_timm_resnet_cam_under_activation_checkpointing():
    """timm runs a checkpointed stage block by block: the CAM hook sits on the last block, which still runs."""
    from hf_robust.methods.masktune.masks import image_masks

    model, _ = make_model("timm_wrapper_resnet")
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    plain = image_masks(model, get_adapter(model), x)
    model.timm_model.set_grad_checkpointing(True)
    assert torch.equal(image_masks(model, get_adapter(model), x), plain)


def test_wrapping_a_timm_vit_keeps_its_input_size():
    from hf_robust.data.preprocessing import ImagePreprocessing

    raw, _ = make_model("timm_vit")  # built for 32x32, its pretrained_cfg says 224
    size = tuple(raw.patch_embed.img_size)
    assert ImagePreprocessing.for_model(raw).size == size
    assert ImagePreprocessing.for_model(maybe_wrap_timm(raw)).size == size


def test_vit_like_prefix_tokens_and_non_square_patch_grids():
    from transformers import DeiTConfig, DeiTForImageClassification, ViTConfig, ViTForImageClassification

    small = dict(patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    deit = DeiTForImageClassification(DeiTConfig(image_size=32, **small)).eval()
    adapter = get_adapter(deit)
    assert adapter.num_prefix_tokens == 2  # CLS + distillation token: neither is a patch
    tokens = torch.arange(2 * 18 * 1, dtype=torch.float).reshape(2, 18, 1)
    assert torch.equal(adapter.activation_to_map(tokens)[0, 0], tokens[0, 2:, 0].reshape(4, 4))
    vit = ViTForImageClassification(ViTConfig(image_size=(24, 40), **small)).eval()  # a 3 x 5 patch grid
    adapter = get_adapter(vit)
    tokens = torch.randn(2, 16, 32)
    assert torch.equal(adapter.activation_to_map(tokens), tokens[:, 1:].transpose(1, 2).reshape(2, 32, 3, 5))


def test_a_per_token_classifier_is_refused_not_misread():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=100, n_embd=16, n_layer=1, n_head=2, n_positions=32,
                                                     num_labels=2, pad_token_id=0)).eval()
    with pytest.raises(UnsupportedModelError, match=r"runs on every token \(features of shape \(3, 7, 16\)\)"):
        get_adapter(model).penultimate({"input_ids": torch.randint(1, 100, (3, 7))})


def test_wrapped_timm_models_reload_with_from_pretrained(tmp_path, caplog):
    import timm
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageClassification

    x = torch.randn(2, 3, 32, 32)
    vit, _ = make_model("timm_vit")  # its img_size=32 is found by itself, the other arguments must be told
    vit_args = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    resnet, _ = make_model("timm_resnet")  # built with channels=(8, 16, 32, 32)
    for name, raw, model_args in [("vit", vit, vit_args), ("resnet", resnet, {"channels": [8, 16, 32, 32]})]:
        wrapped = maybe_wrap_timm(raw, model_args=model_args).eval()
        wrapped.save_pretrained(tmp_path / name)
        reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / name).eval()
        assert torch.equal(reloaded(pixel_values=x).logits, wrapped(pixel_values=x).logits), name
    with caplog.at_level("WARNING"):
        maybe_wrap_timm(make_model("timm_resnet")[0])  # without its channels: a warning, not a silent bad reload
    assert "will not reload with from_pretrained" in caplog.text
    lora = get_peft_model(timm.create_model("resnet18", pretrained=False, num_classes=2),
                          LoraConfig(target_modules=["conv1"], modules_to_save=["fc"], r=2))
    with pytest.raises(UnsupportedModelError, match="peft was applied to a raw timm model"):
        maybe_wrap_timm(lora)


def test_slim48_preset_keeps_a_6x6_cam_map_at_48x48(tmp_path):
    """`digits-resnet18-slim48` (a cheaper MaskTune model, not the default): the narrow ResNet-18 with a 64-channel
    last stage, whose CAM layer keeps a 6x6 map at its 48x48 input, and which reloads as built."""
    from transformers import AutoModelForImageClassification

    from hf_robust.data.preprocessing import ImagePreprocessing
    from hf_robust.models import load_model

    model, _ = load_model("digits-resnet18-slim48", num_labels=2)
    assert ImagePreprocessing.for_model(model).size == (48, 48)
    inner = model.timm_model
    assert inner.layer3[-1].conv2.out_channels == 64 and inner.layer4[-1].conv2.out_channels == 64
    seen = {}
    layer = get_adapter(model).cam_layer
    handle = layer.register_forward_hook(lambda module, inputs, output: seen.update(shape=output.shape))
    with torch.no_grad():
        model.eval()(pixel_values=torch.zeros(1, 3, 48, 48))
    handle.remove()
    assert tuple(seen["shape"][-3:]) == (64, 6, 6)
    model.save_pretrained(tmp_path)
    again = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert again.timm_model.layer4[-1].conv2.out_channels == 64
    for name, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name
