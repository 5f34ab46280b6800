"""Batch-norm statistics recomputed from a trained model on chosen images ("precise BN": Wu and Johnson,
Rethinking "Batch" in BatchNorm, 2021, section 3 and appendix; fvcore's update_bn_stats).

A BN layer's running statistics are an exponential average over the batches it saw in training mode, under weights
that kept changing, and in most semi-supervised methods those batches include strong views (colour jitter,
CutOut, CutMix) that inference never sees. Recomputed with the final weights on clean images, they are the
statistics of what the model will be shown.

One process: the batches are moved to the model's device; under DDP each process would hold its own statistics
(and SyncBatchNorm would need every process to pass as many batches), so a caller there averages them.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
import torch.nn as nn


@torch.no_grad()
def recompute_bn_statistics(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace the running mean and variance of every BN layer that trains (a frozen encoder's keep theirs) by the
    population statistics of ``batches`` (image tensors [B, 3, H, W], B >= 2), the rest of the model in inference
    mode; returns the number of batches. Every module's mode and each layer's momentum are restored; after an error
    the statistics are too; without a single batch, ValueError before anything changes."""
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise ValueError("no images to recompute batch-norm statistics from")
    modes = {m: m.training for m in model.modules()}
    model.train()  # a frozen encoder puts its BN layers back in inference mode here
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    saved = {m: (m.momentum, m.running_mean.clone(), m.running_var.clone()) for m in norms}
    values: dict[nn.Module, int] = {}  # values per channel in the layer's current batch

    def record(m, inputs):
        values[m] = inputs[0].numel() // inputs[0].shape[1]
    hooks = [m.register_forward_pre_hook(record) for m in norms]
    model.eval()
    for m in norms:
        m.train()
        m.momentum = 1.0  # the running statistics become each batch's own: its mean and unbiased variance
    # Population statistics, each batch weighted by its values per channel n (the paper's appendix):
    # mean = E[mean_b], var = E[var_b (n - 1) / n + mean_b^2] - mean^2.
    sums = {m: [0, torch.zeros_like(m.running_mean), torch.zeros_like(m.running_var)] for m in norms}
    device = next(model.parameters()).device
    count = 0
    try:
        for x in itertools.chain([first], batches):
            if len(x) < 2:
                raise ValueError(f"a batch of {len(x)} image: batch norm needs two or more to normalise by")
            model(x.to(device))
            for m, acc in sums.items():
                n = values[m]
                acc[0] += n
                acc[1] += n * m.running_mean
                acc[2] += m.running_var * (n - 1) + n * m.running_mean ** 2
            count += 1
        for m, (total, mean_sum, square_sum) in sums.items():
            mean = mean_sum / total
            m.running_mean.copy_(mean)
            m.running_var.copy_(square_sum / total - mean ** 2)
    except BaseException:
        for m, (_, mean, var) in saved.items():
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
        raise
    finally:
        for h in hooks:
            h.remove()
        for m, (momentum, _, _) in saved.items():
            m.momentum = momentum
        for m, mode in modes.items():
            m.training = mode
    return count
