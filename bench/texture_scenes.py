"""Real-texture scenes: a deterministic segmentation set built from photographs that ship inside the
scikit-image wheel (``skimage.data``), so nothing is downloaded at run time.

Each class is a photographic texture (grass, brick, gravel, cat fur, stained tissue); objects are smooth
random blobs or the horse silhouette, cut from that texture and laid over a background cropped from other
photographs (moon, camera man, coffee, rocket, Hubble field, astronaut). Object radii are log-uniform over
an 8x range, and the texture is sampled in proportion to the object, as a real surface seen nearer or
further away: the same class looks different at different scales, the regime ScaleMatch targets.
Photometric noise (per-object gain and contrast, per-image brightness, Gaussian noise, blur) keeps
brightness from giving the classes away; the grey textures (grass, brick, gravel) and the grey
backgrounds can only be told apart by their texture.

``variety="wide"`` (the ``photos`` benchmark) widens every class: each class draws from several
photographs (brick or printed text, gravel or a pile of coins, stained tissue or a cell culture), a
texture is sampled at 0.7-1.4x its zoom and turned by a multiple of 90 degrees, half the backgrounds get a
random hue and half the objects a hue turned by up to 35 degrees (colour varies within a class, as in
natural photos, so a method's colour jitter does not contradict the labels), and the light falls off across
the image in a random direction.

``variety="recoloured"`` (the ``recoloured`` benchmark) keeps ``textures``' photographs and zoom but recolours
every object and background as the methods' strong view does: hue turned by up to 90 degrees either way and
one in five in grey. Class identity then lives in texture alone, so no view of A_s (colour jitter with hue
0.25, grayscale p 0.2) asks for a label the image no longer shows; on ``textures`` cat fur and stained
tissue are told apart by colour and fall to 0 IoU in grey (bench/augment_sensitivity.py).
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from training.data.folder import (ClassInfo, _default_color, staged_folder, write_classes, write_image, write_mask,
                                  write_split)

CLASS_SOURCES = {"grass": "grass", "brick": "brick", "gravel": "gravel", "fur": "chelsea", "tissue": "immunohistochemistry"}
WIDE_CLASS_SOURCES = {"grass": ("grass", "retina"), "brick": ("brick", "page", "text"), "gravel": ("gravel", "coins"),
                      "fur": ("chelsea", "cat"), "tissue": ("immunohistochemistry", "cell")}
BACKGROUND_SOURCES = ("moon", "camera", "coffee", "rocket", "hubble_deep_field", "astronaut")
WIDE_BACKGROUND_SOURCES = BACKGROUND_SOURCES + ("clock", "colorwheel", "microaneurysms")
RADIUS_RANGE = (0.06, 0.48)   # object radius as a fraction of the image side: an 8x range
TEXTURE_PATCH = 56            # source pixels across an object, whatever its size (texture scales with it)
# The wide variety's spread. A texture's hue turns by at most 35 degrees and its zoom by 0.7-1.4x: full turns
# and 0.5-2x made the classes unlearnable in a CPU budget (supervised with 8x more labels scored lower).
WIDE_OBJECT_HUE = 0.6
WIDE_LOG_ZOOM = (-0.35, 0.35)
# The recoloured variety's spread: A_s's colour jitter turns hue by up to 0.25 of a turn and greys p 0.2.
RECOLOUR_HUE = np.pi / 2
RECOLOUR_GREY = 0.2
VARIETIES = ("narrow", "wide", "recoloured")
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601 luma: YIQ's Y, and grey as rgb_to_grayscale makes it


def class_table() -> list[ClassInfo]:
    names = ["background", *CLASS_SOURCES]
    return [ClassInfo(i, n, tuple(_default_color(i))) for i, n in enumerate(names)]


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    """The named skimage.data photograph as float RGB in [0, 1]."""
    import skimage.data
    img = np.asarray(getattr(skimage.data, name)(), dtype=np.float32) / 255.0
    if name == "chelsea":
        img = img[40:260, 60:300]  # the cat's fur, not the room behind it
    elif name == "cat":
        img = img[30:270, 40:300]
    elif name == "retina":
        img = img[300:1100, 300:1100]  # the vessels, not the black frame
    return np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]


@functools.lru_cache(maxsize=None)
def _horse() -> np.ndarray:
    import skimage.data
    mask = ~np.asarray(skimage.data.horse())  # the silhouette is False on white
    ys, xs = np.nonzero(mask)
    return mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def _resize(arr: np.ndarray, w: int, h: int, resample=Image.BILINEAR) -> np.ndarray:
    if arr.dtype == bool:
        return np.asarray(Image.fromarray(arr.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127
    img = Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8))
    return np.asarray(img.resize((w, h), resample), dtype=np.float32) / 255.0


def _patch(source: np.ndarray, side: int, out: int, rng: np.random.Generator) -> np.ndarray:
    """A random side x side crop of ``source`` resized to out x out."""
    h, w = source.shape[:2]
    side = min(side, h, w)
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    return _resize(source[y:y + side, x:x + side], out, out)


def _blob(n: int, rng: np.random.Generator) -> np.ndarray:
    """An n x n boolean mask: a smooth random star-convex blob, or (1 in 4) the horse silhouette."""
    if rng.random() < 0.25:
        horse = _horse()
        scale = n / max(horse.shape)
        mask = _resize(horse, max(1, int(horse.shape[1] * scale)), max(1, int(horse.shape[0] * scale)))
        if rng.random() < 0.5:
            mask = mask[:, ::-1]
        out = np.zeros((n, n), bool)
        out[:mask.shape[0], :mask.shape[1]] = mask
        return out
    yy, xx = (np.mgrid[0:n, 0:n] + 0.5) / n * 2 - 1
    theta, rad = np.arctan2(yy, xx), np.hypot(xx, yy)
    edge = np.full_like(theta, 0.75)
    for k in range(2, 6):
        edge += rng.uniform(0, 0.18 / (k - 1)) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return rad <= np.clip(edge, 0.3, 1.0)


def _hue_rotate(img: np.ndarray, angle: float) -> np.ndarray:
    """Rotate the chroma of float RGB by ``angle`` radians in YIQ space (luminance kept)."""
    yiq = np.array([LUMA, [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]], np.float32)
    return img @ (np.linalg.inv(yiq) @ rot @ yiq).T.astype(np.float32)


def _vary(tex: np.ndarray, rng: np.random.Generator, max_hue: float) -> np.ndarray:
    """The wide variety's per-texture changes: a quarter turn or more, and half the time a hue rotated by up
    to ``max_hue`` radians either way."""
    tex = np.rot90(tex, int(rng.integers(4)))
    return _hue_rotate(tex, rng.uniform(-max_hue, max_hue)) if rng.random() < 0.5 else tex


def _recolour(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The recoloured variety's change: a hue turned by up to RECOLOUR_HUE either way, then grey with
    probability RECOLOUR_GREY (ITU-R 601 luma, as torchvision's rgb_to_grayscale)."""
    img = _hue_rotate(img, rng.uniform(-RECOLOUR_HUE, RECOLOUR_HUE))
    if rng.random() < RECOLOUR_GREY:
        img = np.repeat(img @ LUMA[:, None], 3, axis=2)
    return img


