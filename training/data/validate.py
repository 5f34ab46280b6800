"""`scaleseg data check` and the check before every training run: every problem in a dataset folder,
reported at once. Pixels are decoded by a bounded pool of threads (Pillow and NumPy release the GIL while
decoding and counting) and only for files that changed since the last check (see pixels.py)."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from .folder import SPLITS, DatasetError, check_mask, find_image, load_classes, mask_path, read_split, split_path
from .pixels import FactCache, image_facts, mask_facts

MAX_WORKERS = 8
PROGRESS_FROM = 500  # files; smaller datasets are checked in about a second, without a bar


def check_dataset(root: str | Path, deep: bool = True, progress: bool = False) -> list[str]:
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

    pixel_jobs = []
    for split, ids in splits.items():
        needs_mask = split != "unlabeled"
        for image_id in ids:
            img_file = find_image(root, image_id)
            if img_file is None:
                problems.append(f"{root / 'images' / image_id}.png|.jpg: no image for id {image_id!r} listed in "
                                f"{split_path(root, split)}. Add the image or remove the id.")
            elif needs_mask and not mask_path(root, image_id).is_file():
                problems.append(f"{mask_path(root, image_id)}: missing mask for an id in {split}.txt. "
                                "Add it or move the id to unlabeled.txt.")
            elif deep:
                pixel_jobs.append((img_file, mask_path(root, image_id) if needs_mask else None))
    if pixel_jobs:
        problems += _check_pixels(root, pixel_jobs, num_classes, progress)
    return sorted(set(problems), key=problems.index)


def _check_pixels(root: Path, jobs: list[tuple[Path, Path | None]], num_classes: int | None,
                  progress: bool) -> list[str]:
    cache = FactCache(root)

    def check(job: tuple[Path, Path | None]) -> str | None:
        img_file, mask_file = job
        try:
            size = cache.facts(img_file, image_facts)["size"]
            if mask_file is not None:
                facts = cache.facts(mask_file, mask_facts)
                if num_classes is not None:
                    check_mask(mask_file, facts["size"], facts["values"], num_classes, size)
        except DatasetError as err:
            return str(err)
        except OSError as err:  # e.g. unreadable permissions, or a file removed while checking
            return f"{err.filename or img_file}: {err.strerror or err}. Make the file readable or remove its id."
        return None

    workers = max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        results = list(tqdm(pool.map(check, jobs), total=len(jobs), desc="check pixels", unit="img", leave=False,
                            disable=not progress or len(jobs) < PROGRESS_FROM))
    cache.save()
    return [r for r in results if r is not None]
