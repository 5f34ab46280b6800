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

from ..config import ConfigError

RESNETS = {"resnet18": (64, 512), "resnet34": (64, 512), "resnet50": (256, 2048), "resnet101": (256, 2048)}
# Blocks per stage and whether they are bottlenecks: how a weights file tells its depth.
RESNET_LAYOUTS = {(2, 2, 2, 2, False): "resnet18", (3, 4, 6, 3, False): "resnet34", (3, 4, 6, 3, True): "resnet50",
                  (3, 4, 23, 3, True): "resnet101", (3, 8, 36, 3, True): "resnet152"}


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
            raise ConfigError(f"--backbone {name}: not available; choose {', '.join(RESNETS)}.")
        if output_stride not in (8, 16):
            raise ConfigError(f"--output-stride {output_stride}: must be 8 or 16.")
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
            load_encoder_weights(net, pretrained, name)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.low_channels, self.high_channels = RESNETS[name]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c1, _, c4 = self.stages(x)
        return c1, c4

    def stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c1, c3, c4): layer1, layer3 and layer4 features (c3 feeds PseudoSeg's hypercolumn)."""
        c1 = self.layer1(self.stem(x))
        c3 = self.layer3(self.layer2(c1))
        return c1, c3, self.layer4(c3)


def load_encoder_weights(net: nn.Module, path: str | Path, name: str) -> None:
    """ImageNet weights from a local file: a torchvision ResNet state dict (optionally under 'state_dict',
    with 'module.' / 'backbone.' prefixes). The classifier ('fc.') is ignored; anything else must match."""
    flag = f"--pretrained {path}"
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{flag}: file not found. Pass a local torchvision ResNet .pth file, or no --pretrained for random init.")
    try:
        # weights_only: a weights file must never run code while being read.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if "Weights only load failed" in str(err):
            raise ConfigError(f"{flag}: holds pickled objects (a whole model?), not plain weights. In Python, "
                              "torch.save(model.state_dict(), 'weights.pth') and pass that file.") from None
        raise ConfigError(f"{flag}: not a PyTorch weights file ({type(err).__name__}). "
                          "Pass a torchvision ResNet state dict (.pth).") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        kind = "a tensor" if isinstance(state, torch.Tensor) else f"a {type(state).__name__} that is not names -> tensors"
        raise ConfigError(f"{flag}: holds {kind}, not a state dict. "
                          "Save a torchvision ResNet's model.state_dict() with torch.save and pass that file.")
    clean = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone.", "encoder."):
            key = key[len(prefix):] if key.startswith(prefix) else key
        if not key.startswith("fc."):
            clean[key] = value
    own = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    missing, unexpected = sorted(set(own) - set(clean)), sorted(set(clean) - set(own))
    shape_mismatch = sorted(k for k in set(own) & set(clean) if own[k].shape != clean[k].shape)
    if missing or unexpected or shape_mismatch:
        depth = _resnet_depth(clean)
        if depth is not None and depth != name:
            raise ConfigError(f"{flag}: {depth} weights, but --backbone is {name}. "
                              f"Pass --backbone {depth}, or {name} weights.")
        if not set(own) & set(clean):
            raise ConfigError(f"{flag}: not ResNet encoder weights (no key like {next(iter(own))!r}; found e.g. "
                              f"{unexpected[:2]}). Pass a torchvision ResNet state dict.")
        raise ConfigError(
            f"{flag}: does not fit --backbone {name}: {len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}), {len(shape_mismatch)} with other shapes "
            f"(e.g. {shape_mismatch[:2]}). Use torchvision-layout weights of the same ResNet depth.")
    net.load_state_dict(clean, strict=False)


def _resnet_depth(keys) -> str | None:
    """'resnet50' for the keys of torchvision's ResNet-50, None for anything that is not a known ResNet."""
    blocks = tuple(1 + max((int(k.split(".")[1]) for k in keys if k.startswith(f"layer{i}.") and k.split(".")[1].isdigit()),
                           default=-1) for i in range(1, 5))
    return RESNET_LAYOUTS.get((*blocks, any(".conv3." in k for k in keys)))
