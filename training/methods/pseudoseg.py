"""PseudoSeg (ICLR 2021; official code googleinterns/wss train_wss.py, core/train_utils_core.py;
research/companions.md f).

Two training-only modules share the segmentation network's encoder:
- a multi-label classifier (global average pool of layer4 -> linear to the K-1 foreground classes,
  class 0 being background) whose Grad-CAM gives class activation maps;
- a self-attention propagation ("v2"): keys and queries are 1x1 convolutions of the hypercolumn of
  layer3 and layer4 (both stop-gradient), the values are the CAMs, plus a residual; a background score
  2 - max is prepended and a 1x1 conv + BN turns the scores into K-class logits (the SGC prediction).
Pseudo-labels on the weak view: the decoder's and the SGC logits are divided by one shared RMS
(calibrated fusion), their softmaxes averaged and sharpened with temperature T. The strong view is
the weak view with colour jitter (always, random order) and CutOut; the consistency loss is the soft
CE over pixels that are neither padding nor cut out. Losses: L_sup + L_cls + L_att (SGC on labelled
images with their true image labels) + w_u L_cons. Only the segmentation network is exported.

Following the official code over the notes: the CAMs of unlabelled images come from the encoder in
inference mode and the classifier's own image labels (sigmoid >= 0.5); the CAMs of labelled images
come from the training-mode encoder and their true image labels; the attention also masks the CutOut
region (the code's valid mask); the colour jitter is TensorFlow's (additive brightness delta, contrast
about each channel's mean); every parameter trains at one learning rate (``--head-lr-mult 1``).
Porting choices: Grad-CAM is computed in closed form (for GAP + linear, dS_c/dA^k = W_ck / HW, so the
CAM is ReLU(sum_k W_ck A^k) up to the scale the max-normalisation removes); the labelled image's
ignore pixels stand in for its padding mask; the strong view is built on the device from the weak one
(same crop and flip, as the code); fusion and losses are taken at the input size (the code: stride 4).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from ..config import hp
from ..data.folder import IGNORE
from ..data.transforms import MEAN, STD
from ..models.deeplabv3plus import resize
from .base import Method, StepContext


@dataclass
class PseudoSegConfig:
    unsup_weight: float = hp(1.0, "weight of the consistency loss on the strong view")
    temperature: float = hp(0.5, "sharpening temperature T of the fused pseudo-label (soft labels)")
    soft_labels: bool = hp(True, "soft (sharpened distribution) pseudo-labels; false: hard argmax labels")
    conf_thresh: float = hp(0.0, "pixels whose fused confidence is below this leave the consistency loss (0: none)")
    logit_norm: bool = hp(True, "calibrated fusion: both logits divided by their shared RMS before the softmax")
    cls_thresh: float = hp(0.5, "sigmoid score from which the classifier's image label of an unlabelled image counts")
    attention_dim: int = hp(128, "key and query dimension of the self-attention propagation")
    jitter: tuple = hp((0.5, 0.5, 0.5, 0.25), "strong view colour jitter: brightness delta, contrast, saturation, hue")
    jitter_prob: float = hp(1.0, "probability of the colour jitter")
    cutout_size: float = hp(0.195, "CutOut square side as a fraction of the crop (code: 100 px at crop 513)")


class SelfAttentionPropagation(nn.Module):
    """CAMs [B, K-1, h, w] + hypercolumn [B, C, h, w] + valid [B, h, w] -> SGC logits [B, K, h, w]."""

    def __init__(self, hyper_channels: int, num_classes: int, dim: int):
        super().__init__()
        self.key = nn.Conv2d(hyper_channels, dim, 1, bias=False)
        self.query = nn.Conv2d(hyper_channels, dim, 1, bias=False)
        self.to_logits = nn.Sequential(nn.Conv2d(num_classes, num_classes, 1, bias=False), nn.BatchNorm2d(num_classes))
        self.dim = dim

    def forward(self, cam: torch.Tensor, hyper: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        b, _, h, w = cam.shape
        q = self.query(hyper).flatten(2).transpose(1, 2).float()
        k = self.key(hyper).flatten(2).float()
        v = valid.flatten(1).float()
        # Padding neither attends nor is attended to; additive like the code, so a fully masked image stays finite.
        logits = q @ k / math.sqrt(self.dim) - 1e9 * (1 - v.unsqueeze(2) * v.unsqueeze(1))
        score = (logits.softmax(-1) @ cam.flatten(2).transpose(1, 2).float()).transpose(1, 2).reshape(cam.shape) + cam
        score = torch.cat([2 - score.max(1, keepdim=True).values, score], dim=1)
        return self.to_logits(score.to(hyper.dtype))


def image_labels(mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[B, K-1] float: 1 where a foreground class occurs in the mask (ignore pixels excluded)."""
    flat = torch.where(mask == IGNORE, num_classes, mask).flatten(1)
    present = torch.zeros(mask.shape[0], num_classes + 1, device=mask.device).scatter_(1, flat, 1.0)
    return present[:, 1:num_classes]