def render(index: int, seed: int, size: int, max_objects: int = 4, variety: str = "narrow") -> tuple[np.ndarray, np.ndarray]:
    """One RGB uint8 image and its uint8 mask, a pure function of (index, seed, size, variety)."""
    if variety not in VARIETIES:
        raise ValueError(f"variety {variety!r}: choose one of {', '.join(VARIETIES)}")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index, 0x7E47])))
    wide = variety == "wide"
    backgrounds = WIDE_BACKGROUND_SOURCES if wide else BACKGROUND_SOURCES
    bg_src = _photo(backgrounds[int(rng.integers(len(backgrounds)))])
    img = _patch(bg_src, int(rng.integers(size // 2, 2 * size)), size, rng)
    if wide:
        img = _vary(img, rng, np.pi)
    elif variety == "recoloured":
        img = _recolour(img, rng)
    img = img * rng.uniform(0.7, 1.2) + rng.uniform(-0.1, 0.1)
    mask = np.zeros((size, size), np.uint8)
    n = int(rng.integers(1, max_objects + 1))
    radii = np.exp(rng.uniform(*np.log(RADIUS_RANGE), n)) * size
    for r in sorted(radii, reverse=True):  # small objects last, so they stay visible on top
        cid = int(rng.integers(1, len(CLASS_SOURCES) + 1))
        side = max(3, int(2 * r))
        shape = _blob(side, rng)
        if wide:
            sources = list(WIDE_CLASS_SOURCES.values())[cid - 1]
            tex = _patch(_photo(sources[int(rng.integers(len(sources)))]), int(TEXTURE_PATCH * np.exp(rng.uniform(*WIDE_LOG_ZOOM))), side, rng)
            tex = _vary(tex, rng, WIDE_OBJECT_HUE)
        else:
            tex = _patch(_photo(list(CLASS_SOURCES.values())[cid - 1]), int(TEXTURE_PATCH * rng.uniform(0.8, 1.25)), side, rng)
            if variety == "recoloured":
                tex = _recolour(tex, rng)
        mean = tex.mean((0, 1), keepdims=True)
        tex = (tex - mean) * rng.uniform(0.7, 1.3) + mean * rng.uniform(0.75, 1.25) * rng.uniform(0.92, 1.08, 3)
        y0, x0 = int(rng.integers(-side // 4, size - side + side // 4 + 1)), int(rng.integers(-side // 4, size - side + side // 4 + 1))
        ys, xs = slice(max(0, y0), min(size, y0 + side)), slice(max(0, x0), min(size, x0 + side))
        sub = shape[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
        if not sub.any():
            continue
        img[ys, xs][sub] = tex[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0][sub]
        mask[ys, xs][sub] = cid
    if wide:  # light falling off across the scene in a random direction
        yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
        angle = rng.uniform(0, 2 * np.pi)
        img = img * (1 + rng.uniform(0.2, 0.6) * (np.cos(angle) * xx + np.sin(angle) * yy))[..., None]
    img = img + rng.normal(0, rng.uniform(0.01, 0.05), img.shape)
    out = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    if rng.random() < 0.3:
        out = out.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
    return np.asarray(out), mask


def synthesize_textures(out: str | Path, n_labeled: int, n_unlabeled: int, n_val: int, size: int = 128,
                        seed: int = 0, force: bool = False, variety: str = "narrow") -> Path:
    """Write the dataset folder (built in a temp folder and renamed, so never half-written)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out}: folder exists and is not empty; choose another folder or pass force=True.")
    with staged_folder(out) as tmp:
        write_classes(tmp, class_table())
        index = 0
        for split, count in (("labeled", n_labeled), ("unlabeled", n_unlabeled), ("val", n_val)):
            ids = []
            for _ in range(count):
                image_id = f"tex_{index:05d}"
                img, mask = render(index, seed, size, variety=variety)
                write_image(tmp / "images" / f"{image_id}.png", img)
                if split != "unlabeled":
                    write_mask(tmp / "masks" / f"{image_id}.png", mask)
                ids.append(image_id)
                index += 1
            write_split(tmp, split, ids)
    return out
