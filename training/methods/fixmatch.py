"""FixMatch for segmentation, as UniMatch re-implements it (fixmatch.py): one strong view with CutMix."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import hp
from ..losses import pseudo_label_loss, pseudo_labels
from .base import Method, StepContext, mixed_targets, partner_pseudo_labels, paste


@dataclass
class FixMatchConfig:
    conf_thresh: float = hp(0.95, "pseudo-label confidence threshold tau (VOC 0.95, Cityscapes 0)")
    unsup_weight: float = hp(1.0, "weight of the strong-view loss; total is (L_x + w*L_s) / 2")


class FixMatch(Method):
    name = "fixmatch"
    Config = FixMatchConfig
    num_strong_views = 1
    needs_partner = True

    def training_step(self, labeled, unlabeled, partner, ctx: StepContext):
        cfg, n = self.cfg, labeled["image"].shape[0]
        p_conf, p_label = partner_pseudo_labels(self.model, partner)
        strong = paste(unlabeled["box1"], partner["strong1"], unlabeled["strong1"])

        logits = self.model(torch.cat([labeled["image"], unlabeled["weak"]]))
        logits_x, logits_w = logits[:n], logits[n:]
        logits_s = self.model(strong)

        conf, label = pseudo_labels(logits_w)
        label_m, conf_m, ign_m = mixed_targets(unlabeled["box1"], conf, label, unlabeled["ignore"],
                                               p_conf, p_label, partner["ignore"])
        loss_x = self.sup_loss(logits_x, labeled["mask"])
        loss_s = pseudo_label_loss(logits_s, label_m, conf_m, ign_m, cfg.conf_thresh)
        loss = (loss_x + cfg.unsup_weight * loss_s) / 2
        return {"loss": loss, "loss_x": loss_x.detach(), "loss_s": loss_s.detach(),
                "mask_ratio": ((conf >= cfg.conf_thresh) & (unlabeled["ignore"] != 255)).float().mean()}
