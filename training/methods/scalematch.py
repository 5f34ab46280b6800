"""ScaleMatch (AAAI 2025): UniMatch's weak-to-strong training plus a second image scale fused by CIF.

Each step draws an image scale v and a feature scale t (research/scalematch.md 3.2-3.3):
- the batch [labelled; weak unlabelled] runs at its own size (with feature rescaling by t and the
  Dropout2d stream: FSVC) and at x v (ISVC); CIF fuses the two predictions with its gate s, which
  always weights the lower-resolution member;
- the labelled loss is taken on the fused prediction, so CIF learns from labels alone; by default it
  is also taken on the plain 1x prediction (unscaled features), the path single-scale inference and
  ``model.onnx`` run. The official code supervises the fused prediction only (``--plain-sup-weight 0``);
  with feature scales t != 1 that leaves the deployed path without direct supervision;
- pseudo-labels come from the original-size prediction before ``warmup_epochs`` and from the fused one
  after; the unlabelled losses (strong view with CutMix, ISVC, FSVC) never touch CIF.
The released code also builds a second strong view it never uses; this one does not pay for it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import hp
from ..losses import pseudo_label_loss, pseudo_labels
from .base import Method, StepContext, mixed_targets, partner_pseudo_labels, paste


@dataclass
class ScaleMatchConfig:
    conf_thresh: float = hp(0.95, "pseudo-label confidence threshold tau (VOC 0.95, Cityscapes 0)")
    img_scales: tuple = hp((0.25, 0.5, 1.5, 2.0), "V: image scales, one drawn per iteration for the second view")
    feat_scales_up: tuple = hp((0.75, 1.0), "feature scales t drawn when v > 1 (the released training logs; paper T = [0.75, 1.0, 1.25])")
    feat_scales_down: tuple = hp((1.0, 1.25), "feature scales t drawn when v < 1 (the released training logs)")
    plain_sup_weight: float = hp(1.0, "labelled loss on the plain 1x prediction, beside the fused one (official code: 0)")
    warmup_epochs: int = hp(10, "epochs before pseudo-labels switch from the original-size to the CIF-fused prediction")
    strong_weight: float = hp(0.25, "weight of the CutMixed strong-view loss")
    isvc_weight: float = hp(0.25, "weight of image-scale variation consistency (ISVC)")
    fsvc_weight: float = hp(0.5, "weight of feature-scale variation consistency (FSVC)")
    fp_dropout: float = hp(0.5, "Dropout2d rate in the FSVC stream")


class ScaleMatch(Method):
    name = "scalematch"
    Config = ScaleMatchConfig
    num_strong_views = 1
    needs_partner = True
    uses_cif = True

    def feature_scales(self, v: float) -> tuple:
        """The feature scales t a step may draw with image scale v."""
        return self.cfg.feat_scales_up if v > 1 else self.cfg.feat_scales_down

    def scale_draws(self) -> list[tuple[float, float, float]]:
        """(v, t, probability) of every pair draw_scales can return."""
        n = len(self.cfg.img_scales)
        return [(float(v), float(t), 1 / (n * len(self.feature_scales(v))))
                for v in self.cfg.img_scales for t in self.feature_scales(v)]

    def draw_scales(self) -> tuple[float, float]:
        cfg = self.cfg
        v = float(cfg.img_scales[int(torch.randint(len(cfg.img_scales), (1,)))])
        pool = self.feature_scales(v)
        return v, float(pool[int(torch.randint(len(pool), (1,)))])

    def two_scale_forward(self, x: torch.Tensor, v: float, fs: float, plain: int = 0, fp_from: int = 0
                          ) -> dict[str, torch.Tensor]:
        """{'joint': CIF-fused logits, 'ori': original-size logits, 'fp': FSVC logits of the images from
        ``fp_from`` on, 'size': x v logits resized back, 'plain': unscaled-feature logits of the first
        ``plain`` images}, all at x's size."""
        p_o, f_o, p_fp, p_plain = self.model.forward_fp(x, fs, p=self.cfg.fp_dropout, plain=plain, fp_from=fp_from)
        xv = F.interpolate(x, scale_factor=v, mode="bilinear", align_corners=True)
        p_v, f_v = self.model.forward_features(xv)
        p_v = F.interpolate(p_v, size=x.shape[-2:], mode="bilinear", align_corners=True)
        grid = f_o.shape[-2:]
        if v > 1:
            joint = self.model.cif_fuse(p_o, f_o, p_v, f_v, grid)
        else:
            joint = self.model.cif_fuse(p_v, f_v, p_o, f_o, grid)
        return {"joint": joint, "ori": p_o, "fp": p_fp, "size": p_v, "plain": p_plain}

    def use_fused_labels(self, ctx: StepContext) -> bool:
        return ctx.epoch >= self.cfg.warmup_epochs

    def training_step(self, labeled, unlabeled, partner, ctx: StepContext):
        cfg, n = self.cfg, labeled["image"].shape[0]
        v, fs = self.draw_scales()
        p_conf, p_label = partner_pseudo_labels(self.model, partner)
        strong = paste(unlabeled["box1"], partner["strong1"], unlabeled["strong1"])

        plain = n if cfg.plain_sup_weight > 0 else 0
        out = self.two_scale_forward(torch.cat([labeled["image"], unlabeled["weak"]]), v, fs, plain, fp_from=n)
        logits_s = self.model(strong)

        source = out["joint"] if self.use_fused_labels(ctx) else out["ori"]
        conf, label = pseudo_labels(source[n:])
        ign = unlabeled["ignore"]
        label_m, conf_m, ign_m = mixed_targets(unlabeled["box1"], conf, label, ign, p_conf, p_label, partner["ignore"])

        loss_x = self.sup_loss(out["joint"][:n], labeled["mask"])
        loss_plain = self.sup_loss(out["plain"], labeled["mask"]) if plain else torch.zeros((), device=loss_x.device)
        loss_s = pseudo_label_loss(logits_s, label_m, conf_m, ign_m, cfg.conf_thresh)
        loss_isvc = pseudo_label_loss(out["size"][n:], label, conf, ign, cfg.conf_thresh)
        loss_fsvc = pseudo_label_loss(out["fp"], label, conf, ign, cfg.conf_thresh)
        loss = (loss_x + cfg.plain_sup_weight * loss_plain + cfg.strong_weight * loss_s + cfg.isvc_weight * loss_isvc
                + cfg.fsvc_weight * loss_fsvc) / 2
        return {"loss": loss, "loss_x": loss_x.detach(), "loss_x_plain": loss_plain.detach(), "loss_s": loss_s.detach(),
                "loss_isvc": loss_isvc.detach(), "loss_fsvc": loss_fsvc.detach(), "scale": torch.tensor(v),
                "mask_ratio": ((conf >= cfg.conf_thresh) & (ign != 255)).float().mean()}
