"""Which unlabelled images to label next: per-image uncertainty scores and a class-balanced top-k.

Scores (higher = more worth labelling), each averaged over the image's pixels:
- ``entropy``: -sum_c p_c log p_c of the softmax.
- ``margin``: 1 - (p_top1 - p_top2).
- ``least_confidence``: 1 - max_c p_c.
- ``scale_disagreement``: the fraction of pixels where the single-scale and the CIF multi-scale
  predictions disagree: the model's own uncertainty about scale (needs a package with model.cif.onnx).

Uncertainty alone picks near-duplicates (ten views of the same hard scene), so two strategies also look at
what the images are, through pooled encoder features (app/features.py):
- ``coreset``: k-center greedy (Sener & Savarese, ICLR 2018): each pick is the pool image farthest from
  every labelled image and every pick so far, so the picks cover the feature space.
- ``combined``: uncertainty-weighted diversity: the pool's features are clustered into k groups (k-means,
  seeded by k-center greedy) and the most uncertain image (entropy) of each group is picked.

Before any model exists (a cold start) only ``coreset``, on an ImageNet encoder's features, and ``random``
can select (app/scoring.select_without_model).
"""
from __future__ import annotations

import numpy as np

UNCERTAINTY = ("entropy", "margin", "least_confidence", "scale_disagreement")
DIVERSITY = ("coreset", "combined")
FUNCTIONS = UNCERTAINTY + DIVERSITY
COLD_START = ("coreset", "random")  # what selects without a model: ImageNet features, or a seeded draw
NEEDS_PROBS = ("entropy", "margin", "combined")
COMBINED_UNCERTAINTY = "entropy"  # the uncertainty the combined strategy ranks each group by


def check_cold_start(function: str) -> None:
    """ValueError unless ``function`` can select without a model."""
    if function not in COLD_START:
        needs = "needs a model's predictions" if function in FUNCTIONS else "is not a selection function"
        raise ValueError(f"--function {function} {needs}; pass a model package (`scaleseg label push MODEL DATA`) or "
                         f"select without one by {' or '.join(COLD_START)}")


def score(function: str, outputs: dict[str, np.ndarray], cif_outputs: dict[str, np.ndarray] | None = None) -> float:
    """One image's score from its graph outputs (``probs`` [K, H, W] where the function needs it). Core-set
    ignores uncertainty (0); combined scores by entropy."""
    if function == "coreset":
        return 0.0
    if function == "combined":
        function = COMBINED_UNCERTAINTY
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


def _nearest_distances(features: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Each feature's Euclidean distance to its nearest center (inf without centers)."""
    if len(centers) == 0:
        return np.full(len(features), np.inf)
    sq = (features ** 2).sum(1)[:, None] - 2 * features @ centers.T + (centers ** 2).sum(1)[None]
    return np.sqrt(np.clip(sq, 0, None)).min(1)


def k_center_greedy(features: np.ndarray, k: int, labeled: np.ndarray | None = None) -> list[int]:
    """Indices of k pool ``features`` [N, D], each the point farthest from the labelled ``features`` [M, D]
    and the picks before it (ties: the lowest index). Without labelled features the first pick is the point
    farthest from the pool's mean."""
    features = np.asarray(features, dtype=np.float64)
    labeled = np.zeros((0, features.shape[1])) if labeled is None else np.asarray(labeled, dtype=np.float64)
    k = min(k, len(features))
    if k <= 0:
        return []
    distance = _nearest_distances(features, labeled if len(labeled) else features.mean(0, keepdims=True))
    chosen: list[int] = []
    for _ in range(k):
        pick = int(np.argmax(distance))
        chosen.append(pick)
        distance = np.minimum(distance, _nearest_distances(features, features[pick:pick + 1]))
        distance[chosen] = -1.0  # never picked twice, even among duplicates
    return chosen


def kmeans(features: np.ndarray, k: int, iterations: int = 20) -> np.ndarray:
    """Cluster index per feature: Lloyd's k-means started from k-center greedy centers (deterministic)."""
    features = np.asarray(features, dtype=np.float64)
    centers = features[k_center_greedy(features, k)]
    assign = None
    for _ in range(iterations):
        sq = (features ** 2).sum(1)[:, None] - 2 * features @ centers.T + (centers ** 2).sum(1)[None]
        new = sq.argmin(1)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        centers = np.stack([features[assign == c].mean(0) if (assign == c).any() else centers[c] for c in range(len(centers))])
    return assign


def uncertain_per_cluster(features: np.ndarray, scores: np.ndarray, k: int) -> list[int]:
    """The most uncertain member of each of k feature clusters, most uncertain first; if duplicates leave
    fewer than k clusters, the most uncertain of the rest fill up the k."""
    scores = np.asarray(scores, dtype=np.float64)
    k = min(k, len(scores))
    if k <= 0:
        return []
    assign = kmeans(features, k)
    best = [int(np.flatnonzero(assign == c)[np.argmax(scores[assign == c])]) for c in np.unique(assign)]
    rest = [i for i in np.argsort(-scores, kind="stable").tolist() if i not in best]
    return sorted(best, key=lambda i: -scores[i]) + rest[:k - len(best)]
