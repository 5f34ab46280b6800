"""Score the unlabelled images of a dataset with a model package and pick the ones to label next."""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from serving.backends import Backend, load_backend
from training.data.folder import atomic_write, find_image, load_classes, read_split

from . import acquisition


@dataclass
class Scored:
    image_id: str
    score: float
    labels: np.ndarray
    confidence: np.ndarray


def image_batch(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).transpose(2, 0, 1)[None].copy()


def score_unlabeled(model_dir: Path, data: Path, function: str = "entropy", ids: list[str] | None = None,
                    backend: Backend | None = None, cif_backend: Backend | None = None, progress=None) -> list[Scored]:
    """Every unlabelled image (or ``ids``) with its score and predicted labels, highest score first."""
    model_dir, data = Path(model_dir), Path(data)
    if function not in acquisition.FUNCTIONS:
        raise ValueError(f"unknown acquisition function {function!r}; choose one of {', '.join(acquisition.FUNCTIONS)}")
    backend = backend or load_backend(model_dir)
    if function == "scale_disagreement" and cif_backend is None:
        if not (model_dir / "model.cif.onnx").is_file():
            raise ValueError(f"{model_dir}: scale_disagreement needs model.cif.onnx (export a scalematch checkpoint "
                             "with --cif-scales 0.5,2.0)")
        cif_backend = load_backend(model_dir, graph="model.cif.onnx")
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
        scored.append(Scored(image_id, acquisition.score(function, out, cif), out["labels"], out["confidence"]))
    return sorted(scored, key=lambda s: -s.score)


def choose(scored: list[Scored], data: Path, k: int, balance: float = 1.0) -> list[Scored]:
    """Class-balanced top-k of the scored images."""
    if not scored:
        return []
    num_classes = len(load_classes(data))
    hist = np.stack([acquisition.class_histogram(s.labels, num_classes) for s in scored])
    picks = acquisition.select(np.array([s.score for s in scored]), hist, k, balance)
    return [scored[i] for i in picks]


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
