"""PS-MT, Perturbed and Strict Mean Teachers (CVPR 2022), after the official code (yyliu01/PS-MT, VocCode).

One student and two EMA teachers. In each epoch one teacher is active (teacher 1 in even 0-based epochs,
teacher 2 in odd ones) and only it follows the student by EMA. Pseudo-labels come from the teachers on
the weak view: the inactive teacher keeps its top-k class logits per pixel and takes the active
teacher's elsewhere, and the two are averaged in logit space. The student sees the strong view, CutMixed
within the batch (box side sqrt(1 - lambda), lambda ~ Beta(4, 4)) with the targets mixed alike, and
learns it with the strict confidence-weighted CE: CE x confidence, averaged over the pixels whose
confidence reaches the threshold. T-VAT perturbs the student's decoder input (on the labelled and the
unlabelled pass) with adversarial noise found by power iteration through the teachers' decoders; the
noise is a constant, not learned. The unlabelled weight follows a cosine ramp-up.

Where this follows the code over the notes (research/companions.md e): the teachers are averaged in logit
space with the top-k assist, not as a mean of softmaxes; the teachers label the weak view with batch
statistics (BatchNorm in train mode), while T-VAT runs their decoders in eval mode; one learning rate for
every parameter group.

Deviations, because the shared loop has one optimiser and one schedule: the official code first trains
teacher 1, teacher 2 and the student separately with supervised CE for 5 labelled-set epochs (its teachers
from random weights); here both teachers start as copies of the student (ImageNet weights where
--pretrained gives them) and the cosine ramp-up over the first 12 epochs stands in for that warm-up. The
labelled images are the weak view (the official student reads a strong view of them), and the labelled
and unlabelled images share one student pass, as in every method here. The negative-learning branch,
disabled in all published scripts, is left out.

Teacher 1 is evaluated and exported: the paper's single-network comparison (the author, yyliu01/PS-MT
issue #43), the code's inference.py and its Cityscapes evaluator; the code's VOC validation averages both
teachers, at the cost of two networks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import hp
from ..data.folder import IGNORE
from ..models.deeplabv3plus import resize
from .base import Method, StepContext, ema_update, frozen_copy, paste


@dataclass
class PSMTConfig:
    conf_thresh: float = hp(0.6, "confidence threshold of the strict CE (semi_p_th; VOC and Cityscapes)")
    unsup_weight: float = hp(1.5, "final weight of the unlabelled loss (VOC aug 1.5; VOC 1464-split 0.6, 0.06 at 92 labels; Cityscapes 3.0)")
    rampup_epochs: float = hp(12.0, "epochs of the cosine ramp-up of the unlabelled weight")
    ema_decay: float = hp(0.996, "EMA keep rate of the active teacher (parameters and BatchNorm statistics)")
    teacher_gamma: float = hp(0.5, "weight of teacher 1 in the logit ensemble (teacher 2 gets 1 - gamma)")
    assist_topk: int = hp(7, "the inactive teacher keeps its top-k class logits per pixel, the active one fills the rest")
    vat_xi: float = hp(1e-6, "T-VAT: finite-difference step of the power iteration")
    vat_eps: float = hp(2.0, "T-VAT: L2 norm of the adversarial noise per image")
    vat_iters: int = hp(1, "T-VAT: power iterations")
    cutmix_beta: float = hp(4.0, "CutMix: lambda ~ Beta(b, b); the box's sides are sqrt(1 - lambda) of the crop's")


def cosine_rampup(step: float, length: float) -> float:
    """0 at step 0 rising to 1 at ``length`` as 1 - (cos(pi t / T) + 1) / 2 (the official ramps.py)."""
    if length <= 0:
        return 1.0
    return 1 - 0.5 * (math.cos(math.pi * min(max(step, 0.0), length) / length) + 1)


def assisted_logits(core: torch.Tensor, assist: torch.Tensor, k: int) -> torch.Tensor:
    """``assist``'s top-k class logits per pixel, ``core``'s for the other classes."""
    top = assist.topk(min(k, assist.shape[1]), dim=1).indices
    keep = torch.zeros_like(assist, dtype=torch.bool).scatter_(1, top, True)
    return torch.where(keep, assist, core)


def beta_boxes(n: int, h: int, w: int, beta: float, device) -> torch.Tensor:
    """[n, h, w] bool CutMix boxes as in the official ``rand_bbox_1``: one lambda ~ Beta(b, b) for the
    batch gives sides int(h sqrt(1 - lambda)) and int(w sqrt(1 - lambda)); each image's centre is uniform
    in [h/8, h) x [w/8, w) and the box is clipped to the crop."""
    lam = float(torch.distributions.Beta(torch.tensor(beta), torch.tensor(beta)).sample())
    cut = math.sqrt(1 - lam)
    boxes = torch.zeros(n, h, w, dtype=torch.bool, device=device)
    for i in range(n):
        bounds = []
        for size in (h, w):
            half = int(size * cut) // 2
            centre = int(torch.randint(int(size / 8), size, (1,)))
            bounds.append((max(centre - half, 0), min(centre + half, size)))
        (y1, y2), (x1, x2) = bounds
        boxes[i, y1:y2, x1:x2] = True
    return boxes


def strict_confidence_ce(logits: torch.Tensor, target_logits: torch.Tensor, ignore: torch.Tensor,
                         thresh: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mask ratio): CE against argmax(target) x max softmax(target), averaged over the non-padding
    pixels whose confidence reaches ``thresh`` (the official semi_ce_loss); 0 with a graph when none does."""
    conf, label = target_logits.detach().float().softmax(1).max(1)
    mask = (conf >= thresh) & (ignore != IGNORE)
    if not mask.any():
        return logits.sum() * 0.0, mask.float().mean()
    per_pixel = F.cross_entropy(logits.float(), label, reduction="none") * conf
    return per_pixel[mask].mean(), mask.float().mean()


