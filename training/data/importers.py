"""Importers for Pascal VOC 2012 (+SBD aug) and Cityscapes into the folder format.

Images (and VOC masks, already class ids in palette PNGs) are symlinked, not copied; Cityscapes masks
are converted from labelIds to the 19 trainIds. The labelled subset is either a list file (UniMatch's
split files work: their first column is the image path) or a seeded random draw of the standard size.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .build import build_dataset
from .folder import ClassInfo, DatasetError, _default_color, write_classes, write_mask, write_split

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
VOC_CLASSIC_SIZES = (92, 183, 366, 732, 1464)

CITYSCAPES_CLASSES = (
    ("road", (128, 64, 128)), ("sidewalk", (244, 35, 232)), ("building", (70, 70, 70)), ("wall", (102, 102, 156)),
    ("fence", (190, 153, 153)), ("pole", (153, 153, 153)), ("traffic light", (250, 170, 30)),
    ("traffic sign", (220, 220, 0)), ("vegetation", (107, 142, 35)), ("terrain", (152, 251, 152)),
    ("sky", (70, 130, 180)), ("person", (220, 20, 60)), ("rider", (255, 0, 0)), ("car", (0, 0, 142)),
    ("truck", (0, 0, 70)), ("bus", (0, 60, 100)), ("train", (0, 80, 100)), ("motorcycle", (0, 0, 230)),
    ("bicycle", (119, 11, 32)))
# labelId -> trainId for the 19 evaluated classes; every other labelId becomes 255 (ignore).
CITYSCAPES_LABEL_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                             25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def cityscapes_lut() -> np.ndarray:
    lut = np.full(256, 255, np.uint8)
    for label_id, train_id in CITYSCAPES_LABEL_TO_TRAIN.items():
        lut[label_id] = train_id
    return lut


def read_id_list(path: str | Path) -> list[str]:
    """Ids from a list file: one per line, either a bare id or UniMatch's 'JPEGImages/x.jpg SegmentationClass/x.png'."""
    ids = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            first = line.split()[0]
            ids.append(Path(first).stem.replace("_leftImg8bit", ""))
    return ids


def choose_labeled(pool: list[str], labeled: str | None, labeled_list: str | None, seed: int) -> list[str]:
    """The labelled subset: from a list file, a count ('92') or a fraction ('1/16') of ``pool``."""
    if labeled_list:
        ids = read_id_list(labeled_list)
        missing = sorted(set(ids) - set(pool))
        if missing:
            raise DatasetError(f"{labeled_list}: {len(missing)} ids are not training images, e.g. {missing[:3]}. "
                               "(VOC: ids of the 10,582 aug set need --sbd SegmentationClassAug.)")
        return ids
    if not labeled:
        return list(pool)
    count = labeled_count(labeled, len(pool))
    if not 1 <= count <= len(pool):
        raise DatasetError(f"--labeled {labeled}: asks for {count} of {len(pool)} available training images.")
    rng = np.random.Generator(np.random.PCG64(seed))
    return sorted(pool[i] for i in rng.choice(len(pool), count, replace=False))


def labeled_count(labeled: str, pool_size: int) -> int:
    """'92' -> 92; '1/16' of 10,582 -> 662. Fractions round up, as the published split lists do (UniMatch's
    VOC 662 / 1323 / 2646 / 5291 of 10,582, Cityscapes 186 / 372 / 744 / 1488 of 2,975)."""
    try:
        if "/" not in labeled:
            return int(labeled)
        num, den = (int(part) for part in labeled.split("/"))
        return -(-pool_size * num // den)  # ceiling division, exact in integers
    except (ValueError, ZeroDivisionError):
        raise DatasetError(f"--labeled {labeled}: expected a count (92) or a fraction (1/16).") from None


def _link(src: Path, dst: Path) -> None:
    if not src.is_file():
        raise DatasetError(f"{src}: missing, so {dst.name} would be a broken link. Pass the folders that hold "
                           "every listed image and mask, or remove the id.")
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src.resolve(), dst)


