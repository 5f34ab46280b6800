"""DeepLabV3+ (ASPP 6/12/18 at output stride 16, 48-channel low-level projection), as in UniMatch and
ScaleMatch, with the forward variants the semi-supervised methods need and optional CIF fusion.

``decoder="light"`` replaces every 3x3 convolution of the head (the ASPP's atrous branches and the two
stride-4 fuse convolutions) by a depthwise-separable one, as DeepLabV3+'s MobileNet variants and
segmentation_models_pytorch do; the 256-channel feature the methods and CIF read is unchanged.

All resizes are bilinear with align_corners=True, matching the official code.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError
from .encoders import build_encoder
from .cif import CIF

# standard: the papers' DeepLabV3+; light: depthwise-separable 3x3s (about 1/4 of Lite0's MACs at 512x512)
DECODERS = ("standard", "light")


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def _conv_bn_relu(cin: int, cout: int, k: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=(k // 2) * dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _separable_bn_relu(cin: int, cout: int, k: int = 3, dilation: int = 1) -> nn.Sequential:
    """Depthwise kxk + BN + ReLU, then pointwise 1x1 + BN + ReLU (DeepLab's MobileNet/Xception heads): at 256
    channels about a ninth of a full 3x3's multiply-adds. Index 0 is the depthwise convolution, which reads
    ``cin`` channels as a full convolution's index 0 does."""
    return nn.Sequential(nn.Conv2d(cin, cin, k, padding=(k // 2) * dilation, dilation=dilation, groups=cin, bias=False),
                         nn.BatchNorm2d(cin), nn.ReLU(inplace=True), *_conv_bn_relu(cin, cout, 1))


class ASPP(nn.Module):
    def __init__(self, cin: int, cout: int, rates: Sequence[int], conv3x3=_conv_bn_relu):
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn_relu(cin, cout, 1)] + [conv3x3(cin, cout, 3, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), _conv_bn_relu(cin, cout, 1))
        self.project = _conv_bn_relu(cout * (len(rates) + 2), cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        outs.append(resize(self.pool(x), x.shape[-2:]))
        return self.project(torch.cat(outs, dim=1))


class DeepLabV3Plus(nn.Module):
    FEATURE_CHANNELS = 256

    def __init__(self, num_classes: int, backbone: str = "resnet101", output_stride: int = 16,
                 pretrained: str = "none", aspp_dilations: Sequence[int] = (6, 12, 18), cif: bool = False,
                 encoder_bn: str = "train", decoder: str = "standard"):
        super().__init__()
        if decoder not in DECODERS:
            raise ConfigError(f"--decoder {decoder}: choose {' or '.join(DECODERS)}.")
        self.encoder = build_encoder(backbone, output_stride, pretrained, encoder_bn)
        conv3x3 = _separable_bn_relu if decoder == "light" else _conv_bn_relu
        rates = tuple(aspp_dilations) if output_stride == 16 else tuple(2 * r for r in aspp_dilations)
        self.aspp = ASPP(self.encoder.high_channels, 256, rates, conv3x3)
        self.reduce = _conv_bn_relu(self.encoder.low_channels, 48, 1)
        self.fuse = nn.Sequential(conv3x3(256 + 48, 256, 3), conv3x3(256, 256, 3))
        self.classifier = nn.Conv2d(256, num_classes, 1)
        self.cif = CIF(self.FEATURE_CHANNELS) if cif else None
        self.num_classes = num_classes

    # --- building blocks -------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c1, c4): stride-4 low-level and deepest encoder features."""
        return self.encoder(x)

    def decode(self, c1: torch.Tensor, c4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, feature) at c1's stride-4 grid; feature is the 256-channel map before the classifier."""
        return self.decode_from(self.decoder_input(c1, c4))

    def decoder_input(self, c1: torch.Tensor, c4: torch.Tensor) -> torch.Tensor:
        """The 304-channel stride-4 map the decoder's 3x3 convolutions read: reduced low-level features
        concatenated with the ASPP output (what PS-MT calls the encoder's output and perturbs)."""
        high = resize(self.aspp(c4), c1.shape[-2:])
        return torch.cat([self.reduce(c1), high], dim=1)

    def decode_from(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, feature) from the decoder input ``f``."""
        feat = self.fuse(f)
        return self.classifier(feat), feat

    # --- forward variants ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the input's size."""
        return self.forward_features(x)[0]

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, feat = self.decode(*self.encode(x))
        return resize(logits, x.shape[-2:]), feat

    def forward_fp(self, x: torch.Tensor, feature_scale: float = 1.0, p: float = 0.5, plain: int = 0,
                   fp_from: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """UniMatch's feature perturbation (ScaleMatch FSVC when feature_scale != 1): the encoder runs
        once; the decoder runs on [(c1, c4); (Dropout2d(c1), Dropout2d(c4))] in one batch, both
        optionally rescaled by feature_scale first. The clean half is decoded from the rescaled features
        too, exactly as the official code does. Returns (clean logits, clean feature, FP logits, plain
        logits), logits at the input's size; FP logits only of the images from ``fp_from`` on (the
        labelled images' FP output is decoded, for the official BatchNorm batch, but never used, so it is
        not resized); plain logits are the unscaled-feature prediction (the path single-scale inference
        runs) of the first ``plain`` images, None when plain is 0."""
        c1, c4 = self.encode(x)
        scaled = feature_scale != 1.0
        plain_logits = resize(self.decode(c1[:plain], c4[:plain])[0], x.shape[-2:]) if plain and scaled else None
        if scaled:
            c1 = F.interpolate(c1, scale_factor=feature_scale, mode="bilinear", align_corners=True)
            c4 = F.interpolate(c4, scale_factor=feature_scale, mode="bilinear", align_corners=True)
        n = x.shape[0]
        logits, feat = self.decode(torch.cat([c1, F.dropout2d(c1, p, training=True)]),
                                   torch.cat([c4, F.dropout2d(c4, p, training=True)]))
        clean, fp = resize(logits[:n], x.shape[-2:]), resize(logits[n + fp_from:], x.shape[-2:])
        if plain and not scaled:  # the clean half already is the plain path
            plain_logits = clean[:plain]
        return clean, feat[:n], fp, plain_logits

    # --- CIF ---------------------------------------------------------------------------------------
    def cif_fuse(self, p_lo: torch.Tensor, f_lo: torch.Tensor, p_hi: torch.Tensor, f_hi: torch.Tensor,
                 grid: Sequence[int]) -> torch.Tensor:
        """Fused logits s*P_lo + (1-s)*P_hi. Both features are brought to ``grid`` (the original view's
        feature grid, where CIF runs in training); s is resized to the logits' size (both at input size)."""
        if self.cif is None:
            raise RuntimeError("this model has no CIF module; train it with --method scalematch")
        s = self.cif(resize(f_lo, grid), resize(f_hi, grid))
        s = resize(s, p_lo.shape[-2:])
        return s * p_lo + (1 - s) * p_hi

    def forward_multiscale(self, x: torch.Tensor, scales: Sequence[float] = (0.5, 2.0)) -> torch.Tensor:
        """CIF multi-scale inference (the paper's dagger rows), hierarchical from the largest scale down:
        each lower scale is fused with the running prediction of the scales above it, the gate computed
        on the 1x feature grid as in training (research/scalematch.md 3.4)."""
        chain = sorted(set(float(s) for s in scales) | {1.0}, reverse=True)
        size = x.shape[-2:]
        outputs = {}
        for s in chain:
            xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=True)
            logits, feat = self.forward_features(xs)
            outputs[s] = (resize(logits, size), feat)
        grid = outputs[1.0][1].shape[-2:]
        pred, f_prev = outputs[chain[0]]
        for s in chain[1:]:
            p_lo, f_lo = outputs[s]
            pred = self.cif_fuse(p_lo, f_lo, pred, f_prev, grid)
            f_prev = f_lo
        return pred

    # --- optimiser groups --------------------------------------------------------------------------
    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        enc = {id(p) for p in self.encoder.parameters()}
        return [p for p in self.parameters() if id(p) not in enc]
