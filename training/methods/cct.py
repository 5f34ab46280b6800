"""CCT, Cross-Consistency Training (CVPR 2020; official code yassouali/CCT, research/companions-2.md 2).

A shared encoder feeds a main decoder and K auxiliary decoders. On unlabelled images each auxiliary
decoder sees a perturbed copy of the encoder output z and is pulled, by the MSE between softmaxes, to
the main decoder's detached prediction; the main decoder learns from labels only.

On our DeepLabV3+ the encoder is everything up to the 256-channel decoder feature (ResNet, ASPP, fuse
convolutions) and the main decoder is the classifier with the bilinear upsampling: each auxiliary
decoder has that same architecture with its own weights, as in the code (1x1 conv + upsampling).
Where the official code and the notes differ the code is followed:
- the set and counts of config.json: 2 I-VAT (xi 1e-6, eps 2.0), 6 DropOut (0.5), 6 G-Cutout (erase
  0.4), 2 Con-Msk, 2 Obj-Msk, 6 F-Drop (gamma in [0.7, 0.9] of the per-image max), 6 F-Noise (0.3,
  one noise tensor shared by the batch); K = 30;
- the weight ramps to 30 as exp(-5 (1 - t)^2) over int(0.1 x epochs) whole epochs;
- the MSE is averaged over B x C x H x W at the input size (here over non-padding pixels only).
Porting choices: I-VAT finds its direction with ``torch.autograd.grad`` in float32 (the code calls
``backward`` inside forward, which DDP and AMP do not allow); G-Cutout finds objects as 8-connected
components of the predicted foreground whose outline is longer than 50 pixels (the code keeps OpenCV
contours with more than 50 vertices); the guided perturbations take ``background_class`` as
background (the code hard-codes class 0). Only the encoder and main decoder are evaluated and exported.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, hp
from ..data.folder import IGNORE
from ..models.deeplabv3plus import DeepLabV3Plus, resize
from .base import Method, StepContext, sigmoid_rampup

PERTURBATIONS = ("vat", "dropout", "cutout", "context", "object", "featdrop", "noise")


@dataclass
class CCTConfig:
    unsup_weight: float = hp(30.0, "final weight w_u of the consistency loss (MSE averaged over B x C x H x W)")
    rampup: float = hp(0.1, "w_u ramps up as exp(-5 (1 - t)^2) over int(rampup x epochs) whole epochs")
    vat_decoders: int = hp(2, "I-VAT auxiliary decoders (virtual adversarial noise on z)")
    vat_xi: float = hp(1e-6, "I-VAT: step xi of the power iteration")
    vat_eps: float = hp(2.0, "I-VAT: L2 norm of the adversarial perturbation per image")
    dropout_decoders: int = hp(6, "DropOut auxiliary decoders (Dropout2d on z)")
    drop_rate: float = hp(0.5, "DropOut: Dropout2d rate")
    cutout_decoders: int = hp(6, "G-Cutout auxiliary decoders (a random sub-box of each predicted object erased)")
    cutout_erase: float = hp(0.4, "G-Cutout: erased fraction of each object's box width and height")
    cutout_min_outline: int = hp(50, "G-Cutout: only objects whose outline is longer than this many pixels are cut")
    context_decoders: int = hp(2, "Con-Msk auxiliary decoders (z kept on predicted objects only)")
    object_decoders: int = hp(2, "Obj-Msk auxiliary decoders (z kept on predicted background only)")
    featdrop_decoders: int = hp(6, "F-Drop auxiliary decoders (the most activated region of z dropped)")
    featdrop_range: tuple = hp((0.7, 0.9), "F-Drop: drop where the channel mean of z >= gamma x its image max, gamma uniform in this range")
    noise_decoders: int = hp(6, "F-Noise auxiliary decoders (z + z * N, N uniform)")
    noise_range: float = hp(0.3, "F-Noise: N uniform in [-r, r], one draw shared by the batch")
    background_class: int = hp(0, "class id the guided perturbations treat as background (VOC 0)")


def l2_normalise(d: torch.Tensor) -> torch.Tensor:
    """Each image's perturbation scaled to unit L2 norm."""
    return d / (d.flatten(1).norm(dim=1).view(-1, *[1] * (d.dim() - 1)) + 1e-8)


