"""PRCL, probabilistic representation contrastive learning (AAAI 2023, IJCV 2024 journal version; official
code Haoyu-Xie/PRCL ``prcl_sig.py``, ``loss.py``, ``uncer_head.py``; research/companions.md section g).

A Mean Teacher (EMA 0.99) labels the weak view; the student learns the CutMixed strong view with the
ReCo-weighted pseudo-label loss (per image, the share of pixels whose teacher confidence reaches 0.97
times the per-pixel CE, averaged over pixels with non-zero loss), plus the contrastive term:
- two training-only heads read the decoder's 304-channel concat (48 low-level + 256 ASPP channels, the
  input of ``fuse``, taken by a forward hook): the representation head gives the mean mu, the
  uncertainty head (row-normalised linear layers, BN, gamma x + beta, sigmoid) the diagonal variance
  sigma^2; the uncertainty head trains at lr x ``uncer_lr_mult`` (official 5e-5 beside 3.2e-3);
- similarity is the Mutual Likelihood Score on L2-normalised means,
  MLS = -1/2 mean_d [(mu0_d - mu1_d)^2 / (s0_d + s1_d) + log(s0_d + s1_d)], divided by the temperature;
- valid pixels (at the feature grid, labels nearest-resized): labelled pixels and unlabelled pixels whose
  teacher confidence reaches 0.7; per class the batch prototype is the precision-weighted fusion
  Sigma = 1 / sum 1/s_i, mu = Sigma sum mu_i / s_i, and the Global Distribution Prototype (GDP, journal)
  fuses it into the running one the same way: 1/s_g <- 1/s_g + 1/s_b, mu_g <- s_g (mu_g/s_g,old + mu_b/s_b)
  (``prototype_update momentum`` gives the EMA variant seen in a derived repository);
- per class, 256 anchors sampled with replacement among its hard pixels (probability of the class < 0.8);
  positive: the class's GDP; 512 negatives per anchor: a class drawn with softmax(MLS(GDP_c, GDP_j) / T),
  then a random valid pixel of it; virtual negatives: samples mu_g + sqrt(s_g) eps from every other
  class's GDP, scored with variance 0; CE on the MLS logits with the positive as target, summed over
  classes and divided by the number of classes present;
- L = L_x + L_u + lambda(t) L_prcl with the code's ramp-down lambda(t) = exp(-5 (t/T)^2).
The GDPs are buffers of this module: saved in every checkpoint and restored exactly on --resume. Under
DDP the per-class precision sums are all-reduced, so every process holds the same GDPs (the code
all-gathers every pixel instead). The teacher (the plain network) is evaluated and exported. Memory: the
code keeps every class's MLS tensors (Q x 513 x 256 each) for backward, several GB; here each class's
candidates and MLS tensors are rebuilt in backward from pixel indices (activation checkpointing), so one
class's are alive at a time.

Decided here, where the sources leave it open or our pipeline differs: the strong view is the loader's
CutMix with a partner image instead of the code's in-batch ClassMix; the teacher runs in eval mode with
EMA BatchNorm statistics (as meanteacher.py), the code runs it in train mode; the GDP is initialised
from a class's first batch prototype, and only classes that have one give virtual negatives (the code
samples zero-initialised ones too); ``num_virtual`` (the journal's count is not verifiable) defaults to
16 per class; the loss is 0 (with a graph) when fewer than two classes are present, as in the AAAI code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..config import ConfigError, hp
from ..data.folder import IGNORE
from ..distributed import all_reduce_sum
from ..losses import nearest_labels, pseudo_labels
from .base import StepContext, mixed_targets, paste
from .meanteacher import MeanTeacher
from .taps import inputs_of, outputs_of

PROTOTYPE_UPDATES = ("fusion", "momentum")


@dataclass
class PRCLConfig:
    ema_decay: float = hp(0.99, "EMA decay of the teacher (warmed up as min(1 - 1/(t+1), alpha))")
    un_threshold: float = hp(0.97, "ReCo weighting of the pseudo-label loss: share of pixels with teacher confidence >= this")
    weak_threshold: float = hp(0.7, "unlabelled pixels join the contrastive loss when the teacher's confidence reaches this")
    strong_threshold: float = hp(0.8, "anchors are drawn among pixels whose predicted probability of their class is below this")
    temperature: float = hp(100.0, "MLS logits are divided by this (official config temp 100)")
    num_queries: int = hp(256, "anchors sampled per class (pixel sampling cap)")
    num_negatives: int = hp(512, "pixel negatives per anchor (pixel sampling cap)")
    num_virtual: int = hp(16, "virtual negatives per anchor drawn from each other class's GDP")
    rep_dim: int = hp(256, "dimension of the representation mu and variance sigma^2")
    contrast_weight: float = hp(1.0, "weight of the contrastive loss at the start of the ramp-down")
    rampdown: float = hp(5.0, "ramp-down lambda(t) = weight * exp(-rampdown (t/T)^2)")
    prototype_update: str = hp("fusion", "GDP update: fusion (precision-weighted, journal) or momentum")
    prototype_momentum: float = hp(0.99, "with --prototype-update momentum: GDP <- m GDP + (1 - m) batch prototype")
    uncer_lr_mult: float = hp(5e-5 / 3.2e-3, "learning-rate multiplier of the uncertainty head (official 5e-5 vs 3.2e-3)")
    min_var: float = hp(1e-6, "variances are clamped to at least this, so precisions stay finite")


class UncertaintyHead(nn.Module):
    """Per-pixel diagonal variance in (0, 1): row-normalised linear -> BN -> ReLU -> row-normalised linear
    -> BN (no affine) -> gamma x + beta -> log(exp(x) + 1e-6) -> sigmoid (uncer_head.py)."""

    def __init__(self, cin: int, dim: int):
        super().__init__()
        self.fc1 = nn.Parameter(nn.init.kaiming_normal_(torch.empty(dim, cin)))
        self.bn1 = nn.BatchNorm2d(dim)
        self.fc2 = nn.Parameter(nn.init.kaiming_normal_(torch.empty(dim, dim)))
        self.bn2 = nn.BatchNorm2d(dim, affine=False)
        self.gamma = nn.Parameter(torch.ones(1))
        self.beta = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, F.normalize(self.fc1, dim=-1)[..., None, None])
        x = F.conv2d(torch.relu(self.bn1(x)), F.normalize(self.fc2, dim=-1)[..., None, None])
        x = self.gamma * self.bn2(x) + self.beta
        return torch.sigmoid(torch.log(torch.exp(x) + 1e-6))


def representation_head(cin: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
                         nn.Conv2d(256, dim, 1))


def mutual_likelihood_score(mu0: torch.Tensor, mu1: torch.Tensor, var0: torch.Tensor, var1: torch.Tensor) -> torch.Tensor:
    """MLS over the last dimension, means L2-normalised first (loss.py ``mutual_likelihood_score``)."""
    mu0, mu1 = F.normalize(mu0, dim=-1), F.normalize(mu1, dim=-1)
    down = var0 + var1
    return -0.5 * ((mu0 - mu1) ** 2 / down + down.log()).mean(-1)


def anchor_loss(mu: torch.Tensor, var: torch.Tensor, cand_mu: torch.Tensor, cand_var: torch.Tensor,
                temperature: float) -> torch.Tensor:
    """CE of the MLS logits of anchors [Q, D] against candidates [Q, C, D], the positive first."""
    logits = mutual_likelihood_score(mu.unsqueeze(1), cand_mu, var.unsqueeze(1), cand_var) / temperature
    return F.cross_entropy(logits, torch.zeros(mu.shape[0], dtype=torch.long, device=mu.device))


def reco_weighted_loss(logits: torch.Tensor, label: torch.Tensor, conf: torch.Tensor, ignore: torch.Tensor,
                       thresh: float) -> torch.Tensor:
    """Per image w_b = #(conf >= thresh) / #valid pixels; mean over pixels with non-zero loss of w_b * CE."""
    valid = ignore != IGNORE
    target = torch.where(valid, label, torch.full_like(label, IGNORE))
    per_pixel = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="none")
    weight = ((conf >= thresh) & valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp(min=1)
    weighted = weight[:, None, None] * per_pixel
    positive = per_pixel > 0
    return weighted[positive].mean() if positive.any() else logits.sum() * 0.0


class PRCL(MeanTeacher):
    name = "prcl"
    Config = PRCLConfig
    num_strong_views = 1
    needs_partner = True
    optim_defaults = {"head_lr_mult": 1.0, "weight_decay": 5e-4}  # the code: one LR for the network, wd 5e-4

    def __init__(self, cfg, model_cfg, num_classes, supervised_loss):
        if cfg.prototype_update not in PROTOTYPE_UPDATES:
            raise ConfigError(f"--prototype-update {cfg.prototype_update!r}: choose {' or '.join(PROTOTYPE_UPDATES)}.")
        super().__init__(cfg, model_cfg, num_classes, supervised_loss)
        cin = self.model.fuse[0][0].in_channels
        self.rep_head = representation_head(cin, cfg.rep_dim)
        self.unc_head = UncertaintyHead(cin, cfg.rep_dim)
        self.register_buffer("proto_mu", torch.zeros(num_classes, cfg.rep_dim))
        self.register_buffer("proto_var", torch.ones(num_classes, cfg.rep_dim))
        self.register_buffer("proto_seen", torch.zeros(num_classes, dtype=torch.bool))

    def param_groups(self, lr: float, head_lr_mult: float) -> list[dict]:
        head, unc = lr * head_lr_mult, lr * self.cfg.uncer_lr_mult
        return [*super().param_groups(lr, head_lr_mult),
                {"params": list(self.rep_head.parameters()), "lr": head, "base_lr": head},
                {"params": list(self.unc_head.parameters()), "lr": unc, "base_lr": unc}]

    def contrast_weight(self, ctx: StepContext) -> float:
        return self.cfg.contrast_weight * math.exp(-self.cfg.rampdown * (ctx.iteration / max(1, ctx.total_iters)) ** 2)

    def training_step(self, labeled, unlabeled, partner, ctx: StepContext):
        cfg = self.cfg
        with torch.no_grad():
            self.teacher.eval()
            conf, label = pseudo_labels(self.teacher(torch.cat([unlabeled["weak"], partner["weak"]])))
        (conf, p_conf), (label, p_label) = conf.chunk(2), label.chunk(2)
        label_m, conf_m, ign_m = mixed_targets(unlabeled["box1"], conf, label, unlabeled["ignore"], p_conf, p_label,
                                               partner["ignore"])
        strong = paste(unlabeled["box1"], partner["strong1"], unlabeled["strong1"])
        with inputs_of(self.model.fuse) as decoder_in, outputs_of(self.model.classifier) as grid_logits:
            logits_x = self.model(labeled["image"])  # separate passes, as the code: BN sees one domain each
            logits_u = self.model(strong)
        loss_x = self.sup_loss(logits_x, labeled["mask"])
        loss_u = reco_weighted_loss(logits_u, label_m, conf_m, ign_m, cfg.un_threshold)

        raw = torch.cat(decoder_in)
        mu = self.rep_head(raw).float()
        var = self.unc_head(raw).float().clamp(min=cfg.min_var)
        grid = mu.shape[-2:]
        confident = (conf_m >= cfg.weak_threshold) & (ign_m != IGNORE)
        pseudo = torch.where(confident, label_m, torch.full_like(label_m, IGNORE))
        labels = torch.cat([nearest_labels(labeled["mask"], grid), nearest_labels(pseudo, grid)])
        prob = torch.cat(grid_logits).detach().float().softmax(1)
        loss_c = self.prcl_loss(mu, var, labels, prob)
        weight = self.contrast_weight(ctx)
        loss = loss_x + loss_u + weight * loss_c
        return {"loss": loss, "loss_x": loss_x.detach(), "loss_u": loss_u.detach(), "loss_prcl": loss_c.detach(),
                "prcl_weight": torch.tensor(weight),
                "mask_ratio": ((conf >= cfg.un_threshold) & (unlabeled["ignore"] != IGNORE)).float().mean()}

    # --- prototypes ----------------------------------------------------------------------------------
    @torch.no_grad()
    def update_prototypes(self, mu: torch.Tensor, var: torch.Tensor, labels: torch.Tensor) -> None:
        """Fuse this step's per-class precision-weighted prototypes (over every process) into the GDPs.
        ``mu``, ``var`` [P, D] and ``labels`` [P] of the valid pixels."""
        k = self.proto_mu.shape[0]
        onehot = F.one_hot(labels, k).to(mu.dtype)  # [P, K]
        precision = all_reduce_sum(onehot.T @ (1 / var))  # [K, D]: sum of 1/s_i per class
        weighted = all_reduce_sum(onehot.T @ (mu / var))  # [K, D]: sum of mu_i/s_i per class
        present = precision[:, 0] > 0
        batch_var = 1 / precision[present]
        batch_mu = batch_var * weighted[present]
        seen = self.proto_seen[present]
        old_mu, old_var = self.proto_mu[present], self.proto_var[present]
        if self.cfg.prototype_update == "fusion":
            new_var = 1 / (1 / old_var + precision[present])
            new_mu = new_var * (old_mu / old_var + weighted[present])
        else:
            m = self.cfg.prototype_momentum
            new_mu, new_var = m * old_mu + (1 - m) * batch_mu, m * old_var + (1 - m) * batch_var
        self.proto_mu[present] = torch.where(seen[:, None], new_mu, batch_mu)
        self.proto_var[present] = torch.where(seen[:, None], new_var, batch_var)
        self.proto_seen[present] = True

    def prcl_loss(self, mu: torch.Tensor, var: torch.Tensor, labels: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
        """The contrastive term for [B, D, h, w] means and variances, [B, h, w] labels (255 = not used) and
        [B, K, h, w] predicted probabilities; updates the GDPs first."""
        cfg = self.cfg
        d = mu.shape[1]
        mu, var = mu.permute(0, 2, 3, 1).reshape(-1, d), var.permute(0, 2, 3, 1).reshape(-1, d)
        labels, prob = labels.reshape(-1), prob.permute(0, 2, 3, 1).reshape(-1, prob.shape[1])
        valid = labels != IGNORE
        self.update_prototypes(mu.detach()[valid], var.detach()[valid], labels[valid])
        zero = 0.0 * (mu.sum() + var.sum())  # keeps every head parameter in the graph (DDP)
        classes = labels[valid].unique().tolist()
        if len(classes) < 2:
            return zero
        pools = [torch.nonzero(valid & (labels == c)).squeeze(1) for c in classes]
        # This step's GDPs, passed to the checkpointed loss so that backward rebuilds from the same ones.
        gdp = (self.proto_mu.clone(), self.proto_var.clone(), self.proto_seen.tolist())
        total = zero
        for i, c in enumerate(classes):
            hard = pools[i][prob[pools[i], c] < cfg.strong_threshold]
            if hard.numel() == 0:
                continue
            anchors = hard[torch.randint(hard.numel(), (cfg.num_queries,), device=hard.device)]
            negatives = self.negative_pixels(c, [cl for cl in classes if cl != c],
                                             [p for j, p in enumerate(pools) if j != i])
            # Checkpointed on indices: backward rebuilds this class's Q x candidates x D tensors (the
            # virtual negatives from the restored RNG state) instead of keeping them, so one class's are
            # alive at a time.
            total = total + checkpoint(self.class_loss, c, anchors, negatives, mu, var, gdp, use_reentrant=False)
        return total / len(classes)

    def class_loss(self, c: int, anchors: torch.Tensor, negatives: torch.Tensor, mu: torch.Tensor,
                   var: torch.Tensor, gdp: tuple) -> torch.Tensor:
        """Class c's anchor loss; no gradient reaches the candidates, as in the code."""
        cand_mu, cand_var = self.contrast_candidates(c, negatives, mu.detach(), var.detach(), *gdp)
        return anchor_loss(mu[anchors], var[anchors], cand_mu, cand_var, self.cfg.temperature)

    @torch.no_grad()
    def negative_pixels(self, c: int, others: list[int], pools: list[torch.Tensor]) -> torch.Tensor:
        """[Q, N] pixel indices: per negative a class drawn by prototype similarity to c, then a uniform
        valid pixel of it."""
        cfg, q = self.cfg, self.cfg.num_queries
        device = pools[0].device
        others_t = torch.tensor(others, device=device)
        sim = mutual_likelihood_score(self.proto_mu[c][None], self.proto_mu[others_t], self.proto_var[c][None],
                                      self.proto_var[others_t])
        cls = torch.multinomial(torch.softmax(sim / cfg.temperature, 0), q * cfg.num_negatives, replacement=True)
        counts = torch.tensor([p.numel() for p in pools], device=device)
        offsets = torch.cumsum(counts, 0) - counts
        pick = offsets[cls] + (torch.rand(cls.shape, device=device) * counts[cls]).long().clamp(max=counts[cls] - 1)
        return torch.cat(pools)[pick].reshape(q, cfg.num_negatives)

    def contrast_candidates(self, c: int, negatives: torch.Tensor, mu: torch.Tensor, var: torch.Tensor,
                            proto_mu: torch.Tensor, proto_var: torch.Tensor,
                            seen: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        """[Q, 1 + N + V, D] means and variances: class c's GDP, the N pixel negatives and V virtual
        negatives drawn from the other GDPs."""
        cfg, q = self.cfg, self.cfg.num_queries
        parts_mu = [proto_mu[c].expand(q, 1, -1), mu[negatives]]
        parts_var = [proto_var[c].expand(q, 1, -1), var[negatives]]
        virtual = [j for j, s in enumerate(seen) if j != c and s]
        if virtual and cfg.num_virtual > 0:
            g_mu, g_var = proto_mu[virtual], proto_var[virtual]  # [J, D]
            eps = torch.randn(q, len(virtual), cfg.num_virtual, g_mu.shape[1], device=mu.device)
            samples = g_mu[None, :, None] + g_var.sqrt()[None, :, None] * eps
            parts_mu.append(samples.reshape(q, -1, g_mu.shape[1]))
            parts_var.append(torch.zeros_like(parts_mu[-1]))
        return torch.cat(parts_mu, 1), torch.cat(parts_var, 1)
