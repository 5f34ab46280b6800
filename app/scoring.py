"""Score the unlabelled images of a dataset with a model package and pick the ones to label next; before
there is a model (a cold start), pick them by diversity on ImageNet features, or at random."""
from __future__ import annotations

import json
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from serving.backends import Backend, load_backend
from training.data.folder import atomic_write, find_image, load_classes, read_split

from . import acquisition
from .features import EncoderFeatures


@dataclass
class Scored:
    image_id: str
    score: float
    labels: np.ndarray
    confidence: np.ndarray
    features: np.ndarray | None = None  # pooled encoder features, for the diversity strategies


def image_batch(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).transpose(2, 0, 1)[None].copy()


def score_unlabeled(model_dir: Path, data: Path, function: str = "entropy", ids: list[str] | None = None,
                    backend: Backend | None = None, cif_backend: Backend | None = None, progress=None,
                    encoder=None) -> list[Scored]:
    """Every unlabelled image (or ``ids``) with its score and predicted labels, highest score first; with the
    diversity strategies also its pooled encoder features (from ``encoder``, else the package's checkpoint)."""
    model_dir, data = Path(model_dir), Path(data)
    if function not in acquisition.FUNCTIONS:
        raise ValueError(f"unknown acquisition function {function!r}; choose one of {', '.join(acquisition.FUNCTIONS)}")
    backend = backend or load_backend(model_dir)
    if function == "scale_disagreement" and cif_backend is None:
        if not (model_dir / "model.cif.onnx").is_file():
            raise ValueError(f"{model_dir}: scale_disagreement needs model.cif.onnx (export a scalematch checkpoint "
                             "with --cif-scales 0.5,2.0)")
        cif_backend = load_backend(model_dir, graph="model.cif.onnx")
    if function in acquisition.DIVERSITY and encoder is None:
        encoder = EncoderFeatures.from_package(model_dir)
    ids = ids if ids is not None else read_split(data, "unlabeled", required=False)
    scored = []
    for n, image_id in enumerate(ids):
        if progress:
            progress(n / max(1, len(ids)), f"scoring {image_id}")
        path = find_image(data, image_id)
        if path is None:
            continue
        x = image_batch(path)
        out = {k: v[0] for k, v in backend.infer(x).items()}
        cif = {k: v[0] for k, v in cif_backend.infer(x).items()} if function == "scale_disagreement" else None
        features = encoder(x) if function in acquisition.DIVERSITY else None
        scored.append(Scored(image_id, acquisition.score(function, out, cif), out["labels"], out["confidence"], features))
    return sorted(scored, key=lambda s: -s.score)


def choose(scored: list[Scored], data: Path, k: int, balance: float = 1.0) -> list[Scored]:
    """Class-balanced top-k of the scored images."""
    if not scored:
        return []
    num_classes = len(load_classes(data))
    hist = np.stack([acquisition.class_histogram(s.labels, num_classes) for s in scored])
    picks = acquisition.select(np.array([s.score for s in scored]), hist, k, balance)
    return [scored[i] for i in picks]


def select_next(model_dir: Path, data: Path, function: str, k: int, balance: float = 1.0, backend: Backend | None = None,
                cif_backend: Backend | None = None, progress=None) -> tuple[list[Scored], list[Scored]]:
    """(every scored unlabelled image, the k picked to label next): the one selection path of the app, the
    CLI and the simulation. Uncertainty functions pick a class-balanced top-k; core-set covers the feature
    space around the labelled images; combined takes the most uncertain image of each feature cluster
    (class balance applies to the uncertainty functions only)."""
    encoder = EncoderFeatures.from_package(model_dir) if function in acquisition.DIVERSITY else None
    scored = score_unlabeled(model_dir, data, function, backend=backend, cif_backend=cif_backend, progress=progress,
                             encoder=encoder)
    if function not in acquisition.DIVERSITY or not scored:
        return scored, choose(scored, data, k, balance)
    pool = np.stack([s.features for s in scored])
    if function == "coreset":
        paths = (find_image(data, i) for i in read_split(data, "labeled", required=False))
        labeled = [encoder(image_batch(path)) for path in paths if path is not None]
        picks = acquisition.k_center_greedy(pool, k, np.stack(labeled) if labeled else None)
    else:
        picks = acquisition.uncertain_per_cluster(pool, np.array([s.score for s in scored]), k)
    return scored, [scored[i] for i in picks]


def select_without_model(data: Path, function: str, k: int, seed: int = 0, chosen=(), progress=None,
                         encoder: EncoderFeatures | None = None) -> list[str]:
    """k unlabelled image ids to label first when there is no model yet. ``coreset``: k-center greedy on the
    pooled features of the ImageNet encoder (``encoder``, else EncoderFeatures.pretrained()), each pick the
    image farthest from the labelled images, the ``chosen`` ones (already sent for labelling) and the picks
    before it; ``random``: a draw with ``seed``. ``chosen`` images are never picked again."""
    data = Path(data)
    acquisition.check_cold_start(function)
    chosen = set(chosen)
    pool = [i for i in read_split(data, "unlabeled", required=False) if i not in chosen and find_image(data, i) is not None]
    if function == "random":
        return random.Random(seed).sample(pool, min(k, len(pool)))
    if not pool:
        return []
    encoder = encoder or EncoderFeatures.pretrained()
    centers = [i for i in read_split(data, "labeled", required=False) + sorted(chosen) if find_image(data, i) is not None]
    features = []
    for n, image_id in enumerate(pool + centers):
        if progress:
            progress(n / len(pool + centers), f"features of {image_id}")
        features.append(encoder(image_batch(find_image(data, image_id))))
    picks = acquisition.k_center_greedy(np.stack(features[:len(pool)]), k,
                                        np.stack(features[len(pool):]) if centers else None)
    return [pool[i] for i in picks]


def save_ranking(path: Path, ranking: list[Scored], model_version: str) -> None:
    """The selection with its masks, so that a restart does not lose it (one .npz, written atomically)."""
    arrays = {"meta": np.frombuffer(json.dumps({"model_version": model_version, "ids": [s.image_id for s in ranking],
                                                "scores": [s.score for s in ranking]}).encode(), np.uint8)}
    for n, s in enumerate(ranking):
        arrays[f"labels_{n}"], arrays[f"confidence_{n}"] = s.labels, s.confidence
    atomic_write(path, lambda fh: np.savez_compressed(fh, **arrays))


def load_ranking(path: Path, data: Path) -> tuple[list[Scored], str]:
    """(selection, model version) saved by save_ranking, without images that are no longer unlabelled."""
    if not Path(path).is_file():
        return [], ""
    try:
        with np.load(path) as saved:
            meta = json.loads(saved["meta"].tobytes())
            pool = set(read_split(data, "unlabeled", required=False))
            ranking = [Scored(i, score, saved[f"labels_{n}"], saved[f"confidence_{n}"])
                       for n, (i, score) in enumerate(zip(meta["ids"], meta["scores"])) if i in pool]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # a damaged file only costs a new ranking
        return [], ""
    return ranking, meta["model_version"]
