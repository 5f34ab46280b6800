"""`scaleseg data import labelstudio`: a Label Studio project (brush and polygon results) as a dataset
folder, from a JSON export plus a folder of its images, or from the running Label Studio itself.

From an export, each task's image is found by the last part of its URL (``/data/upload/3/1a2b3c4d-photo.jpg``,
or the ``d`` parameter of a local-files URL), with Label Studio's upload prefix (8 hex digits and '-')
stripped when the folder holds the original name. From a running Label Studio, the project's own export is
read and each task's image fetched from that Label Studio only (never another host), under the upload caps
and decode checks; the dataset then records the project in DATA/labeling/state.json, so `scaleseg label
pull` brings in later annotations and `label push` adds tasks to the same project.

Annotations follow `label pull`'s rules: cancelled ones are ignored, of several the latest wins, regions are
painted in their order and unpainted pixels are 255 (ignore). Tasks without a finished annotation, and
images in the folder that no task names, become unlabelled. The classes are the palette's, or else the
labels the export uses, in order of first use.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from PIL import Image, ImageOps
from tqdm import tqdm

from training.data.build import ImportItem, build_dataset, make_ids, write_items
from training.data.folder import ClassInfo, DatasetError, _default_color, class_dicts, write_classes, write_text
from training.data.import_folder import _files
from training.data.ingest import IMAGE_SUFFIXES, MAX_ENTRY_BYTES, MAX_PIXELS, decode_upload

from .labeling import (ID_KEY, annotation_labels, annotation_to_mask, final_annotation, mask_digest, state_path, task_image_url,
                       task_model_version)
from .labelstudio import LabelStudio, LabelStudioError

UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")
TOKEN_ENV = "LABEL_STUDIO_API_KEY"


def image_name(url: str) -> str:
    """The file name a task's image URL points to."""
    parsed = urlparse(url)
    if "d" in parse_qs(parsed.query):  # local files: /data/local-files/?d=folder/photo.jpg
        return Path(unquote(parse_qs(parsed.query)["d"][0])).name
    return Path(unquote(parsed.path)).name


def _task_image(task: dict) -> str:
    url = task_image_url(task)
    if url is None:
        raise DatasetError(f"task {task.get('id')}: no image URL in its data {task.get('data')!r}.")
    return url


