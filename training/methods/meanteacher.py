"""Mean Teacher, weak-to-strong form (research/companions.md b2): an EMA teacher labels the weak view,
the student learns them on the strong view; the teacher is what is evaluated and exported."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import hp
from ..losses import pseudo_label_loss, pseudo_labels
from .base import Method, StepContext, ema_update, frozen_copy, sigmoid_rampup


@dataclass
class MeanTeacherConfig:
    ema_decay: float = hp(0.99, "EMA decay alpha of the teacher (warmed up as min(1 - 1/(t+1), alpha))")
    conf_thresh: float = hp(0.95, "teacher confidence threshold for pseudo-labels")
    unsup_weight: float = hp(1.0, "maximum weight lambda of the consistency loss")
    rampup: float = hp(0.1, "fraction of training over which lambda ramps up as exp(-5 (1 - t/T_r)^2)")


class MeanTeacher(Method):
    name = "meanteacher"
    Config = MeanTeacherConfig
    num_strong_views = 1

    def __init__(self, cfg, model_cfg, num_classes, supervised_loss):
        super().__init__(cfg, model_cfg, num_classes, supervised_loss)
        self.teacher = frozen_copy(self.model)

    def consistency_weight(self, ctx: StepContext) -> float:
        return self.cfg.unsup_weight * sigmoid_rampup(ctx.iteration, self.cfg.rampup * ctx.total_iters)

    def training_step(self, labeled, unlabeled, partner, ctx: StepContext):
        cfg, n = self.cfg, labeled["image"].shape[0]
        with torch.no_grad():
            self.teacher.eval()
            conf, label = pseudo_labels(self.teacher(unlabeled["weak"]))
        logits = self.model(torch.cat([labeled["image"], unlabeled["strong1"]]))
        loss_x = self.sup_loss(logits[:n], labeled["mask"])
        loss_u = pseudo_label_loss(logits[n:], label, conf, unlabeled["ignore"], cfg.conf_thresh)
        weight = self.consistency_weight(ctx)
        loss = loss_x + weight * loss_u
        return {"loss": loss, "loss_x": loss_x.detach(), "loss_u": loss_u.detach(),
                "unsup_weight": torch.tensor(weight)}

    def after_step(self, ctx: StepContext) -> None:
        ema_update(self.teacher, self.model, min(1 - 1 / (ctx.iteration + 2), self.cfg.ema_decay))

    def inference_model(self):
        return self.teacher
