"""`scaleseg data synth`: a deterministic multi-scale segmentation dataset for demos, tests and benchmarks.

Objects of K-1 classes (each a shape with its own texture and colour family) on textured backgrounds,
with sizes spread log-uniformly from a few pixels to most of the image: the regime ScaleMatch targets,
where a model at one input scale misses small objects and loses context on large ones. Textures scale
with the object, as real surfaces do, so the same class looks different at different scales.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from .folder import ClassInfo, _default_color, staged_folder, write_classes, write_image, write_mask, write_split

SHAPES = ("disc", "square", "triangle", "ring", "cross", "diamond", "bar", "ellipse")
TEXTURES = ("stripes", "checker", "dots", "plain", "waves", "grid", "rings", "noise")


def class_table(num_classes: int) -> list[ClassInfo]:
    if not 2 <= num_classes <= len(SHAPES) + 1:
        raise ValueError(f"--classes must be between 2 and {len(SHAPES) + 1}, got {num_classes}")
    names = ["background", *SHAPES[: num_classes - 1]]
    return [ClassInfo(i, n, tuple(_default_color(i))) for i, n in enumerate(names)]


def _shape_mask(kind: str, xx: np.ndarray, yy: np.ndarray, r: float, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    u, v = (xx * c + yy * s) / r, (-xx * s + yy * c) / r
    if kind == "disc":
        return u ** 2 + v ** 2 <= 1
    if kind == "square":
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    if kind == "triangle":
        return (v <= 0.75) & (v >= 1.7 * np.abs(u) - 0.95)
    if kind == "ring":
        d = u ** 2 + v ** 2
        return (d <= 1) & (d >= 0.35)
    if kind == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1))
    if kind == "diamond":
        return np.abs(u) + np.abs(v) <= 1
    if kind == "bar":
        return (np.abs(u) <= 1) & (np.abs(v) <= 0.35)
    return (u / 1.0) ** 2 + (v / 0.55) ** 2 <= 1  # ellipse


def _texture(kind: str, xx: np.ndarray, yy: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    """Values in [0, 1] at pixel offsets (xx, yy) from the object centre."""
    f = 2 * np.pi / period
    if kind == "stripes":
        return 0.5 + 0.5 * np.sign(np.sin(f * (xx + yy) / np.sqrt(2)))
    if kind == "checker":
        return ((np.floor(xx / period * 2) + np.floor(yy / period * 2)) % 2).astype(np.float64)
    if kind == "dots":
        return ((np.sin(f * xx) * np.sin(f * yy)) > 0.5).astype(np.float64)
    if kind == "plain":
        return np.full_like(xx, 0.7, dtype=np.float64)
    if kind == "waves":
        return 0.5 + 0.5 * np.sin(f * xx + 2 * np.sin(f * yy / 2))
    if kind == "grid":
        return ((np.abs(np.sin(f * xx)) < 0.3) | (np.abs(np.sin(f * yy)) < 0.3)).astype(np.float64)
    if kind == "rings":
        return 0.5 + 0.5 * np.sin(f * np.sqrt(xx ** 2 + yy ** 2))
    return rng.random(xx.shape)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency coloured noise plus a gradient: cluttered enough that colour alone does not segment."""
    coarse = rng.random((6, 6, 3))
    ys = np.linspace(0, 5, size)
    i0 = np.clip(ys.astype(int), 0, 4)
    t = (ys - i0)[:, None]
    rows = coarse[i0] * (1 - t[..., None]) + coarse[i0 + 1] * t[..., None]
    bg = rows[:, i0] * (1 - t[None, :, :]) + rows[:, i0 + 1] * t[None, :, :]
    grad = np.linspace(0, 1, size)[None, :, None] * rng.uniform(-0.3, 0.3, 3)
    return np.clip(0.25 + 0.5 * bg + grad, 0, 1)


def render(index: int, seed: int, size: int, classes: list[ClassInfo],
           min_frac: float = 0.05, max_frac: float = 0.7, max_objects: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """One RGB uint8 image and its uint8 mask, a pure function of (index, seed)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index])))
    img = _background(size, rng)
    mask = np.zeros((size, size), np.uint8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    n = int(rng.integers(1, max_objects + 1))
    radii = np.exp(rng.uniform(np.log(min_frac), np.log(max_frac), n)) * size / 2
    for r in sorted(radii, reverse=True):  # small objects last, so they stay visible on top
        cid = int(rng.integers(1, len(classes)))
        cx, cy = rng.uniform(-0.1, 1.1) * size, rng.uniform(-0.1, 1.1) * size
        dx, dy = xx - cx, yy - cy
        region = _shape_mask(SHAPES[cid - 1], dx, dy, r, rng.uniform(0, np.pi))
        if not region.any():
            continue
        tex = _texture(TEXTURES[(cid - 1) % len(TEXTURES)], dx, dy, max(r / 2.5, 1.5), rng)
        base = np.array(classes[cid].color, np.float64) / 255 * 0.6 + 0.2 + rng.uniform(-0.08, 0.08, 3)
        dark = base * rng.uniform(0.35, 0.6)
        colour = dark + (base - dark) * tex[..., None]
        img[region] = colour[region]
        mask[region] = cid
    img = img * rng.uniform(0.8, 1.2) + rng.normal(0, 0.02, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), mask


def synthesize(out: str | Path, num_classes: int = 5, n_labeled: int = 16, n_unlabeled: int = 240,
               n_val: int = 40, size: int = 128, seed: int = 0, force: bool = False,
               progress: bool = True, max_objects: int = 5) -> Path:
    """Write the dataset folder; built in a temp folder beside ``out`` and renamed, so never half-written.
    Each image holds 1..max_objects objects."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out}: folder exists and is not empty. Choose another folder or pass --force to replace it.")
    if min(n_labeled, n_val, max_objects) < 1 or n_unlabeled < 0 or size < 16:
        raise ValueError("need --n-labeled >= 1, --n-val >= 1, --max-objects >= 1, --n-unlabeled >= 0 and --size >= 16")
    classes = class_table(num_classes)
    with staged_folder(out) as tmp:
        write_classes(tmp, classes)
        counts = {"labeled": n_labeled, "unlabeled": n_unlabeled, "val": n_val}
        bar = tqdm(total=sum(counts.values()), desc="synth", unit="img", disable=not progress)
        index = 0
        for split, count in counts.items():
            ids = []
            for _ in range(count):
                image_id = f"synth_{index:05d}"
                img, mask = render(index, seed, size, classes, max_objects=max_objects)
                write_image(tmp / "images" / f"{image_id}.png", img)
                if split != "unlabeled":
                    write_mask(tmp / "masks" / f"{image_id}.png", mask)
                ids.append(image_id)
                index += 1
                bar.update()
            write_split(tmp, split, ids)
        bar.close()
    return out
