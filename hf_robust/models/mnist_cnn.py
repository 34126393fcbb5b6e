"""The small CNN of MaskTune's biased-MNIST experiment, as a transformers model (the `mnist-cnn` preset).

Taghanaki et al., "MaskTune: Mitigating Spurious Correlations by Forcing to Explore" (NeurIPS 2022,
arXiv:2210.00055), section 3: "a simple convolutional neural network with four convolutional layers and a linear
head"; the layout as the authors' `SmallCNN` (github.com/aliasgharkhani/Masktune, `src/models/simple_cnn.py`),
written here:

    28x28x3 -> [conv 3x3 (no padding) -> BatchNorm -> ReLU] x 2 (16, 16 channels) -> max-pool 2
            -> [conv 3x3 -> BatchNorm -> ReLU] x 2 (32, 32 channels) -> max-pool 2 -> flatten (32 x 4 x 4 = 512)
            -> Linear 512 -> 256 -> BatchNorm -> ReLU -> Linear 256 -> num_labels

The CAM layer is the last convolution block (its ReLU, an 8x8 map at 28x28: the authors' `backbone[-3]`); the
classifier (GradTune's and DFR's last layer) is the final Linear, reading the 256 hidden features. Inputs are the
pixels in [0, 1] with no normalisation (the authors' `ToTensor()` only): `mnist_cnn_processor()` says so to the
collators. Weights start from PyTorch's default initialisation, as the authors' model does.

`MnistCnnForImageClassification` is a `PreTrainedModel`: `save_pretrained` / `from_pretrained`, and
`AutoModelForImageClassification` once `hf_robust.models.mnist_cnn` is imported (`hf_robust.models.load_model` does).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

from .auto import register_image_classifier


class MnistCnnConfig(PreTrainedConfig):
    r"""
    Configuration of [`MnistCnnForImageClassification`].

    Args:
        num_channels (`int`, defaults to 3): input channels (RGB digits).
        image_size (`int`, defaults to 28): input side; the flattened features are 32 x ((side - 4) / 2 - 4) / 2)^2.
        hidden_size (`int`, defaults to 256): width of the head's hidden layer (the classifier's input).
    """

    model_type = "hf_robust_mnist_cnn"

    num_channels: int = 3
    image_size: int = 28
    hidden_size: int = 256


CONV_CHANNELS = (16, 16, 32, 32)


def _conv_block(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3), nn.BatchNorm2d(outputs), nn.ReLU())


class MnistCnnForImageClassification(PreTrainedModel):
    """MaskTune's biased-MNIST CNN (module docstring). Takes `pixel_values` (and optional `labels`), returns
    `ImageClassifierOutput` (`logits`; `loss` = cross-entropy when labels are given)."""

    config_class = MnistCnnConfig
    config: MnistCnnConfig
    base_model_prefix = "mnist_cnn"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: MnistCnnConfig):
        super().__init__(config)
        channels = (config.num_channels, *CONV_CHANNELS)
        self.conv1 = _conv_block(channels[0], channels[1])
        self.conv2 = _conv_block(channels[1], channels[2])
        self.pool1 = nn.MaxPool2d(2)
        self.conv3 = _conv_block(channels[2], channels[3])
        self.conv4 = _conv_block(channels[3], channels[4])
        self.pool2 = nn.MaxPool2d(2)
        side = ((config.image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"image_size={config.image_size}: too small for MnistCnn (at least 14).")
        self.head = nn.Sequential(
            nn.Linear(channels[4] * side * side, config.hidden_size), nn.BatchNorm1d(config.hidden_size), nn.ReLU()
        )
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        # PyTorch's default initialisation (kaiming-uniform convs and linears, BatchNorm 1/0), as the authors' model
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)):
            module.reset_parameters()

    def forward(self, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None, **kwargs):
        x = self.pool1(self.conv2(self.conv1(pixel_values)))
        x = self.pool2(self.conv4(self.conv3(x)))
        logits = self.classifier(self.head(x.flatten(1)))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def mnist_cnn_processor(image_size: int = 28):
    """An image processor for the CNN: resize to `image_size` (a no-op on MNIST), pixels rescaled to [0, 1], no
    normalisation (the authors' `transforms.ToTensor()`)."""
    from transformers import ViTImageProcessor

    return ViTImageProcessor(do_resize=True, size={"height": image_size, "width": image_size}, do_rescale=True,
                             rescale_factor=1 / 255, do_normalize=False)


def load_mnist_cnn(num_labels: int, id2label: dict):
    """(a randomly initialised MnistCnn, its processor): the `mnist-cnn` preset."""
    config = MnistCnnConfig(num_labels=num_labels, id2label=id2label, label2id={v: k for k, v in id2label.items()})
    return MnistCnnForImageClassification(config), mnist_cnn_processor(config.image_size)


register_image_classifier(MnistCnnConfig, MnistCnnForImageClassification)
