"""Parity between PyTorch and every available runtime on real images of several sizes and batch sizes.

Reports max |delta confidence| (and |delta prob| when the graph has probs) and the fraction of pixels
whose label agrees; a graph passes when agreement is at least ``min_agreement`` (99.9 %) everywhere.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from serving.backends import Backend

MIN_AGREEMENT = 0.999


def load_images(paths: Sequence[Path], size: tuple[int, int]) -> np.ndarray:
    """uint8 [N, 3, H, W] from image files, resized to (H, W)."""
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((size[1], size[0]), Image.BILINEAR)) for p in paths]
    return np.stack(arrays).transpose(0, 3, 1, 2).copy()


def probe_batches(image_paths: Sequence[Path], sizes: Sequence[tuple[int, int]], batch_sizes: Sequence[int],
                  seed: int = 0) -> list[np.ndarray]:
    """Batches of real images (cycled) at each size and batch size; random images when none are given."""
    rng = np.random.default_rng(seed)
    batches = []
    for size in sizes:
        for n in batch_sizes:
            if image_paths:
                picks = [image_paths[(i + len(batches)) % len(image_paths)] for i in range(n)]
                batches.append(load_images(picks, size))
            else:
                batches.append(rng.integers(0, 256, (n, 3, *size), dtype=np.uint8))
    return batches


@torch.no_grad()
def compare(graph: torch.nn.Module, backend: Backend, batches: Sequence[np.ndarray],
            min_agreement: float = MIN_AGREEMENT) -> dict:
    worst_conf, worst_prob, agree, total, cases = 0.0, 0.0, 0, 0, []
    for batch in batches:
        ref = [t.numpy() for t in graph(torch.from_numpy(batch))]
        got = backend.infer(batch)
        same = int((ref[0] == got["labels"]).sum())
        d_conf = float(np.abs(ref[1] - got["confidence"]).max())
        d_prob = float(np.abs(ref[2] - got["probs"]).max()) if len(ref) > 2 else None
        worst_conf = max(worst_conf, d_conf)
        worst_prob = max(worst_prob, d_prob or 0.0)
        agree, total = agree + same, total + ref[0].size
        cases.append({"shape": list(batch.shape), "label_agreement": same / ref[0].size, "max_abs_diff_confidence": d_conf,
                      "max_abs_diff_probs": d_prob})
    agreement = agree / total
    return {"backend": backend.description, "label_agreement": agreement, "max_abs_diff_confidence": worst_conf,
            "max_abs_diff_probs": worst_prob if len(ref) > 2 else None, "passed": agreement >= min_agreement,
            "min_agreement": min_agreement, "cases": cases}
