"""The active-labeling loop with Label Studio: push the chosen images with the model's masks as
pre-annotations (or without any, on a cold start with no model yet), pull finished annotations back into
the dataset folder.

State lives in DATA/labeling/state.json (written atomically): which image went to which task, so that
pushing again never duplicates a task and a crash between push and pull loses nothing; the tasks also
carry our image id, so the state can be rebuilt from Label Studio if the file is lost.

Pull rules: cancelled (skipped) annotations are ignored; of several annotations the latest wins;
brush regions are painted in the order Label Studio lists them, a later region winning where regions
overlap; pixels no region covers become 255 (ignore). Annotations whose labels are not in classes.json,
or whose size is not the image's, are reported and not written. Each pulled mask is recorded with the
annotation that wrote it: when that same annotation was edited in Label Studio, pull applies the edit;
a mask from any other source (another annotation, a file changed on disk) is a conflict and is never
overwritten unless ``overwrite`` is given. Validation images are never written into the training splits,
and their masks are changed only for the ids listed in ``replace_val``, one explicit decision per image.

Pull reads every finished task of the project, also tasks made in Label Studio by hand: their image is
fetched from that Label Studio only (a URL on any other host is refused), under the upload caps, and stored
as an upload is (decode checks, de-duplication by pixels: an image the dataset holds keeps its id, and its
rules); it joins the training split with its mask. ``state["imported"]`` maps such a task to its image id,
so it is fetched once. A label that is not in classes.json stops the pull before anything is written.

Labelling effort: push keeps each image's pre-annotation (DATA/labeling/preannotations/<id>.png); pull
records, per written mask, the fraction of its labelled pixels whose pre-annotated class the labeller
changed (a proxy for correction work; pixels left unlabelled, 255, are not counted), with the model
version that made the pre-annotation.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from PIL import Image, ImageDraw

from training.data.folder import (IGNORE, class_dicts, find_image, load_classes, mask_path, read_split, write_mask, write_split,
                                  write_text)
from training.data.ingest import MAX_ENTRY_BYTES, MAX_PIXELS, content_index, decode_upload, store_image

from . import rle
from .labelstudio import FROM_NAME, TO_NAME, LabelStudio, LabelStudioError

ID_KEY = "scaleseg_id"
REGION_TYPES = ("brushlabels", "polygonlabels")  # the regions a class-id mask is painted from


def local_files_url(path: Path, document_root: str | None = None) -> str:
    """The Label Studio URL of an image served by a local-files storage: the path relative to Label Studio's
    LOCAL_FILES_DOCUMENT_ROOT (read from the same environment variable, default "/")."""
    root = Path(document_root or os.environ.get("LOCAL_FILES_DOCUMENT_ROOT") or "/").resolve()
    path = Path(path).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"{path} is outside Label Studio's LOCAL_FILES_DOCUMENT_ROOT {root}; mount the dataset "
                         "under that folder (in Label Studio and here at the same path) or push with delivery='upload'.")
    return "/data/local-files/?d=" + str(path.relative_to(root))


def state_path(data: Path) -> Path:
    return Path(data) / "labeling" / "state.json"


def load_state(data: Path) -> dict:
    path = state_path(data)
    if not path.is_file():
        return {"tasks": {}, "pulled": {}}
    return json.loads(path.read_text())


def save_state(data: Path, state: dict) -> None:
    write_text(state_path(data), json.dumps(state, indent=2))


def tasked(state: dict) -> set[str]:
    """Ids of the images that have a task in the dataset's project: pushed, or made there by hand and pulled."""
    return set(state["tasks"]) | set(state.get("imported", {}).values())


def preannotation_path(data: Path, image_id: str) -> Path:
    return Path(data) / "labeling" / "preannotations" / f"{image_id}.png"


def labeling_effort(preannotation: np.ndarray, final: np.ndarray) -> float | None:
    """Fraction of the final mask's labelled pixels (not 255) whose class differs from the pre-annotation's;
    None when the final mask labels no pixel."""
    if preannotation.shape != final.shape:
        raise ValueError(f"pre-annotation is {preannotation.shape}, final mask {final.shape}: not the same image size")
    labelled = final != IGNORE
    if not labelled.any():
        return None
    return float((preannotation[labelled] != final[labelled]).mean())


