"""What every encoder gives DeepLabV3+ and the methods: a stem and four levels named layer1..layer4.

layer1 ends at stride 4 (the decoder's low-level features), layer2 at 8, layer3 at 16, and layer4 is the
deepest map, at the run's output stride (16 or 8) because its strides are turned into dilation. PseudoSeg
reads layer3 (``stages``); Contextrast hooks all four by name; ``level_channels`` sizes their heads.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ...config import ConfigError


class Encoder(nn.Module):
    level_channels: tuple[int, int, int, int]
    weights_source: str = "random init"  # what initialised it, printed at the start of every run
    frozen_bn: bool = False  # --encoder-bn frozen: BatchNorm keeps its running statistics while training

    def train(self, mode: bool = True) -> "Encoder":
        super().train(mode)
        if self.frozen_bn:  # SyncBatchNorm (torchrun on CUDA) is a _BatchNorm too
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    @property
    def low_channels(self) -> int:
        return self.level_channels[0]

    @property
    def mid_channels(self) -> int:
        return self.level_channels[2]

    @property
    def high_channels(self) -> int:
        return self.level_channels[3]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c1, _, c4 = self.stages(x)
        return c1, c4

    def stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c1, c3, c4): layer1, layer3 and layer4 features."""
        c1 = self.layer1(self.stem(x))
        c3 = self.layer3(self.layer2(c1))
        return c1, c3, self.layer4(c3)


def check_output_stride(output_stride: int) -> None:
    if output_stride not in (8, 16):
        raise ConfigError(f"--output-stride {output_stride}: must be 8 or 16.")
