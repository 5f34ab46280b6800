"""Regenerate the app's screenshots (docs/screenshots/*.png) from the model `make demo` trains.

    python bench/screenshots.py [DEMO]          # DEMO: the demo folder (model/ and data/), default demo/

The app runs on a copy of DEMO/data (it adds labels, versions and a ranking there), with a local Label
Studio started as the demo starts it (its virtual environment in .venv-labelstudio, or SCALESEG_LS_VENV),
and headless Chromium (Debian's /usr/bin/chromium, as tests/test_app.py drives it) takes one page per tab:

  predict.png       the val image on which the model is most right: highest mIoU of the CIF prediction against
                    its mask among val images that show at least three object classes (the score is printed)
  unlabeled.png     the unlabelled pool ranked by entropy, top 8
  label-studio.png  those 8 pushed to Label Studio with the model's masks as pre-annotations
  retrain.png       a short supervised fine-tune from the serving model, exported, evaluated, promoted or not
  models.png        the versions with their mIoU, after that job
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CHROMIUM = Path("/usr/bin/chromium")
MIN_OBJECT_CLASSES = 3  # an image with one object on background would be "right" without showing much


def best_val_image(model: Path, data: Path) -> tuple[Path, float]:
    """(image, its mIoU in %) of the val image the package's CIF graph segments best."""
    from serving.segmenter import Segmenter
    from training.data.folder import find_image, load_classes, mask_path, read_mask, read_split
    from training.evaluate import confusion_matrix, metrics_from_confusion

    classes = [c.name for c in load_classes(data)]
    segmenter = Segmenter.load(model, cif=True, backend="onnxruntime")
    scored = []
    for image_id in read_split(data, "val"):
        mask = read_mask(mask_path(data, image_id))
        if len(set(np.unique(mask).tolist()) - {0, 255}) < MIN_OBJECT_CLASSES:
            continue
        path = find_image(data, image_id)
        labels, _ = segmenter.predict(path)
        cm = confusion_matrix(torch.from_numpy(labels.astype(np.int64)), torch.from_numpy(mask.astype(np.int64)), len(classes))
        scored.append((metrics_from_confusion(cm, classes)["miou"], path))
    if not scored:
        raise SystemExit(f"{data}: no val image shows {MIN_OBJECT_CLASSES} object classes; is it the demo's dataset?")
    miou, path = max(scored)
    print(f"predict.png: {path.name}, mIoU {miou:.1f} % against its mask (best of {len(scored)} val images "
          f"with >= {MIN_OBJECT_CLASSES} object classes; median {np.median([s for s, _ in scored]):.1f} %)", flush=True)
    return path, miou


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shoot(url: str, image: Path, shots: Path, retrain_iters: int) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.get_by_role("button", name="Segment").wait_for()
        page.locator("input[type=file]").first.set_input_files(str(image))
        page.get_by_role("button", name="Segment").click()
        page.locator("#overlay img").wait_for(timeout=120_000)
        page.locator("#predict-info").get_by_text("ms").wait_for(timeout=120_000)
        page.screenshot(path=str(shots / "predict.png"), full_page=True)

        page.get_by_role("tab", name="Unlabeled").click()
        page.get_by_role("button", name="Score and rank").click()
        page.locator("#rank-report").get_by_text("Selected").wait_for(timeout=600_000)
        time.sleep(2.0)  # the gallery's thumbnails load after the report
        page.screenshot(path=str(shots / "unlabeled.png"), full_page=True)

        page.get_by_role("tab", name="Label Studio").click()
        page.get_by_role("button", name="Push selection with pre-annotations").click()
        page.locator("#ls-status").get_by_text("pending").wait_for(timeout=300_000)
        page.screenshot(path=str(shots / "label-studio.png"), full_page=True)

        page.get_by_role("tab", name="Retrain").click()
        page.get_by_label("Method").click()
        page.get_by_role("option", name="supervised", exact=True).click()
        page.get_by_label("Iterations").fill(str(retrain_iters))
        page.get_by_role("button", name="Start retraining").click()
        page.locator("#retrain-status").get_by_text("mIoU").wait_for(timeout=1_800_000)  # the job's closing message
        time.sleep(3.0)  # one more tick of the loss plot
        page.screenshot(path=str(shots / "retrain.png"), full_page=True)

        # A fresh page draws the plot from the registry; redrawn in place after the job, it once showed v1 only.
        page.reload()
        page.get_by_role("button", name="Segment").wait_for()
        page.get_by_role("tab", name="Models").click()
        page.locator("#promote-report").wait_for(state="attached")
        time.sleep(3.0)
        page.screenshot(path=str(shots / "models.png"), full_page=True)
        browser.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("demo", type=Path, nargs="?", default=Path("demo"), help="folder `make demo` wrote (model/, data/)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "screenshots",
                   help="folder for the PNG files")
    p.add_argument("--retrain-iters", type=int, default=20, help="iterations of the Retrain tab's job")
    args = p.parse_args()
    model, data = args.demo / "model", args.demo / "data"
    if not (model / "meta.json").is_file() or not (data / "classes.json").is_file():
        raise SystemExit(f"{args.demo}: expected model/ and data/ from `make demo` (or `scaleseg demo --out "
                         f"{args.demo} --no-app`).")
    if not CHROMIUM.exists():
        raise SystemExit(f"{CHROMIUM}: not found; install Debian's chromium (apt-get install chromium).")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from app.local_labelstudio import start
    from app.ui import App

    image, _ = best_val_image(model, data)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="scaleseg-screenshots-") as tmp:
        tmp = Path(tmp)
        shutil.copytree(data, tmp / "data")  # the demo's own dataset stays as it is
        server = start(tmp / "label-studio")
        try:
            app = App(model, tmp / "data", tmp / "work", ls_url=server.url, ls_token=server.token)
            demo = app.blocks()
            demo.queue(default_concurrency_limit=1)
            port = free_port()
            demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, ssr_mode=False, quiet=True)
            try:
                shoot(f"http://127.0.0.1:{port}/", image, args.out, args.retrain_iters)
            finally:
                demo.close()
        finally:
            server.stop()
    print(f"wrote {', '.join(sorted(f.name for f in args.out.glob('*.png')))} in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
