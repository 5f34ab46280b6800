"""Weak and strong augmentations and the CutMix box, as UniMatch/ScaleMatch define them (METHODS.md).

Every random draw comes from an explicit ``numpy.random.Generator`` so that a sample's augmentation
depends only on (seed, epoch, index): data order and augmentation replay exactly after a resume,
whatever the number of loader workers.
"""
from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter

from .folder import IGNORE

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
UNLABELED_PAD = 254  # padding marker for unlabelled crops; becomes the ignore mask


def random_rescale(img: Image.Image, mask: Image.Image, rng: np.random.Generator,
                   lo: float, hi: float) -> tuple[Image.Image, Image.Image]:
    """Resize so the long side is a uniform integer in [lo*L, hi*L], keeping the aspect ratio."""
    w, h = img.size
    long_side = int(rng.integers(int(max(w, h) * lo), int(max(w, h) * hi) + 1))
    if h > w:
        oh, ow = long_side, int(w * long_side / h + 0.5)
    else:
        ow, oh = long_side, int(h * long_side / w + 0.5)
    ow, oh = max(ow, 1), max(oh, 1)
    return img.resize((ow, oh), Image.BILINEAR), mask.resize((ow, oh), Image.NEAREST)


def pad_and_crop(img: Image.Image, mask: Image.Image, size: int, rng: np.random.Generator,
                 mask_fill: int) -> tuple[Image.Image, Image.Image]:
    """Pad right/bottom to ``size`` (image black, mask ``mask_fill``), then take a random size x size crop."""
    w, h = img.size
    if w < size or h < size:
        pw, ph = max(size, w), max(size, h)
        padded = Image.new("RGB", (pw, ph), (0, 0, 0))
        padded.paste(img, (0, 0))
        padded_mask = Image.new("L", (pw, ph), mask_fill)
        padded_mask.paste(mask, (0, 0))
        img, mask, (w, h) = padded, padded_mask, (pw, ph)
    x = int(rng.integers(0, w - size + 1))
    y = int(rng.integers(0, h - size + 1))
    box = (x, y, x + size, y + size)
    return img.crop(box), mask.crop(box)


def hflip(img: Image.Image, mask: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    if rng.random() < 0.5:
        return img.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
    return img, mask


def weak(img: Image.Image, mask: Image.Image, rng: np.random.Generator, crop: int,
         scale: tuple[float, float], mask_fill: int) -> tuple[Image.Image, Image.Image]:
    """A_w: random rescale 0.5-2.0 of the long side, pad, random crop, horizontal flip."""
    img, mask = random_rescale(img, mask, rng, *scale)
    img, mask = pad_and_crop(img, mask, crop, rng, mask_fill)
    return hflip(img, mask, rng)


def colour_jitter(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """ColorJitter(0.5, 0.5, 0.5, 0.25): brightness, contrast, saturation and hue, in a random order."""
    factors = {
        "brightness": rng.uniform(0.5, 1.5),
        "contrast": rng.uniform(0.5, 1.5),
        "saturation": rng.uniform(0.5, 1.5),
        "hue": rng.uniform(-0.25, 0.25),
    }
    for name in rng.permutation(list(factors)):
        img = getattr(TF, f"adjust_{name}")(img, float(factors[name]))
    return img


def grayscale(img: Image.Image) -> Image.Image:
    return TF.rgb_to_grayscale(img, num_output_channels=3)


def blur(img: Image.Image, radius: float) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(radius=radius))


def strong(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A_s on top of A_w: colour jitter (0.5, 0.5, 0.5, 0.25) p=0.8, grayscale p=0.2, Gaussian blur p=0.5."""
    if rng.random() < 0.8:
        img = colour_jitter(img, rng)
    if rng.random() < 0.2:
        img = grayscale(img)
    if rng.random() < 0.5:
        img = blur(img, float(rng.uniform(0.1, 2.0)))
    return img


def cutmix_box(size: int, rng: np.random.Generator, p: float = 0.5,
               area: tuple[float, float] = (0.02, 0.4), ratio: tuple[float, float] = (0.3, 1 / 0.3)) -> torch.Tensor:
    """Binary size x size box (1 = pasted from the partner image), present with probability p.

    The area is drawn once and only the aspect ratio and position are redrawn until the box fits, as in
    the official ``obtain_cutmix_box``; redrawing the area too would bias boxes towards small ones."""
    box = torch.zeros(size, size, dtype=torch.uint8)
    if rng.random() >= p:
        return box
    a = rng.uniform(*area) * size * size
    while True:
        r = rng.uniform(*ratio)
        w, h = int(np.sqrt(a / r)), int(np.sqrt(a * r))
        x, y = int(rng.integers(0, size)), int(rng.integers(0, size))
        if 0 < w and 0 < h and x + w <= size and y + h <= size:
            break
    box[y:y + h, x:x + w] = 1
    return box


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL -> normalised float32 [3, H, W] (ImageNet mean/std)."""
    return TF.normalize(TF.to_tensor(img), MEAN, STD)


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(mask, dtype=np.int64))


def ignore_from_padding(mask: Image.Image) -> torch.Tensor:
    """255 where an unlabelled crop was padded, 0 elsewhere: padding never yields pseudo-labels."""
    arr = np.array(mask, dtype=np.int64)
    return torch.from_numpy(np.where(arr == UNLABELED_PAD, IGNORE, 0))
