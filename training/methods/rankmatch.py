"""RankMatch (CVPR 2024): UniMatch plus rank-aware pixel-to-agent correlation consistency
(official code mai556/RankMatch ``rankmatch.py``).

On the ASPP output (256 channels, stride 16, read through a forward hook so the network is the plain
one and export is unchanged):
- the weak "teacher" feature of strong view k is the weak view's ASPP feature with the CutMix partner's
  pasted inside box k (both upsampled to the input size, pasted, resized back, as the code does), detached;
- agents: per image, M mutually near-orthogonal pixels of the teacher feature, chosen greedily (a random
  first pixel, then each time the pixel whose largest |cos| to the chosen ones is smallest); the strong
  view's agents are its features at the same pixels;
- each pixel's softmax over its dot products with the agents gives P_w and P_s; over the top-k agents
  of P_w, every one of the k! orderings gets its Plackett-Luce probability under P_w and under P_s;
- loss KL(PL_w || PL_s), mean over all B·h·w·k! entries (``KLDivLoss(reduction='mean')``), weight 0.1,
  averaged over the two strong views: L = L_UniMatch + 0.1 (L_c1 + L_c2) / 2.
Where the code and the paper differ we follow the code (no temperature; top-k rather than all M).
Deviation: when a crop has fewer stride-16 pixels than M, the agents are all its pixels (the official
code assumes M <= h·w).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import hp
from .base import StepContext
from .taps import outputs_of
from .unimatch import UniMatch, UniMatchConfig


@dataclass
class RankMatchConfig(UniMatchConfig):
    corr_weight: float = hp(0.1, "weight of the rank-aware correlation consistency (official code 0.1)")
    num_agents: int = hp(64, "agents (orthogonal landmarks) per image, M")
    top_k: int = hp(4, "agents ranked per pixel; the ranking distribution has k! entries")


def orthogonal_agents(feat_w: torch.Tensor, num: int) -> torch.Tensor:
    """[B, M] pixel indices of ``feat_w`` [B, C, h, w]: a random first pixel, then greedily the pixel whose
    largest |cosine| to the already chosen ones is smallest; M = min(num, h·w)."""
    b = feat_w.shape[0]
    q = F.normalize(feat_w.flatten(2).transpose(1, 2), dim=-1)  # [B, N, C]
    n = q.shape[1]
    m = min(num, n)
    rows = torch.arange(b, device=q.device)
    chosen = [torch.randint(n, (b,), device=q.device)]
    worst = torch.zeros(b, n, device=q.device, dtype=q.dtype)  # largest |cos| to the chosen set so far
    taken = torch.zeros(b, n, dtype=torch.bool, device=q.device)
    for _ in range(1, m):
        last = chosen[-1]
        taken[rows, last] = True
        worst = torch.maximum(worst, torch.einsum("bnc,bc->bn", q, q[rows, last]).abs())
        chosen.append(worst.masked_fill(taken, float("inf")).argmin(1))
    return torch.stack(chosen, 1)


def plackett_luce(prob: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Probability of each ordering under Plackett-Luce restricted to the ordered items:
    prod_i p[o_i] / sum_{j>=i} p[o_j]. ``prob`` [..., M], ``order`` [..., R, k] indices -> [..., R]."""
    picked = torch.gather(prob.unsqueeze(-2).expand(*order.shape[:-1], prob.shape[-1]), -1, order)
    remaining = picked.flip(-1).cumsum(-1).flip(-1)
    return (picked / (remaining + 1e-10)).prod(-1)


def ranking_distributions(p_w: torch.Tensor, p_s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Over every ordering of each pixel's top-k agents under ``p_w`` ([..., M] softmax over agents): the
    Plackett-Luce probabilities under p_w and under p_s, each [..., k!]."""
    k = min(k, p_w.shape[-1])
    perms = torch.tensor(list(itertools.permutations(range(k))), device=p_w.device)  # [k!, k]
    top = p_w.topk(k, dim=-1).indices  # [..., k]
    order = top[..., perms]  # [..., k!, k]
    return plackett_luce(p_w, order), plackett_luce(p_s, order)


def rank_correlation_loss(feat_w: torch.Tensor, feat_s: torch.Tensor, num_agents: int, k: int) -> torch.Tensor:
    """KL(PL_w || PL_s) of the pixel-to-agent ranking distributions, mean over every entry."""
    idx = orthogonal_agents(feat_w, num_agents)  # [B, M]
    fw, fs = feat_w.flatten(2).transpose(1, 2), feat_s.flatten(2).transpose(1, 2)  # [B, N, C]
    agents_w = torch.gather(fw, 1, idx.unsqueeze(-1).expand(-1, -1, fw.shape[-1]))
    agents_s = torch.gather(fs, 1, idx.unsqueeze(-1).expand(-1, -1, fs.shape[-1]))
    p_w = torch.einsum("bnc,bmc->bnm", fw, agents_w).softmax(-1)
    p_s = torch.einsum("bnc,bmc->bnm", fs.float(), agents_s.float()).softmax(-1)
    rank_w, rank_s = ranking_distributions(p_w, p_s, k)
    # KLDivLoss(reduction='mean') of the code: the mean over every entry, not per pixel
    return (torch.xlogy(rank_w, rank_w) - rank_w * (rank_s + 1e-10).log()).mean()


class RankMatch(UniMatch):
    name = "rankmatch"
    Config = RankMatchConfig

    def training_step(self, labeled, unlabeled, partner, ctx: StepContext):
        cfg, n = self.cfg, labeled["image"].shape[0]
        with outputs_of(self.model.aspp) as aspp:
            out = self.forward_views(labeled, unlabeled, partner)
        # One ASPP output per network pass, in forward_views' order; the FP pass decodes [clean; dropped].
        f_partner, f_train, f_strong = aspp
        f_weak = f_train[n:n + unlabeled["weak"].shape[0]].detach().float()
        size = unlabeled["weak"].shape[-2:]
        grid = f_weak.shape[-2:]
        up_w, up_p = (F.interpolate(f, size=size, mode="bilinear", align_corners=True) for f in (f_weak, f_partner.float()))
        losses = self.unimatch_losses(out, labeled, unlabeled, partner)
        corr = []
        for k, f_s in zip((1, 2), f_strong.chunk(2)):
            box = unlabeled[f"box{k}"].bool().unsqueeze(1)
            teacher = F.interpolate(torch.where(box, up_p, up_w), size=grid, mode="bilinear", align_corners=True)
            corr.append(rank_correlation_loss(teacher, f_s, cfg.num_agents, cfg.top_k))
        loss_corr = (corr[0] + corr[1]) / 2
        losses["loss"] = losses["loss"] + cfg.corr_weight * loss_corr
        losses["loss_corr"] = loss_corr.detach()
        return losses