def effort_by_version(state: dict) -> dict[str, tuple[float, int]]:
    """Model version -> (mean labelling effort, images) over the pulled masks that started from its pre-annotations."""
    efforts: dict[str, list[float]] = {}
    for record in state.get("pulled", {}).values():
        if record.get("effort") is not None and record.get("model_version"):
            efforts.setdefault(record["model_version"], []).append(record["effort"])
    return {version: (float(np.mean(values)), len(values)) for version, values in efforts.items()}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def prediction_result(labels: np.ndarray, classes: list[dict], confidence: np.ndarray | None = None) -> list[dict]:
    """One brush region per class present, at the image's own size (what the editor needs)."""
    h, w = labels.shape
    out = []
    for c in classes:
        region = labels == c["id"]
        if not region.any():
            continue
        item = {"id": uuid.uuid4().hex[:10], "from_name": FROM_NAME, "to_name": TO_NAME, "type": "brushlabels",
                "original_width": w, "original_height": h, "image_rotation": 0,
                "value": {"format": "rle", "rle": rle.mask_to_rle(region), "brushlabels": [c["name"]]}}
        if confidence is not None:
            item["score"] = float(confidence[region].mean())
        out.append(item)
    return out


def annotation_to_mask(result: list[dict], classes: list[dict], size: tuple[int, int]) -> np.ndarray:
    """Class-id mask (255 where nothing is painted) from an annotation's brush and polygon regions, painted in
    the order Label Studio lists them; ValueError for labels outside classes.json or regions of another size."""
    width, height = size
    ids = {c["name"]: c["id"] for c in classes}
    mask = np.full((height, width), IGNORE, np.uint8)
    for region in result:
        kind = region.get("type")
        if kind not in REGION_TYPES:
            continue
        names = region["value"].get(kind) or []
        unknown = [n for n in names if n not in ids]
        if unknown or len(names) != 1:
            raise ValueError(f"labels {names} are not exactly one class of classes.json ({sorted(ids)})")
        if (region.get("original_width"), region.get("original_height")) != (width, height):
            raise ValueError(f"region drawn on a {region.get('original_width')}x{region.get('original_height')} image, "
                             f"but the image is {width}x{height}")
        if kind == "brushlabels":
            mask[rle.rle_to_mask(region["value"]["rle"], height, width)] = ids[names[0]]
        else:
            mask[polygon_mask(region["value"]["points"], width, height)] = ids[names[0]]
    return mask


def final_annotation(task: dict) -> dict | None:
    """The annotation a task's mask comes from: the latest one not cancelled (skipped); None if there is none."""
    done = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    return max(done, key=lambda a: (a.get("updated_at") or "", a.get("id") or 0)) if done else None


def annotation_labels(annotation: dict) -> list[str]:
    """The labels of an annotation's brush and polygon regions, in order, repeats included."""
    return [label for region in annotation.get("result") or [] if region.get("type") in REGION_TYPES
            for label in (region.get("value") or {}).get(region["type"]) or []]


def task_image_url(task: dict) -> str | None:
    """The image URL of a task: its ``image`` (what scaleseg's projects name it), else the first value with a
    file extension; None if it has neither."""
    data = task.get("data") or {}
    urls = [data["image"]] if isinstance(data.get("image"), str) else []
    urls += [v for v in data.values() if isinstance(v, str) and Path(urlparse(v).path).suffix]
    return urls[0] if urls else None


def polygon_mask(points: list[list[float]], width: int, height: int) -> np.ndarray:
    """bool [H, W] of a Label Studio polygon, whose points are percentages of the image's width and height."""
    if len(points) < 3:
        raise ValueError(f"a polygon needs at least 3 points, got {len(points)}")
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon([(x * width / 100, y * height / 100) for x, y in points], fill=1)
    return np.asarray(canvas, dtype=bool)


@dataclass
class PushReport:
    pushed: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    project_id: int | None = None


class ProjectChanged(LabelStudioError):
    """The dataset's tasks live in another project; pushing here would duplicate them."""


