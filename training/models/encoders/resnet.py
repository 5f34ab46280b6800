"""ResNet encoders: torchvision's ResNet-18/34/50/101, and the deep-stem ResNet-50/101 that UniMatch and
ScaleMatch train from.

torchvision's BasicBlock (ResNet-18/34) refuses ``replace_stride_with_dilation``, so for those the last
stages are turned into dilated convolutions by hand, following the Bottleneck convention: the first
block of a dilated stage keeps the previous dilation and loses its stride, later blocks dilate.

The deep stem (UniMatch model/backbone/resnet.py, the layout of their released resnet50.pth /
resnet101.pth): three 3x3 convolutions 3->64 (stride 2), 64->64, 64->128 as ``conv1.0/.3/.6`` with
BatchNorm at ``conv1.1/.4`` and ``bn1`` after the last, so layer1 starts from 128 channels. Those files are
not published anywhere torch.hub can fetch (UniMatch's README links them on Google Drive), so
``--pretrained imagenet`` asks for the local file.
"""
from __future__ import annotations

import torch.nn as nn
import torchvision

from ...config import ConfigError
from .base import Encoder, check_output_stride
from .weights import download_once, is_random_init, load_matching, read_state_dict

CHANNELS = {"resnet18": (64, 128, 256, 512), "resnet34": (64, 128, 256, 512),
            "resnet50": (256, 512, 1024, 2048), "resnet101": (256, 512, 1024, 2048)}
# Blocks per stage and whether they are bottlenecks: how a weights file tells its depth.
LAYOUTS = {(2, 2, 2, 2, False): "resnet18", (3, 4, 6, 3, False): "resnet34", (3, 4, 6, 3, True): "resnet50",
           (3, 4, 23, 3, True): "resnet101", (3, 8, 36, 3, True): "resnet152"}
IMAGENET = {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights", "resnet50": "ResNet50_Weights",
            "resnet101": "ResNet101_Weights"}
DEEP_STEM_SOURCE = ("UniMatch's README (github.com/LiheYoung/UniMatch, 'Pretrained Backbone': resnet50.pth / "
                    "resnet101.pth)")


def _dilate_basic_stage(stage: nn.Sequential, previous_dilation: int, dilation: int) -> None:
    for i, block in enumerate(stage):
        first = i == 0
        for conv in (block.conv1, block.conv2):
            d = previous_dilation if first else dilation
            conv.stride = (1, 1)
            conv.dilation, conv.padding = (d, d), (d, d)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


def _deep_stem(net: torchvision.models.ResNet) -> None:
    """Give a torchvision Bottleneck ResNet the three-convolution stem, initialised as torchvision does."""
    convs = [nn.Conv2d(3, 64, 3, 2, 1, bias=False), nn.Conv2d(64, 64, 3, 1, 1, bias=False), nn.Conv2d(64, 128, 3, 1, 1, bias=False)]
    net.conv1 = nn.Sequential(convs[0], nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                              convs[1], nn.BatchNorm2d(64), nn.ReLU(inplace=True), convs[2])
    net.bn1 = nn.BatchNorm2d(128)
    first = net.layer1[0]
    first.conv1 = nn.Conv2d(128, first.conv1.out_channels, 1, bias=False)
    first.downsample[0] = nn.Conv2d(128, first.downsample[0].out_channels, 1, bias=False)
    for conv in (*convs, first.conv1, first.downsample[0]):
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")


def resnet_depth(keys) -> str | None:
    """'resnet50' for the keys of a ResNet-50, None for anything that is not a known ResNet."""
    blocks = tuple(1 + max((int(k.split(".")[1]) for k in keys if k.startswith(f"layer{i}.") and k.split(".")[1].isdigit()),
                           default=-1) for i in range(1, 5))
    return LAYOUTS.get((*blocks, any(".conv3." in k for k in keys)))


class ResNetEncoder(Encoder):
    def __init__(self, name: str = "resnet101", output_stride: int = 16, pretrained: str = "none", deep_stem: bool = False):
        super().__init__()
        check_output_stride(output_stride)
        basic = name in ("resnet18", "resnet34")
        dilate = [False, output_stride == 8, True]
        net = getattr(torchvision.models, name)(weights=None, **({} if basic else {"replace_stride_with_dilation": dilate}))
        if basic:
            if output_stride == 8:
                _dilate_basic_stage(net.layer3, 1, 2)
                _dilate_basic_stage(net.layer4, 2, 4)
            else:
                _dilate_basic_stage(net.layer4, 1, 2)
        self.name = name + ("_deepstem" if deep_stem else "")
        if deep_stem:
            _deep_stem(net)
        if not is_random_init(pretrained):
            self.weights_source = self._load(net, pretrained)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.level_channels = CHANNELS[name]

    def _load(self, net: nn.Module, pretrained: str) -> str:
        deep = self.name.endswith("_deepstem")
        if pretrained == "imagenet":
            if deep:
                raise ConfigError(f"--pretrained imagenet: the deep-stem {self.name} weights cannot be downloaded "
                                  f"automatically; get them from {DEEP_STEM_SOURCE} and pass --pretrained PATH.")
            weights = getattr(torchvision.models, IMAGENET[self.name]).IMAGENET1K_V1
            state, source = download_once(weights.url, self.name), f"ImageNet ({weights.url.rsplit('/', 1)[-1]})"
        else:
            expect = f"{'UniMatch-layout deep-stem' if deep else 'torchvision'} {self.name} weights"
            state, source = read_state_dict(pretrained, f"--pretrained {pretrained}", expect), pretrained

        def explain(state: dict) -> str | None:
            depth = resnet_depth(state)
            base = self.name.removesuffix("_deepstem")
            if depth is not None and depth != base:
                return f"{depth} weights, but --backbone is {self.name}. Pass --backbone {depth}, or {base} weights."
            has_deep = "conv1.0.weight" in state
            if depth == base and has_deep != deep:
                other = f"{base}_deepstem" if has_deep else base
                return (f"{'deep-stem (three 3x3 convolutions)' if has_deep else 'single 7x7 stem'} {base} weights, "
                        f"but --backbone is {self.name}. Pass --backbone {other}.")
            return None

        load_matching(net, state, f"--pretrained {pretrained}", self.name, ignore=("fc.",), explain=explain)
        return source
