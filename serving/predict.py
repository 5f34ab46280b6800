"""`scaleseg predict MODEL SOURCES... --out DIR`: masks on disk for image files, folders, globs and videos.

Per image it writes OUT/masks/<name>.png (8-bit class ids, with the class colours as the PNG palette),
OUT/overlays/<name>.png (the image with the colours blended in) and, with --confidence,
OUT/confidence/<name>.png (max softmax x 255); then OUT/predictions.json and OUT/predictions.csv with each
image's size, mean confidence and per-class areas. Each file is written to a temp file and renamed. Video
frames (read with OpenCV) are named <video>/frame_<n>. One image is held at a time. An image that cannot
be read or segmented is listed with the reason and the others go on; the exit status is then 1.
"""
from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .backends import BackendError
from .imaging import class_stats, mask_png, overlay, png_bytes
from .precision import PRECISIONS
from .segmenter import Segmenter, as_rgb

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}


def expand_sources(sources: list[str]) -> list[tuple[Path, str]]:
    """(file, output name without extension) for every image or video the sources name: files, folders
    (searched recursively; names keep the sub-folders) and glob patterns. Names are unique."""
    found, missing = [], []
    for text in sources:
        matches = [Path(text)] if Path(text).exists() else sorted(Path(p) for p in glob.glob(text, recursive=True))
        if not matches:
            missing.append(text)
        for match in matches:
            if match.is_dir():
                found += [(p, p.relative_to(match).with_suffix("").as_posix()) for p in sorted(match.rglob("*"))
                          if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES
                          and not any(part.startswith(".") for part in p.relative_to(match).parts)]
            elif match.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
                found.append((match, match.stem))
            elif Path(text).exists():
                missing.append(f"{text} (not an image or video file: {', '.join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))})")
    if missing:
        raise FileNotFoundError(f"nothing to segment in {', '.join(missing)}. Pass image or video files, folders or "
                                "quoted glob patterns.")
    seen, out = set(), []
    for path, name in dict.fromkeys(found):
        unique, n = name, 1
        while unique in seen:
            n += 1
            unique = f"{name}_{n}"
        seen.add(unique)
        out.append((path, unique))
    return out


def video_frames(path: Path, every: int) -> Iterator[tuple[str, np.ndarray]]:
    """(frame_<n>, RGB frame) for every ``every``-th frame of a video, read by OpenCV one frame at a time."""
    try:
        import cv2
    except ImportError:
        raise ValueError("reading video needs OpenCV: pip install opencv-python-headless") from None
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise ValueError("OpenCV cannot open this video (unknown codec or damaged file)")
    try:
        n = 0
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            if n % every == 0:
                yield f"frame_{n:06d}", cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            n += 1
    finally:
        capture.release()


