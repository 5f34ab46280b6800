"""Pieces shared by the methods that train a critic network beside the segmenter (AdvSemSeg's discriminator,
GCT's flaw detector): a frozen call, the critic's own Adam, and small tensor helpers."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ..data.folder import IGNORE


def frozen_call(net: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """``net(*inputs)`` with its parameters detached: gradients reach the inputs, never the network
    (what the official code gets by toggling ``requires_grad``, without mutating shared state)."""
    params = {name: p.detach() for name, p in net.named_parameters()}
    return functional_call(net, {**params, **dict(net.named_buffers())}, inputs)


def critic_adam(net: nn.Module, lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    """Adam over the whole critic at one LR; ``base_lr`` lets the loop's poly schedule decay it."""
    return torch.optim.Adam([{"params": list(net.parameters()), "lr": lr, "base_lr": lr}], lr=lr, betas=tuple(betas))


def upsample_to_min_side(x: torch.Tensor, side: int) -> torch.Tensor:
    """Bilinear upscale so the short side is at least ``side``: a critic's strided 4x4 stack needs that much
    input (the papers crop 321 px); larger inputs pass unchanged."""
    short = min(x.shape[-2:])
    if short >= side:
        return x
    size = [max(side, round(s * side / short)) for s in x.shape[-2:]]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def one_hot(mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[B, K, H, W] float one-hot of a label map; ignored pixels (255) are all-zero vectors, as both
    official codes make them."""
    valid = mask != IGNORE
    out = F.one_hot(torch.where(valid, mask, torch.zeros_like(mask)), num_classes).permute(0, 3, 1, 2).float()
    return out * valid.unsqueeze(1)


def masked_bce(logits: torch.Tensor, target: float, valid: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits of a [B, 1, H, W] map against a constant label over ``valid`` pixels (AdvSemiSeg's
    BCEWithLogitsLoss2d); 0 with a graph when none is valid."""
    picked = logits.float()[:, 0][valid]
    if picked.numel() == 0:
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(picked, torch.full_like(picked, target))
