"""Contextrast (CVPR 2024) as an auxiliary loss any method can add (``--aux contextrast``).

There is no public code. This follows the reconstruction in research/companions-2.md section 1, taken
from the authors' journal extension Contextrast++ (which restates the CVPR method), and decides what the
sources leave open as written below.

Contextual contrastive learning: the four encoder levels (layer1..layer4, read by forward hooks, so the
network stays the plain one and export is unchanged) each get a training-only projection head (Multi's:
1x1 conv c->c, ReLU, BN, 1x1 conv c->d) whose embeddings are L2-normalised. Per level and class the
anchor is the batch mean embedding of the class (at least ``contrast_min_pixels`` pixels); shallow anchors
are fused with the deepest level's, a = (1 - w_h) a_i + w_h a_4, when the class is present there. The
pixel-to-anchor InfoNCE is mean over positives of -log(e^{a.z+/t} / (e^{a.z+/t} + sum_neg e^{a.z-/t})),
weighted per level by (0.1, 0.3, 0.7, 1.0) and averaged over the anchors of a level.

Boundary-aware negatives (BANE): Contextrast++ eq. 13 prints the error map of class n as the pixels of
true class n that were missed, but calls them negatives of anchor n, which a pixel of class n cannot be.
We take the consistent reading: a pixel predicted n whose label is another class is a hard negative for
anchor n (false positives of n); it stays a positive of its own class. Within each image, the distance of
such a pixel to the edge of its error region is the number of 3x3 erosions it survives (chessboard
distance, exact enough to rank at stride 4-32); the share ``contrast_bane_ratio`` nearest the edge
(distance at most the per-image K_s quantile) are the negatives. When fewer than
``contrast_min_negatives`` exist (error regions shrink as training fits), random pixels of other classes
top them up, so an anchor never loses its gradient; at most ``contrast_max_negatives`` are kept.

Semi-supervised use (the paper is supervised; all of this is our proposal, companions-2.md 1.7):
- the loss runs its own student pass on [labelled; strong unlabelled view] (CutMixed with the partner
  when the method loads one) rather than reading the method's passes, so it works with every method
  unchanged, at the cost of one more forward/backward; pseudo-labels and confidences come from the
  method's exported network (its EMA teacher where it has one) on the weak views, in eval mode;
- unlabelled pixels count when their confidence (min-pooled to the level, so no label is taken across an
  edge) reaches ``contrast_conf_thresh``; anchors come from labelled pixels only and are detached for this
  term, and classes absent from the labelled batch fall back to an EMA bank of labelled anchors (a buffer,
  saved in checkpoints); the error map is the disagreement between the student's prediction on the
  strong view and the pseudo-label, with pixels within two cells of the CutMix box edge left out;
- total = alpha L_l + alpha beta r(t) L_u, r ramping up as exp(-5 (1 - t/T_r)^2); methods without strong
  views (CPS) or without unlabelled data (supervised) get the labelled term only.
Anchors of the labelled term are not detached (the paper does not say; they are batch means of the same
embeddings).
"""
from __future__ import annotations

import math
from contextlib import ExitStack

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import AuxConfig, ConfigError
from ..data.folder import IGNORE
from ..losses import nearest_labels
from .base import StepContext, mixed_targets, partner_pseudo_labels, paste
from .taps import outputs_of

LEVELS = ("layer1", "layer2", "layer3", "layer4")


def projection_head(cin: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cin, 1), nn.ReLU(inplace=True), nn.BatchNorm2d(cin), nn.Conv2d(cin, dim, 1))


def erosion_depth(mask: torch.Tensor) -> torch.Tensor:
    """[..., h, w] bool -> per pixel the number of 3x3 erosions it survives (1 = on the region's edge,
    0 = outside); outside the image counts as outside the region."""
    shape = mask.shape
    current = mask.reshape(-1, 1, *shape[-2:]).float()
    depth = torch.zeros_like(current)
    while current.any():
        depth += current
        current = 1 - F.max_pool2d(F.pad(1 - current, (1, 1, 1, 1), value=1.0), 3, stride=1)
    return depth.reshape(shape)


def boundary_negatives(errors: torch.Tensor, ratio: float) -> torch.Tensor:
    """[B, h, w] error map -> the error pixels whose edge distance is at most the per-image ``ratio``
    quantile of the error pixels' distances (BANE)."""
    depth = erosion_depth(errors)
    keep = torch.zeros_like(errors)
    for b in range(errors.shape[0]):
        d = depth[b][errors[b]]
        if d.numel():
            cut = torch.quantile(d, ratio, interpolation="lower")
            keep[b] = errors[b] & (depth[b] <= cut)
    return keep


