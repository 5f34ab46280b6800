"""`scaleseg data import coco`: COCO instance annotations or COCO panoptic, turned into semantic masks.

Instances (``annotations[].segmentation`` as polygons, RLE or uncompressed RLE, decoded by pycocotools):
class 0 is ``background`` (every pixel no annotation covers), the categories follow in category-id order.
Larger objects are drawn first, so a small object on top of a large one keeps its pixels. Every image the
JSON lists is labelled (an image without annotations is all background); images in the folder that the
JSON does not list become unlabelled.

Panoptic (``annotations[].file_name`` + ``segments_info``, the PNGs in the folder beside the JSON):
each pixel's segment id (R + 256 G + 256^2 B) becomes its segment's category; id 0 (void) and segments
the JSON does not describe become 255 (ignore). The categories are the classes, in category-id order.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from .build import ImportItem, build_dataset, write_items
from .folder import IGNORE, ClassInfo, DatasetError, _default_color, write_classes
from .import_folder import _files
from .ingest import IMAGE_SUFFIXES
from .palette import parse_color


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"{path}: no such file. Pass the COCO annotation JSON (e.g. annotations/instances_train2017.json).")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON ({err}).") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: not a COCO annotation file (no {key!r} list).")
    return data


def _classes(categories: list[dict], background: bool, where: Path) -> tuple[list[ClassInfo], dict[int, int]]:
    """Classes (optionally background first) and COCO category id -> class id."""
    try:
        cats = sorted(categories, key=lambda c: int(c["id"]))
        names = [str(c["name"]) for c in cats]
    except (KeyError, TypeError, ValueError):
        raise DatasetError(f"{where}: each category needs an integer 'id' and a 'name'.") from None
    if background and "background" in names:
        raise DatasetError(f"{where}: a category is named 'background', which the import reserves for uncovered pixels.")
    names = (["background"] if background else []) + names
    if len(names) > IGNORE:
        raise DatasetError(f"{where}: {len(names)} classes; at most {IGNORE}.")
    colors = [None] * background + [c.get("color") for c in cats]
    classes = [ClassInfo(i, n, parse_color(col, f"{where}: category {n!r}") if col is not None else tuple(_default_color(i)))
               for i, (n, col) in enumerate(zip(names, colors))]
    return classes, {int(c["id"]): i + background for i, c in enumerate(cats)}


def _instance_mask(image: dict, annotations: list[dict], class_of: dict[int, int], where: Path) -> np.ndarray:
    from pycocotools import mask as coco_mask

    h, w = int(image["height"]), int(image["width"])
    mask = np.zeros((h, w), np.uint8)
    for ann in sorted(annotations, key=lambda a: -float(a.get("area", 0))):
        what = f"{where}: annotation {ann.get('id')} of image {image.get('file_name')!r}"
        if ann.get("category_id") not in class_of:
            raise DatasetError(f"{what}: category_id {ann.get('category_id')} is not in 'categories'.")
        segm = ann.get("segmentation")
        try:
            if isinstance(segm, list):  # polygons [[x1, y1, x2, y2, ...], ...]
                rle = coco_mask.merge(coco_mask.frPyObjects([p for p in segm if len(p) >= 6], h, w)) if segm else None
            elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):  # uncompressed RLE
                rle = coco_mask.frPyObjects(segm, h, w)
            elif isinstance(segm, dict):
                rle = dict(segm, counts=segm["counts"].encode() if isinstance(segm["counts"], str) else segm["counts"])
            else:
                raise TypeError("neither polygons nor RLE")
            if rle is not None and list(rle["size"]) != [h, w]:
                raise ValueError(f"RLE size {rle['size']} differs from the image's {h}x{w}")
            if rle is not None:
                mask[coco_mask.decode(rle).astype(bool)] = class_of[ann["category_id"]]
        except (TypeError, ValueError, KeyError, IndexError) as err:
            raise DatasetError(f"{what}: unreadable segmentation ({err}). Fix or remove the annotation.") from None
    return mask


def _panoptic_mask(png: Path, segments: list[dict], class_of: dict[int, int], where: str) -> np.ndarray:
    if not png.is_file():
        raise DatasetError(f"{png}: missing panoptic PNG for {where}. Pass --panoptic-masks with the folder of PNGs.")
    with Image.open(png) as img:
        rgb = np.asarray(img.convert("RGB")).astype(np.int32)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
    lut_keys, lut_values = [], []
    for seg in segments:
        if seg.get("category_id") not in class_of:
            raise DatasetError(f"{where}: segment {seg.get('id')} has category_id {seg.get('category_id')}, not in 'categories'.")
        lut_keys.append(int(seg["id"]))
        lut_values.append(class_of[seg["category_id"]])
    out = np.full(ids.shape, IGNORE, np.uint8)
    for key, value in zip(lut_keys, lut_values):
        out[ids == key] = value
    return out


def import_coco(annotations: str | Path, out: str | Path, images: str | Path, panoptic_masks: str | Path | None = None,
                val: str = "0.2", seed: int = 0, force: bool = False) -> tuple[Path, dict[str, int]]:
    """Import a COCO instances or panoptic JSON with its images into ``out``; returns (out, images per split)."""
    path = Path(annotations)
    data = _load_json(path)
    image_dir = Path(images)
    if not image_dir.is_dir():
        raise DatasetError(f"{image_dir}: no such folder. Pass --images with the folder holding the JSON's images.")
    panoptic = any("segments_info" in a for a in data["annotations"])
    classes, class_of = _classes(data["categories"], background=not panoptic, where=path)
    by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann.get("image_id"), []).append(ann)
    png_dir = Path(panoptic_masks) if panoptic_masks else path.with_suffix("")
    on_disk = _files(image_dir, IMAGE_SUFFIXES)
    listed, items = set(), []
    for n, image in enumerate(data["images"]):
        if not isinstance(image, dict) or not {"id", "file_name", "height", "width"} <= set(image):
            raise DatasetError(f"{path}: images[{n}] needs 'id', 'file_name', 'height' and 'width'.")
        name = str(image["file_name"])
        src = image_dir / name
        if not src.is_file():
            raise DatasetError(f"{src}: missing image {name!r} listed in {path}. Pass the right --images folder.")
        listed.add(Path(name).with_suffix("").as_posix())
        anns = by_image.get(image.get("id"), [])
        if panoptic:
            if not anns:  # panoptic lists every labelled image once; an image without an entry has no labels
                items.append(ImportItem(name, src))
                continue
            ann = anns[0]
            make = (lambda a=ann: _panoptic_mask(png_dir / a["file_name"], a["segments_info"], class_of, f"{path}: image {name!r}"))
            items.append(ImportItem(name, src, make, str(png_dir / ann["file_name"])))
        else:
            make = (lambda im=image, a=anns: _instance_mask(im, a, class_of, path))
            items.append(ImportItem(name, src, make, f"{path}: image {name!r}"))
    items += [ImportItem(Path(p).relative_to(image_dir).as_posix(), p) for key, p in on_disk.items() if key not in listed]
    counts = {}

    def fill(tmp: Path) -> None:
        counts.update(write_items(tmp, items, val, seed, "import coco"))
        write_classes(tmp, classes)

    return build_dataset(out, fill, force), counts
