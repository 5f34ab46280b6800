"""`scaleseg data import labelstudio`: a Label Studio JSON export (brush and polygon results) plus a
folder of its images, matched by file name.

Each task's image is found by the last part of its URL (``/data/upload/3/1a2b3c4d-photo.jpg``, or the
``d`` parameter of a local-files URL), with Label Studio's upload prefix (8 hex digits and '-') stripped
when the folder holds the original name. Annotations follow `label pull`'s rules: cancelled ones are
ignored, of several the latest wins, regions are painted in their order and unpainted pixels are 255
(ignore). Tasks without a finished annotation, and images in the folder that no task names, become
unlabelled. The classes are the palette's, or else the labels the export uses, in order of first use.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from PIL import Image

from training.data.build import ImportItem, build_dataset, write_items
from training.data.folder import ClassInfo, DatasetError, _default_color, class_dicts, write_classes
from training.data.import_folder import _files
from training.data.ingest import IMAGE_SUFFIXES

from .labeling import annotation_to_mask

UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")
REGION_TYPES = ("brushlabels", "polygonlabels")


def image_name(url: str) -> str:
    """The file name a task's image URL points to."""
    parsed = urlparse(url)
    if "d" in parse_qs(parsed.query):  # local files: /data/local-files/?d=folder/photo.jpg
        return Path(unquote(parse_qs(parsed.query)["d"][0])).name
    return Path(unquote(parsed.path)).name


def _task_image(task: dict) -> str:
    urls = [v for v in (task.get("data") or {}).values() if isinstance(v, str) and Path(urlparse(v).path).suffix]
    if not urls:
        raise DatasetError(f"task {task.get('id')}: no image URL in its data {task.get('data')!r}.")
    return urls[0]


def _final_annotation(task: dict) -> dict | None:
    done = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    return max(done, key=lambda a: (a.get("updated_at") or "", a.get("id") or 0)) if done else None


def import_labelstudio(export: str | Path, out: str | Path, images: str | Path, classes: list[ClassInfo] | None = None,
                       val: str = "0.2", seed: int = 0, force: bool = False) -> tuple[Path, dict[str, int]]:
    export = Path(export)
    try:
        tasks = json.loads(export.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{export}: no such file. Export the project from Label Studio as JSON.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{export}: not valid JSON ({err}). Export the project from Label Studio as JSON.") from None
    if not isinstance(tasks, list):
        raise DatasetError(f"{export}: expected Label Studio's JSON export (a list of tasks).")
    image_dir = Path(images)
    if not image_dir.is_dir():
        raise DatasetError(f"{image_dir}: no such folder. Pass --images with the folder of the project's images.")
    by_name: dict[str, Path] = {}
    for path in _files(image_dir, IMAGE_SUFFIXES).values():
        by_name.setdefault(path.name, path)

    finals, missing, used = [], [], []
    for task in tasks:
        name = image_name(_task_image(task))
        path = by_name.get(name) or by_name.get(UPLOAD_PREFIX.sub("", name))
        if path is None:
            missing.append(name)
            continue
        annotation = _final_annotation(task)
        finals.append((task, path, annotation))
        for region in (annotation or {}).get("result", []):
            for label in region.get("value", {}).get(region.get("type"), []) if region.get("type") in REGION_TYPES else []:
                used.append(label)
    if missing:
        raise DatasetError(f"{len(missing)} task image(s) are not in {image_dir}, e.g. {missing[:3]} (Label Studio's upload "
                           "prefix is stripped when matching). Pass the folder that holds the project's images.")
    if classes is None:
        classes = [ClassInfo(i, n, tuple(_default_color(i))) for i, n in enumerate(dict.fromkeys(used))]
    unknown = sorted(set(used) - {c.name for c in classes})
    if unknown:
        raise DatasetError(f"{export}: labels {unknown} are not in the palette ({[c.name for c in classes]}). Add them to "
                           "--palette; nothing was written.")
    if not classes:
        raise DatasetError(f"{export}: no finished annotation has a brush or polygon region; label some tasks first.")
    dicts = class_dicts(classes)

    def mask_of(task: dict, path: Path, annotation: dict):
        def make():
            with Image.open(path) as img:
                size = img.size
            try:
                return annotation_to_mask(annotation["result"], dicts, size)
            except (ValueError, KeyError, TypeError) as err:
                raise DatasetError(f"{export}: task {task.get('id')}, annotation {annotation.get('id')}: {err}") from None
        return make

    items = [ImportItem(path.relative_to(image_dir).as_posix(), path, mask_of(task, path, ann) if ann else None,
                        f"{export}: task {task.get('id')}") for task, path, ann in finals]
    named = {path for _, path, _ in finals}
    items += [ImportItem(p.relative_to(image_dir).as_posix(), p) for p in by_name.values() if p not in named]
    counts = {}

    def fill(tmp: Path) -> None:
        counts.update(write_items(tmp, items, val, seed, "import labelstudio"))
        write_classes(tmp, classes)

    return build_dataset(out, fill, force), counts