def bane_negatives(pred: torch.Tensor, label: torch.Tensor, c: int, allowed: torch.Tensor, ratio: float) -> torch.Tensor:
    """Hard negatives of class c's anchor: pixels predicted c whose label is another class (false
    positives of c; see the eq. 13 note above), among ``allowed``, nearest their error region's edge."""
    return boundary_negatives((pred == c) & (label != c) & allowed, ratio)


def anchor_infonce(anchor: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, tau: float) -> torch.Tensor:
    """mean_p -log(e^{a.z_p/t} / (e^{a.z_p/t} + sum_m e^{a.z_m/t})) for unit vectors [D], [P, D], [M, D]."""
    s_pos = pos @ anchor / tau
    if neg.shape[0] == 0:
        return s_pos.sum() * 0.0
    s_neg = torch.logsumexp(neg @ anchor / tau, 0)
    return (torch.logaddexp(s_pos, s_neg) - s_pos).mean()


def _subset(idx: torch.Tensor, cap: int) -> torch.Tensor:
    return idx[torch.randperm(idx.numel(), device=idx.device)[:cap]] if idx.numel() > cap else idx


class Contextrast(nn.Module):
    def __init__(self, cfg: AuxConfig, model: nn.Module, num_classes: int):
        super().__init__()
        if len(cfg.contrast_level_weights) != len(LEVELS):
            raise ConfigError(f"--contrast-level-weights needs {len(LEVELS)} values (layer1..layer4), "
                             f"got {len(cfg.contrast_level_weights)}")
        self.cfg = cfg
        self.heads = nn.ModuleList(projection_head(c, cfg.contrast_dim) for c in model.encoder.level_channels)
        self.register_buffer("bank", torch.zeros(len(LEVELS), num_classes, cfg.contrast_dim))
        self.register_buffer("bank_seen", torch.zeros(len(LEVELS), num_classes, dtype=torch.bool))

    # --- the step ------------------------------------------------------------------------------------
    def forward(self, method: nn.Module, labeled: dict, unlabeled: dict | None, partner: dict | None,
                ctx: StepContext) -> dict[str, torch.Tensor]:
        cfg, n = self.cfg, labeled["image"].shape[0]
        view = self.strong_view(unlabeled, partner) if method.uses_unlabeled else None
        images = labeled["image"] if view is None else torch.cat([labeled["image"], view["image"]])
        encoder = method.model.encoder
        with ExitStack() as stack:
            taps = [stack.enter_context(outputs_of(getattr(encoder, name))) for name in LEVELS]
            logits = method.model(images)
        feats = [tap[-1] for tap in taps]
        embeds = [F.normalize(head(f.float()), dim=1) for head, f in zip(self.heads, feats)]
        pred = logits.detach().argmax(1)
        zero = sum(0.0 * z.sum() for z in embeds)

        lab = [z[:n] for z in embeds]
        anchors = self.labeled_anchors(lab, labeled["mask"])
        loss_l = zero + self.pa_loss(lab, anchors, labeled["mask"], pred[:n], None)
        out = {"loss_ctr_l": loss_l.detach()}
        loss = cfg.aux_weight * loss_l
        if view is not None:
            with torch.no_grad():
                bank = self.update_bank(anchors)
            conf, label = self.pseudo_targets(method, unlabeled, partner)
            confident = (conf >= cfg.contrast_conf_thresh) & (view["ignore"] != IGNORE)
            target = torch.where(confident, label, torch.full_like(label, IGNORE))
            unl = [z[n:] for z in embeds]
            loss_u = zero + self.pa_loss(unl, bank, target, pred[n:], view["box"], conf=conf, confident=confident)
            ramp = self.rampup(ctx)
            loss = loss + cfg.aux_weight * cfg.aux_unlabeled_weight * ramp * loss_u
            out.update(loss_ctr_u=loss_u.detach(), ctr_rampup=torch.tensor(ramp))
        return {"loss": loss, **out}

    def rampup(self, ctx: StepContext) -> float:
        ramp = self.cfg.aux_rampup * ctx.total_iters
        return 1.0 if ramp <= 0 or ctx.iteration >= ramp else math.exp(-5 * (1 - ctx.iteration / ramp) ** 2)

    @staticmethod
    def strong_view(unlabeled: dict | None, partner: dict | None) -> dict | None:
        """The strong unlabelled view the method trains on (CutMixed when it loads a partner), or None."""
        if unlabeled is None or "strong1" not in unlabeled:
            return None
        if partner is None:
            return {"image": unlabeled["strong1"], "ignore": unlabeled["ignore"], "box": None}
        box = unlabeled["box1"]
        return {"image": paste(box, partner["strong1"], unlabeled["strong1"]),
                "ignore": paste(box, partner["ignore"], unlabeled["ignore"]), "box": box}

    @staticmethod
    def pseudo_targets(method: nn.Module, unlabeled: dict, partner: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
        net = method.inference_model()
        if partner is None:
            return partner_pseudo_labels(net, unlabeled)
        conf, label = partner_pseudo_labels(net, {"weak": torch.cat([unlabeled["weak"], partner["weak"]])})
        (conf, p_conf), (label, p_label) = conf.chunk(2), label.chunk(2)
        label, conf, _ = mixed_targets(unlabeled["box1"], conf, label, unlabeled["ignore"], p_conf, p_label, partner["ignore"])
        return conf, label

    # --- anchors -------------------------------------------------------------------------------------
    def labeled_anchors(self, embeds: list[torch.Tensor], mask: torch.Tensor) -> list[dict[int, torch.Tensor]]:
        """Per level {class: unit anchor}: batch means, shallow ones fused with the deepest level's."""
        raw = []
        for z in embeds:
            y = nearest_labels(mask, z.shape[-2:])
            flat, yf = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), y.reshape(-1)
            raw.append({c: flat[yf == c].mean(0) for c in yf[yf != IGNORE].unique().tolist()
                        if int((yf == c).sum()) >= self.cfg.contrast_min_pixels})
        w = self.cfg.contrast_deep_weight
        deep = raw[-1]
        return [{c: F.normalize((1 - w) * a + w * deep[c] if c in deep else a, dim=0) for c, a in level.items()}
                for level in raw]

    @torch.no_grad()
    def update_bank(self, anchors: list[dict[int, torch.Tensor]]) -> list[dict[int, torch.Tensor]]:
        """EMA of the labelled anchors per level and class; returns every banked class's anchor, this
        batch's (detached) where it has one."""
        m = self.cfg.contrast_bank_momentum
        out = []
        for i, level in enumerate(anchors):
            for c, a in level.items():
                old = self.bank[i, c]
                self.bank[i, c] = F.normalize(m * old + (1 - m) * a, dim=0) if self.bank_seen[i, c] else a
                self.bank_seen[i, c] = True
            seen = torch.nonzero(self.bank_seen[i]).squeeze(1).tolist()
            out.append({c: level[c].detach() if c in level else self.bank[i, c].clone() for c in seen})
        return out

    # --- loss ----------------------------------------------------------------------------------------
    def pa_loss(self, embeds, anchors, target, pred, box, conf=None, confident=None) -> torch.Tensor:
        """Sum over levels of lambda_i x mean over anchors of the pixel-to-anchor InfoNCE. ``target`` is the
        label map (255 = unused); with ``confident`` given (unlabelled), the error map is where the
        prediction says n and a confident pseudo-label says otherwise, away from the CutMix box edge."""
        cfg = self.cfg
        total = embeds[0].sum() * 0.0
        for z, anchors_i, weight in zip(embeds, anchors, cfg.contrast_level_weights):
            size = z.shape[-2:]
            y = nearest_labels(target, size)
            p = nearest_labels(pred, size)
            if confident is not None:  # min-pool: a cell is confident only if every pixel in it is
                ok = -F.adaptive_max_pool2d(-(confident.float() * conf)[:, None], size)[:, 0] >= cfg.contrast_conf_thresh
                y = torch.where(ok, y, torch.full_like(y, IGNORE))
            labelled = y != IGNORE
            if box is not None:
                cells = nearest_labels(box.long(), size)[:, None].float()
                dilated, eroded = F.max_pool2d(cells, 5, 1, 2), -F.max_pool2d(-cells, 5, 1, 2)
                edge = dilated - eroded  # 1 within two cells of the box edge
                labelled_err = labelled & (edge[:, 0] == 0)
            else:
                labelled_err = labelled
            flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            terms = []
            for c, anchor in anchors_i.items():
                pos = _subset(torch.nonzero((y == c).reshape(-1)).squeeze(1), cfg.contrast_max_positives)
                if pos.numel() == 0:
                    continue
                hard = torch.nonzero(bane_negatives(p, y, c, labelled_err, cfg.contrast_bane_ratio).reshape(-1)).squeeze(1)
                neg = _subset(hard, cfg.contrast_max_negatives)
                if neg.numel() < cfg.contrast_min_negatives:
                    others = torch.nonzero((labelled & (y != c)).reshape(-1)).squeeze(1)
                    others = others[~torch.isin(others, neg)]
                    neg = torch.cat([neg, _subset(others, cfg.contrast_min_negatives - neg.numel())])
                terms.append(anchor_infonce(anchor, flat[pos], flat[neg], cfg.contrast_temperature))
            if terms:
                total = total + weight * torch.stack(terms).mean()
        return total
