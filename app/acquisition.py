"""Which unlabelled images to label next: per-image uncertainty scores and a class-balanced top-k.

Scores (higher = more worth labelling), each averaged over the image's pixels:
- ``entropy``: -sum_c p_c log p_c of the softmax.
- ``margin``: 1 - (p_top1 - p_top2).
- ``least_confidence``: 1 - max_c p_c.
- ``scale_disagreement``: the fraction of pixels where the single-scale and the CIF multi-scale
  predictions disagree: the model's own uncertainty about scale (needs a package with model.cif.onnx).
"""
from __future__ import annotations

import numpy as np

FUNCTIONS = ("entropy", "margin", "least_confidence", "scale_disagreement")
NEEDS_PROBS = ("entropy", "margin")


def score(function: str, outputs: dict[str, np.ndarray], cif_outputs: dict[str, np.ndarray] | None = None) -> float:
    """One image's score from its graph outputs (``probs`` [K, H, W] where the function needs it)."""
    if function == "least_confidence":
        return float(1 - outputs["confidence"].mean())
    if function == "scale_disagreement":
        if cif_outputs is None:
            raise ValueError("scale_disagreement needs the CIF multi-scale graph (export with --cif-scales)")
        return float((outputs["labels"] != cif_outputs["labels"]).mean())
    if function not in NEEDS_PROBS:
        raise ValueError(f"unknown acquisition function {function!r}; choose one of {', '.join(FUNCTIONS)}")
    if "probs" not in outputs:
        raise ValueError(f"{function} needs per-class probabilities (export with --with-probs)")
    probs = outputs["probs"].astype(np.float64)
    if function == "entropy":
        return float(-(probs * np.log(np.clip(probs, 1e-12, 1))).sum(0).mean())
    top2 = np.sort(probs, axis=0)[-2:]
    return float(1 - (top2[1] - top2[0]).mean())


def class_histogram(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(labels.ravel(), minlength=num_classes) / labels.size


def select(scores: np.ndarray, histograms: np.ndarray, k: int, balance: float = 1.0) -> list[int]:
    """Greedy class-balanced top-k: each pick maximises score x (1 + balance x novelty), where novelty is
    how much of the image's predicted class mass falls on classes the picks so far cover least. With
    balance 0 this is plain top-k by score."""
    scores = np.asarray(scores, dtype=np.float64)
    histograms = np.asarray(histograms, dtype=np.float64)
    k = min(k, len(scores))
    covered = np.zeros(histograms.shape[1])
    chosen: list[int] = []
    available = np.ones(len(scores), dtype=bool)
    for _ in range(k):
        novelty = (histograms / (1.0 + covered)).sum(1)
        gain = np.where(available, scores * (1 + balance * novelty), -np.inf)
        pick = int(np.argmax(gain))
        chosen.append(pick)
        available[pick] = False
        covered += histograms[pick]
    return chosen
