"""Cross-scale Interaction Fusion (ScaleMatch): a Vision-RWKV block over the two scales' decoder
features, then the Scale-Aware Gate that outputs s, the per-pixel weight of the lower-resolution view.

Layout as in the official model file (research/scalematch.md 3.1): concat (2x256) -> 1x1 conv to 32 ->
one VRWKV block (Q-shift, bidirectional WKV, squared-ReLU channel mix, layer-scale 0.01) -> LayerNorm ->
concat with the 512 -> squeeze-excite (r=16) -> dw3x3 -> 1x1 to 128 -> dw3x3 -> 1x1 to 1 -> sigmoid.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .wkv import bi_wkv


def q_shift(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Tokens [B, T, C] on an H x W grid: each channel quarter takes its left, right, upper or lower
    neighbour (zero at the border)."""
    b, t, c = x.shape
    h, w = hw
    g = x.transpose(1, 2).reshape(b, c, h, w)
    q = c // 4
    parts = [
        F.pad(g[:, :q], (1, 0, 0, 0))[..., :, :-1],
        F.pad(g[:, q:2 * q], (0, 1, 0, 0))[..., :, 1:],
        F.pad(g[:, 2 * q:3 * q], (0, 0, 1, 0))[..., :-1, :],
        F.pad(g[:, 3 * q:4 * q], (0, 0, 0, 1))[..., 1:, :],
        g[:, 4 * q:],
    ]
    return torch.cat(parts, dim=1).flatten(2).transpose(1, 2)


def _ramp(c: int, power: float) -> torch.Tensor:
    return (torch.arange(c, dtype=torch.float32) / c) ** power


class SpatialMix(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        h = torch.arange(c, dtype=torch.float32)
        # VRWKV "fancy" init for layer 0 of 2 (research/scalematch.md).
        self.decay = nn.Parameter(-5 + 8 * (h / (c - 1)) ** 0.7)
        self.first = nn.Parameter(math.log(0.3) + 0.5 * (((h + 1) % 3) - 1))
        self.mix_k = nn.Parameter(_ramp(c, 1.0))
        self.mix_v = nn.Parameter(_ramp(c, 1.0))
        self.mix_r = nn.Parameter(_ramp(c, 0.5))
        self.key, self.value, self.receptance, self.output = (nn.Linear(c, c, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        xx = q_shift(x, hw)
        xk = x * self.mix_k + xx * (1 - self.mix_k)
        xv = x * self.mix_v + xx * (1 - self.mix_v)
        xr = x * self.mix_r + xx * (1 - self.mix_r)
        tokens = x.shape[1]
        y = bi_wkv(self.decay / tokens, self.first / tokens, self.key(xk), self.value(xv)).to(x.dtype)
        return self.output(torch.sigmoid(self.receptance(xr)) * y)


class ChannelMix(nn.Module):
    def __init__(self, c: int, hidden_rate: int = 4):
        super().__init__()
        self.mix_k = nn.Parameter(_ramp(c, 1.0))
        self.mix_r = nn.Parameter(_ramp(c, 1.0))
        self.key = nn.Linear(c, hidden_rate * c, bias=False)
        self.value = nn.Linear(hidden_rate * c, c, bias=False)
        self.receptance = nn.Linear(c, c, bias=False)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        xx = q_shift(x, hw)
        xk = x * self.mix_k + xx * (1 - self.mix_k)
        xr = x * self.mix_r + xx * (1 - self.mix_r)
        return torch.sigmoid(self.receptance(xr)) * self.value(torch.relu(self.key(xk)) ** 2)


class VRWKVBlock(nn.Module):
    def __init__(self, c: int, layer_scale: float = 1e-2):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(c, eps=1e-6), nn.LayerNorm(c, eps=1e-6)
        self.spatial, self.channel = SpatialMix(c), ChannelMix(c)
        self.gamma1 = nn.Parameter(torch.full((c,), layer_scale))
        self.gamma2 = nn.Parameter(torch.full((c,), layer_scale))

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = x + self.gamma1 * self.spatial(self.ln1(x), hw)
        return x + self.gamma2 * self.channel(self.ln2(x), hw)


def _dw_pw(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
            nn.Conv2d(cin, cout, 1, bias=False)]


class CIF(nn.Module):
    """gate = CIF(f_lo, f_hi): s in (0, 1) at the features' grid, the weight of the lower-resolution view."""

    def __init__(self, feat_channels: int = 256, reduction: int = 16, se_reduction: int = 16, gate_hidden: int = 128):
        super().__init__()
        cat = 2 * feat_channels
        hidden = cat // reduction
        self.reduce = nn.Sequential(nn.Conv2d(cat, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True))
        self.block = VRWKVBlock(hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-6)
        joint = cat + hidden
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(joint, joint // se_reduction, 1), nn.ReLU(inplace=True),
                                nn.Conv2d(joint // se_reduction, joint, 1), nn.Sigmoid())
        self.gate = nn.Sequential(*_dw_pw(joint, gate_hidden), nn.BatchNorm2d(gate_hidden), nn.ReLU(inplace=True),
                                  *_dw_pw(gate_hidden, 1), nn.Sigmoid())

    def forward(self, f_lo: torch.Tensor, f_hi: torch.Tensor) -> torch.Tensor:
        cat = torch.cat([f_lo, f_hi], dim=1)
        z = self.reduce(cat)
        b, c, h, w = z.shape
        t = self.norm(self.block(z.flatten(2).transpose(1, 2), (h, w)))
        a = torch.cat([cat, t.transpose(1, 2).reshape(b, c, h, w)], dim=1)
        return self.gate(a * self.se(a))