def import_voc(voc_root: str | Path, out: str | Path, sbd_masks: str | Path | None = None,
               labeled: str | None = "1464", labeled_list: str | None = None, seed: int = 0, force: bool = False) -> Path:
    """VOC 2012 (VOCdevkit/VOC2012). Classic splits draw labels from the 1464 fine train images; with
    ``sbd_masks`` (SegmentationClassAug) the unlabelled pool is the rest of the 10,582 aug images."""
    voc = Path(voc_root)
    seg_sets = voc / "ImageSets" / "Segmentation"
    for need in (voc / "JPEGImages", voc / "SegmentationClass", seg_sets / "train.txt", seg_sets / "val.txt"):
        if not need.exists():
            raise DatasetError(f"{need}: missing. Pass the VOC2012 folder (VOCdevkit/VOC2012) as the source.")
    train = read_id_list(seg_sets / "train.txt")
    val = read_id_list(seg_sets / "val.txt")
    pool = train
    if sbd_masks:
        aug = sorted(p.stem for p in Path(sbd_masks).glob("*.png"))
        if not aug:
            raise DatasetError(f"{sbd_masks}: no .png masks there (or no such folder). Pass the SegmentationClassAug "
                               "folder, or leave out --sbd for the 1464 fine masks only.")
        pool = sorted((set(aug) | set(train)) - set(val))
        no_image = [i for i in pool if not (voc / "JPEGImages" / f"{i}.jpg").is_file()]
        if no_image:
            raise DatasetError(f"{voc / 'JPEGImages'}: no image for {len(no_image)} masks in {sbd_masks}, e.g. "
                               f"{no_image[:3]}. Pass the VOC2012 folder that holds all 17,125 JPEGs.")
    # A count is drawn from the fine train set (classic splits); a fraction or a list from the whole pool.
    classic = labeled and "/" not in labeled and not labeled_list
    lab = choose_labeled(train if classic else pool, labeled, labeled_list, seed)
    unl = sorted(set(pool) - set(lab))

    def mask_source(image_id: str) -> Path:
        fine = voc / "SegmentationClass" / f"{image_id}.png"
        return fine if fine.is_file() else Path(sbd_masks) / f"{image_id}.png"

    def fill(tmp: Path) -> None:
        classes = [ClassInfo(i, n, tuple(_default_color(i))) for i, n in enumerate(VOC_CLASSES)]
        write_classes(tmp, classes)
        for image_id in tqdm(lab + unl + val, desc="voc", unit="img"):
            _link(voc / "JPEGImages" / f"{image_id}.jpg", tmp / "images" / f"{image_id}.jpg")
        for image_id in lab + val:
            _link(mask_source(image_id), tmp / "masks" / f"{image_id}.png")
        write_split(tmp, "labeled", lab)
        write_split(tmp, "unlabeled", unl)
        write_split(tmp, "val", val)

    return build_dataset(out, fill, force)


def import_cityscapes(city_root: str | Path, out: str | Path, labeled: str | None = "1/8",
                      labeled_list: str | None = None, seed: int = 0, force: bool = False) -> Path:
    """Cityscapes (leftImg8bit/ + gtFine/): masks converted labelIds -> 19 trainIds, 255 elsewhere."""
    root = Path(city_root)
    for need in (root / "leftImg8bit" / "train", root / "leftImg8bit" / "val", root / "gtFine"):
        if not need.is_dir():
            raise DatasetError(f"{need}: missing. Pass the Cityscapes root holding leftImg8bit/ and gtFine/.")

    def scan(split: str) -> dict[str, Path]:
        return {p.name.replace("_leftImg8bit.png", ""): p for p in sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))}

    train, val = scan("train"), scan("val")
    lab = choose_labeled(sorted(train), labeled, labeled_list, seed)
    unl = sorted(set(train) - set(lab))
    lut = cityscapes_lut()

    def fill(tmp: Path) -> None:
        write_classes(tmp, [ClassInfo(i, n, c) for i, (n, c) in enumerate(CITYSCAPES_CLASSES)])
        for image_id, src in {**train, **val}.items():
            _link(src, tmp / "images" / f"{image_id}.png")
        for image_id in tqdm(lab + sorted(val), desc="cityscapes masks", unit="img"):
            split = "train" if image_id in train else "val"
            city = image_id.split("_")[0]
            src = root / "gtFine" / split / city / f"{image_id}_gtFine_labelIds.png"
            if not src.is_file():
                raise DatasetError(f"{src}: missing ground truth for {image_id}.")
            write_mask(tmp / "masks" / f"{image_id}.png", lut[np.array(Image.open(src), dtype=np.uint8)])
        write_split(tmp, "labeled", lab)
        write_split(tmp, "unlabeled", unl)
        write_split(tmp, "val", sorted(val))

    return build_dataset(out, fill, force)
