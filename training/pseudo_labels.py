"""Offline pseudo-labels (``--method selftrain``): finding a teacher's checkpoints, one labelling pass over
the unlabelled images into a resumable cache, and ST++'s reliability ranking.

A cache folder holds labels/<id>.png (class ids), confidence/<id>.png (the winning class's probability,
x255) and manifest.json: what made the labels (``identity``), per-image statistics and whether the pass
finished. Each PNG is written atomically before its id enters the manifest, and the manifest is rewritten
every few seconds, so a killed pass resumes with at most those seconds of work lost.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import CheckpointError, load_checkpoint
from .config import ConfigError
from .data import transforms as T
from .data.folder import image_path, load_image, remove_partial_writes, write_mask, write_text
from .evaluate import confusion_matrix, metrics_from_confusion
from .run_settings import SNAPSHOT_FILES, SNAPSHOTS, snapshot_iteration

MANIFEST = "manifest.json"
CACHE_FORMAT = 1
MANIFEST_EVERY_S = 5.0  # a killed pass loses at most this much labelling
CONFIDENT = 0.95  # the manifest's "confident" share counts pixels at or above this probability (FixMatch's tau)


@dataclass
class Teacher:
    label_file: Path        # its predictions become the pseudo-labels
    rank_files: list[Path]  # earlier checkpoints, then the final one; empty when only one checkpoint is known


def find_teacher(path: str) -> Teacher:
    """The teacher's files. A run folder labels with best.pt (else last.pt) and ranks by its snapshots older
    than last.pt against last.pt (ST++); without snapshots, by best.pt against last.pt when best.pt is older.
    A model package (checkpoint.pt) or a single .pt file is one checkpoint: nothing to rank by stability."""
    if not path:
        raise ConfigError("--method selftrain needs --teacher: a `scaleseg train` output folder, a model package folder "
                          "(from `scaleseg export`) or a .pt checkpoint.")
    folder = Path(path)
    if folder.is_file():
        return Teacher(folder, [])
    if (folder / "checkpoint.pt").is_file():
        return Teacher(folder / "checkpoint.pt", [])
    best, last = folder / "best.pt", folder / "last.pt"
    if not (best.is_file() or last.is_file()):
        what = "no such file or folder" if not folder.exists() else "holds no best.pt, last.pt or checkpoint.pt"
        raise CheckpointError(f"--teacher {folder}: {what}. Pass the --out folder of a finished `scaleseg train` run, "
                              "a model package folder, or a .pt checkpoint.")
    label = best if best.is_file() else last
    if not last.is_file():
        return Teacher(label, [])
    final = load_checkpoint(last)["iteration"]
    snapshots = ((snapshot_iteration(p), p) for p in (folder / SNAPSHOTS).glob(SNAPSHOT_FILES))
    earlier = [p for it, p in sorted((it, p) for it, p in snapshots if it is not None and it < final)]
    if not earlier and best.is_file() and load_checkpoint(best)["iteration"] < final:
        earlier = [best]
    return Teacher(label, [*earlier, last] if earlier else [])


def check_classes(path: Path, ckpt: dict, classes: list) -> None:
    """A teacher must predict exactly the dataset's classes."""
    theirs = [(c["id"], c["name"]) for c in ckpt["classes"]]
    ours = [(c.id, c.name) for c in classes]
    if theirs != ours:
        raise CheckpointError(f"--teacher {path}: predicts classes {theirs}, but the dataset's classes.json lists {ours}. "
                              "Use a teacher trained on this dataset's classes.")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over a network's weights and buffers: identifies the student that made a cache."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def soft_label(model, image: torch.Tensor, scales: Sequence[float], flip: bool,
               cif_scales: Sequence[float] | None = None) -> torch.Tensor:
    """Class probabilities [B, K, H, W]: with ``cif_scales``, the softmax of CIF multi-scale fusion (ScaleMatch);
    otherwise the mean softmax over ``scales`` (each resized back, as ST++'s test-time augmentation); with
    ``flip``, averaged with the horizontally flipped image's."""
    size = image.shape[-2:]

    def probs(x: torch.Tensor) -> list[torch.Tensor]:
        if cif_scales:
            return [model.forward_multiscale(x, cif_scales).softmax(1)]
        out = []
        for s in scales:
            xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=True)
            out.append(F.interpolate(model(xs).softmax(1), size=size, mode="bilinear", align_corners=True))
        return out

    members = probs(image)
    if flip:
        members += [p.flip(3) for p in probs(image.flip(3))]
    return torch.stack(members).mean(0)


