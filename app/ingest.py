"""Add uploaded unlabelled images (files or .zip archives) to a dataset folder.

Each image is decoded (so broken files are reported, not stored), re-encoded as PNG and named by the
first 16 hex digits of the SHA-256 of its pixels; an image whose pixels the dataset already holds,
under any name, is reported as a duplicate and not added again. New ids are appended
to splits/unlabeled.txt atomically; nothing else in the dataset is touched. Zip entries are read in
memory, never extracted by name, so '../' or absolute entry names cannot write outside the dataset.
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from training.data.folder import IMAGE_EXTENSIONS, find_image, read_split, write_image, write_split, write_text

MAX_PIXELS = 40_000_000
MAX_ENTRY_BYTES = 100 * 1024 * 1024
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class IngestReport:
    added: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    invalid: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{len(self.added)} added", f"{len(self.duplicates)} already in the dataset"]
        if self.invalid:
            parts.append(f"{len(self.invalid)} rejected: " + "; ".join(f"{k}: {v}" for k, v in list(self.invalid.items())[:10]))
        return ", ".join(parts)


def _decode(data: bytes, max_pixels: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:  # reads the header only; pixels are decoded after the size check
        w, h = img.size
        if w * h > max_pixels:
            raise ValueError(f"{w}x{h} is larger than the {max_pixels}-pixel limit")
        if min(w, h) < 16:
            raise ValueError(f"{w}x{h} is smaller than 16x16")
        img.load()
        return np.asarray(img.convert("RGB"))


def pixel_hash(rgb: np.ndarray) -> str:
    return hashlib.sha256(rgb.tobytes() + str(rgb.shape).encode()).hexdigest()


def content_index(data: Path) -> dict[str, str]:
    """pixel hash -> image id for every image in the dataset, cached in DATA/labeling/content-index.json
    and brought up to date for images added since."""
    path = data / "labeling" / "content-index.json"
    by_id = json.loads(path.read_text()) if path.is_file() else {}
    changed = False
    for image in sorted((data / "images").glob("*")):
        if image.suffix.lower() in IMAGE_EXTENSIONS and image.stem not in by_id:
            try:
                with Image.open(image) as img:
                    by_id[image.stem] = pixel_hash(np.asarray(img.convert("RGB")))
            except OSError:
                continue  # unreadable files are `scaleseg data check`'s to report
            changed = True
    if changed:
        write_text(path, json.dumps(by_id))
    return {h: i for i, h in by_id.items()}


def _entries(path: Path):
    """(display name, bytes) for a file, or for each file inside a zip; (name, error) for rejected entries."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.is_dir():
                    continue
                name = f"{path.name}:{info.filename}"
                pure = PurePosixPath(info.filename)
                if pure.is_absolute() or ".." in pure.parts:
                    yield name, ValueError("unsafe path in archive (absolute or '..'); skipped")
                elif pure.parts[0] == "__MACOSX" or pure.name.startswith("."):
                    continue
                elif pure.suffix.lower() not in IMAGE_SUFFIXES:
                    yield name, ValueError("not an image file")
                elif info.file_size > MAX_ENTRY_BYTES:
                    yield name, ValueError(f"{info.file_size} bytes uncompressed is over the {MAX_ENTRY_BYTES}-byte limit")
                else:
                    yield name, archive.read(info)
    else:
        yield path.name, path.read_bytes()


def ingest(data: str | Path, files: list[str | Path], max_pixels: int = MAX_PIXELS, progress=None) -> IngestReport:
    data = Path(data)
    report = IngestReport()
    unlabeled = read_split(data, "unlabeled", required=False)
    known = content_index(data)
    for n, file in enumerate(files):
        if progress:
            progress(n / max(1, len(files)), f"adding {Path(file).name}")
        try:
            entries = list(_entries(Path(file)))
        except (zipfile.BadZipFile, OSError) as err:
            report.invalid[Path(file).name] = f"unreadable ({err})"
            continue
        for name, payload in entries:
            if isinstance(payload, Exception):
                report.invalid[name] = str(payload)
                continue
            try:
                rgb = _decode(payload, max_pixels)
            except (ValueError, OSError, Image.DecompressionBombError, SyntaxError) as err:
                report.invalid[name] = f"not a usable image ({err})"
                continue
            digest = pixel_hash(rgb)
            image_id = "u_" + digest[:16]
            if digest in known or find_image(data, image_id) is not None:
                report.duplicates.append(name)
                continue
            write_image(data / "images" / f"{image_id}.png", rgb)
            known[digest] = image_id
            report.added.append(image_id)
    if report.added:
        write_split(data, "unlabeled", unlabeled + report.added)
        content_index(data)
    return report
