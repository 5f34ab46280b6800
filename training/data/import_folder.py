"""`scaleseg data import folder`: a folder of images and a folder of masks, as most tools export them.

SRC/images/**/<name>.<png|jpg|...> and SRC/masks/**/<name><suffix>.<png|bmp|tif|...> are paired by their
path below those folders without the extension. A mask holds either class ids (8- or 16-bit greyscale, or
a palette PNG whose indices are the ids, as VOC's) or RGB colours mapped to classes by the palette. Images
without a mask become unlabelled; a mask without an image is an error. Ids come from the image paths.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .build import ImportItem, build_dataset, write_items
from .folder import IGNORE, ClassInfo, DatasetError, _default_color, write_classes
from .ingest import IMAGE_SUFFIXES
from .palette import ColorMapper, ValueChecker

MASK_SUFFIXES = {".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
LOSSY_SUFFIXES = {".jpg", ".jpeg"}
MASK_FORMATS = ("auto", "ids", "colors")
ID_MODES = ("L", "I;16", "I;16B", "I;16L", "I", "1")


def _files(folder: Path, suffixes: set[str]) -> dict[str, Path]:
    """Relative path without extension -> file, for visible files with one of ``suffixes``, below ``folder``."""
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and path.suffix.lower() in suffixes and not any(p.startswith(".") for p in rel.parts):
            key = rel.with_suffix("").as_posix()
            if key in found:
                raise DatasetError(f"{found[key]} and {path}: two files of the same name, so which one pairs with which "
                                   "is ambiguous. Rename or remove one.")
            found[key] = path
    return found


class MaskReader:
    """Decodes one mask file into class ids, by colour or by value as the file and ``mask_format`` say."""

    def __init__(self, classes: list[ClassInfo] | None, mask_format: str, ignore_value: int, ignore_colors):
        if mask_format not in MASK_FORMATS:
            raise DatasetError(f"--mask-format {mask_format}: choose one of {', '.join(MASK_FORMATS)}.")
        self.format = mask_format
        self.colors = ColorMapper(classes or [], ignore_colors)
        self.values = ValueChecker(len(classes) if classes else IGNORE, ignore_value)
        self.palette_given = classes is not None

    def __call__(self, path: Path) -> np.ndarray:
        try:
            with Image.open(path) as img:
                img.load()
                mode = img.mode
                as_ids = self._holds_ids(img)
                if as_ids:
                    arr = np.asarray(img.convert("L") if mode == "1" else img.getchannel(0) if mode in ("RGB", "RGBA", "LA") else img)
                else:
                    arr = np.asarray(img.convert("RGB"))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise DatasetError(f"{path}: cannot be read as a mask ({err}). Replace the file.") from None
        if as_ids:
            return self.values.convert(arr.astype(np.int64), str(path))
        return self.colors.convert(arr, str(path))

    def _holds_ids(self, img: Image.Image) -> bool:
        if self.format != "auto":
            return self.format == "ids"
        if img.mode in ID_MODES or img.mode == "P":
            return True
        # An RGB file whose three channels agree is a greyscale id mask saved in colour, unless a palette says otherwise.
        if img.mode in ("RGB", "RGBA", "LA") and not self.palette_given:
            arr = np.asarray(img.convert("RGB"))
            return bool((arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all())
        return False

    def check(self) -> None:
        self.colors.check()
        self.values.check()


def import_folder(source: str | Path, out: str | Path, images: str = "images", masks: str = "masks",
                  classes: list[ClassInfo] | None = None, mask_format: str = "auto", ignore_value: int = IGNORE,
                  ignore_colors: list[tuple[int, int, int]] = (), mask_suffix: str = "", val: str = "0.2",
                  seed: int = 0, force: bool = False) -> tuple[Path, dict[str, int]]:
    """Import SRC/images + SRC/masks into ``out``; returns (out, images per split)."""
    source = Path(source)
    image_dir, mask_dir = source / images, source / masks
    if not image_dir.is_dir():
        raise DatasetError(f"{image_dir}: no such folder. Put the images in SRC/{images}/ or pass --images DIR (relative to SRC).")
    found = _files(image_dir, IMAGE_SUFFIXES)
    if not found:
        raise DatasetError(f"{image_dir}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    lossy = [str(p) for p in _files(mask_dir, LOSSY_SUFFIXES).values()] if mask_dir.is_dir() else []
    if lossy:
        raise DatasetError(f"{len(lossy)} mask(s) are JPEG files, e.g. {lossy[0]}; JPEG blurs region edges into other "
                           "values. Export the masks again as PNG.")
    mask_files = _files(mask_dir, MASK_SUFFIXES) if mask_dir.is_dir() else {}
    by_name = {}
    for key, path in mask_files.items():
        if mask_suffix and not key.endswith(mask_suffix):
            continue
        by_name[key[:len(key) - len(mask_suffix)] if mask_suffix else key] = path
    orphans = sorted(set(by_name) - set(found))
    if orphans:
        raise DatasetError(f"{len(orphans)} mask(s) have no image of the same name in {image_dir}, e.g. "
                           f"{by_name[orphans[0]]}. Add the images, fix the names (--mask-suffix for masks named "
                           "like photo_mask.png), or remove those masks.")
    reader = MaskReader(classes, mask_format, ignore_value, ignore_colors)
    items = [ImportItem(key, path, (lambda p=by_name[key]: reader(p)) if key in by_name else None,
                        str(by_name.get(key, ""))) for key, path in found.items()]

    counts = {}

    def fill(tmp: Path) -> None:
        counts.update(write_items(tmp, items, val, seed, "import folder", finish=reader.check))
        write_classes(tmp, classes or inferred_classes(reader.values.largest))

    return build_dataset(out, fill, force), counts


def inferred_classes(largest: int) -> list[ClassInfo]:
    """Id masks imported without a palette: classes 0..largest, named class_<id> (rename them in classes.json)."""
    return [ClassInfo(i, "background" if i == 0 else f"class_{i}", tuple(_default_color(i))) for i in range(max(largest, 1) + 1)]
