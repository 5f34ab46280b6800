"""Add unlabelled images (files or .zip archives) to a dataset folder: the one ingest path of the app's upload
and `scaleseg data add`.

Each image is decoded (so broken files are reported, not stored), re-encoded as PNG and named by the
first 16 hex digits of the SHA-256 of its pixels; an image whose pixels the dataset already holds,
under any name, is reported as a duplicate and not added again. New ids are appended
to splits/unlabeled.txt atomically; nothing else in the dataset is touched. Zip entries are read in
memory, never extracted by name, so '../' or absolute entry names cannot write outside the dataset.

Memory stays bounded whatever the archive claims: entries are read one at a time, in chunks, counting the
bytes actually decompressed against a per-entry and a per-upload cap, and reading stops as soon as either
is reached. Camera photos are turned upright by their EXIF orientation before they are stored.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .folder import IMAGE_EXTENSIONS, find_image, read_split, write_image, write_split, write_text

MAX_PIXELS = 40_000_000
MAX_ENTRY_BYTES = 100 * 1024 * 1024           # one image file or zip entry, decompressed
MAX_UPLOAD_BYTES = 1024 * 1024 * 1024         # everything one upload decompresses to, all files together
CHUNK = 1024 * 1024
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class IngestReport:
    added: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    invalid: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line per outcome, then one line per rejected file (Markdown)."""
        lines = [f"{len(self.added)} added" + (f": {', '.join(self.added)}" if self.added else ""),
                 f"{len(self.duplicates)} already in the dataset" + (f": {', '.join(self.duplicates)}" if self.duplicates else "")]
        if self.invalid:
            lines.append(f"{len(self.invalid)} rejected:")
            lines += [f"- {name}: {why}" for name, why in self.invalid.items()]
        return "\n".join(lines)


class UploadTooLarge(ValueError):
    """The upload as a whole reached MAX_UPLOAD_BYTES; nothing further is read."""


def decode_upload(data: bytes, max_pixels: int) -> np.ndarray:
    """RGB uint8 [H, W, 3], upright by its EXIF orientation; ValueError with a plain reason for anything else.
    The size is checked from the header, before any pixel is decoded."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ValueError(f"{w}x{h} is larger than the {max_pixels:,}-pixel limit; downscale it first")
            if min(w, h) < 16:
                raise ValueError(f"{w}x{h} is smaller than 16x16")
            img.load()
            return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    except UnidentifiedImageError:
        raise ValueError("not an image file this app can read (PNG, JPEG, BMP, WebP or TIFF)") from None
    except Image.DecompressionBombError:
        raise ValueError(f"larger than the {max_pixels:,}-pixel limit; downscale it first") from None
    except (OSError, SyntaxError) as err:  # PIL's messages for damaged files name no object
        raise ValueError(f"the file is damaged or truncated ({err})") from None


def read_upload(path: Path, max_bytes: int, max_pixels: int) -> np.ndarray:
    """One uploaded image file, refused by its byte size before it is read and by its pixel count before
    it is decoded."""
    size = Path(path).stat().st_size
    if size > max_bytes:
        raise ValueError(f"the file is {size:,} bytes; the limit is {max_bytes:,}")
    return decode_upload(Path(path).read_bytes(), max_pixels)


class _Budget:
    """Decompressed bytes this upload may still read."""

    def __init__(self, total: int):
        self.total, self.left = total, total

    def read(self, stream, entry_limit: int) -> bytes:
        """The stream's bytes, refusing (ValueError) past ``entry_limit`` and (UploadTooLarge) past the budget,
        as soon as the count is passed."""
        chunks, size = [], 0
        while chunk := stream.read(CHUNK):
            size += len(chunk)
            if size > self.left:
                self.left = 0
                raise UploadTooLarge(f"the upload decompresses to more than {self.total:,} bytes in all; nothing "
                                     "after this was read. Split it into smaller uploads")
            if size > entry_limit:
                raise ValueError(f"more than {entry_limit:,} bytes uncompressed (the per-image limit)")
            chunks.append(chunk)
        self.left -= size
        return b"".join(chunks)


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


def store_image(data: Path, rgb: np.ndarray, known: dict[str, str]) -> tuple[str, bool]:
    """(image id, whether it was added): a decoded image is stored as images/u_<pixel hash>.png, unless the
    dataset holds its pixels already, under any id (``known``: pixel hash -> id, from content_index), whose id
    it then gets. ``known`` learns the new image; no split is touched."""
    digest = pixel_hash(rgb)
    if digest in known:
        return known[digest], False
    image_id = "u_" + digest[:16]
    new = find_image(data, image_id) is None
    if new:
        write_image(data / "images" / f"{image_id}.png", rgb)
    known[digest] = image_id
    return image_id, new


def _entries(path: Path, budget: _Budget, entry_limit: int):
    """(display name, bytes or the reason it was rejected) for a file, or for each file inside a zip, one at a
    time; stops with UploadTooLarge when the upload's budget runs out."""
    if not zipfile.is_zipfile(path):
        if path.stat().st_size > entry_limit:
            yield path.name, ValueError(f"{path.stat().st_size:,} bytes is over the {entry_limit:,}-byte limit")
        else:
            with open(path, "rb") as fh:
                yield path.name, budget.read(fh, entry_limit)
        return
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
            elif info.file_size > entry_limit:  # what the header claims; the bytes read are counted as well
                yield name, ValueError(f"{info.file_size:,} bytes uncompressed is over the {entry_limit:,}-byte limit")
            else:
                try:
                    with archive.open(info) as fh:
                        yield name, budget.read(fh, entry_limit)  # not kept here: one entry in memory at a time
                except UploadTooLarge:
                    raise
                except (ValueError, zipfile.BadZipFile, OSError, EOFError) as err:
                    yield name, ValueError(str(err) if isinstance(err, ValueError) else f"damaged zip entry ({err})")


