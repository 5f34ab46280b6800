"""`scaleseg data check`: every problem in a dataset folder, reported at once."""
from __future__ import annotations

from pathlib import Path

from .folder import (SPLITS, DatasetError, find_image, load_classes, load_image, load_mask, mask_path,
                     read_split, split_path)


def check_dataset(root: str | Path, deep: bool = True) -> list[str]:
    """Problems found, each naming the file and the fix; empty when the folder is usable for training.

    deep=False checks the structure only (files exist, splits consistent) and skips decoding pixels.
    """
    root = Path(root)
    if not root.is_dir():
        return [f"{root}: not a folder. Pass the dataset folder (with classes.json, images/, masks/, splits/)."]
    problems: list[str] = []
    try:
        num_classes = len(load_classes(root))
    except DatasetError as err:
        problems.append(str(err))
        num_classes = None

    splits: dict[str, list[str]] = {}
    for split in SPLITS:
        try:
            splits[split] = read_split(root, split, required=split != "unlabeled")
        except DatasetError as err:
            problems.append(str(err))
            splits[split] = []
        seen: set[str] = set()
        for image_id in splits[split]:
            if image_id in seen:
                problems.append(f"{split_path(root, split)}: id {image_id!r} appears more than once. Remove the repeat.")
            seen.add(image_id)
    if split_path(root, "labeled").is_file() and not splits["labeled"]:
        problems.append(f"{split_path(root, 'labeled')}: empty. Label at least one image and list its id there.")
    overlap = set(splits["val"]) & (set(splits["labeled"]) | set(splits["unlabeled"]))
    if overlap:
        problems.append(f"{split_path(root, 'val')}: ids also used for training: {sorted(overlap)[:10]}. "
                        "Validation images must not be trained on.")

    for split, ids in splits.items():
        needs_mask = split != "unlabeled"
        for image_id in ids:
            img_file = find_image(root, image_id)
            if img_file is None:
                problems.append(f"{root / 'images' / image_id}.png|.jpg: no image for id {image_id!r} listed in "
                                f"{split_path(root, split)}. Add the image or remove the id.")
                continue
            if not deep:
                if needs_mask and not mask_path(root, image_id).is_file():
                    problems.append(f"{mask_path(root, image_id)}: missing mask for an id in {split}.txt. "
                                    "Add it or move the id to unlabeled.txt.")
                continue
            try:
                size = load_image(img_file).size
            except DatasetError as err:
                problems.append(str(err))
                continue
            if needs_mask and num_classes is not None:
                try:
                    load_mask(mask_path(root, image_id), num_classes, size)
                except DatasetError as err:
                    problems.append(str(err))
    return sorted(set(problems), key=problems.index)
