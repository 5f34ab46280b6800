"""What batch-norm statistics left by training cost at inference: each run's val mIoU (x1.0, the exported model)
with the running statistics as trained, and with them recomputed from the final weights on clean training images
(training/bn_stats.py): the labelled images alone, and every training image (labelled and unlabelled).

    python bench/bn_statistics.py runs/headroom_tex/textures/1_32/{cct,cutmixseg}/seed*

Runs in folders of the same name (METHOD/seedN, as bench/label_efficiency.py lays them out) are one method:
mean ± std over them, and the change paired by run.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import (batch_runs_arguments, machine, markdown_table, mean_std, run_data,  # noqa: E402
                          whole_image_batches, write_results)
from training.bn_stats import recompute_bn_statistics  # noqa: E402
from training.checkpoint import load_checkpoint, load_inference_model  # noqa: E402
from training.data.datasets import EvalSet  # noqa: E402
from training.data.folder import load_classes, read_split  # noqa: E402
from training.evaluate import evaluate  # noqa: E402

SOURCES = {"labelled": ("labeled",), "all training images": ("labeled", "unlabeled")}


def val_miou(model, data: Path, names: list[str]) -> float:
    val = EvalSet(data, read_split(data, "val"), len(names))
    return round(evaluate(model, val, names, torch.device("cpu"))["scales"]["1.0"]["miou"], 2)


def score_run(run: Path, batch: int, data: Path | None = None) -> dict:
    data = data or run_data(run)
    names = [c.name for c in load_classes(data)]
    ckpt = load_checkpoint(run / "last.pt")

    def clean_images(splits):
        for split in splits:
            for x, _ in whole_image_batches(data, read_split(data, split), len(names), split, batch, masks=False):
                yield x
    row = {"run": str(run), "method": run.parent.name, "seed": run.name,
           "as trained": val_miou(load_inference_model(ckpt, run / "last.pt")[0].eval(), data, names)}
    for source, splits in SOURCES.items():
        model = load_inference_model(ckpt, run / "last.pt")[0]
        recompute_bn_statistics(model, clean_images(splits))
        row[source] = val_miou(model.eval(), data, names)
    print(f"{run}: {row}", flush=True)
    return row


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        line = {"method": method, "runs": len(rs), "as trained": mean_std([r["as trained"] for r in rs])}
        for source in SOURCES:
            line[source] = mean_std([r[source] for r in rs])
            line[f"{source} change"] = mean_std([r[source] - r["as trained"] for r in rs])
        out.append(line)
    return out


def markdown(summary: list[dict]) -> str:
    def cell(v):
        return f"{v[0]:.1f} ± {v[1]:.1f}"
    rows = [{k: (cell(v) if isinstance(v, tuple) else v) for k, v in line.items()} for line in summary]
    return markdown_table(rows, [("method", "method"), ("runs", "runs"), ("as trained", "val mIoU as trained"),
                                 *[(k, f"recomputed on {k}") for s in SOURCES for k in (s, f"{s} change")]])


def main() -> None:
    args = batch_runs_arguments(__doc__, "bn_statistics", "`scaleseg train --out` folders (METHOD/seedN)",
                                "images per batch while recomputing (the study's batch)")
    rows = []
    for run in dict.fromkeys(args.runs):  # a run named twice is scored once
        rows.append(score_run(run, args.batch))
        publish(rows, args)  # written as each run is scored, so a long list shows its results as it goes


def publish(rows: list[dict], args) -> None:
    summary = summarise(rows)
    note = ("Val mIoU at x1.0 of each run's exported model (last.pt): with the batch-norm running statistics training "
            f"left, and with them recomputed from the final weights as the population statistics of batches of {args.batch} "
            "whole, unaugmented training images (the labelled ones, or every training image). Changes are paired by run.")
    write_results(args.name, {"machine": machine(), "batch": args.batch, "summary": summary, "rows": rows},
                  markdown(summary), note, args.results, script="bn_statistics")


if __name__ == "__main__":
    main()
