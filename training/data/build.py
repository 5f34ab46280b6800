"""What every importer shares: a dataset folder built in a temp folder, checked with `scaleseg data check`'s
own check and only then renamed into place; ids made from file names; val split off the labelled images;
images copied (upright by their EXIF orientation) and masks written beside them.
"""
from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from .folder import DatasetError, staged_folder, write_image, write_mask, write_split
from .validate import check_dataset

MAX_PROBLEMS = 20  # problems named in one error message; the count says how many there were
# Files whose bytes the training loader reads as they are; anything else is written again as RGB PNG.
KEEP_BYTES = {("PNG", "RGB"), ("PNG", "L"), ("PNG", "P"), ("PNG", "RGBA"), ("JPEG", "RGB"), ("JPEG", "L")}


@dataclass
class ImportItem:
    """One image of an import: its file and, for a labelled image, how to get its class-id mask."""
    name: str                                      # path relative to the source, used for the id and in messages
    image: Path
    mask: Callable[[], np.ndarray] | None = None   # uint8 [H, W] class ids (255 = ignore); None: unlabelled
    mask_name: str = ""                            # the mask's file (or annotation) for messages


def build_dataset(out: str | Path, fill: Callable[[Path], None], force: bool) -> Path:
    """Run ``fill(tmp)`` on a temp folder beside ``out``, check the result as `scaleseg data check` does and
    rename it to ``out``; any error leaves ``out`` as it was."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"{out}: exists and is not an empty folder. Choose another folder or pass --force.")
    with staged_folder(out) as tmp:
        fill(tmp)
        problems = check_dataset(tmp, progress=True)
        if problems:
            raise DatasetError(f"the imported dataset fails `scaleseg data check` ({len(problems)} problem(s)); nothing "
                               "was written:\n" + "\n".join(f"  - {p}" for p in problems[:MAX_PROBLEMS]))
    return out


def make_ids(names: Iterable[str]) -> list[str]:
    """File paths (relative to the import's source) -> unique ids usable as file names and split lines:
    the path without its extension, folders joined by '__', other characters than letters, digits, '.', '_'
    and '-' replaced by '_'."""
    ids, seen = [], set()
    for name in names:
        stem = "__".join(PurePath(name).with_suffix("").parts)
        base = re.sub(r"[^A-Za-z0-9._-]", "_", stem).strip(".") or "image"
        image_id, n = base, 1
        while image_id in seen:
            n += 1
            image_id = f"{base}_{n}"
        seen.add(image_id)
        ids.append(image_id)
    return ids


def val_count(spec: str, labelled: int) -> int:
    """``--val``: a count ('10'), a fraction ('0.2' or '1/5') of the labelled images, rounded to the nearest
    and at least one while two or more are labelled (one must stay for training)."""
    try:
        if "/" in spec:
            num, den = (int(p) for p in spec.split("/"))
            value = num / den
        elif "." in spec:
            value = float(spec)
        else:
            count = int(spec)
            if count < 0 or (count and count >= labelled):
                raise DatasetError(f"--val {spec}: asks for {count} of {labelled} labelled images; at least one must "
                                   "stay for training. Pass a smaller count or a fraction such as 0.2.")
            return count
    except (ValueError, ZeroDivisionError):
        raise DatasetError(f"--val {spec}: expected a count (10) or a fraction (0.2 or 1/5).") from None
    if not 0 <= value < 1:
        raise DatasetError(f"--val {spec}: a fraction must be at least 0 and below 1.")
    if value == 0 or labelled < 2:
        return 0
    return min(labelled - 1, max(1, round(value * labelled)))


def split_val(ids: list[str], spec: str, seed: int) -> tuple[list[str], list[str]]:
    """(train, val) of the labelled ``ids``: a seeded draw of ``val_count(spec)`` for val."""
    count = val_count(spec, len(ids))
    rng = np.random.Generator(np.random.PCG64(seed))
    val = set(ids[i] for i in rng.choice(len(ids), count, replace=False)) if count else set()
    return [i for i in ids if i not in val], [i for i in ids if i in val]


def copy_image(src: Path, dst_stem: Path) -> tuple[Path, tuple[int, int]]:
    """Copy an image into the dataset as ``dst_stem``.png/.jpg; PNG and JPEG files keep their bytes unless
    their EXIF orientation turns them, other formats are written as PNG. Returns (file, (width, height))."""
    try:
        with Image.open(src) as img:
            img.load()
            turned = img.getexif().get(ExifTags.Base.Orientation, 1) not in (0, 1)
            upright = ImageOps.exif_transpose(img) if turned else img
            size = upright.size
            if not turned and (img.format, img.mode) in KEEP_BYTES:
                dst = dst_stem.with_suffix(".png" if img.format == "PNG" else ".jpg")
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
            else:
                dst = dst_stem.with_suffix(".png")
                write_image(dst, upright.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(f"{src}: cannot be read as an image ({err}). Replace the file or remove it from the source.") from None
    return dst, size


def write_items(root: Path, items: list[ImportItem], val: str, seed: int, desc: str,
                finish: Callable[[], None] = lambda: None) -> dict[str, int]:
    """Write ``items`` into the staged folder ``root``: images, masks and the three split lists (the caller
    writes classes.json, which may depend on the masks seen).
    Every size mismatch is collected and raised together; ``finish()`` (the colour or value tally's check)
    runs before anything counts as done. Returns the number of images per split."""
    ids = make_ids(item.name for item in items)
    labelled = [i for i, item in zip(ids, items) if item.mask is not None]
    train, val_ids = split_val(labelled, val, seed)
    problems = []
    for image_id, item in tqdm(list(zip(ids, items)), desc=desc, unit="img"):
        _, (w, h) = copy_image(item.image, root / "images" / image_id)
        if item.mask is None:
            continue
        mask = item.mask()
        if mask.shape != (h, w):
            problems.append(f"{item.mask_name}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {item.image} is "
                            f"{w}x{h}. Masks must have exactly their image's size.")
            continue
        write_mask(root / "masks" / f"{image_id}.png", mask)
    finish()
    if problems:
        raise DatasetError(f"{len(problems)} mask(s) do not fit their images; nothing was written:\n"
                           + "\n".join(f"  - {p}" for p in problems[:MAX_PROBLEMS]))
    if not labelled:
        raise DatasetError(f"{desc}: none of the {len(items)} images has a mask; training needs at least one labelled "
                           "image. Check where the masks are and how they are named.")
    write_split(root, "labeled", train)
    write_split(root, "unlabeled", [i for i, item in zip(ids, items) if item.mask is None])
    write_split(root, "val", val_ids)
    return {"labeled": len(train), "unlabeled": len(items) - len(labelled), "val": len(val_ids)}
