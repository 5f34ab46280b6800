"""The dataset folder contract (DESIGN.md): reading it strictly and writing it atomically.

DATA/
  classes.json          [{"id": 0, "name": "background", "color": [0, 0, 0]}, ...]
  images/<id>.<png|jpg|jpeg>
  masks/<id>.png        8-bit single channel, value = class id, 255 = ignore
  splits/labeled.txt, unlabeled.txt, val.txt   one id per line
  .scaleseg-check.json  what the last pixel check decoded, by file size and mtime (pixels.py); safe to delete
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IGNORE = 255
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLITS = ("labeled", "unlabeled", "val")


class DatasetError(Exception):
    """A problem with the user's data; the message names the file and says how to fix it."""


@dataclass(frozen=True)
class ClassInfo:
    id: int
    name: str
    color: tuple[int, int, int]


def load_classes(root: str | Path) -> list[ClassInfo]:
    path = Path(root) / "classes.json"
    if not path.is_file():
        raise DatasetError(f"{path}: missing. Create it as a JSON list of {{\"id\", \"name\", \"color\"}} objects, ids 0..K-1.")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON ({err}). Fix the syntax; expected a list of {{\"id\", \"name\", \"color\"}} objects.") from None
    if not isinstance(raw, list) or not raw:
        raise DatasetError(f"{path}: expected a non-empty JSON list of classes, got {type(raw).__name__}.")
    classes = []
    for n, item in enumerate(raw):
        where = f"{path}: entry {n}"
        if not isinstance(item, dict) or not {"id", "name"} <= set(item):
            raise DatasetError(f"{where}: each class needs \"id\" and \"name\" (and optionally \"color\": [r, g, b]).")
        cid, name, color = item["id"], item["name"], item.get("color", _default_color(n))
        if not isinstance(cid, int) or isinstance(cid, bool):
            raise DatasetError(f"{where}: \"id\" must be an integer, got {cid!r}.")
        if not isinstance(name, str) or not name.strip():
            raise DatasetError(f"{where}: \"name\" must be a non-empty string.")
        if not (isinstance(color, list) and len(color) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in color)):
            raise DatasetError(f"{where}: \"color\" must be [r, g, b] with integers 0..255, got {color!r}.")
        classes.append(ClassInfo(cid, name, tuple(color)))
    ids = [c.id for c in classes]
    if sorted(ids) != list(range(len(classes))):
        raise DatasetError(f"{path}: class ids must be exactly 0..{len(classes) - 1} without gaps or repeats, got {ids}.")
    if IGNORE in ids or len(classes) > 255:
        raise DatasetError(f"{path}: at most 255 classes (id 255 is reserved for 'ignore').")
    names = [c.name for c in classes]
    if len(set(names)) != len(names):
        raise DatasetError(f"{path}: class names must be unique, got {names}.")
    return sorted(classes, key=lambda c: c.id)


def _default_color(i: int) -> list[int]:
    """The Pascal VOC palette, so that classes without a colour still get distinct ones."""
    r = g = b = 0
    for bit in range(8):
        r |= ((i >> 0) & 1) << (7 - bit)
        g |= ((i >> 1) & 1) << (7 - bit)
        b |= ((i >> 2) & 1) << (7 - bit)
        i >>= 3
    return [r, g, b]


def palette(classes: list[ClassInfo]) -> np.ndarray:
    """uint8 [256, 3] lookup table: class id -> colour; ignore stays black."""
    table = np.zeros((256, 3), np.uint8)
    for c in classes:
        table[c.id] = c.color
    return table


def split_path(root: str | Path, split: str) -> Path:
    return Path(root) / "splits" / f"{split}.txt"


def read_split(root: str | Path, split: str, required: bool = True) -> list[str]:
    path = split_path(root, split)
    if not path.is_file():
        if required:
            raise DatasetError(f"{path}: missing. Write one image id per line (ids are file names in images/ without extension).")
        return []
    ids = [line.strip() for line in path.read_text().splitlines()]
    return [i for i in ids if i and not i.startswith("#")]


def find_image(root: str | Path, image_id: str) -> Path | None:
    for ext in IMAGE_EXTENSIONS:
        p = Path(root) / "images" / f"{image_id}{ext}"
        if p.is_file():
            return p
    return None


def image_path(root: str | Path, image_id: str, split: str = "") -> Path:
    p = find_image(root, image_id)
    if p is None:
        src = f" (listed in {split_path(root, split)})" if split else ""
        raise DatasetError(
            f"{Path(root) / 'images' / image_id}.png|.jpg: no image for id {image_id!r}{src}. "
            "Add the image or remove the id from the split file.")
    return p


def mask_path(root: str | Path, image_id: str) -> Path:
    return Path(root) / "masks" / f"{image_id}.png"


def load_image(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"{path}: cannot be read as an image ({err}). Replace the file or remove its id from the splits.") from None


