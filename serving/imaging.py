"""Image files in, masks and overlays out, for `/v1/segment` (and the app)."""
from __future__ import annotations

import io
import re
import struct
import warnings
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .protocol import ProtocolError

IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp", "image/tiff")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _rgb8(img: Image.Image) -> np.ndarray:
    """RGB uint8 [H, W, 3]; 16-bit greyscale is scaled to 8 bits (``convert`` would clip it to white)."""
    if img.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(img).astype(np.int64).clip(0, 65535)
        grey = ((grey * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode == "F":
        raise ProtocolError("floating-point images are not accepted; send an 8- or 16-bit image")
    return np.asarray(img.convert("RGB"))


def decode_image(data: bytes, check_size: Callable[[int, int], object]) -> np.ndarray:
    """RGB uint8 [H, W, 3], upright as its EXIF orientation says. ``check_size(height, width)`` sees the
    size read from the file's header and raises (e.g. 413 from ``serving.limits``) before any pixel is
    decoded; 400 for anything that is not a whole image."""
    if not data:
        raise ProtocolError("empty image upload")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:  # reads the header only
                w, h = img.size
                check_size(h, w)
                img.load()
                return _rgb8(ImageOps.exif_transpose(img))
    except ProtocolError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ProtocolError("image exceeds the decoder's pixel limit", 413) from None
    except UnidentifiedImageError:
        raise ProtocolError("not a readable image: the data is not a PNG, JPEG, WebP, BMP or TIFF file") from None
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError, struct.error) as err:
        detail = re.sub(r"<[^>]*>", "the upload", str(err))  # no object reprs in messages
        raise ProtocolError(f"not a readable image ({detail}); send a whole PNG, JPEG, WebP, BMP or TIFF file") from None


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