def connected_components(mask: torch.Tensor) -> torch.Tensor:
    """[B, H, W] bool -> int64 labels, 0 outside ``mask``, one id per 8-connected component (max
    propagation of pixel indices until stable)."""
    h, w = mask.shape[-2:]
    fg = mask.unsqueeze(1).float()
    labels = torch.arange(1, h * w + 1, dtype=torch.float32, device=mask.device).view(1, 1, h, w) * fg
    while True:
        grown = F.max_pool2d(labels, 3, stride=1, padding=1) * fg
        if torch.equal(grown, labels):
            return labels.squeeze(1).long()
        labels = grown


def object_boxes(mask: torch.Tensor, min_outline: int) -> list[list[tuple[int, int, int, int]]]:
    """Per image, (y0, y1, x0, x1) of each connected object whose outline (pixels with a 4-neighbour
    outside it, or on the border) is longer than ``min_outline``."""
    labels = connected_components(mask)
    inside = F.pad(mask.float(), (1, 1, 1, 1))
    enclosed = inside[:, :-2, 1:-1] * inside[:, 2:, 1:-1] * inside[:, 1:-1, :-2] * inside[:, 1:-1, 2:]
    outline = mask & (enclosed == 0)
    h, w = mask.shape[-2:]
    ys = torch.arange(h, device=mask.device).view(h, 1).expand(h, w)
    xs = torch.arange(w, device=mask.device).view(1, w).expand(h, w)
    boxes = []
    for lab, edge in zip(labels, outline):
        ids, counts = torch.unique(lab[edge], return_counts=True)
        found = []
        for i in ids[counts > min_outline].tolist():
            sel = lab == i
            y, x = ys[sel], xs[sel]
            found.append((int(y.min()), int(y.max()), int(x.min()), int(x.max())))
        boxes.append(found)
    return boxes


def cutout_mask(boxes: list[list[tuple[int, int, int, int]]], size: tuple[int, int], erase: float,
                device) -> torch.Tensor:
    """[B, 1, H, W] float, 0 on a random (erase x box) sub-box of every object box, 1 elsewhere."""
    mask = torch.ones(len(boxes), 1, *size, device=device)
    for i, found in enumerate(boxes):
        for y0, y1, x0, x1 in found:
            bh, bw = y1 - y0, x1 - x0
            dy = int(torch.randint(0, int(bh * (1 - erase)) + 1, (1,)))
            dx = int(torch.randint(0, int(bw * (1 - erase)) + 1, (1,)))
            mask[i, 0, y0 + dy:y0 + dy + int(bh * erase), x0 + dx:x0 + dx + int(bw * erase)] = 0
    return mask