def _read_export(export: Path) -> list[dict]:
    try:
        tasks = json.loads(export.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{export}: no such file. Export the project from Label Studio as JSON.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{export}: not valid JSON ({err}). Export the project from Label Studio as JSON.") from None
    if not isinstance(tasks, list):
        raise DatasetError(f"{export}: expected Label Studio's JSON export (a list of tasks).")
    return tasks


def _classes(source: str, tasks: list[dict], classes: list[ClassInfo] | None) -> list[ClassInfo]:
    """The palette's classes, or the labels the final annotations use; DatasetError for labels the palette
    lacks, before anything is written or fetched."""
    used = [label for task in tasks for label in annotation_labels(final_annotation(task) or {})]
    if classes is None:
        classes = [ClassInfo(i, n, tuple(_default_color(i))) for i, n in enumerate(dict.fromkeys(used))]
    unknown = sorted(set(used) - {c.name for c in classes})
    if unknown:
        raise DatasetError(f"{source}: labels {unknown} are not in the palette ({[c.name for c in classes]}). Add them to "
                           "--palette; nothing was written.")
    if not classes:
        raise DatasetError(f"{source}: no finished annotation has a brush or polygon region; label some tasks first.")
    return classes


def _items(source: str, pairs: list[tuple[dict, Path]], root: Path, classes: list[ClassInfo],
           digests: dict[int, str] | None = None) -> list[ImportItem]:
    """One item per (task, image file), named by the file's path below ``root``; a task's mask is made from
    its final annotation when the item is written (its digest kept in ``digests`` by task id, if given)."""
    dicts = class_dicts(classes)

    def mask_of(task: dict, path: Path, annotation: dict):
        def make():
            with Image.open(path) as img:
                size = ImageOps.exif_transpose(img).size  # the upright size, as the image is stored
            try:
                mask = annotation_to_mask(annotation["result"], dicts, size)
            except (ValueError, KeyError, TypeError) as err:
                raise DatasetError(f"{source}: task {task.get('id')}, annotation {annotation.get('id')}: {err}") from None
            if digests is not None:
                digests[task["id"]] = mask_digest(mask)
            return mask
        return make

    items = []
    for task, path in pairs:
        annotation = final_annotation(task)
        items.append(ImportItem(path.relative_to(root).as_posix(), path, mask_of(task, path, annotation) if annotation else None,
                                f"{source}: task {task.get('id')}"))
    return items


def import_labelstudio(export: str | Path, out: str | Path, images: str | Path, classes: list[ClassInfo] | None = None,
                       val: str = "0.2", seed: int = 0, force: bool = False) -> tuple[Path, dict[str, int]]:
    """A JSON export plus the folder of the project's images."""
    export = Path(export)
    tasks = _read_export(export)
    image_dir = Path(images)
    if not image_dir.is_dir():
        raise DatasetError(f"{image_dir}: no such folder. Pass --images with the folder of the project's images.")
    by_name: dict[str, Path] = {}
    for path in _files(image_dir, IMAGE_SUFFIXES).values():
        by_name.setdefault(path.name, path)

    pairs, missing = [], []
    for task in tasks:
        name = image_name(_task_image(task))
        path = by_name.get(name) or by_name.get(UPLOAD_PREFIX.sub("", name))
        if path is None:
            missing.append(name)
        else:
            pairs.append((task, path))
    if missing:
        raise DatasetError(f"{len(missing)} task image(s) are not in {image_dir}, e.g. {missing[:3]} (Label Studio's upload "
                           "prefix is stripped when matching). Pass the folder that holds the project's images.")
    classes = _classes(str(export), tasks, classes)
    items = _items(str(export), pairs, image_dir, classes)
    named = {path for _, path in pairs}
    items += [ImportItem(p.relative_to(image_dir).as_posix(), p) for p in by_name.values() if p not in named]
    counts = {}

    def fill(tmp: Path) -> None:
        counts.update(write_items(tmp, items, val, seed, "import labelstudio"))
        write_classes(tmp, classes)

    return build_dataset(out, fill, force), counts


def _file_name(url: str, task_id: int, taken: set[str]) -> str:
    """A file name for a fetched task image: its own name (upload prefix stripped), else with the prefix, else
    with the task id, whichever is free first; the dataset's ids come from these names."""
    name = image_name(url)
    stem, suffix = Path(name).stem, Path(name).suffix.lower()
    suffix = suffix if suffix in IMAGE_SUFFIXES else ".png"
    for candidate in (UPLOAD_PREFIX.sub("", stem) + suffix, stem + suffix, f"{stem}_task{task_id}{suffix}"):
        if candidate.lower() not in taken:
            taken.add(candidate.lower())
            return candidate
    raise DatasetError(f"task {task_id}: no free file name for its image {url[:200]}.")


def import_labelstudio_server(client: LabelStudio, project: str, out: str | Path, classes: list[ClassInfo] | None = None,
                              val: str = "0.2", seed: int = 0, force: bool = False, max_pixels: int = MAX_PIXELS,
                              max_bytes: int = MAX_ENTRY_BYTES) -> tuple[Path, dict[str, int]]:
    """Every task of a running Label Studio's project (by id or title), its images fetched from there."""
    info = client.project(project)
    tasks = client.export(info["id"])
    source = f"{client.url} project {info['id']} ({info['title']!r})"
    if not tasks:
        raise DatasetError(f"{source}: the project has no tasks. Import images into it and label some first.")
    classes = _classes(source, tasks, classes)
    counts = {}

    def fill(tmp: Path) -> None:
        downloads = tmp / "labeling" / "downloads"  # inside the staged folder: removed with it on any failure
        downloads.mkdir(parents=True)
        pairs, taken = [], set()
        for task in tqdm(tasks, desc="fetch images", unit="img"):
            url = _task_image(task)
            try:
                payload = client.fetch(url, max_bytes)
                decode_upload(payload, max_pixels)
            except (ValueError, LabelStudioError) as err:
                raise DatasetError(f"{source}: task {task['id']}: {err}; nothing was written.") from None
            path = downloads / _file_name(url, task["id"], taken)
            path.write_bytes(payload)
            pairs.append((task, path))
        digests: dict[int, str] = {}
        items = _items(source, pairs, downloads, classes, digests)
        counts.update(write_items(tmp, items, val, seed, "import labelstudio"))
        write_classes(tmp, classes)
        shutil.rmtree(downloads)
        ids = dict(zip((task["id"] for task, _ in pairs), make_ids(item.name for item in items)))
        _write_state(tmp, client.url, info, tasks, ids, digests)

    return build_dataset(out, fill, force), counts


def _write_state(data: Path, url: str, project: dict, tasks: list[dict], ids: dict[int, str], digests: dict[int, str]) -> None:
    """DATA/labeling/state.json as `label pull` would leave it after pulling these tasks: the project, which
    task is which image, and which annotation wrote each mask (so a later edit of it is pulled as an update)."""
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    state = {"url": url, "project_id": project["id"], "project_title": project["title"], "tasks": {}, "pulled": {},
             "imported": {}}
    for task in tasks:
        image_id = ids[task["id"]]
        pushed_as = (task.get("data") or {}).get(ID_KEY)
        if pushed_as is None:
            state["imported"][str(task["id"])] = image_id
        elif pushed_as == image_id:  # pushed by scaleseg (the file keeps the id's name): a task of this dataset now
            state["tasks"][image_id] = {"task_id": task["id"], "pushed_at": None, "recovered": True,
                                        "model_version": task_model_version(task)}
        else:  # pushed under an id this dataset does not have: `label pull` reports it
            continue
        annotation = final_annotation(task)
        if annotation is not None:
            state["pulled"][image_id] = {"task_id": task["id"], "annotation_id": annotation["id"],
                                         "updated_at": annotation.get("updated_at"), "mask_sha256": digests[task["id"]],
                                         "pulled_at": now, "effort": None, "model_version": None}
    write_text(state_path(data), json.dumps(state, indent=2))


def import_labelstudio_url(url: str, project: str, out: str | Path, classes: list[ClassInfo] | None = None,
                           val: str = "0.2", seed: int = 0, force: bool = False) -> tuple[Path, dict[str, int]]:
    """`data import labelstudio URL OUT --project P`; the token comes from the environment only, so it is never
    on a command line or in a shell history."""
    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        raise DatasetError(f"set {TOKEN_ENV} to your Label Studio access token (Account & Settings -> Access Token) "
                           f"to import from {url}.")
    client = LabelStudio(url, token)
    try:
        return import_labelstudio_server(client, project, out, classes, val, seed, force)
    finally:
        client.close()
