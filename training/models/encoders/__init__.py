"""Encoder registry: backbone name -> encoder class and its construction arguments.

A new encoder is one file (a subclass of ``Encoder``: stem, layer1..layer4, level_channels, its own
``--pretrained imagenet`` source) and one line here.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

from ...config import ConfigError
from .base import Encoder
from .efficientnet_lite import EfficientNetLiteEncoder
from .resnet import ResNetEncoder

ENCODERS: dict[str, Callable[..., Encoder]] = {
    "resnet18": partial(ResNetEncoder, "resnet18"),
    "resnet34": partial(ResNetEncoder, "resnet34"),
    "resnet50": partial(ResNetEncoder, "resnet50"),
    "resnet101": partial(ResNetEncoder, "resnet101"),
    "resnet50_deepstem": partial(ResNetEncoder, "resnet50", deep_stem=True),
    "resnet101_deepstem": partial(ResNetEncoder, "resnet101", deep_stem=True),
    "efficientnet_lite0": partial(EfficientNetLiteEncoder, "efficientnet_lite0"),
    "efficientnet_lite1": partial(EfficientNetLiteEncoder, "efficientnet_lite1"),
    "efficientnet_lite2": partial(EfficientNetLiteEncoder, "efficientnet_lite2"),
}


def build_encoder(name: str, output_stride: int = 16, pretrained: str = "none", bn: str = "train") -> Encoder:
    if name not in ENCODERS:
        raise ConfigError(f"--backbone {name}: not available; choose {', '.join(ENCODERS)}.")
    if bn not in ("train", "frozen"):
        raise ConfigError(f"--encoder-bn {bn}: choose train or frozen.")
    encoder = ENCODERS[name](output_stride=output_stride, pretrained=pretrained)
    encoder.frozen_bn = bn == "frozen"
    return encoder


__all__ = ["ENCODERS", "Encoder", "build_encoder"]