def softmax_mse(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean squared error between softmax(logits) and target over classes and non-padding pixels."""
    err = (logits.float().softmax(1) - target).pow(2).sum(1)
    return (err * valid).sum() / (valid.sum() * logits.shape[1]).clamp(min=1)


class CCT(Method):
    name = "cct"
    Config = CCTConfig

    def __init__(self, cfg, model_cfg, num_classes, supervised_loss):
        super().__init__(cfg, model_cfg, num_classes, supervised_loss)
        self.kinds = [kind for kind in PERTURBATIONS for _ in range(getattr(cfg, f"{kind}_decoders"))]
        if not self.kinds:
            raise ConfigError("--method cct: every auxiliary decoder count is 0; CCT needs at least one (e.g. --dropout-decoders 6).")
        self.aux_decoders = nn.ModuleList(nn.Conv2d(DeepLabV3Plus.FEATURE_CHANNELS, num_classes, 1) for _ in self.kinds)

    def training_heads(self):
        return [self.aux_decoders]

    def consistency_weight(self, ctx: StepContext) -> float:
        ramp_epochs = int(self.cfg.rampup * ctx.total_iters / ctx.iters_per_epoch)
        return self.cfg.unsup_weight * sigmoid_rampup(ctx.iteration, ramp_epochs * ctx.iters_per_epoch)

    def vat_perturbation(self, z: torch.Tensor, decoder: nn.Module, size) -> torch.Tensor:
        """One power-iteration step on this decoder's KL(clean || z + xi d), d from uniform noise."""
        cfg = self.cfg
        with torch.autocast(z.device.type, enabled=False), torch.enable_grad():
            z0 = z.detach().float()
            with torch.no_grad():
                clean = resize(decoder(z0), size).softmax(1)
            d = l2_normalise(torch.rand_like(z0) - 0.5).requires_grad_()
            noisy = resize(decoder(z0 + cfg.vat_xi * d), size).log_softmax(1)
            (grad,) = torch.autograd.grad(F.kl_div(noisy, clean, reduction="batchmean"), d)
        return cfg.vat_eps * l2_normalise(grad).to(z.dtype)

    def perturb(self, kind: str, z: torch.Tensor, decoder: nn.Module, guide: dict) -> torch.Tensor:
        cfg = self.cfg
        if kind == "vat":
            return z + self.vat_perturbation(z, decoder, guide["size"])
        if kind == "dropout":
            return F.dropout2d(z, cfg.drop_rate, training=True)
        if kind == "cutout":
            keep = cutout_mask(guide["boxes"], guide["size"], cfg.cutout_erase, z.device)
            return z * F.interpolate(keep, size=z.shape[-2:], mode="nearest")
        if kind == "context":
            return z * guide["objects"]
        if kind == "object":
            return z * (1 - guide["objects"])
        if kind == "featdrop":
            attention = z.mean(1, keepdim=True)
            top = attention.flatten(1).max(1).values.view(-1, 1, 1, 1)
            gamma = float(torch.empty(1).uniform_(*cfg.featdrop_range))
            return z * (attention < top * gamma)
        noise = torch.empty(z.shape[1:], device=z.device).uniform_(-cfg.noise_range, cfg.noise_range)
        return z + z * noise.unsqueeze(0)

    def compute_losses(self, labeled, unlabeled, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Named losses, still attached to the graph: loss_x (labels, main path) and loss_u (consistency)."""
        loss_x = self.sup_loss(self.model(labeled["image"]), labeled["mask"])
        x_u = unlabeled["weak"]
        size = x_u.shape[-2:]
        logits_u, z = self.model.decode(*self.model.encode(x_u))
        target = resize(logits_u.detach(), size).float().softmax(1)
        objects = target.argmax(1) != self.cfg.background_class
        guide = {"size": size, "objects": F.interpolate(objects.unsqueeze(1).float(), size=z.shape[-2:], mode="nearest")}
        if "cutout" in self.kinds:
            guide["boxes"] = object_boxes(objects, self.cfg.cutout_min_outline)
        valid = (unlabeled["ignore"] != IGNORE).float()
        consistency = [softmax_mse(resize(dec(self.perturb(kind, z, dec, guide)), size), target, valid)
                       for kind, dec in zip(self.kinds, self.aux_decoders)]
        return {"loss_x": loss_x, "loss_u": sum(consistency) / len(consistency)}

    def training_step(self, labeled, unlabeled, partner, ctx: StepContext):
        losses = self.compute_losses(labeled, unlabeled, ctx)
        weight = self.consistency_weight(ctx)
        return {"loss": losses["loss_x"] + weight * losses["loss_u"], "loss_x": losses["loss_x"].detach(),
                "loss_u": losses["loss_u"].detach(), "unsup_weight": torch.tensor(weight)}