def l2_normalise(d: torch.Tensor) -> torch.Tensor:
    return d / (d.flatten(1).norm(dim=1).view(-1, *([1] * (d.dim() - 1))) + 1e-8)


class PSMT(Method):
    name = "psmt"
    Config = PSMTConfig
    num_strong_views = 1
    optim_defaults = {"head_lr_mult": 1.0}  # the official code trains every parameter group at one LR

    def __init__(self, cfg, model_cfg, num_classes, supervised_loss):
        super().__init__(cfg, model_cfg, num_classes, supervised_loss)
        self.teachers = nn.ModuleList([frozen_copy(self.model), frozen_copy(self.model)])

    def init_targets(self):
        return [(self.model, ""), *((t, "") for t in self.teachers)]

    def inference_model(self):
        return self.teachers[0]

    @staticmethod
    def active_teacher(epoch: int) -> int:
        """Index of the teacher that follows the student in this 0-based epoch (official epoch 1: teacher 1)."""
        return epoch % 2

    def unsup_weight(self, ctx: StepContext) -> float:
        return self.cfg.unsup_weight * cosine_rampup(ctx.iteration, self.cfg.rampup_epochs * ctx.iters_per_epoch)

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor, active: int) -> torch.Tensor:
        t = [teacher(x) for teacher in self.teachers]
        t[1 - active] = assisted_logits(t[active], t[1 - active], self.cfg.assist_topk)
        return self.cfg.teacher_gamma * t[0] + (1 - self.cfg.teacher_gamma) * t[1]

    def tvat_noise(self, f: torch.Tensor, size) -> torch.Tensor:
        """The adversarial noise for decoder input ``f``: one power-iteration step on the KL between the
        teachers' mean decoder output at f and at f + xi d, their BatchNorm in eval mode. No gradient
        reaches f or any network through it."""
        modes = [t.training for t in self.teachers]
        for t in self.teachers:
            t.eval()

        def decoders(z):
            return sum(resize(t.decode_from(z)[0], size) for t in self.teachers) / len(self.teachers)

        f0 = f.detach()
        with torch.no_grad():
            target = decoders(f0).float().softmax(1)
        d = l2_normalise(torch.rand_like(f0) - 0.5)
        with torch.enable_grad():
            for _ in range(self.cfg.vat_iters):
                d.requires_grad_(True)
                log_p = F.log_softmax(decoders(f0 + self.cfg.vat_xi * d).float(), dim=1)
                kl = F.kl_div(log_p, target, reduction="batchmean")
                d = l2_normalise(torch.autograd.grad(kl, d)[0])
        for t, mode in zip(self.teachers, modes):
            t.train(mode)
        return self.cfg.vat_eps * d.detach()

    def perturbed_student(self, x: torch.Tensor) -> torch.Tensor:
        """Student logits at x's size, its decoder input shifted by the T-VAT noise."""
        f = self.model.decoder_input(*self.model.encode(x))
        logits, _ = self.model.decode_from(f + self.tvat_noise(f, x.shape[-2:]))
        return resize(logits, x.shape[-2:])

    def training_step(self, labeled, unlabeled, partner, ctx: StepContext):
        cfg, n = self.cfg, labeled["image"].shape[0]
        target = self.teacher_logits(unlabeled["weak"], self.active_teacher(ctx.epoch))
        strong, ign = unlabeled["strong1"], unlabeled["ignore"]
        box = beta_boxes(strong.shape[0], *strong.shape[-2:], cfg.cutmix_beta, strong.device)
        perm = torch.randperm(strong.shape[0]).to(strong.device)
        strong = paste(box, strong[perm], strong)
        target, ign = paste(box, target[perm], target), paste(box, ign[perm], ign)

        logits = self.perturbed_student(torch.cat([labeled["image"], strong]))
        loss_x = self.sup_loss(logits[:n], labeled["mask"])
        loss_u, mask_ratio = strict_confidence_ce(logits[n:], target, ign, cfg.conf_thresh)
        weight = self.unsup_weight(ctx)
        loss = loss_x + weight * loss_u
        return {"loss": loss, "loss_x": loss_x.detach(), "loss_u": loss_u.detach(),
                "unsup_weight": torch.tensor(weight), "mask_ratio": mask_ratio}

    def after_step(self, ctx: StepContext) -> None:
        ema_update(self.teachers[self.active_teacher(ctx.epoch)], self.model, self.cfg.ema_decay)
