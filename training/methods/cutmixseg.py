"""CutMix-Seg (French et al., BMVC 2020), after the official code (Britefury/cutmix-semisup-seg,
train_seg_semisup_mask_mt.py, mask_gen.py).

A mean teacher whose student reads a CutMix of two unlabelled images, x0 outside the box and x1 inside,
and whose target is the same mix of the teacher's predictions on x0 and x1. One box per image covers
exactly half of the crop (area-proportional sampling, random aspect ratio, fully inside the crop). The
consistency loss is the squared difference of the two softmax vectors summed over classes, masked by
the non-padding pixels and averaged over every pixel; it is scaled by the fraction of teacher pixels
whose confidence reaches 0.97 (the code's default gate: a scalar per batch, which acts as a ramp-up;
``--conf-per-pixel`` masks pixels instead). The teacher is an EMA (alpha 0.99) of the student's
parameters and BatchNorm statistics, starts as its copy, and is what is evaluated and exported.

Where this follows the code over the notes (research/companions-2.md 3.8): the teacher labels with batch
statistics (train mode), as the code runs it. The recipe around the method is the shared one: SGD with
the poly schedule and every BatchNorm trained (the published runs use Adam at a constant small LR with
the backbone's BatchNorm frozen, tuned for an ImageNet DeepLab v2), and the labelled and mixed images
share one student pass. The BMVC runs show the student the same views as the teacher; the code's later
colour augmentation (arXiv 2110.04487) is ``--student-strong``, with this package's strong view.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import hp
from ..data.folder import IGNORE
from .base import Method, StepContext, ema_update, frozen_copy, paste


@dataclass
class CutMixSegConfig:
    ema_decay: float = hp(0.99, "teacher EMA alpha over parameters and BatchNorm statistics (--teacher_alpha)")
    cons_weight: float = hp(1.0, "weight of the consistency loss")
    conf_thresh: float = hp(0.97, "teacher confidence threshold of the consistency gate")
    conf_per_pixel: bool = hp(False, "mask unconfident pixels instead of scaling the loss by the batch's confident fraction")
    box_area: tuple = hp((0.5, 0.5), "range of the box's area as a fraction of the crop (--mask_prop_range)")
    student_strong: bool = hp(False, "the student mixes the strong views (the 2021 colour augmentation); the BMVC runs use the teacher's views")


def area_boxes(n: int, h: int, w: int, area: tuple[float, float], device) -> torch.Tensor:
    """[n, h, w] bool boxes as the official BoxMaskGenerator (one box, area-proportional, random aspect
    ratio, within bounds): area p ~ U(area), height fraction p^u with u ~ U(0, 1), width fraction p over
    that, so both lie in [p, 1]; sizes and the top-left corner rounded, the box fully inside the crop."""
    boxes = torch.zeros(n, h, w, dtype=torch.bool, device=device)
    for i in range(n):
        p = float(torch.empty(()).uniform_(*area))
        y_frac = p ** float(torch.rand(())) if p > 0 else 0.0
        x_frac = p / y_frac if p > 0 else 0.0
        bh, bw = round(y_frac * h), round(x_frac * w)
        y0 = round((h - bh) * float(torch.rand(())))
        x0 = round((w - bw) * float(torch.rand(())))
        boxes[i, y0:y0 + bh, x0:x0 + bw] = True
    return boxes


def gated_consistency(logits: torch.Tensor, teacher_logits: torch.Tensor, valid: torch.Tensor, thresh: float,
                      per_pixel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, confident fraction): mean over pixels of sum_c (p_s - p_t)^2 x valid x gate, the gate the
    batch's fraction of teacher pixels with confidence >= thresh, or that indicator per pixel."""
    p_t = teacher_logits.detach().float().softmax(1)
    p_s = logits.float().softmax(1)
    confident = (p_t.max(1).values >= thresh).float()
    gate = confident if per_pixel else confident.mean()
    per_px = ((p_s - p_t) ** 2).sum(1)
    return (per_px * valid.float() * gate).mean(), confident.mean()


class CutMixSeg(Method):
    name = "cutmixseg"
    Config = CutMixSegConfig
    needs_partner = True

    def __init__(self, cfg, model_cfg, num_classes, supervised_loss):
        super().__init__(cfg, model_cfg, num_classes, supervised_loss)
        self.teacher = frozen_copy(self.model)

    @property
    def num_strong_views(self) -> int:
        return 1 if self.cfg.student_strong else 0

    def inference_model(self):
        return self.teacher

    def training_step(self, labeled, unlabeled, partner, ctx: StepContext):
        cfg, n = self.cfg, labeled["image"].shape[0]
        x0, x1 = unlabeled["weak"], partner["weak"]
        box = area_boxes(x0.shape[0], *x0.shape[-2:], cfg.box_area, x0.device)
        with torch.no_grad():
            t0 = self.teacher(x0)
            target = paste(box, self.teacher(x1), t0)
        view = "strong1" if cfg.student_strong else "weak"
        mixed = paste(box, partner[view], unlabeled[view])
        valid = paste(box, partner["ignore"], unlabeled["ignore"]) != IGNORE

        logits = self.model(torch.cat([labeled["image"], mixed]))
        loss_x = self.sup_loss(logits[:n], labeled["mask"])
        loss_cons, conf_rate = gated_consistency(logits[n:], target, valid, cfg.conf_thresh, cfg.conf_per_pixel)
        loss = loss_x + cfg.cons_weight * loss_cons
        return {"loss": loss, "loss_x": loss_x.detach(), "loss_cons": loss_cons.detach(), "conf_rate": conf_rate}

    def after_step(self, ctx: StepContext) -> None:
        ema_update(self.teacher, self.model, self.cfg.ema_decay)
