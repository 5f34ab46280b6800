"""`scaleseg data import cvat`: CVAT's "Segmentation mask 1.1" export, as its zip or unpacked.

The export holds labelmap.txt (``name:r,g,b:parts:actions`` per label, background first),
SegmentationClass/<image>.png (colour masks in the labelmap's colours) and, when exported with images,
JPEGImages/<image>.<ext>; otherwise ``--images`` names the folder of the task's images. The colour masks
are imported like `data import folder` with the labelmap as palette, so an unknown colour is refused
with its pixel count.
"""
from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from .folder import ClassInfo, DatasetError
from .import_folder import import_folder
from .palette import classes_from_entries, parse_color


def read_labelmap(path: Path) -> list[ClassInfo]:
    if not path.is_file():
        raise DatasetError(f"{path}: missing. Export the task from CVAT as 'Segmentation mask 1.1' (it writes labelmap.txt).")
    entries = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        name, _, rest = line.partition(":")
        color = rest.split(":")[0]
        parts = color.split(",")
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise DatasetError(f"{path}: line {n} {line!r}: expected name:r,g,b:parts:actions.")
        entries.append((name.strip(), parse_color([int(p) for p in parts], f"{path}: line {n}")))
    return classes_from_entries(entries, str(path))


def _unpack(archive: Path, into: Path) -> None:
    """Extract a CVAT zip, refusing entries that would land outside ``into``."""
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                pure = PurePosixPath(info.filename)
                if pure.is_absolute() or ".." in pure.parts:
                    raise DatasetError(f"{archive}: entry {info.filename!r} has an unsafe path; this is not a CVAT export.")
                if info.is_dir():
                    continue
                target = into.joinpath(*pure.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except (zipfile.BadZipFile, OSError) as err:
        raise DatasetError(f"{archive}: cannot be unpacked ({err}). Download the export again.") from None


def import_cvat(source: str | Path, out: str | Path, images: str | Path | None = None, val: str = "0.2", seed: int = 0,
                ignore_colors=(), force: bool = False) -> tuple[Path, dict[str, int]]:
    source = Path(source)
    if not source.exists():
        raise DatasetError(f"{source}: no such file or folder. Pass CVAT's 'Segmentation mask 1.1' zip or its unpacked folder.")
    with tempfile.TemporaryDirectory(prefix="scaleseg-cvat-") as tmp:
        root = source
        if source.is_file():
            _unpack(source, Path(tmp))
            root = Path(tmp)
        classes = read_labelmap(root / "labelmap.txt")
        if not (root / "SegmentationClass").is_dir():
            raise DatasetError(f"{source}: no SegmentationClass/ folder; export the task as 'Segmentation mask 1.1'.")
        image_dir = Path(images).resolve() if images else root / "JPEGImages"
        if not image_dir.is_dir():
            raise DatasetError(f"{source}: the export holds no JPEGImages/; export it with 'Save images', or pass "
                               "--images with the folder of the task's images.")
        return import_folder(root, out, images=str(image_dir), masks="SegmentationClass", classes=classes,
                             mask_format="colors", ignore_colors=list(ignore_colors), val=val, seed=seed, force=force)