def frame_count(path: Path) -> int:
    try:
        import cv2
    except ImportError:
        return 1
    capture = cv2.VideoCapture(str(path))
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if capture.isOpened() else 1
    capture.release()
    return max(1, count)


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def progress_bar(total: int, enabled: bool) -> Callable[[str], None]:
    """One step per image: tqdm where it is installed (a serving image may lack it), else a line every 10 %."""
    if not enabled:
        return lambda name: None
    try:
        from tqdm import tqdm
    except ImportError:
        done = [0]

        def step(name: str) -> None:
            done[0] += 1
            if done[0] == total or done[0] % max(1, total // 10) == 0:
                print(f"predict: {done[0]}/{total} {name}", file=sys.stderr)
        return step
    bar = tqdm(total=total, desc="predict", unit="img")

    def step(name: str) -> None:
        bar.update(1)
        if bar.n >= total:
            bar.close()
    return step


def predict_sources(segmenter: Segmenter, sources: list[str], out: str | Path, overlays: bool = True,
                    confidence: bool = False, tile: bool = False, every: int = 1, alpha: float = 0.5,
                    progress: bool = False) -> dict:
    """Segment every image and video frame of ``sources`` into ``out``; returns the summary written to
    predictions.json ({"images": [...], "failed": {name: reason}})."""
    out = Path(out)
    # A folder source that holds OUT would feed earlier outputs back in on a second run.
    items = [(p, n) for p, n in expand_sources(sources) if out.resolve() not in p.resolve().parents]
    total = sum(-(-frame_count(p) // every) if p.suffix.lower() in VIDEO_SUFFIXES else 1 for p, _ in items)
    step = progress_bar(total, progress)
    classes = segmenter.classes
    rows, failed = [], {}

    def one(name: str, image) -> None:
        try:
            rgb = as_rgb(image)
            labels, conf = segmenter.predict(rgb, tile=tile)
        except (ValueError, OSError) as err:
            failed[name] = getattr(err, "strerror", None) or str(err)
            return
        write_atomic(out / "masks" / f"{name}.png", mask_png(labels, classes))
        if overlays:
            write_atomic(out / "overlays" / f"{name}.png", png_bytes(overlay(rgb, labels, classes, alpha)))
        if confidence:
            write_atomic(out / "confidence" / f"{name}.png", png_bytes(np.round(conf * 255).astype(np.uint8)))
        stats = class_stats(labels, conf, classes)
        rows.append({"name": name, "mask": f"masks/{name}.png", "width": int(labels.shape[1]), "height": int(labels.shape[0]), **stats})

    for path, name in items:
        if path.suffix.lower() in VIDEO_SUFFIXES:
            try:
                for frame_name, frame in video_frames(path, every):
                    one(f"{name}/{frame_name}", frame)
                    step(frame_name)
            except ValueError as err:
                failed[str(path)] = str(err)
        else:
            one(name, path)
            step(name)
    summary = {"model": segmenter.description, "classes": classes, "images": rows, "failed": failed}
    write_atomic(out / "predictions.json", json.dumps(summary, indent=2).encode())
    write_atomic(out / "predictions.csv", _csv(rows, classes).encode())
    return summary


def _csv(rows: list[dict], classes: list[dict]) -> str:
    """One row per image: size, mean confidence and each class's area fraction."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["name", "mask", "width", "height", "mean_confidence", *(f"{c['name']}_fraction" for c in classes)])
    for r in rows:
        writer.writerow([r["name"], r["mask"], r["width"], r["height"], f"{r['mean_confidence']:.4f}",
                         *(f"{c['fraction']:.4f}" for c in r["classes"])])
    return buf.getvalue()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scaleseg predict", description="Segment image files, folders, globs and videos "
                                "with a model package (or a checkpoint) and write masks, overlays and per-image stats.")
    p.add_argument("model", help="model package folder written by `scaleseg export`, or a training checkpoint (.pt)")
    p.add_argument("sources", nargs="+", help="image or video files, folders (searched recursively) or quoted glob patterns")
    p.add_argument("--out", required=True, help="output folder (masks/, overlays/, predictions.json, predictions.csv)")
    p.add_argument("--cif", action="store_true", help="run the package's CIF multi-scale graph (model.cif.onnx)")
    p.add_argument("--tile", action="store_true", help="segment images larger than one pass takes in overlapping tiles "
                   "instead of refusing them")
    p.add_argument("--overlays", action=argparse.BooleanOptionalAction, default=True, help="write colour overlays (default: %(default)s)")
    p.add_argument("--confidence", action="store_true", help="also write confidence maps (max softmax x 255)")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the class colours, 0..1 (default: %(default)s)")
    p.add_argument("--every", type=int, default=1, help="videos: segment every N-th frame (default: %(default)s)")
    p.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt"],
                   help="packages: auto takes a TensorRT engine built for this GPU when present, else ONNX Runtime (default: %(default)s)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="packages: as `scaleseg serve --precision` (default: %(default)s)")
    p.add_argument("--cif-scales", default="0.5,2.0", help="checkpoints with --cif: the scales fused with 1.0 (default: %(default)s)")
    p.add_argument("--device", default="auto", help="checkpoints: torch device (auto, cpu, cuda) (default: %(default)s)")
    return p


def main(argv: list[str] | None = None, load_checkpoint: Callable[[argparse.Namespace], Segmenter] | None = None) -> int:
    """``load_checkpoint`` builds a Segmenter over a checkpoint; the export stage passes it (serving cannot read
    checkpoints), so without it only packages are accepted."""
    args = parser().parse_args(argv)
    if args.every < 1 or not 0 <= args.alpha <= 1:
        raise SystemExit("scaleseg predict: --every must be >= 1 and --alpha within 0..1")
    model = Path(args.model)
    if model.is_file():
        if load_checkpoint is None:
            raise BackendError(f"{model}: a checkpoint; this installation predicts from model packages only. Export it "
                               "with `scaleseg export` and pass the package folder.")
        segmenter = load_checkpoint(args)
    else:
        segmenter = Segmenter.load(model, cif=args.cif, backend=args.backend, precision=args.precision)
    summary = predict_sources(segmenter, args.sources, args.out, args.overlays, args.confidence, args.tile, args.every,
                              args.alpha, progress=True)
    print(f"{len(summary['images'])} image(s) segmented into {args.out} ({segmenter.description})")
    for name, why in summary["failed"].items():
        print(f"  failed: {name}: {why}", file=sys.stderr)
    return 1 if summary["failed"] else 0
