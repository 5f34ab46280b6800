"""The Python API: a model package loaded in process, segmenting paths, PIL images and NumPy arrays.

    from serving.segmenter import Segmenter
    seg = Segmenter.load("runs/model")          # the folder `scaleseg export` wrote
    labels, confidence = seg.predict("photo.jpg")

It loads the package exactly as `scaleseg serve` does (the same backends, precision choice and warm-up
check) and is what `scaleseg predict` runs. An image larger than the backend takes in one pass (a TensorRT
engine's max side, or the pixels-of-work budget for ONNX Runtime) is refused, or with ``tile=True``
segmented in overlapping tiles whose results are merged by keeping, per pixel, the most confident tile.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from .backends import Backend, BackendError
from .imaging import _rgb8, decode_image
from .limits import MIN_SIDE, RequestLimits, scale_cost
from .precision import load_graph
from .protocol import ProtocolError
from .repository import read_meta, warm_up

GRAPHS = {False: "model.onnx", True: "model.cif.onnx"}
OVERLAP = 0.25  # fraction of a tile shared with its neighbour: each pixel near a tile's edge is also seen inside another


class Segmenter:
    """One graph of a model package behind a backend; ``predict`` takes one image at a time."""

    def __init__(self, backend: Backend, classes: list[dict], scales=(1.0,), max_work_pixels: int = RequestLimits.max_work_pixels):
        self.backend, self.classes, self.scales = backend, classes, tuple(scales)
        self.max_work_pixels = max_work_pixels

    @classmethod
    def load(cls, model_dir: str | Path, cif: bool = False, backend: str = "auto", precision: str = "auto",
             max_work_pixels: int = RequestLimits.max_work_pixels) -> Segmenter:
        """The package's single-scale graph, or with ``cif`` its multi-scale CIF graph; ``backend`` auto, onnxruntime
        or tensorrt; ``precision`` auto, fp32 or int8 (as `scaleseg serve`)."""
        directory = Path(model_dir)
        meta = read_meta(directory)
        graph = GRAPHS[cif]
        if cif and not (directory / graph).is_file():
            raise BackendError(f"{directory}: has no CIF graph ({graph}); export it with `scaleseg export --cif-scales 0.5,2.0`, "
                               "or predict without --cif.")
        loaded = load_graph(directory, graph, meta, kind=backend, requested=precision, check=lambda b: warm_up(b, meta))
        scales = ((meta.get("graphs") or {}).get(graph) or {}).get("scales") or [1.0]
        return cls(loaded, meta["classes"], scales, max_work_pixels)

    @property
    def description(self) -> str:
        return f"{self.backend.description}, {self.backend.precision}"

    def max_side(self) -> int:
        """The largest square side one pass takes: the engine's profile, or the work-pixel budget."""
        budget = math.isqrt(int(self.max_work_pixels / scale_cost(self.scales)))
        return min(budget, self.backend.profile.max_side) if self.backend.profile else budget

    def fits(self, height: int, width: int) -> bool:
        if self.backend.profile is not None and self.backend.profile.exceeds((1, 3, height, width)):
            return False
        return height * width * scale_cost(self.scales) <= self.max_work_pixels

    def predict(self, image, tile: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(labels uint8 [H, W] class ids, confidence float32 [H, W] max softmax) of one image: a file path, a PIL
        image, or a uint8 array [H, W, 3] RGB ([H, W] grey and [H, W, 4] RGBA are accepted too)."""
        rgb = as_rgb(image)
        h, w = rgb.shape[:2]
        min_side = max(MIN_SIDE, self.backend.profile.min_side if self.backend.profile else 0)
        if min(h, w) < min_side:
            raise ValueError(f"{w}x{h}: images must be at least {min_side}x{min_side} pixels")
        if self.fits(h, w):
            return self._run(rgb)
        if not tile:
            side = self.max_side()
            raise ValueError(f"{w}x{h} is larger than this backend takes in one pass (about {side}x{side}); "
                             "segment it in tiles (tile=True, or --tile), or downscale it")
        return self._tiled(rgb)

    def _run(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.backend.infer(np.ascontiguousarray(rgb.transpose(2, 0, 1)[None]))
        return out["labels"][0].astype(np.uint8), out["confidence"][0].astype(np.float32)

    def _tiled(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, w = rgb.shape[:2]
        side = self.max_side()
        labels = np.zeros((h, w), np.uint8)
        confidence = np.full((h, w), -1.0, np.float32)
        for y in tile_starts(h, side):
            for x in tile_starts(w, side):
                lab, conf = self._run(rgb[y:y + side, x:x + side])
                view = confidence[y:y + side, x:x + side]
                better = conf > view
                labels[y:y + side, x:x + side][better] = lab[better]
                view[better] = conf[better]
        return labels, confidence


def tile_starts(length: int, side: int) -> list[int]:
    """Start offsets of tiles of ``side`` covering ``length``, neighbours overlapping by about OVERLAP; the last
    tile ends at the edge, so every tile has the full side when the image is at least that long."""
    if length <= side:
        return [0]
    stride = max(1, int(side * (1 - OVERLAP)))
    starts = list(range(0, length - side, stride))
    return starts + [length - side]


def as_rgb(image) -> np.ndarray:
    """uint8 [H, W, 3] RGB from a path (decoded upright by its EXIF orientation), a PIL image or an array."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        try:
            return decode_image(path.read_bytes(), lambda h, w: None)
        except ProtocolError as err:
            raise ValueError(f"{path}: {err}") from None
    if isinstance(image, Image.Image):
        return _rgb8(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"array of {image.dtype}; pass uint8 RGB [H, W, 3] (0..255)")
        if image.ndim == 2:
            return np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim == 3 and image.shape[2] in (3, 4):
            return np.ascontiguousarray(image[:, :, :3])
        raise ValueError(f"array of shape {image.shape}; pass RGB [H, W, 3]")
    raise TypeError(f"cannot segment a {type(image).__name__}; pass a file path, a PIL image or a uint8 NumPy array")