def push(client: LabelStudio, data: Path, predictions: dict[str, dict | None], model_version: str | None,
         project_title: str, delivery: str = "local", progress=None, switch_project: bool = False) -> PushReport:
    """Create one task per image id with its prediction; ids already in this project are skipped.
    ``predictions[id]`` holds ``labels`` (H x W), ``confidence`` and ``score``, or is None for a task without
    pre-annotation (a cold start: no model yet); ``model_version`` names the model that made them. Pushing to
    another project title than before is refused unless ``switch_project``."""
    data = Path(data)
    classes = class_dicts(load_classes(data))
    state = load_state(data)
    previous = state.get("project_title")
    count = len(tasked(state))
    if previous not in (None, project_title) and state.get("url") == client.url and count and not switch_project:
        raise ProjectChanged(f"this dataset's {count} task(s) are in project {previous!r} "
                             f"(id {state.get('project_id')}); pushing to {project_title!r} would start a new project and "
                             f"leave them behind. Set the project back to {previous!r}, or choose to switch (pull "
                             f"{previous!r} first: after the switch, pull reads {project_title!r}).")
    project = client.ensure_project(project_title, classes)
    if state.get("project_id") not in (None, project["id"]) or state.get("url") not in (None, client.url):
        state = {"tasks": {}, "pulled": state.get("pulled", {})}  # another project: its task map does not apply
    state.update({"url": client.url, "project_id": project["id"], "project_title": project_title})
    for task in client.tasks(project["id"]):  # recover ids pushed before a crash that lost the state file
        image_id = task["data"].get(ID_KEY)
        if image_id and image_id not in state["tasks"]:
            state["tasks"][image_id] = {"task_id": task["id"], "pushed_at": None, "recovered": True,
                                        "model_version": task_model_version(task)}
    report = PushReport(project_id=project["id"])
    if delivery == "local":
        client.ensure_local_storage(project["id"], data / "images")
    items = list(predictions.items())
    for n, (image_id, pred) in enumerate(items):
        if progress:
            progress(n / max(1, len(items)), f"pushing {image_id}")
        if image_id in tasked(state):
            report.already.append(image_id)
            continue
        path = find_image(data, image_id)
        if path is None:
            raise FileNotFoundError(f"{data / 'images' / image_id}.*: image not found; is {image_id!r} in this dataset?")
        url = client.upload_image(project["id"], path) if delivery == "upload" else local_files_url(path)
        task = {"data": {"image": url, ID_KEY: image_id}}
        if pred is None:  # no pre-annotation: nothing to measure the labelling effort against
            preannotation_path(data, image_id).unlink(missing_ok=True)
        else:
            task["predictions"] = [{"model_version": model_version, "score": float(pred["score"]),
                                    "result": prediction_result(pred["labels"], classes, pred.get("confidence"))}]
            write_mask(preannotation_path(data, image_id), np.asarray(pred["labels"], dtype=np.uint8))
        task_id = client.import_tasks(project["id"], [task])[0]
        state["tasks"][image_id] = {"task_id": task_id, "pushed_at": _now(), "model_version": model_version,
                                    "score": None if pred is None else float(pred["score"])}
        save_state(data, state)  # after every task: a crash loses at most the task in flight
        report.pushed.append(image_id)
    save_state(data, state)
    return report


def task_model_version(task: dict) -> str | None:
    """The model version of a task's pre-annotation in Label Studio (what the state file records on push;
    read back when that file was lost)."""
    versions = [p.get("model_version") for p in task.get("predictions") or [] if isinstance(p, dict)]
    return next((v for v in versions if v), None)


@dataclass
class PullReport:
    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)        # cancelled / skipped by the labeller
    pending: list[str] = field(default_factory=list)        # no annotation yet
    conflicts: list[str] = field(default_factory=list)      # a different human mask exists; not overwritten
    protected: list[str] = field(default_factory=list)      # validation images whose mask was left as it is
    updated: list[str] = field(default_factory=list)        # of written: edits of the annotation pulled before
    imported: list[str] = field(default_factory=list)       # of written: from tasks made in Label Studio by hand
    errors: dict[str, str] = field(default_factory=dict)
    effort: dict[str, float] = field(default_factory=dict)  # of written: fraction of pre-annotated pixels corrected

    def effort_summary(self) -> str:
        if not self.effort:
            return ""
        return (f"labelling effort: {100 * np.mean(list(self.effort.values())):.1f} % of the pre-annotated pixels "
                f"corrected on average ({len(self.effort)} image(s))")


