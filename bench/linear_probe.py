"""Label headroom in minutes: a per-pixel linear probe on the frozen ImageNet encoder.

Fine-tuning a network until it levels off costs CPU-hours per run; a linear classifier on frozen features
costs a minute at most, and answers the question a label-efficiency study needs answered first: do more
labels buy accuracy on this benchmark, or do a few labelled images already cover every class? The probe
reads the encoder's four levels (upsampled to stride 4 and concatenated), standardises them on the
labelled pixels and fits multinomial logistic regression; val mIoU is scored at stride 4 over every val
image. It is not a substitute for fine-tuning (within a CPU budget it can score above or below it); its use
is the gap between fractions.

Datasets are the label-efficiency study's own (same pool, val set and per-seed labelled subsets), so the
numbers line up with its runs. Results: bench/results/linear_probe.{json,md}.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import RESULTS, machine, markdown_table, write_results  # noqa: E402
from bench.label_efficiency import labelled_subset, make_data  # noqa: E402
from training.data.folder import IGNORE, load_classes, read_split  # noqa: E402
from training.data.transforms import MEAN, STD  # noqa: E402
from training.evaluate import confusion_matrix, metrics_from_confusion  # noqa: E402
from training.models.encoders import build_encoder  # noqa: E402

FIT_STEPS = 300  # full-batch Adam steps; the training loss has levelled off well before
MAX_FIT_PIXELS = 250_000  # labelled pixels the fit sees (a random subset beyond this), to bound memory


@torch.no_grad()
def features(encoder, data: Path, image_id: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels x channels) stride-4 features of every encoder level and the (pixels,) labels under them."""
    img = np.asarray(Image.open(data / "images" / f"{image_id}.png").convert("RGB"), np.float32) / 255.0
    mask = np.asarray(Image.open(data / "masks" / f"{image_id}.png"))
    x = torch.from_numpy(((img - MEAN) / STD).transpose(2, 0, 1).copy()).float()[None]
    levels, h = [], encoder.stem(x)
    for layer in (encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4):
        h = layer(h)
        levels.append(h)
    grid = levels[0].shape[-2:]
    f = torch.cat([F.interpolate(t, size=grid, mode="bilinear", align_corners=True) for t in levels], 1)
    stride = img.shape[0] // grid[0]
    labels = torch.from_numpy(mask[stride // 2::stride, stride // 2::stride][:grid[0], :grid[1]].astype(np.int64))
    return f[0].flatten(1).T, labels.flatten()


def probe(train_x, train_y, val_x, val_y, num_classes: int, seed: int) -> tuple[float, list[float]]:
    """Val mIoU (and per-class IoU) of a linear classifier fitted on the labelled pixels."""
    keep = train_y != IGNORE
    train_x, train_y = train_x[keep], train_y[keep]
    gen = torch.Generator().manual_seed(seed)
    if len(train_y) > MAX_FIT_PIXELS:
        pick = torch.randperm(len(train_y), generator=gen)[:MAX_FIT_PIXELS]
        train_x, train_y = train_x[pick], train_y[pick]
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-5
    torch.manual_seed(seed)
    head = torch.nn.Linear(train_x.shape[1], num_classes)
    opt = torch.optim.Adam(head.parameters(), 1e-2, weight_decay=1e-4)
    train_x = (train_x - mu) / sd
    for _ in range(FIT_STEPS):
        loss = F.cross_entropy(head(train_x), train_y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = head((val_x - mu) / sd).argmax(1)
    result = metrics_from_confusion(confusion_matrix(pred, val_y, num_classes), [str(k) for k in range(num_classes)])
    return result["miou"], [None if v is None else round(v, 1) for v in result["iou"].values()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmarks", default="textures,photos")
    p.add_argument("--fractions", default="1/32,1/8,1")
    p.add_argument("--seeds", default="0,1,2", help="each seed labels a different subset of the pool")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--pool", type=int, default=600)
    p.add_argument("--n-val", type=int, default=120)
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--work", default=str(REPO / "runs" / "linear_probe"))
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args()
    encoder = build_encoder(args.backbone, 16, "imagenet").eval()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for benchmark in args.benchmarks.split(","):
        # One dataset with every pool image labelled holds the features; each (fraction, seed) picks its
        # subset as the study does, so the probe sees the study's labelled images.
        full = make_data(benchmark, Path(args.work) / benchmark, args.pool, 0, args.n_val, args.size, 0)
        generation_order = read_split(full, "labeled")
        pool = {i: features(encoder, full, i) for i in generation_order}
        val = [features(encoder, full, i) for i in read_split(full, "val")]
        val_x, val_y = torch.cat([v[0] for v in val]), torch.cat([v[1] for v in val])
        num_classes = len(load_classes(full))
        for fraction in args.fractions.split(","):
            scores = []
            for seed in seeds:
                n = max(1, round(args.pool * Fraction(fraction)))
                ids = labelled_subset(generation_order, n, seed)
                miou, per_class = probe(torch.cat([pool[i][0] for i in ids]), torch.cat([pool[i][1] for i in ids]),
                                        val_x, val_y, num_classes, seed)
                scores.append(miou)
                print(f"{benchmark} {fraction} seed {seed}: {n} labelled, val mIoU {miou:.1f} {per_class}", flush=True)
            rows.append({"benchmark": benchmark, "fraction": fraction, "labelled": n, "seeds": len(seeds),
                         "miou_mean": round(statistics.mean(scores), 2),
                         "miou_std": round(statistics.stdev(scores), 2) if len(scores) > 1 else 0.0,
                         "miou_per_seed": [round(s, 2) for s in scores]})
    table = markdown_table(rows, [("benchmark", "benchmark"), ("fraction", "labelled fraction"), ("labelled", "images"),
                                  ("miou_mean", "val mIoU (mean)"), ("miou_std", "std"), ("seeds", "seeds")])
    note = (f"Per-pixel linear probe on the frozen ImageNet {args.backbone} (all four levels at stride 4), fitted on "
            f"the labelled images of a {args.pool}-image pool, scored on {args.n_val} val images at {args.size} px. "
            "The gap between fractions is the headroom more labels can buy on each benchmark.")
    write_results("linear_probe", {"machine": machine(), "settings": vars(args), "rows": rows}, table, note,
                  Path(args.results))


if __name__ == "__main__":
    main()