def ingest(data: str | Path, files: list[str | Path], max_pixels: int = MAX_PIXELS, progress=None,
           max_entry_bytes: int = MAX_ENTRY_BYTES, max_upload_bytes: int = MAX_UPLOAD_BYTES) -> IngestReport:
    data = Path(data)
    report = IngestReport()
    unlabeled = read_split(data, "unlabeled", required=False)
    known = content_index(data)
    budget = _Budget(max_upload_bytes)
    for n, file in enumerate(files):
        if progress:
            progress(n / max(1, len(files)), f"adding {Path(file).name}")
        try:
            for name, payload in _entries(Path(file), budget, max_entry_bytes):
                if isinstance(payload, Exception):
                    report.invalid[name] = str(payload)
                    continue
                try:
                    rgb = decode_upload(payload, max_pixels)
                except ValueError as err:
                    report.invalid[name] = str(err)
                    continue
                finally:
                    del payload  # before the next entry is read: one entry's bytes in memory at a time
                image_id, new = store_image(data, rgb, known)
                if new:
                    report.added.append(image_id)
                else:
                    report.duplicates.append(name)
        except UploadTooLarge as err:
            report.invalid[Path(file).name] = str(err)
            break
        except (zipfile.BadZipFile, OSError) as err:
            report.invalid[Path(file).name] = f"unreadable ({err.strerror if isinstance(err, OSError) and err.strerror else err})"
    if report.added:
        write_split(data, "unlabeled", unlabeled + report.added)
        content_index(data)
    return report


def expand_paths(paths: list[str | Path]) -> list[Path]:
    """Files, folders (searched recursively for images and zips), and glob patterns -> files, in order,
    each once. A path that matches nothing is an error naming it."""
    files, missing = [], []
    for raw in paths:
        text = str(raw)
        if Path(text).exists():
            matches = [Path(text)]
        else:
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True))
        if not matches:
            missing.append(text)
        for match in matches:
            if match.is_dir():
                files += sorted(p for p in match.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | {".zip"}
                                and not any(part.startswith(".") for part in p.relative_to(match).parts))
            elif match.is_file():
                files.append(match)
    if missing:
        raise FileNotFoundError(f"nothing matches {', '.join(repr(m) for m in missing)}. Pass image files, folders, "
                                "glob patterns (quote them) or .zip archives.")
    return list(dict.fromkeys(files))


def add_paths(data: str | Path, paths: list[str | Path], max_pixels: int = MAX_PIXELS, progress: bool = False) -> IngestReport:
    """`scaleseg data add`: ``ingest`` over files, folders, globs and zips. Each zip may decompress to the
    app's per-upload cap; plain files count at their size on disk, which they already occupy."""
    from tqdm import tqdm

    data = Path(data)
    if not (data / "classes.json").is_file():
        raise FileNotFoundError(f"{data}: not a dataset folder (no classes.json). Create one with `scaleseg data import` first.")
    files = expand_paths(paths)
    budget = sum(MAX_UPLOAD_BYTES if zipfile.is_zipfile(f) else f.stat().st_size for f in files)
    with tqdm(total=len(files), desc="data add", unit="file", disable=not progress) as bar:
        def step(fraction: float, message: str) -> None:
            bar.n = round(fraction * len(files))
            bar.set_postfix_str(message[-40:])
            bar.refresh()

        report = ingest(data, files, max_pixels=max_pixels, progress=step, max_upload_bytes=max(budget, 1))
        bar.n = len(files)
        bar.refresh()
    return report
