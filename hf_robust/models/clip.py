"""A CLIP image classifier with a zero-shot head: the student (and teacher) of counterfactual distillation.

`CLIPZeroShotClassifier` = CLIP's image tower + visual projection + a linear head whose rows are the class
text embeddings (Radford et al., ICML 2021, section 3.1.4; the construction WiSE-FT and Xiao et al. fine-tune
from). For each class, its name(s) are put into every prompt template, encoded by the CLIP text tower,
L2-normalised, averaged, renormalised and scaled by `exp(logit_scale)`; the image embedding is L2-normalised
before the head. The head is a plain `nn.Linear` (bias zero at the start) and is trained like any classifier.

    classifier = CLIPZeroShotClassifier.from_clip(clip_model, tokenizer, ["cat", "dog"])
    logits = classifier(pixel_values=x).logits
    f = classifier.image_embeds(x)     # projected, NOT normalised: what counterfactual distillation matches

It is a `PreTrainedModel`: `save_pretrained` / `from_pretrained` (also through `AutoModelForImageClassification`
once `hf_robust.models.clip` is imported) keep the fine-tuned weights; the text tower is only needed to build the head.
`load_clip_zero_shot("openai/clip-vit-base-patch32", class_names)` is the path from a CLIP checkpoint.

The head construction follows the zero-shot notebook of OpenAI's CLIP and `get_zeroshot_classifier` of the
authors of the counterfactual-distillation paper (github.com/Coxy7/robust-finetuning); written here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, PreTrainedConfig
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.models.clip.modeling_clip import CLIPPreTrainedModel, CLIPVisionModel

from .auto import register_image_classifier

# The 80 prompts of OpenAI's ImageNet zero-shot notebook (CLIP repository, Prompt_Engineering_for_ImageNet).
OPENAI_IMAGENET_TEMPLATES = [
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
]
# The 7-prompt subset the same notebook selected as the best short ensemble.
SHORT_TEMPLATES = [
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
]
SIMPLE_TEMPLATES = ["a photo of a {}."]
TEMPLATE_SETS = {"openai_imagenet": OPENAI_IMAGENET_TEMPLATES, "short": SHORT_TEMPLATES, "simple": SIMPLE_TEMPLATES}

Template = str | Callable[[str], str]
ClassName = str | Sequence[str]


class CLIPZeroShotConfig(PreTrainedConfig):
    r"""
    Configuration of [`CLIPZeroShotClassifier`].

    Args:
        vision_config (`dict` or `CLIPVisionConfig`): the CLIP image tower.
        projection_dim (`int`): size of the joint image-text embedding (the visual projection's output).
        class_names (`list`, *optional*): the name(s) of each class the head was built from (for the record).
        templates (`list[str]`, *optional*): the prompt templates the head was built from (for the record).
    """

    model_type = "clip_zero_shot"
    sub_configs_defaults = {"vision_config": CLIPVisionConfig}

    vision_config: dict | CLIPVisionConfig | None = None
    projection_dim: int = 512
    class_names: list | None = None
    templates: list | None = None
    initializer_factor: float = 1.0
    initializer_range: float = 0.02


class CLIPZeroShotClassifier(CLIPPreTrainedModel):
    """CLIP image tower + visual projection + zero-shot linear head. Takes `pixel_values` (and optional
    `labels`), returns `ImageClassifierOutput` (`logits`, `loss` = cross-entropy when labels are given)."""

    config_class = CLIPZeroShotConfig
    config: CLIPZeroShotConfig
    base_model_prefix = "clip_zero_shot"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["CLIPEncoderLayer", "CLIPVisionEmbeddings"]

    def __init__(self, config: CLIPZeroShotConfig):
        super().__init__(config)
        vision_config = config.vision_config
        self.vision_model = CLIPVisionModel._from_config(vision_config)
        self.visual_projection = nn.Linear(vision_config.hidden_size, config.projection_dim, bias=False)
        self.classifier = nn.Linear(config.projection_dim, config.num_labels)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        factor = self.config.initializer_factor
        if isinstance(module, CLIPZeroShotClassifier):
            nn.init.normal_(module.visual_projection.weight, std=module.config.vision_config.hidden_size**-0.5 * factor)
            nn.init.normal_(module.classifier.weight, std=module.config.projection_dim**-0.5 * factor)
            nn.init.zeros_(module.classifier.bias)

    def image_embeds(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        """The projected image embedding f(x), not normalised (B, projection_dim)."""
        outputs = self.vision_model(pixel_values=pixel_values, **kwargs)
        return self.visual_projection(outputs.pooler_output)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput:
        outputs = self.vision_model(
            pixel_values=pixel_values, output_attentions=output_attentions, output_hidden_states=output_hidden_states
        )
        embeds = self.visual_projection(outputs.pooler_output)
        logits = self.classifier(F.normalize(embeds, dim=-1))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )

    # ------------------------------------------------------------------ construction from a CLIP model
    @classmethod
    def from_clip(
        cls,
        clip_model,
        tokenizer,
        class_names: Sequence[ClassName],
        templates: Sequence[Template] | str = "openai_imagenet",
        batch_size: int = 256,
    ) -> CLIPZeroShotClassifier:
        """The zero-shot classifier of `clip_model` (a transformers `CLIPModel`) for `class_names`.

        `class_names`: one entry per class, a name or a list of synonyms (all are put into every template and
        averaged together). `templates`: format strings with one `{}` (or callables), or the name of a built-in
        set: "openai_imagenet" (80 prompts), "short" (7), "simple" ("a photo of a {}.").
        """
        templates = _resolve_templates(templates)
        if not class_names:
            raise ValueError("from_clip needs at least one class name.")
        clip_config = clip_model.config
        config = CLIPZeroShotConfig(
            vision_config=clip_config.vision_config.to_dict(),
            projection_dim=clip_config.projection_dim,
            num_labels=len(class_names),
            id2label={i: _display_name(name) for i, name in enumerate(class_names)},
            label2id={_display_name(name): i for i, name in enumerate(class_names)},
            class_names=[name if isinstance(name, str) else list(name) for name in class_names],
            templates=[t if isinstance(t, str) else getattr(t, "__name__", "template") for t in templates],
        )
        model = cls(config)
        # the classifier keeps the CLIP model's attention implementation (eager is needed for attention maps)
        implementation = getattr(clip_model.config, "_attn_implementation", None)
        if implementation and implementation != model.config._attn_implementation:
            model.set_attn_implementation(implementation)
        model.vision_model.load_state_dict(clip_model.vision_model.state_dict())
        model.visual_projection.load_state_dict(clip_model.visual_projection.state_dict())
        weights = zero_shot_weights(clip_model, tokenizer, class_names, templates, batch_size=batch_size)
        with torch.no_grad():
            model.classifier.weight.copy_(weights)
            model.classifier.bias.zero_()
        name = getattr(clip_config, "_name_or_path", "")
        model.config._name_or_path = name
        return model.to(next(clip_model.parameters()).device)


def _resolve_templates(templates) -> list:
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise ValueError(f"templates={templates!r}: expected a list of prompts or one of {sorted(TEMPLATE_SETS)}.")
        return list(TEMPLATE_SETS[templates])
    templates = list(templates)
    if not templates:
        raise ValueError("templates is empty: give at least one prompt such as 'a photo of a {}.'.")
    for template in templates:
        if isinstance(template, str) and "{}" not in template:
            raise ValueError(f"Prompt template {template!r} has no '{{}}' where the class name goes.")
    return templates


def _display_name(name: ClassName) -> str:
    return name if isinstance(name, str) else "/".join(name)


def _fill(template: Template, name: str) -> str:
    return template.format(name) if isinstance(template, str) else template(name)


def _text_features(clip_model, tokenizer, texts: list[str], batch_size: int) -> torch.Tensor:
    device = next(clip_model.parameters()).device
    max_length = clip_model.config.text_config.max_position_embeddings
    chunks = []
    for start in range(0, len(texts), batch_size):
        # right padding: CLIP's text tower pools at the first end-of-text token and uses absolute positions
        tokens = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt", padding_side="right").to(device)
        out = clip_model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask"))
        chunks.append(out if torch.is_tensor(out) else out.pooler_output)
    return torch.cat(chunks)


@torch.no_grad()
def zero_shot_weights(
    clip_model, tokenizer, class_names: Sequence[ClassName], templates: Sequence[Template] | str = "openai_imagenet",
    batch_size: int = 256,
) -> torch.Tensor:
    """(num_classes, projection_dim): per class, the text embeddings of every (name, template) L2-normalised,
    averaged, renormalised, times `exp(logit_scale)`."""
    templates = _resolve_templates(templates)
    was_training = clip_model.training
    clip_model.eval()
    try:
        rows = []
        for name in class_names:
            names = [name] if isinstance(name, str) else list(name)
            texts = [_fill(template, n) for n in names for template in templates]
            embeddings = F.normalize(_text_features(clip_model, tokenizer, texts, batch_size).float(), dim=-1)
            rows.append(F.normalize(embeddings.mean(0), dim=-1))
        return torch.stack(rows) * clip_model.logit_scale.exp().float()
    finally:
        clip_model.train(was_training)


def load_clip_zero_shot(
    name_or_path: str, class_names: Sequence[ClassName], templates: Sequence[Template] | str = "openai_imagenet",
    attn_implementation: str = "eager",
):
    """(CLIPZeroShotClassifier, image processor) from a CLIP checkpoint: a Hub id such as
    "openai/clip-vit-base-patch32" or a local folder in the same layout (CLIPModel weights, tokenizer and image
    processor). Eager attention by default: attention rollout needs the attention maps."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    clip_model = CLIPModel.from_pretrained(name_or_path, attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    processor = AutoImageProcessor.from_pretrained(name_or_path)
    classifier = CLIPZeroShotClassifier.from_clip(clip_model, tokenizer, class_names, templates)
    classifier.config._name_or_path = str(name_or_path)
    return classifier, processor


register_image_classifier(CLIPZeroShotConfig, CLIPZeroShotClassifier)
