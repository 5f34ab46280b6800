"""Batch-norm statistics recomputed from a trained model on chosen images ("precise BN": Wu and Johnson,
Rethinking "Batch" in BatchNorm, 2021, section 3; detectron2's PreciseBN hook).

A BN layer's running statistics are an exponential average over the batches it saw in training mode, under weights
that kept changing, and in most semi-supervised methods those batches include strong views (colour jitter,
CutOut, CutMix) that inference never sees. Recomputed with the final weights on clean images, they are the
statistics of what the model will be shown.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
import torch.nn as nn


@torch.no_grad()
def recompute_bn_statistics(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace every BN layer's running mean and variance by their average over ``batches`` (image tensors
    [B, 3, H, W], B >= 2), with the rest of the model in inference mode; returns the number of batches. The
    model's mode and each layer's momentum are restored; without a single batch, ValueError before anything changes."""
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise ValueError("no images to recompute batch-norm statistics from")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was_training, momenta = model.training, [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: every batch counts the same
        m.train()
    count = 0
    for x in itertools.chain([first], batches):
        model(x)
        count += 1
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)
    return count