def load_mask(path: str | Path, num_classes: int, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 [H, W] of class ids; raises DatasetError for anything that would train on wrong labels."""
    mask = read_mask(path)
    check_mask(path, (mask.shape[1], mask.shape[0]), mask_values(mask), num_classes, image_size)
    return mask


def read_mask(path: str | Path) -> np.ndarray:
    """The decoded mask, refusing files that cannot hold exact class ids (colour, lossy, not PNG)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: missing mask for a labelled image. Add it (8-bit PNG of class ids) or move the id to unlabeled.txt.")
    try:
        with Image.open(path) as img:
            if img.format != "PNG":
                # JPEG blurs region edges into neighbouring values: other class ids, silently.
                raise DatasetError(
                    f"{path}: a {img.format or 'non-PNG'} file named .png; masks must be lossless PNG. Export the "
                    "mask again as an 8-bit PNG of class ids (converting this file would keep its damaged edges).")
            img.load()
            if img.mode not in ("L", "P"):
                raise DatasetError(
                    f"{path}: mask has mode {img.mode}; expected a single-channel 8-bit PNG (mode L or P) whose "
                    "pixel values are class ids. Convert colour masks with the class palette first.")
            return np.array(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"{path}: cannot be read as a mask ({err}). Replace the file.") from None


def mask_values(mask: np.ndarray) -> list[int]:
    """The distinct pixel values of a uint8 mask, ascending."""
    return np.flatnonzero(np.bincount(mask.ravel(), minlength=256)).tolist()


def check_mask(path: str | Path, size: tuple[int, int], values: list[int], num_classes: int,
               image_size: tuple[int, int] | None = None) -> None:
    """Raise DatasetError if a mask of ``size`` (w, h) holding ``values`` does not fit its image and classes."""
    if image_size is not None and tuple(size) != tuple(image_size):
        raise DatasetError(
            f"{path}: mask is {size[0]}x{size[1]} but its image is {image_size[0]}x{image_size[1]}. "
            "Masks must have exactly the image's size.")
    bad = [v for v in values if v >= num_classes and v != IGNORE]
    if bad:
        raise DatasetError(
            f"{path}: class ids {bad} are not in classes.json (0..{num_classes - 1}, 255 = ignore). "
            "Fix the mask or add the classes.")


def class_pixel_counts(root: str | Path, ids: list[str], num_classes: int) -> np.ndarray:
    """int64 [num_classes]: how many pixels of each class the masks of ``ids`` hold (255 not counted)."""
    counts = np.zeros(num_classes, np.int64)
    for image_id in ids:
        mask = read_mask(mask_path(root, image_id))
        counts += np.bincount(mask[mask != IGNORE].ravel(), minlength=num_classes)[:num_classes]
    return counts


def atomic_write(path: str | Path, write) -> None:
    """Write through a temp file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the final file should read like any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_partial_writes(folder: Path, names: Iterable[str]) -> None:
    """Delete the temp files ``atomic_write`` left in ``folder`` for the files ``names`` (glob patterns, such as
    ``last.pt`` or ``**/*.png``) when a kill stopped it before the rename: the files they were to replace are
    intact, and only the killed process could have finished them. Other files, a user's own included, are
    not touched."""
    for name in names:
        parent, _, base = name.rpartition("/")
        for tmp in folder.glob(f"{parent}/.{base}.*.tmp" if parent else f".{base}.*.tmp"):
            tmp.unlink(missing_ok=True)


def write_mask(path: str | Path, mask: np.ndarray) -> None:
    atomic_write(path, lambda fh: Image.fromarray(mask.astype(np.uint8), mode="L").save(fh, format="PNG"))


def write_image(path: str | Path, image: np.ndarray | Image.Image) -> None:
    img = image if isinstance(image, Image.Image) else Image.fromarray(image)
    fmt = "JPEG" if Path(path).suffix.lower() in (".jpg", ".jpeg") else "PNG"
    atomic_write(path, lambda fh: img.save(fh, format=fmt))


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode()))


def write_split(root: str | Path, split: str, ids: list[str]) -> None:
    write_text(split_path(root, split), "".join(f"{i}\n" for i in ids))


def class_dicts(classes: list[ClassInfo]) -> list[dict]:
    """classes.json's own form: [{"id", "name", "color": [r, g, b]}, ...]."""
    return [{"id": c.id, "name": c.name, "color": list(c.color)} for c in classes]


def write_classes(root: str | Path, classes: list[ClassInfo]) -> None:
    items = class_dicts(classes)
    write_text(Path(root) / "classes.json", json.dumps(items, indent=2) + "\n")


def fingerprint(root: str | Path) -> str:
    """sha256 over classes.json and the three split lists: identifies what a model was trained on."""
    h = hashlib.sha256()
    root = Path(root)
    h.update((root / "classes.json").read_bytes())
    for split in SPLITS:
        h.update(split.encode())
        h.update("\n".join(sorted(read_split(root, split, required=False))).encode())
    return h.hexdigest()


@contextmanager
def staged_folder(final: str | Path):
    """Build a folder in a temp folder beside ``final``; on success it replaces ``final``, on any error
    (or interrupt) it is removed, so ``final`` is never half-written."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the renamed folder should be readable like any other
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
