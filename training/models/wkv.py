"""Bidirectional WKV (Vision-RWKV) in plain PyTorch: linear in the number of tokens, stable, exportable.

For each channel c and token t (w, u already divided by the token count T, as ScaleMatch does):

    y_t = [ sum_{i != t} e^{-(|t-i|-1) w + k_i} v_i + e^{u + k_t} v_t ]
        / [ sum_{i != t} e^{-(|t-i|-1) w + k_i}     + e^{u + k_t} + eps ]

The i < t half equals e^{-(t-1) w} * sum_{i<t} e^{i w + k_i} v_i (an exclusive prefix sum) and the
i > t half equals e^{(t+1) w} * sum_{i>t} e^{-i w + k_i} v_i (an exclusive suffix sum), so the whole
operator is two cumulative sums: O(T) time and memory instead of the O(T^2) pairwise form. Each sum is
taken after subtracting its running-direction maximum, and the three parts of every token are combined
relative to their largest log-scale, so nothing overflows in float32. Only ops ONNX has (CumSum, Max,
Exp, Slice) are used, with T dynamic.
"""
from __future__ import annotations

import math

import torch


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    """sum_{i < t} x_i along dim 1, by shifting the inclusive sum (no subtraction, no cancellation)."""
    inclusive = torch.cumsum(x, dim=1)
    return torch.cat([torch.zeros_like(inclusive[:, :1]), inclusive[:, :-1]], dim=1)


def bi_wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """w, u: [C]; k, v: [B, T, C]. Returns y: [B, T, C] in float32 (the official kernel's precision)."""
    k, v = k.float(), v.float()
    w, u = w.float(), u.float()
    pos = torch.cumsum(torch.ones_like(k[:1, :, :1]), dim=1) - 1  # [1, T, 1] token index, T dynamic for export

    a = pos * w + k                              # forward-direction exponents
    a_max = a.amax(dim=1, keepdim=True).detach()
    ea = torch.exp(a - a_max)
    fwd_num, fwd_den = _exclusive_cumsum(ea * v), _exclusive_cumsum(ea)
    fwd_log = -(pos - 1) * w + a_max             # log-scale of the prefix sums at token t

    b = k - pos * w                              # backward-direction exponents
    b_max = b.amax(dim=1, keepdim=True).detach()
    eb = torch.flip(torch.exp(b - b_max), dims=[1])
    bwd_num = torch.flip(_exclusive_cumsum(eb * torch.flip(v, dims=[1])), dims=[1])
    bwd_den = torch.flip(_exclusive_cumsum(eb), dims=[1])
    bwd_log = (pos + 1) * w + b_max

    self_log = u + k
    top = torch.maximum(torch.maximum(fwd_log, bwd_log), self_log).detach()
    f, bw, s = torch.exp(fwd_log - top), torch.exp(bwd_log - top), torch.exp(self_log - top)
    num = f * fwd_num + bw * bwd_num + s * v
    den = f * fwd_den + bw * bwd_den + s + torch.exp(torch.clamp(math.log(eps) - top, max=60.0))
    return num / den
