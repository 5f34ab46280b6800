"""GCT, Guided Collaborative Training (Ke et al., ECCV 2020; official code ZHKKKe/PixelSSL, ssl_gct.py).

Two segmenters f1, f2 of one architecture (different head initialisations) see the same batch
[labelled; unlabelled]. A flaw detector F reads (image, softmax prediction) and predicts the prediction's
error map. Each segmenter learns
  CE on labelled images
  + dc_weight * ramp(t) * MSE(p_k, dc target)   dynamic consistency: where the other model's (processed) flaw
                                                is lower, the target is the other model's softmax, else its own
  + fc_weight * mean(both_bad * F(x, p_k)^2)    flaw correction through the frozen detector
and F learns fd_weight * MSE(F(x, p_k), error map) on labelled images (mean of the two models), with its own
Adam and poly LR. The error map ("pipeline C") is mu * sum_c |onehot(y) - p|, Gaussian-blurred, then nu times
dilated (3x3 max) and re-blurred, min-max normalised per image.

Following the official code where it differs from the paper:
- the consistency and flaw-correction terms cover the whole batch, labelled images included;
- flaw correction only counts pixels where both models' processed flaws exceed dc_threshold (the paper's
  L_fc has no such mask);
- the detector's loss sees its output with negatives zeroed (the code's in-place clamp), gradient straight
  through;
- processed flaw: negatives zeroed, blurred, zeroed when the image's maximum is under 0.1, min-max normalised;
  values above dc_threshold count as 1 when the two models' flaws are compared;
- blur kernels are crop/16 (flaw processing), crop/8 and crop/4 (error map), made odd, with PixelSSL's
  sigma = 0.3 ((k - 1)/2 - 1) + 0.8 on a delta filtered in scipy's "reflect" mode;
- defaults are the DeepLab-v2 VOC script's (dc 100, fc 1, threshold 0.6, fd 10, mu 0.5, nu 1, detector Adam
  1e-4 with betas (0.9, 0.99), ramp over 3 of 20 epochs).
Differences kept on purpose: each segmenter runs once per step (the code's extra no-grad pre-forward gives the
same output, no dropout here, but moves BN running statistics twice); padded unlabelled pixels are left out of
the consistency and correction terms; the ramp-up is a fraction of training; the detector's input is upscaled
to 128 px when the crop is smaller; network 1 is evaluated and exported.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import hp
from ..data.folder import IGNORE
from ..models import build_model
from ..models.deeplabv3plus import resize
from .base import Method, StepContext, sigmoid_rampup  # PixelSSL's func.sigmoid_rampup
from .critics import critic_adam, frozen_call, one_hot, upsample_to_min_side

# Four stride-2 and three shrinking stride-1 4x4 convolutions then a stride-2 classifier: 60 px in give one cell
# out, 128 px a 3x3 map (321 px crops, the papers', give 9x9). Smaller inputs are upscaled to this side.
FLAW_DETECTOR_MIN_SIDE = 128
FLAW_BLUR_DIV, ERROR_BLUR_DIV, ERROR_REBLUR_DIV = 16, 8, 4  # blur kernel = crop / this, made odd


@dataclass
class GCTConfig:
    dc_weight: float = hp(100.0, "dynamic consistency weight (dc_ssl_scale, VOC DeepLab-v2 script)")
    fc_weight: float = hp(1.0, "flaw correction weight (fc_ssl_scale)")
    dc_threshold: float = hp(0.6, "processed flaw above this marks a pixel bad (dc_threshold)")
    dc_rampup: float = hp(0.15, "fraction of training over which dc ramps up as exp(-5 (1 - t/T)^2) (3 of 20 epochs)")
    fd_weight: float = hp(10.0, "flaw detector loss weight (fd_scale)")
    fd_lr: float = hp(1e-4, "flaw detector Adam learning rate, poly-decayed")
    fd_betas: tuple = hp((0.9, 0.99), "flaw detector Adam betas")
    mu: float = hp(0.5, "error map: scale of sum_c |onehot - p| (1/2 maps it to [0, 1])")
    nu: int = hp(1, "error map: rounds of 3x3 dilation + re-blur")
    flaw_clip: float = hp(0.1, "a processed flaw map whose maximum is below this is set to zero")
    fd_channels: int = hp(64, "ndf: width of the flaw detector's first layer (doubling to 8x)")


@lru_cache(maxsize=32)
def gaussian_taps(size: int) -> tuple[float, ...]:
    """1-D taps of PixelSSL's GaussianBlurLayer: scipy's gaussian_filter (truncate 4, mode 'reflect') applied
    to a centred delta of length ``size``, so mass beyond the ends folds back in."""
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    radius = int(4.0 * sigma + 0.5)
    weights = [math.exp(-0.5 * (j / sigma) ** 2) for j in range(-radius, radius + 1)]
    total = sum(weights)
    taps = [0.0] * size
    for i in range(size):
        for j in range(-radius, radius + 1):
            m = (i + j) % (2 * size)
            if (m if m < size else 2 * size - 1 - m) == size // 2:
                taps[i] += weights[j + radius] / total
    return tuple(taps)


def blur_size(side: int, div: int) -> int:
    k = int(side / div)
    return k + 1 if k % 2 == 0 else k


def gaussian_blur(x: torch.Tensor, size: int) -> torch.Tensor:
    """Blur a [B, 1, H, W] map with reflection padding (PixelSSL's GaussianBlurLayer)."""
    taps = torch.tensor(gaussian_taps(size), dtype=x.dtype, device=x.device)
    kernel = torch.outer(taps, taps)[None, None]
    pad = size // 2
    return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), kernel)


