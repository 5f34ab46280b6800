"""Loss functions shared by the methods: supervised CE / OHEM and confidence-masked pseudo-label CE."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .data.folder import IGNORE


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean CE over pixels whose label is not 255 (with class weights: the weighted mean, as
    F.cross_entropy takes it); 0 (with a graph) when every pixel is ignored."""
    valid = target != IGNORE
    if not valid.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), target, weight=weight, ignore_index=IGNORE)


def balanced_class_weights(counts) -> torch.Tensor:
    """Per-class CE weights from labelled pixel counts: 1 / sqrt(share), scaled so that the pixel-weighted
    mean weight is 1 (the loss keeps its scale and learning rate). The square root lifts rare classes
    without letting a handful of pixels dominate, as full inverse frequency does. A class with no
    labelled pixel never appears as a target; it gets the largest weight so a later label counts."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if counts.sum() <= 0:
        raise ValueError("class weights need at least one labelled pixel")
    share = counts / counts.sum()
    present = share > 0
    weight = torch.zeros_like(share)
    weight[present] = share[present].rsqrt()
    weight /= (share * weight).sum()
    weight[~present] = weight[present].max()
    return weight.float()


def ohem_cross_entropy(logits: torch.Tensor, target: torch.Tensor, thresh: float = 0.7,
                       min_kept: int = 200000, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Online hard example mining (Cityscapes): keep pixels whose ground-truth probability is below
    max(thresh, the min_kept-th smallest such probability); plain CE when fewer pixels are valid."""
    valid = target != IGNORE
    n_valid = int(valid.sum())
    if n_valid == 0:
        return logits.sum() * 0.0
    if n_valid <= min_kept:
        return cross_entropy(logits, target, weight)
    with torch.no_grad():
        prob = logits.float().softmax(1)
        p_gt = prob.gather(1, target.clamp(max=logits.shape[1] - 1).unsqueeze(1)).squeeze(1)
        p_gt = torch.where(valid, p_gt, torch.ones_like(p_gt))
        kth = torch.kthvalue(p_gt[valid], min(min_kept, n_valid)).values
        keep = valid & (p_gt <= torch.maximum(kth, torch.tensor(thresh, device=kth.device)))
    hard = torch.where(keep, target, torch.full_like(target, IGNORE))
    return cross_entropy(logits, hard, weight)


def pseudo_label_loss(logits: torch.Tensor, pseudo: torch.Tensor, conf: torch.Tensor, ignore: torch.Tensor,
                      thresh: float) -> torch.Tensor:
    """sum over pixels of CE * [conf >= thresh] * [not padding] / #non-padding pixels (UniMatch family):
    unconfident pixels contribute zero rather than shrinking the denominator."""
    per_pixel = F.cross_entropy(logits.float(), pseudo, reduction="none")
    valid = ignore != IGNORE
    mask = (conf >= thresh) & valid
    return (per_pixel * mask).sum() / valid.sum().clamp(min=1)


def pseudo_labels(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, hard label) from detached logits."""
    prob = logits.detach().float().softmax(1)
    conf, label = prob.max(1)
    return conf, label


def nearest_labels(labels: torch.Tensor, size) -> torch.Tensor:
    """[B, H, W] class map resized to ``size`` by nearest neighbour (labels are never interpolated)."""
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()
