"""Does a benchmark contradict the strong augmentation? Trained models are scored on val images that went
through each part of A_s, the strong view FixMatch, UniMatch, ScaleMatch, CutMix-Seg and selftrain train
unlabelled images on (colour jitter, grayscale, Gaussian blur; training/data/transforms.py).

A consistency loss asks the network to predict, on the strong view, the weak view's labels. Where a part of
A_s takes a class's IoU away even from a model trained with strong views, the view no longer shows what
tells that class apart, and the loss asks for something the image does not hold: a benchmark whose classes
are told apart by colour (the issue the `synthetic` set had) contradicts colour jitter and grayscale.

    python bench/augment_sensitivity.py runs/headroom_tex/textures/1_32/{supervised,fixmatch,unimatch}/seed0

Each RUN is a `scaleseg train --out` folder (its last.pt is scored, on the dataset it trained on unless
``--data`` says otherwise). Runs in folders of the same name (METHOD/seedN, as bench/label_efficiency.py
lays them out) are one method: mean ± std over them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import RESULTS, machine, mean_std, require_finished_runs, run_data, write_results  # noqa: E402
from training.checkpoint import load_checkpoint, load_inference_model  # noqa: E402
from training.data import transforms as T  # noqa: E402
from training.data.datasets import EvalSet  # noqa: E402
from training.data.folder import load_classes, read_split  # noqa: E402
from training.evaluate import score  # noqa: E402

VIEWS = {  # name -> PIL image, rng -> the image as the network sees it
    "none": lambda img, rng: img,
    "blur r1": lambda img, rng: T.blur(img, 1.0),
    "blur r2": lambda img, rng: T.blur(img, 2.0),  # A_s draws radii up to 2
    "colour jitter": T.colour_jitter,
    "grayscale": lambda img, rng: T.grayscale(img),
    "strong A_s": T.strong,
}


class ViewSet(EvalSet):
    """Val images through one view; each image's random draw is seeded by its index, so every model and run
    sees the same views."""

    def __init__(self, root: Path, ids: list[str], num_classes: int, view):
        super().__init__(root, ids, num_classes, normalise=False)
        self.view = view

    def __getitem__(self, index: int) -> dict:
        sample = super().__getitem__(index)
        img = Image.fromarray(sample["image"].permute(1, 2, 0).numpy())
        return {**sample, "image": T.to_tensor(self.view(img, np.random.default_rng(index)))}


def sensitivity(run: Path, data: Path | None = None) -> dict:
    """mIoU and per-class IoU of ``run``'s last checkpoint on val through each view."""
    data = data or run_data(run)
    model = load_inference_model(load_checkpoint(run / "last.pt"), run / "last.pt")[0].eval()
    names = [c.name for c in load_classes(data)]
    ids = read_split(data, "val")
    views = {}
    with torch.no_grad():
        for name, view in VIEWS.items():
            scored = score(lambda x: model(x).argmax(1), ViewSet(data, ids, len(names), view), names, torch.device("cpu"))["1.0"]
            views[name] = {"miou": scored["miou"], "iou": scored["iou"]}
    return {"run": str(run), "method": run.parent.name, "seed": run.name, "views": views}


def summarise(rows: list[dict]) -> list[dict]:
    """Per method: each view's mIoU and per-class IoU, mean ± std over its runs (a class absent from val: None)."""
    def ms(values):
        values = [v for v in values if v is not None]
        return mean_std(values) if values else None
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        line = {"method": method, "runs": len(rs), "views": {}}
        for view in VIEWS:
            line["views"][view] = {"miou": ms([r["views"][view]["miou"] for r in rs]),
                                   "iou": {c: ms([r["views"][view]["iou"][c] for r in rs]) for c in rs[0]["views"][view]["iou"]}}
        out.append(line)
    return out


def markdown(summary: list[dict]) -> str:
    def cell(v):
        return "-" if v is None else f"{v[0]:.1f} ± {v[1]:.1f}" if v[1] else f"{v[0]:.1f}"
    lines = []
    for line in summary:
        classes = list(line["views"]["none"]["iou"])
        lines += [f"### {line['method']} ({line['runs']} run{'s' if line['runs'] > 1 else ''})", "",
                  "| view | mIoU | " + " | ".join(classes) + " |", "|---|---|" + "---|" * len(classes)]
        for view, v in line["views"].items():
            lines.append(f"| {view} | {cell(v['miou'])} | " + " | ".join(cell(v["iou"][c]) for c in classes) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="`scaleseg train --out` folders (METHOD/seedN)")
    p.add_argument("--data", type=Path, default=None, help="dataset to score on (default: each run's own)")
    p.add_argument("--name", default="augment_sensitivity", help="results file name (NAME.json, NAME.md)")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args()
    require_finished_runs(args.runs)
    rows = []
    for run in args.runs:
        rows.append(sensitivity(run, args.data))
        print(f"{run}: " + ", ".join(f"{k} {v['miou']:.1f}" for k, v in rows[-1]["views"].items()), flush=True)
    summary = summarise(rows)
    note = ("mIoU (and IoU per class) of each model's final checkpoint on val at x1.0, every image through one "
            "part of the strong augmentation A_s (its draws seeded per image, the same for every model): colour "
            "jitter (0.5, 0.5, 0.5, 0.25), grayscale, Gaussian blur of radius 1 and 2 (A_s draws 0.1-2), and A_s "
            "itself (jitter p 0.8, grayscale p 0.2, blur p 0.5). A view that takes a class away from models "
            "trained with strong views contradicts the consistency loss on that benchmark.")
    write_results(args.name, {"machine": machine(), "views": list(VIEWS), "summary": summary, "rows": rows},
                  markdown(summary), note, args.results, script="augment_sensitivity")


if __name__ == "__main__":
    main()