def per_image_minmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.flatten(1)
    return flat.min(1).values.view(-1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1)


@torch.no_grad()
def error_map(prob: torch.Tensor, target: torch.Tensor, mu: float, nu: int) -> torch.Tensor:
    """The flaw detector's target (FDGTGenerator): normalised, blurred per-pixel error of ``prob`` against the
    one-hot ``target`` (ignored pixels have an all-zero target, so they count as half wrong at mu = 0.5)."""
    side = prob.shape[-2]
    diff = (target - prob).abs().sum(1, keepdim=True) * mu
    diff = gaussian_blur(diff, blur_size(side, ERROR_BLUR_DIV))
    for _ in range(nu):
        diff = gaussian_blur(F.max_pool2d(F.pad(diff, (1, 1, 1, 1), mode="reflect"), 3, stride=1),
                             blur_size(side, ERROR_REBLUR_DIV))
    lo, hi = per_image_minmax(diff)
    return (diff - lo) / (hi - lo + 1e-9)


@torch.no_grad()
def processed_flaw(flawmap: torch.Tensor, clip: float) -> torch.Tensor:
    """FlawmapHandler: negatives to 0, blur, zero an image whose maximum is below ``clip``, then subtract the
    minimum and divide by the range measured before that zeroing (as the code does)."""
    flaw = gaussian_blur(flawmap.clamp(min=0), blur_size(flawmap.shape[-2], FLAW_BLUR_DIV))
    lo, hi = per_image_minmax(flaw)
    flaw = flaw * (hi > clip).float()
    return (flaw - lo) / (hi - lo + 1e-9)


@torch.no_grad()
def dynamic_consistency_targets(p1, p2, flaw1, flaw2, threshold: float):
    """DCGTGenerator: each model's target is its own softmax where its flaw is not above the other's, the
    other's softmax elsewhere; flaws above ``threshold`` count as 1. Also the both-bad mask for flaw correction."""
    bad1, bad2 = flaw1 > threshold, flaw2 > threshold
    f1, f2 = torch.where(bad1, torch.ones_like(flaw1), flaw1), torch.where(bad2, torch.ones_like(flaw2), flaw2)
    keep1, keep2 = f2 >= f1, f1 >= f2
    return torch.where(keep1, p1, p2), torch.where(keep2, p2, p1), (bad1 & bad2).float()


class IBNorm(nn.Module):
    """BatchNorm on the first half of the channels, InstanceNorm (no affine) on the rest."""

    def __init__(self, channels: int):
        super().__init__()
        self.split = int(channels * 0.5 + 0.5)
        self.bnorm = nn.BatchNorm2d(self.split)
        self.inorm = nn.InstanceNorm2d(channels - self.split)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.bnorm(x[:, :self.split]), self.inorm(x[:, self.split:])], 1)


