"""Model factory: one place that turns a ModelConfig into a network."""
from __future__ import annotations

from ..config import ModelConfig
from .encoders import ENCODERS
from .deeplabv3plus import DECODERS, DeepLabV3Plus

BACKBONES = tuple(ENCODERS)


def build_model(cfg: ModelConfig, num_classes: int, cif: bool = False) -> DeepLabV3Plus:
    """DeepLabV3+ on the configured encoder; ``cif`` adds ScaleMatch's fusion module."""
    return DeepLabV3Plus(num_classes, cfg.backbone, cfg.output_stride, cfg.pretrained, cfg.aspp_dilations, cif=cif,
                         encoder_bn=cfg.encoder_bn, decoder=cfg.decoder)


__all__ = ["BACKBONES", "DECODERS", "DeepLabV3Plus", "build_model"]