class UnknownLabels(LabelStudioError):
    """Finished annotations use labels that classes.json lacks; nothing was pulled."""


def check_labels(tasks: list[dict], finals: dict[int, dict | None], classes: list[dict], data: Path) -> None:
    """UnknownLabels listing each label of the final annotations that classes.json lacks, with its tasks."""
    names = {c["name"] for c in classes}
    unknown: dict[str, list[int]] = {}
    for task in tasks:
        for label in dict.fromkeys(annotation_labels(finals[task["id"]] or {})):
            if label not in names:
                unknown.setdefault(label, []).append(task["id"])
    if unknown:
        listed = "; ".join(f"{label!r} in task(s) {', '.join(map(str, ids))}" for label, ids in unknown.items())
        raise UnknownLabels(f"labels that are not classes of {Path(data) / 'classes.json'}: {listed}. Add each as a class "
                            f"there (an entry {{\"id\": {len(classes)}, \"name\": ..., \"color\": [r, g, b]}}, ids in "
                            "order) or relabel those tasks in Label Studio; nothing was pulled.")


def mask_digest(mask: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(mask).tobytes() + str(mask.shape).encode()).hexdigest()


def pull(client: LabelStudio, data: Path, overwrite: bool = False, progress=None, replace_val=(),
         max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_ENTRY_BYTES) -> PullReport:
    """Finished annotations into DATA/masks and splits/labeled.txt by the rules above; the images of tasks made
    in Label Studio are refused past ``max_bytes`` or ``max_pixels`` (the upload caps)."""
    data = Path(data)
    state = load_state(data)
    if state.get("project_id") is None:
        raise LabelStudioError(f"{state_path(data)}: nothing was pushed from this dataset yet; run push first.")
    classes = class_dicts(load_classes(data))
    report = PullReport()
    labeled = read_split(data, "labeled")
    unlabeled = read_split(data, "unlabeled", required=False)
    val = set(read_split(data, "val", required=False))
    replace_val = set(replace_val)
    tasks = list(client.tasks(state["project_id"]))
    finals = {task["id"]: final_annotation(task) for task in tasks}
    check_labels(tasks, finals, classes, data)
    imported = state.setdefault("imported", {})
    known = None  # the dataset's pixel hashes, read when a task made in Label Studio first needs them
    for n, task in enumerate(tasks):
        annotation = finals[task["id"]]
        image_id = task["data"].get(ID_KEY)
        hand_made = not image_id
        if progress:
            progress(n / max(1, len(tasks)), f"pulling {image_id or 'task ' + str(task['id'])}")
        if hand_made:  # made in Label Studio: only its finished annotation comes in, with its image
            if annotation is None:
                continue
            image_id = imported.get(str(task["id"]))
            if image_id is None or find_image(data, image_id) is None:
                known = content_index(data) if known is None else known
                try:
                    image_id = _import_image(client, data, task, annotation, classes, known, max_pixels, max_bytes)
                except (ValueError, LabelStudioError) as err:
                    report.errors[f"task {task['id']}"] = str(err)
                    continue
                imported[str(task["id"])] = image_id
        if annotation is None:
            (report.skipped if task.get("annotations") else report.pending).append(image_id)
            continue
        path = find_image(data, image_id)
        if path is None:
            report.errors[image_id] = "image no longer in the dataset"
            continue
        with Image.open(path) as img:
            size = img.size
        try:
            mask = annotation_to_mask(annotation["result"], classes, size)
        except ValueError as err:
            report.errors[image_id] = f"task {task['id']}, annotation {annotation['id']}: {err}"
            continue
        target = mask_path(data, image_id)
        ours = False
        if target.is_file():
            with Image.open(target) as img:
                existing = np.array(img)
            if np.array_equal(existing, mask):
                report.unchanged.append(image_id)
                continue
            record = state["pulled"].get(image_id) or {}
            ours = record.get("annotation_id") == annotation["id"] and record.get("mask_sha256") == mask_digest(existing)
        if image_id in val and image_id not in replace_val:
            report.protected.append(image_id)
            continue
        if target.is_file() and not (ours or overwrite or image_id in replace_val):
            report.conflicts.append(image_id)
            continue
        try:
            write_mask(target, mask)
        except OSError as err:  # e.g. disk full: this mask is not written (atomic), the others stand
            report.errors[image_id] = f"could not write {target} ({err.strerror or err}); free space and pull again"
            continue
        # A task made by hand started from no pre-annotation of ours, whatever was pushed for the same pixels.
        effort = None if hand_made else _effort(data, image_id, mask)
        if effort is not None:
            report.effort[image_id] = effort
        state["pulled"][image_id] = {"task_id": task["id"], "annotation_id": annotation["id"],
                                     "updated_at": annotation.get("updated_at"), "mask_sha256": mask_digest(mask),
                                     "pulled_at": _now(), "effort": effort,
                                     "model_version": None if hand_made else
                                     state["tasks"].get(image_id, {}).get("model_version") or task_model_version(task)}
        report.written.append(image_id)
        if ours:
            report.updated.append(image_id)
        if hand_made:
            report.imported.append(image_id)
    new = list(dict.fromkeys(i for i in report.written if i not in labeled and i not in val))
    if new:
        write_split(data, "labeled", labeled + new)
        write_split(data, "unlabeled", [i for i in unlabeled if i not in set(new)])
    save_state(data, state)
    return report