@torch.no_grad()
def stability(models: Sequence, image: torch.Tensor, num_classes: int) -> float:
    """ST++'s reliability of one image: the mean over earlier checkpoints of the mIoU between their
    single-scale prediction and the final checkpoint's (classes absent from both do not count)."""
    preds = [m(image).argmax(1) for m in models]
    names = [str(k) for k in range(num_classes)]
    scores = [metrics_from_confusion(confusion_matrix(p, preds[-1], num_classes), names)["miou"] for p in preds[:-1]]
    return float(sum(scores) / len(scores))


def image_tensor(root: Path, image_id: str, device: torch.device) -> torch.Tensor:
    return T.to_tensor(load_image(image_path(root, image_id, "unlabeled")))[None].to(device)


def label_one(folder: Path, image_id: str, probs: torch.Tensor) -> dict:
    """Write one image's label and confidence PNGs; its manifest statistics."""
    conf, label = probs[0].max(0)
    write_mask(folder / "labels" / f"{image_id}.png", label.cpu().numpy().astype(np.uint8))
    write_mask(folder / "confidence" / f"{image_id}.png", (conf * 255).round().cpu().numpy().astype(np.uint8))
    return {"confidence": round(float(conf.mean()), 4), "confident": round(float((conf >= CONFIDENT).float().mean()), 4)}


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # only a hand-edited manifest breaks (it is written atomically); its labels are made again
    return manifest if isinstance(manifest, dict) and manifest.get("format") == CACHE_FORMAT else None


def _write_manifest(folder: Path, identity: dict, images: dict, complete: bool, seconds: float) -> None:
    manifest = {"format": CACHE_FORMAT, "identity": identity, "complete": complete, "seconds": round(seconds, 1),
                "images": images}
    write_text(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def label_pool(folder: Path, identity: dict, ids: Sequence[str], label: Callable[[str], dict], *, rebuild: bool,
               desc: str, progress: bool, log: Callable[[str], None] = print) -> dict[str, dict]:
    """Label ``ids`` into ``folder`` with ``label(id) -> statistics`` (which writes the PNGs), continuing a
    cache of the same ``identity``; {id: statistics}. A cache of another identity is replaced when
    ``rebuild``, refused otherwise."""
    manifest = read_manifest(folder)
    if manifest is not None and manifest["identity"] != identity:
        changed = sorted(k for k in {*identity, *manifest["identity"]} if identity.get(k) != manifest["identity"].get(k))
        if not rebuild:
            raise CheckpointError(f"{folder}: holds pseudo-labels made by another teacher or with other labelling settings "
                                  f"({', '.join(changed)} differ). Pass --force to label again (the cache is replaced), "
                                  "or choose another --out.")
        log(f"{folder}: made by another {', '.join(changed)}; labelling again")
        shutil.rmtree(folder)
        manifest = None
    remove_partial_writes(folder, (MANIFEST, "labels/**/*.png", "confidence/**/*.png"))  # an id may name a subfolder
    done = dict(manifest["images"]) if manifest else {}
    done = {i: s for i, s in done.items() if (folder / "labels" / f"{i}.png").is_file()}
    todo = [i for i in ids if i not in done]
    if not todo:
        if manifest is None or not manifest["complete"]:
            _write_manifest(folder, identity, done, True, manifest["seconds"] if manifest else 0.0)
        log(f"{desc}: reusing {len(ids)} cached pseudo-labels in {folder}")
        return {i: done[i] for i in ids}
    if done:
        log(f"{desc}: {len(done)} of {len(ids)} images already labelled in {folder}; continuing")
    seconds = manifest["seconds"] if manifest else 0.0
    start = last_write = time.time()
    for image_id in tqdm(todo, desc=desc, unit="img", disable=not progress, dynamic_ncols=True):
        done[image_id] = label(image_id)
        if time.time() - last_write >= MANIFEST_EVERY_S:
            _write_manifest(folder, identity, done, False, seconds + time.time() - start)
            last_write = time.time()
    _write_manifest(folder, identity, done, True, seconds + time.time() - start)
    return {i: done[i] for i in ids}


def rank_images(images: dict[str, dict]) -> tuple[list[str], str]:
    """Ids, most reliable first, and the criterion: ST++ stability when every image has it, else the
    teacher's mean confidence. Ties keep id order, so the ranking is reproducible."""
    by = "stability" if images and all(s.get("stability") is not None for s in images.values()) else "confidence"
    return sorted(images, key=lambda i: (-images[i][by], i)), by
