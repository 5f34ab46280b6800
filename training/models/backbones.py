"""ResNet encoders (torchvision) returning the stride-4 low-level and the deepest feature maps.

torchvision's BasicBlock (ResNet-18/34) refuses ``replace_stride_with_dilation``, so for those the last
stages are turned into dilated convolutions by hand, following the Bottleneck convention: the first
block of a dilated stage keeps the previous dilation and loses its stride, later blocks dilate.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torchvision

RESNETS = {"resnet18": (64, 512), "resnet34": (64, 512), "resnet50": (256, 2048), "resnet101": (256, 2048)}


def _dilate_basic_stage(stage: nn.Sequential, previous_dilation: int, dilation: int) -> None:
    for i, block in enumerate(stage):
        first = i == 0
        for conv in (block.conv1, block.conv2):
            d = previous_dilation if first else dilation
            conv.stride = (1, 1)
            conv.dilation, conv.padding = (d, d), (d, d)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


class ResNetEncoder(nn.Module):
    def __init__(self, name: str = "resnet101", output_stride: int = 16, pretrained: str = ""):
        super().__init__()
        if name not in RESNETS:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(RESNETS)}")
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        dilate = [False, output_stride == 8, True]
        basic = name in ("resnet18", "resnet34")
        net = getattr(torchvision.models, name)(weights=None, **({} if basic else {"replace_stride_with_dilation": dilate}))
        if basic:
            if output_stride == 8:
                _dilate_basic_stage(net.layer3, 1, 2)
                _dilate_basic_stage(net.layer4, 2, 4)
            else:
                _dilate_basic_stage(net.layer4, 1, 2)
        if pretrained:
            load_encoder_weights(net, pretrained)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.low_channels, self.high_channels = RESNETS[name]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c1 = self.layer1(self.stem(x))
        c4 = self.layer4(self.layer3(self.layer2(c1)))
        return c1, c4


def load_encoder_weights(net: nn.Module, path: str | Path) -> None:
    """ImageNet weights from a local file: a torchvision ResNet state dict (optionally under 'state_dict',
    with 'module.' / 'backbone.' prefixes). The classifier ('fc.') is ignored; anything else must match."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: pretrained weights file not found. Pass a local torchvision ResNet .pth file.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a PyTorch weights file ({err}).") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    clean = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone.", "encoder."):
            key = key[len(prefix):] if key.startswith(prefix) else key
        if not key.startswith("fc."):
            clean[key] = value
    own = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    missing = sorted(set(own) - set(clean))
    shape_mismatch = sorted(k for k in set(own) & set(clean) if own[k].shape != clean[k].shape)
    if missing or shape_mismatch:
        raise ValueError(
            f"{path}: does not fit this encoder: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(shape_mismatch)} with other shapes (e.g. {shape_mismatch[:3]}). "
            "Use torchvision-layout weights of the same ResNet depth.")
    net.load_state_dict(clean, strict=False)