class FlawDetector(nn.Module):
    """PixelSSL's FlawDetector: 4x4 convolutions (stride 2, with stride-1 refinements), IBNorm, LeakyReLU(0.2),
    one logit per cell resized to the prediction's grid; input is the image concatenated with the softmax."""

    def __init__(self, in_channels: int, ndf: int = 64):
        super().__init__()
        plan = [(in_channels, ndf, 2), (ndf, ndf * 2, 2), (ndf * 2, ndf * 2, 1), (ndf * 2, ndf * 4, 2),
                (ndf * 4, ndf * 4, 1), (ndf * 4, ndf * 8, 2), (ndf * 8, ndf * 8, 1)]
        layers = []
        for cin, cout, stride in plan:
            layers += [nn.Conv2d(cin, cout, 4, stride=stride, padding=1), IBNorm(cout), nn.LeakyReLU(0.2, inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(ndf * 8, 1, 4, stride=2, padding=1)

    def forward(self, image: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
        x = upsample_to_min_side(torch.cat([image, prob.to(image.dtype)], 1), FLAW_DETECTOR_MIN_SIDE)
        return resize(self.classifier(self.features(x)), prob.shape[-2:])


class GCT(Method):
    name = "gct"
    Config = GCTConfig

    def __init__(self, cfg, model_cfg, num_classes, supervised_loss):
        super().__init__(cfg, model_cfg, num_classes, supervised_loss)
        self.num_classes = num_classes
        # Continue the RNG stream: the second network's head starts differently from the first's.
        self.model2 = build_model(model_cfg, num_classes)
        self.flaw_detector = FlawDetector(3 + num_classes, cfg.fd_channels)

    def trained_networks(self):
        return [self.model, self.model2]

    def init_targets(self):
        """Fine-tuning keeps the two networks different, as PixelSSL does from pretrained backbones: both take
        the checkpoint's encoder, only network 1 its decoder."""
        return [(self.model, ""), (self.model2, "encoder.")]

    def extra_optimizers(self):
        return [critic_adam(self.flaw_detector, self.cfg.fd_lr, self.cfg.fd_betas)]

    def flaw_detector_loss(self, image: torch.Tensor, probs: list[torch.Tensor], labeled: dict) -> tuple:
        """(detector loss on the labelled images, the detector's flaw maps of the whole batch). The predictions
        enter detached: this loss trains the detector only."""
        n, cfg = labeled["image"].shape[0], self.cfg
        flaws = [self.flaw_detector(image, p.detach()) for p in probs]
        target = one_hot(labeled["mask"], self.num_classes)
        # PixelSSL's FlawmapHandler zeroes negatives of this very tensor in place (through .data): the loss sees
        # max(F, 0) while the gradient passes straight through.
        seen = [f[:n].float() + (f[:n].float().clamp(min=0) - f[:n].float()).detach() for f in flaws]
        losses = [F.mse_loss(s, error_map(p[:n].detach(), target, cfg.mu, cfg.nu)) for s, p in zip(seen, probs)]
        return cfg.fd_weight * (losses[0] + losses[1]) / 2, flaws

    def segmenter_losses(self, image, logits, probs, flaws, labeled, unlabeled, ctx: StepContext) -> dict:
        """Supervised, dynamic-consistency and flaw-correction terms (with graphs); the detector is frozen."""
        cfg, n = self.cfg, labeled["image"].shape[0]
        handled = [processed_flaw(f.detach().float(), cfg.flaw_clip) for f in flaws]
        t1, t2, both_bad = dynamic_consistency_targets(probs[0].detach(), probs[1].detach(), *handled, cfg.dc_threshold)
        valid = torch.cat([torch.ones_like(labeled["mask"], dtype=torch.bool), unlabeled["ignore"] != IGNORE])
        valid = valid.unsqueeze(1).float()
        loss_x = self.sup_loss(logits[0][:n], labeled["mask"]) + self.sup_loss(logits[1][:n], labeled["mask"])
        loss_dc = sum(((p - t) ** 2 * valid).mean() for p, t in zip(probs, (t1, t2)))
        loss_fc = sum((both_bad * valid * frozen_call(self.flaw_detector, image, p).float() ** 2).mean() for p in probs)
        return {"loss_x": loss_x, "loss_dc": loss_dc, "loss_fc": loss_fc,
                "dc_ramp": torch.tensor(sigmoid_rampup(ctx.iteration, cfg.dc_rampup * ctx.total_iters))}

    def training_step(self, labeled, unlabeled, partner, ctx: StepContext):
        cfg = self.cfg
        image = torch.cat([labeled["image"], unlabeled["weak"]])
        logits = [self.model(image), self.model2(image)]
        probs = [z.float().softmax(1) for z in logits]
        loss_fd, flaws = self.flaw_detector_loss(image, probs, labeled)
        seg = self.segmenter_losses(image, logits, probs, flaws, labeled, unlabeled, ctx)
        loss = seg["loss_x"] + cfg.dc_weight * seg["dc_ramp"] * seg["loss_dc"] + cfg.fc_weight * seg["loss_fc"] + loss_fd
        return {"loss": loss, "loss_fd": loss_fd.detach(), **{k: v.detach() for k, v in seg.items()}}
