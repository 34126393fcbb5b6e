"""Adapters: one matrix over every supported family (HF BERT/ViT/ResNet, timm ResNet/ViT raw and wrapped, peft)."""

import pytest
import torch
from conftest import make_model
from torch import nn

from hf_robust.adapters import UnsupportedModelError, get_adapter
from hf_robust.trainer.base_trainer import maybe_wrap_timm

POSITIONS = {
    "hf_bert": ["fc", "pooled"],
    "hf_vit": ["block0", "block1", "pooled"],
    "hf_resnet": ["dp2", "dp3", "dp4", "dp5"],
    "timm_resnet": ["dp2", "dp3", "dp4", "dp5"],
    "timm_vit": ["block0", "block1", "pooled"],
    "timm_wrapper_resnet": ["dp2", "dp3", "dp4", "dp5"],
}
# (B, C, H, W) of the CAM map for a 32x32 input
CAM_SHAPES = {
    "hf_vit": (2, 32, 4, 4),
    "hf_resnet": (2, 32, 1, 1),
    "timm_resnet": (2, 32, 1, 1),
    "timm_vit": (2, 32, 4, 4),
    "timm_wrapper_resnet": (2, 32, 4, 4),
}


def _lora(model, family):
    from peft import LoraConfig, get_peft_model

    if family == "hf_bert":
        return get_peft_model(model, LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], r=4))
    return get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"], r=4))


CASES = [(family, False) for family in POSITIONS] + [("hf_bert", True), ("hf_vit", True)]


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
    assert sorted(adapter.fair_dropout_positions) == POSITIONS[family]

    inputs = _inputs(family)
    features, logits = adapter.penultimate(inputs)
    assert features.shape == (2, adapter.classifier.in_features)
    assert torch.allclose(adapter.classifier(features), logits, atol=1e-5)  # h really is the classifier's input
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


def test_unknown_fair_dropout_position_lists_valid_ones():
    model, _ = make_model("hf_resnet")
    with pytest.raises(UnsupportedModelError, match=r"'dp9'.*valid positions are \['dp2', 'dp3', 'dp4', 'dp5'\]"):
        get_adapter(model).fair_dropout_position("dp9")
    model, _ = make_model("hf_vit")
    with pytest.raises(UnsupportedModelError, match=r"\['block0', 'block1', 'pooled'\]"):
        get_adapter(model).fair_dropout_position("fc")