def colour_jitter(img: torch.Tensor, valid: torch.Tensor, strength: tuple) -> torch.Tensor:
    """One [3, H, W] image in [0, 1]: brightness, contrast, saturation and hue in random order, clipped
    after each (TensorFlow's random_brightness adds a delta; random_contrast scales about channel means)."""
    b, c, s, h = strength
    for op in torch.randperm(4).tolist():
        if op == 0:
            img = img + float(torch.empty(1).uniform_(-b, b))
        elif op == 1:
            mean = (img * valid).sum((1, 2), keepdim=True) / valid.sum().clamp(min=1)
            img = (img - mean) * float(torch.empty(1).uniform_(1 - c, 1 + c)) + mean
        elif op == 2:
            img = TF.adjust_saturation(img, float(torch.empty(1).uniform_(1 - s, 1 + s)))
        else:
            img = TF.adjust_hue(img, float(torch.empty(1).uniform_(-h, h)))
        img = img.clamp(0, 1)
    return img


def cutout_box(n: int, h: int, w: int, side: float, device) -> torch.Tensor:
    """[n, H, W] bool, True inside a side x side square (clipped at the border) centred uniformly."""
    half = max(1, round(side * min(h, w) / 2))
    box = torch.zeros(n, h, w, dtype=torch.bool, device=device)
    for i in range(n):
        cy, cx = int(torch.randint(0, h, (1,))), int(torch.randint(0, w, (1,)))
        box[i, max(0, cy - half):cy + half, max(0, cx - half):cx + half] = True
    return box


