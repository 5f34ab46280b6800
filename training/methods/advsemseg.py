"""AdvSemSeg, adversarial semi-supervised segmentation (Hung et al., BMVC 2018; code hfslyc/AdvSemiSeg).

A fully convolutional discriminator D tells the segmenter's softmax maps from one-hot ground truth, pixel by
pixel. The segmenter learns CE on labelled images, fools D on labelled (lambda_adv) and unlabelled
(lambda_semi_adv) images, and, from ``semi_start`` on, learns its own argmax on unlabelled pixels where D's
confidence sigmoid(D) >= ``mask_t`` (lambda_semi). D learns BCE: predictions (labelled and unlabelled,
detached) -> 0, one-hot labels -> 1, each half-weighted, with its own Adam and poly LR.

Following the official train.py where it differs from the paper or this codebase's loop:
- defaults are the README's Table-5 command (lambda_adv 0.01; the script's own default is 0.1);
- the adversarial BCE skips ignored label pixels; D also learns from unlabelled predictions (``D_remain``);
- the segmenter's update uses D before D's update, so one backward of (segmenter loss + D loss) with D frozen
  in the former and the predictions detached in the latter equals the official two-phase step.
Differences kept on purpose: one segmenter forward over [labelled; unlabelled] (BN statistics over both; the
official DeepLab-v2 freezes BN); D's real input is this step's labelled masks (the code draws a second,
independent labelled batch); padded unlabelled pixels are left out of every loss; start points are fractions
of training (5000 of 20000 iterations in the paper); when no unlabelled pixel is trusted the official code
also drops the unlabelled adversarial term for that step, here it stays; D's input is upscaled to 128 px when
the crop is smaller.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import hp
from ..data.folder import IGNORE
from ..losses import cross_entropy
from ..models.deeplabv3plus import resize
from .base import Method, StepContext
from .critics import critic_adam, frozen_call, masked_bce, one_hot, upsample_to_min_side

PRED_LABEL, GT_LABEL = 0.0, 1.0
# Five stride-2 4x4 convolutions: one logit per 32 px cell (10x10 on the papers' 321 px crops). Smaller inputs
# are upscaled to this side so that tiny crops still get a 4x4 confidence map rather than one value per image.
DISCRIMINATOR_MIN_SIDE = 128


@dataclass
class AdvSemSegConfig:
    lambda_adv: float = hp(0.01, "weight of the adversarial loss on labelled images (paper Table 5; script default 0.1)")
    lambda_semi_adv: float = hp(0.001, "weight of the adversarial loss on unlabelled images")
    lambda_semi: float = hp(0.1, "weight of the self-taught CE on unlabelled pixels D trusts")
    mask_t: float = hp(0.2, "T_semi: unlabelled pixels with sigmoid(D) >= this get their argmax as label")
    semi_start: float = hp(0.25, "fraction of training before the self-taught loss starts (5000 of 20000 iterations)")
    semi_adv_start: float = hp(0.0, "fraction of training before the unlabelled adversarial loss starts")
    d_remain: bool = hp(True, "D also learns from unlabelled predictions (official D_remain)")
    d_lr: float = hp(1e-4, "discriminator Adam learning rate, poly-decayed like the segmenter's")
    d_betas: tuple = hp((0.9, 0.99), "discriminator Adam betas")
    d_channels: int = hp(64, "ndf: width of D's first layer (doubling to 8x)")


class FCDiscriminator(nn.Module):
    """Five 4x4 stride-2 convolutions with LeakyReLU(0.2), no normalisation; one logit per 32x32 cell,
    resized back to the input grid (bilinear, align_corners, as ``interp`` in the official code)."""

    def __init__(self, num_classes: int, ndf: int = 64):
        super().__init__()
        widths = [num_classes, ndf, ndf * 2, ndf * 4, ndf * 8]
        layers = []
        for cin, cout in zip(widths, widths[1:]):
            layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(ndf * 8, 1, 4, stride=2, padding=1)

    def forward(self, prob: torch.Tensor) -> torch.Tensor:
        x = upsample_to_min_side(prob, DISCRIMINATOR_MIN_SIDE)
        return resize(self.classifier(self.features(x)), prob.shape[-2:])


class AdvSemSeg(Method):
    name = "advsemseg"
    Config = AdvSemSegConfig

    def __init__(self, cfg, model_cfg, num_classes, supervised_loss):
        super().__init__(cfg, model_cfg, num_classes, supervised_loss)
        self.num_classes = num_classes
        self.discriminator = FCDiscriminator(num_classes, cfg.d_channels)

    def extra_optimizers(self):
        return [critic_adam(self.discriminator, self.cfg.d_lr, self.cfg.d_betas)]

    def segmenter_losses(self, logits: torch.Tensor, labeled: dict, unlabeled: dict, ctx: StepContext) -> dict:
        """The segmenter's terms (with graphs) for logits of [labelled; unlabelled]; D is frozen here."""
        cfg, n = self.cfg, labeled["image"].shape[0]
        prob = logits.float().softmax(1)
        d_out = frozen_call(self.discriminator, prob)
        valid_l, valid_u = labeled["mask"] != IGNORE, unlabeled["ignore"] != IGNORE
        losses = {"loss_x": self.sup_loss(logits[:n], labeled["mask"]),
                  "loss_adv": masked_bce(d_out[:n], GT_LABEL, valid_l)}
        zero = logits.sum() * 0.0
        progress = ctx.iteration / ctx.total_iters
        losses["loss_semi_adv"] = masked_bce(d_out[n:], GT_LABEL, valid_u) if progress >= cfg.semi_adv_start else zero
        if progress >= cfg.semi_start:
            trusted = (d_out[n:, 0].detach().sigmoid() >= cfg.mask_t) & valid_u
            semi_gt = torch.where(trusted, logits[n:].detach().argmax(1), torch.full_like(trusted, IGNORE, dtype=torch.long))
            losses["loss_semi"] = cross_entropy(logits[n:], semi_gt)
            losses["semi_ratio"] = trusted.float().mean()
        else:
            losses["loss_semi"], losses["semi_ratio"] = zero, torch.zeros(())
        return losses

    def discriminator_loss(self, logits: torch.Tensor, labeled: dict, unlabeled: dict) -> torch.Tensor:
        """D's BCE: detached predictions -> 0, one-hot labels -> 1, each half of the loss."""
        n = labeled["image"].shape[0]
        valid = torch.cat([labeled["mask"] != IGNORE, unlabeled["ignore"] != IGNORE])
        if not self.cfg.d_remain:
            logits, valid = logits[:n], valid[:n]
        fake = masked_bce(self.discriminator(logits.detach().float().softmax(1)), PRED_LABEL, valid)
        real = masked_bce(self.discriminator(one_hot(labeled["mask"], self.num_classes)), GT_LABEL, valid[:n])
        return (fake + real) / 2

    def training_step(self, labeled, unlabeled, partner, ctx: StepContext):
        cfg = self.cfg
        logits = self.model(torch.cat([labeled["image"], unlabeled["weak"]]))
        seg = self.segmenter_losses(logits, labeled, unlabeled, ctx)
        loss_seg = (seg["loss_x"] + cfg.lambda_adv * seg["loss_adv"] + cfg.lambda_semi_adv * seg["loss_semi_adv"]
                    + cfg.lambda_semi * seg["loss_semi"])
        loss_d = self.discriminator_loss(logits, labeled, unlabeled)
        return {"loss": loss_seg + loss_d, "loss_d": loss_d.detach(), **{k: v.detach() for k, v in seg.items()}}
