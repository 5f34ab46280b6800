"""CPS, Cross Pseudo Supervision (CVPR 2021): two networks of one architecture, initialised differently,
each trained on the other's hard labels; with CutMix by default (TorchSemiSeg's CPS+CutMix). Network 1
is evaluated and exported, so deployment costs one network."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import hp
from ..data.folder import IGNORE
from ..losses import cross_entropy
from ..models import build_model
from .base import Method, StepContext


@dataclass
class CPSConfig:
    cps_weight: float = hp(1.0, "lambda with CutMix (VOC 1.0, Cityscapes 5; without CutMix VOC 1.5, Cityscapes 6)")
    cutmix: bool = hp(True, "mix two unlabelled images with box masks and supervise with the mixed labels")
    cutmix_boxes: int = hp(3, "boxes per CutMix mask (overlaps toggle), French et al.")
    cutmix_area: tuple = hp((0.25, 0.5), "range of the total mixed area fraction")


def box_masks(n: int, h: int, w: int, boxes: int, area: tuple[float, float], device) -> torch.Tensor:
    """[n, 1, h, w] float masks: ``boxes`` random boxes per image XOR-ed together (1 = second image)."""
    masks = torch.zeros(n, 1, h, w, device=device)
    for i in range(n):
        for _ in range(boxes):
            frac = float(torch.empty(1).uniform_(*area)) / boxes
            ratio = float(torch.exp(torch.empty(1).uniform_(-1.0986, 1.0986)))  # log-uniform in [1/3, 3]
            bh = max(1, min(h, int(round((frac * h * w * ratio) ** 0.5))))
            bw = max(1, min(w, int(round((frac * h * w / ratio) ** 0.5))))
            y = int(torch.randint(0, h - bh + 1, (1,)))
            x = int(torch.randint(0, w - bw + 1, (1,)))
            masks[i, 0, y:y + bh, x:x + bw] = 1 - masks[i, 0, y:y + bh, x:x + bw]
    return masks


class CPS(Method):
    name = "cps"
    Config = CPSConfig
    optim_defaults = {"head_lr_mult": 1.0}  # the official code trains every parameter group at one LR

    def __init__(self, cfg, model_cfg, num_classes, supervised_loss):
        super().__init__(cfg, model_cfg, num_classes, supervised_loss)
        # Continue the RNG stream: the second network's initialisation differs from the first's.
        self.model2 = build_model(model_cfg, num_classes)

    @property
    def needs_partner(self) -> bool:
        return self.cfg.cutmix

    def trained_networks(self):
        return [self.model, self.model2]

    def init_targets(self):
        """Fine-tuning keeps the two networks different, as the official code does from ImageNet weights:
        both take the checkpoint's encoder, only network 1 its decoder; network 2 keeps its own head."""
        return [(self.model, ""), (self.model2, "encoder.")]

    def training_step(self, labeled, unlabeled, partner, ctx: StepContext):
        cfg, n = self.cfg, labeled["image"].shape[0]
        x_u, ign = unlabeled["weak"], unlabeled["ignore"]
        if cfg.cutmix:
            m = box_masks(x_u.shape[0], *x_u.shape[-2:], cfg.cutmix_boxes, cfg.cutmix_area, x_u.device)
            with torch.no_grad():
                targets = []
                for net in (self.model, self.model2):
                    mixed = net(x_u) * (1 - m) + net(partner["weak"]) * m
                    targets.append(mixed.argmax(1))
            x_u = x_u * (1 - m) + partner["weak"] * m
            ign = torch.where(m[:, 0].bool(), partner["ignore"], ign)
        logits1 = self.model(torch.cat([labeled["image"], x_u]))
        logits2 = self.model2(torch.cat([labeled["image"], x_u]))
        if cfg.cutmix:
            y1, y2 = targets
            u1, u2 = logits1[n:], logits2[n:]
        else:  # cross supervision on every image, labelled ones included
            y1, y2 = logits1.detach().argmax(1), logits2.detach().argmax(1)
            ign = F.pad(ign, (0, 0, 0, 0, n, 0))
            u1, u2 = logits1, logits2
        padding = ign == IGNORE
        y1 = torch.where(padding, torch.full_like(y1, IGNORE), y1)
        y2 = torch.where(padding, torch.full_like(y2, IGNORE), y2)
        loss_x = self.sup_loss(logits1[:n], labeled["mask"]) + self.sup_loss(logits2[:n], labeled["mask"])
        loss_cps = cross_entropy(u1, y2) + cross_entropy(u2, y1)
        loss = loss_x + cfg.cps_weight * loss_cps
        return {"loss": loss, "loss_x": loss_x.detach(), "loss_cps": loss_cps.detach()}