def _import_image(client: LabelStudio, data: Path, task: dict, annotation: dict, classes: list[dict],
                  known: dict[str, str], max_pixels: int, max_bytes: int) -> str:
    """The id of a task's image, fetched from Label Studio and stored as an upload is (or the id of the same
    pixels already in the dataset); ValueError when it cannot come in. Its annotation is checked against the
    image first, so a task that cannot be pulled leaves no image behind."""
    url = task_image_url(task)
    if url is None:
        raise ValueError(f"no image URL in its data (keys {sorted(task.get('data') or {})})")
    payload = client.fetch(url, max_bytes)
    try:
        rgb = decode_upload(payload, max_pixels)
    except ValueError as err:
        raise ValueError(f"its image {url[:200]}: {err}") from None
    annotation_to_mask(annotation["result"], classes, (rgb.shape[1], rgb.shape[0]))
    return store_image(data, rgb, known)[0]


def _effort(data: Path, image_id: str, mask: np.ndarray) -> float | None:
    """The labelling effort of a pulled mask; None without a readable pre-annotation of the same size (a task
    pushed before this was recorded, or recovered from Label Studio after the state was lost)."""
    path = preannotation_path(data, image_id)
    if not path.is_file():
        return None
    try:
        with Image.open(path) as img:
            return labeling_effort(np.array(img), mask)
    except (OSError, ValueError):
        return None


@dataclass
class LoopStatus:
    project: str | None = None
    project_id: int | None = None
    pushed: int = 0          # tasks of this dataset in the project
    annotated: int = 0       # with a finished (not skipped) annotation
    pulled: int = 0          # of those, written into the dataset
    pending: int = 0         # no annotation yet

    def summary(self) -> str:
        if self.project_id is None:
            return "Nothing pushed from this dataset yet."
        return (f"Project {self.project!r} (id {self.project_id}): {self.pushed} pushed, {self.annotated} annotated, "
                f"{self.pulled} pulled, {self.pending} pending.")


def status(client: LabelStudio, data: Path) -> LoopStatus:
    """Counts of the dataset's tasks in its Label Studio project."""
    state = load_state(data)
    if state.get("project_id") is None:
        return LoopStatus()
    tasks = [t for t in client.tasks(state["project_id"]) if t["data"].get(ID_KEY)]
    annotated = [t for t in tasks if any(not a.get("was_cancelled") for a in t.get("annotations", []))]
    return LoopStatus(state.get("project_title"), state["project_id"], len(tasks), len(annotated),
                      sum(1 for t in annotated if t["data"][ID_KEY] in state["pulled"]),
                      sum(1 for t in tasks if not t.get("annotations")))