class PseudoSeg(Method):
    name = "pseudoseg"
    Config = PseudoSegConfig
    optim_defaults = {"head_lr_mult": 1.0}  # TF DeepLab: one learning rate for every layer

    def __init__(self, cfg, model_cfg, num_classes, supervised_loss):
        super().__init__(cfg, model_cfg, num_classes, supervised_loss)
        encoder = self.model.encoder
        self.classifier = nn.Linear(encoder.high_channels, num_classes - 1)
        self.attention = SelfAttentionPropagation(encoder.high_channels + encoder.mid_channels, num_classes, cfg.attention_dim)

    def training_heads(self):
        return [self.classifier, self.attention]

    def strong_view(self, weak: torch.Tensor, padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(strong image, CutOut mask) from the normalised weak view; CutOut is filled with the mean
        pixel, which is 0 after normalisation."""
        cfg = self.cfg
        mean = torch.tensor(MEAN, device=weak.device).view(3, 1, 1)
        std = torch.tensor(STD, device=weak.device).view(3, 1, 1)
        images = []
        for img, pad in zip(weak, padding):
            img = img * std + mean
            if float(torch.rand(1)) < cfg.jitter_prob:
                img = colour_jitter(img, (pad != IGNORE).float(), cfg.jitter)
            images.append((img - mean) / std)
        cut = cutout_box(weak.shape[0], *weak.shape[-2:], cfg.cutout_size, weak.device)
        return torch.stack(images).masked_fill(cut.unsqueeze(1), 0.0), cut

    def sgc_logits(self, c3: torch.Tensor, c4: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """SGC logits at c4's grid from Grad-CAM of the present classes (``labels`` [B, K-1]); the CAMs and
        the hypercolumn are stop-gradient, so only the attention module learns from them."""
        with torch.no_grad():
            cam = F.relu(torch.einsum("kc,bchw->bkhw", self.classifier.weight.float(), c4.float()))
            cam = cam * labels[:, :, None, None]
            top = cam.amax((2, 3), keepdim=True)
            cam = torch.where(top > 0, cam / top.clamp(min=1e-12), torch.zeros_like(cam))
            hyper = torch.cat([resize(c3, c4.shape[-2:]), c4], dim=1).detach()
            grid = F.interpolate(valid.unsqueeze(1).float(), size=c4.shape[-2:], mode="nearest").squeeze(1)
        return self.attention(cam.to(c4.dtype), hyper, grid)

    def own_image_labels(self, c4: torch.Tensor) -> torch.Tensor:
        """[B, K-1] float: the classes the classifier says an (unlabelled) image holds."""
        return (torch.sigmoid(self.classifier(c4.mean((2, 3))).float()) >= self.cfg.cls_thresh).float()

    @torch.no_grad()
    def cam_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c3, c4) for Grad-CAM and the attention: from the encoder in inference mode, as the code."""
        encoder, was_training = self.model.encoder, self.model.encoder.training
        encoder.eval()
        _, c3, c4 = encoder.stages(x)
        encoder.train(was_training)
        return c3, c4

    def fuse(self, logits_dec: torch.Tensor, logits_att: torch.Tensor) -> torch.Tensor:
        """Sharpened calibrated fusion of the decoder's and the SGC logits (float, one size), [B, K, H, W]."""
        cfg = self.cfg
        if cfg.logit_norm:
            rms = torch.cat([logits_dec, logits_att]).pow(2).mean().add(1e-8).rsqrt()
            logits_dec, logits_att = logits_dec * rms, logits_att * rms
        prob = (logits_dec.softmax(1) + logits_att.softmax(1)) / 2
        if cfg.soft_labels and cfg.temperature != 1.0:
            prob = prob.pow(1 / cfg.temperature)
            prob = prob / prob.sum(1, keepdim=True)
        return prob

    @torch.no_grad()
    def pseudo_labels(self, weak: torch.Tensor, valid: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Sharpened calibrated fusion of the decoder's and the SGC prediction, [B, K, H, W]; the SGC branch
        uses the classifier's own image labels unless ``labels`` [B, K-1] are given."""
        logits_dec = self.model(weak).float()
        c3, c4 = self.cam_features(weak)
        labels = self.own_image_labels(c4) if labels is None else labels
        return self.fuse(logits_dec, resize(self.sgc_logits(c3, c4, labels, valid), weak.shape[-2:]).float())

    def compute_losses(self, labeled, unlabeled, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Named losses, still attached to the graph: loss_x, loss_cls, loss_att and loss_u (unweighted)."""
        cfg, num_classes = self.cfg, self.model.num_classes
        x_l, y_l = labeled["image"], labeled["mask"]
        weak, padding = unlabeled["weak"], unlabeled["ignore"]
        strong, cut = self.strong_view(weak, padding)
        valid = (padding != IGNORE) & ~cut
        target = self.pseudo_labels(weak, valid)

        c1, c3, c4 = self.model.encoder.stages(x_l)
        loss_x = self.sup_loss(resize(self.model.decode(c1, c4)[0], x_l.shape[-2:]), y_l)
        labels_l = image_labels(y_l, num_classes)
        loss_cls = F.binary_cross_entropy_with_logits(self.classifier(c4.mean((2, 3))).float(), labels_l)
        loss_att = self.sup_loss(resize(self.sgc_logits(c3, c4, labels_l, y_l != IGNORE), x_l.shape[-2:]), y_l)

        log_prob = self.model(strong).float().log_softmax(1)
        conf = target.max(1).values
        if cfg.soft_labels:
            per_pixel = -(target * log_prob).sum(1)
        else:
            per_pixel = F.nll_loss(log_prob, target.argmax(1), reduction="none")
        kept = valid & (conf >= cfg.conf_thresh) if cfg.conf_thresh > 0 else valid
        loss_u = (per_pixel * kept).sum() / valid.sum().clamp(min=1)
        return {"loss_x": loss_x, "loss_cls": loss_cls, "loss_att": loss_att, "loss_u": loss_u,
                "mask_ratio": kept.float().mean()}

    def training_step(self, labeled, unlabeled, partner, ctx: StepContext):
        losses = self.compute_losses(labeled, unlabeled, ctx)
        loss = losses["loss_x"] + losses["loss_cls"] + losses["loss_att"] + self.cfg.unsup_weight * losses["loss_u"]
        return {"loss": loss, **{k: v.detach() for k, v in losses.items()}}
