"""Image files in, masks and overlays out, for `/v1/segment` (and the app)."""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from .protocol import ProtocolError

IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp", "image/tiff")


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """RGB uint8 [H, W, 3]; 400 for anything that is not a whole image, 413 past ``max_pixels``."""
    if not data:
        raise ProtocolError("empty image upload")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ProtocolError(f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}", 413)
                img.load()
                return np.asarray(img.convert("RGB"))
    except ProtocolError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ProtocolError(f"image exceeds the pixel limit of {max_pixels}", 413) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ProtocolError(f"not a readable image ({err}); send a PNG, JPEG, WebP, BMP or TIFF file") from None


def palette_table(classes: list[dict]) -> np.ndarray:
    table = np.zeros((256, 3), np.uint8)
    for c in classes:
        table[c["id"]] = c["color"]
    return table


def mask_png(labels: np.ndarray, classes: list[dict]) -> bytes:
    """8-bit palette PNG: pixel values are class ids (machine-readable), the palette their colours."""
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(palette_table(classes).ravel().tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def overlay(image: np.ndarray, labels: np.ndarray, classes: list[dict], alpha: float = 0.5) -> np.ndarray:
    colours = palette_table(classes)[labels].astype(np.float32)
    return (image.astype(np.float32) * (1 - alpha) + colours * alpha).clip(0, 255).astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def class_stats(labels: np.ndarray, confidence: np.ndarray, classes: list[dict]) -> dict:
    counts = np.bincount(labels.ravel(), minlength=len(classes))
    total = labels.size
    return {
        "mean_confidence": float(confidence.mean()),
        "low_confidence_fraction": float((confidence < 0.5).mean()),
        "classes": [{"id": c["id"], "name": c["name"], "pixels": int(counts[c["id"]]),
                     "fraction": float(counts[c["id"]] / total),
                     "mean_confidence": float(confidence[labels == c["id"]].mean()) if counts[c["id"]] else None}
                    for c in classes],
    }
