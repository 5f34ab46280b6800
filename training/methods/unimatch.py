"""UniMatch (CVPR 2023): two CutMixed strong views plus the feature-perturbation stream (unimatch.py).

The step is split into its network passes (``forward_views``) and its losses (``unimatch_losses``) so that
methods built on it (RankMatch) add their terms without repeating either."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import hp
from ..losses import pseudo_label_loss, pseudo_labels
from .base import Method, StepContext, mixed_targets, partner_pseudo_labels, paste


@dataclass
class UniMatchConfig:
    conf_thresh: float = hp(0.95, "pseudo-label confidence threshold tau (VOC 0.95, Cityscapes 0)")
    strong_weight: float = hp(0.25, "weight of each of the two strong-view losses")
    fp_weight: float = hp(0.5, "weight of the feature-perturbation loss")
    fp_dropout: float = hp(0.5, "Dropout2d rate on the weak view's layer-1 and layer-4 features")


class UniMatch(Method):
    name = "unimatch"
    Config = UniMatchConfig
    num_strong_views = 2
    needs_partner = True

    def forward_views(self, labeled, unlabeled, partner) -> dict[str, torch.Tensor]:
        """The network's three passes, in this order: the CutMix partner's weak view (eval BN, no grad),
        [labelled; weak] with the feature-perturbation stream, and the two CutMixed strong views."""
        n = labeled["image"].shape[0]
        p_conf, p_label = partner_pseudo_labels(self.model, partner)
        s1 = paste(unlabeled["box1"], partner["strong1"], unlabeled["strong1"])
        s2 = paste(unlabeled["box2"], partner["strong2"], unlabeled["strong2"])
        logits, _, logits_fp, _ = self.model.forward_fp(torch.cat([labeled["image"], unlabeled["weak"]]), p=self.cfg.fp_dropout,
                                                        fp_from=n)
        logits_s1, logits_s2 = self.model(torch.cat([s1, s2])).chunk(2)
        return {"x": logits[:n], "w": logits[n:], "fp": logits_fp, "s1": logits_s1, "s2": logits_s2,
                "p_conf": p_conf, "p_label": p_label}

    def unimatch_losses(self, out: dict, labeled, unlabeled, partner) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        conf, label = pseudo_labels(out["w"])
        ign = unlabeled["ignore"]
        losses_s = []
        for k in (1, 2):
            label_m, conf_m, ign_m = mixed_targets(unlabeled[f"box{k}"], conf, label, ign, out["p_conf"], out["p_label"],
                                                   partner["ignore"])
            losses_s.append(pseudo_label_loss(out[f"s{k}"], label_m, conf_m, ign_m, cfg.conf_thresh))
        loss_x = self.sup_loss(out["x"], labeled["mask"])
        loss_fp = pseudo_label_loss(out["fp"], label, conf, ign, cfg.conf_thresh)
        loss = (loss_x + cfg.strong_weight * (losses_s[0] + losses_s[1]) + cfg.fp_weight * loss_fp) / 2
        return {"loss": loss, "loss_x": loss_x.detach(), "loss_s": (sum(losses_s) / 2).detach(),
                "loss_fp": loss_fp.detach(),
                "mask_ratio": ((conf >= cfg.conf_thresh) & (ign != 255)).float().mean()}

    def training_step(self, labeled, unlabeled, partner, ctx: StepContext):
        return self.unimatch_losses(self.forward_views(labeled, unlabeled, partner), labeled, unlabeled, partner)
