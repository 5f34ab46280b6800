"""Label efficiency on a synthetic multi-scale set: every method, the same data (~1/16 labelled), the
same iteration budget, seed and optimiser, ResNet-18 DeepLabV3+ from random init (no pretrained weights
can be fetched here).

Per method: mIoU of the final model (no checkpoint selection on val) at input scales x0.5, x1.0, x2.0,
peak memory (each method trains in its own process so peak RSS is its own) and seconds per iteration,
timed after all training in one quiet pass (one optimiser step on fixed inputs, the data loader excluded)
so that nothing else running during the long training phase skews the comparison.
ScaleMatch is also scored with CIF multi-scale inference (the paper's dagger rows). Finally ScaleMatch's
cost claim: its scale branch (v drawn from V) against naively adding a second full-resolution input.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, markdown_table, write_results  # noqa: E402
from bench.train_speed import time_method  # noqa: E402

METHODS = ["supervised", "meanteacher", "fixmatch", "cps", "unimatch", "scalematch"]


def run_one(args) -> dict:
    """Train and evaluate one method in this process; prints its JSON row."""
    from training.checkpoint import load_checkpoint, load_inference_model
    from training.cli import parse_train_args
    from training.data.datasets import EvalSet
    from training.data.folder import read_split
    from training.engine import Trainer
    from training.evaluate import evaluate

    out = Path(args.work) / args.one
    argv = [str(args.data), "--method", args.one, "--backbone", "resnet18", "--crop-size", str(args.crop),
            "--batch-size", str(args.batch), "--max-iters", str(args.iters), "--eval-every", str(args.iters),
            "--save-every", str(args.iters), "--lr", str(args.lr), "--seed", str(args.seed), "--num-workers", "1",
            "--out", str(out), "--device", "cpu"]
    if args.one == "scalematch":
        argv += ["--warmup-epochs", str(args.warmup_epochs)]
    trainer = Trainer(parse_train_args(argv), progress=False)
    trainer.fit()
    model, classes, _ = load_inference_model(load_checkpoint(out / "last.pt"))
    names = [c["name"] for c in classes]
    val = EvalSet(args.data, read_split(args.data, "val"), len(names))
    with torch.inference_mode():
        res = evaluate(model, val, names, torch.device("cpu"), scales=(0.5, 1.0, 2.0))
        row = {"method": args.one, **{f"miou_x{s}": res["scales"][s]["miou"] for s in res["scales"]}}
        if model.cif is not None:
            cif = evaluate(model, val, names, torch.device("cpu"), cif_scales=(0.5, 2.0))
            row["miou_cif"] = cif["scales"]["1.0"]["miou"]
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("ROW " + json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--iters", type=int, default=800, help="training iterations per method (same for all)")
    p.add_argument("--crop", type=int, default=96)
    p.add_argument("--batch", type=int, default=4, help="labelled images per step (unlabelled: the same)")
    p.add_argument("--lr", type=float, default=0.01, help="backbone LR (head x10), random init")
    p.add_argument("--warmup-epochs", type=int, default=1, help="ScaleMatch warm-up; the paper's 10/80 epochs scaled to this budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-labeled", type=int, default=20)
    p.add_argument("--n-unlabeled", type=int, default=300)
    p.add_argument("--n-val", type=int, default=60)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        run_one(args)
        return

    from training.data.synth import synthesize
    work = Path(tempfile.mkdtemp(prefix="scaleseg-bench-"))
    data = synthesize(work / "data", 5, args.n_labeled, args.n_unlabeled, args.n_val, 128, args.seed, progress=False)
    rows = []
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--one", method, "--data", str(data), "--work", str(work)]
        for key in ("iters", "crop", "batch", "lr", "warmup_epochs", "seed"):
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        print(f"== {method}", flush=True)
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(next(line for line in out.splitlines() if line.startswith("ROW "))[4:]))
        print(rows[-1], flush=True)

    for row in rows:
        row["sec_per_iter"] = time_method(row["method"], "resnet18", args.crop, args.batch, 5, torch.device("cpu"))["sec_per_iter"]
    # ScaleMatch's cost: the second view at scale v in V, against a second full-resolution input (v = 1).
    cost = time_method("scalematch", "resnet18", args.crop, args.batch, 5, torch.device("cpu"), scales=(0.25, 0.5, 1.5, 2.0, 1.0))
    by_v = cost["sec_per_iter_by_scale"]
    expected = sum(by_v[str(v)] for v in (0.25, 0.5, 1.5, 2.0)) / 4
    cost_rows = [{"variant": f"second view at x{v}", "sec_per_iter": by_v[str(v)]} for v in (0.25, 0.5, 1.5, 2.0)]
    cost_rows += [{"variant": "ScaleMatch: v drawn uniformly from V (expected)", "sec_per_iter": expected},
                  {"variant": "naive: second full-resolution input (v = 1)", "sec_per_iter": by_v["1.0"]}]

    table = markdown_table(rows, [("method", "method"), ("miou_x0.5", "mIoU x0.5"), ("miou_x1.0", "mIoU x1.0"),
                                  ("miou_x2.0", "mIoU x2.0"), ("miou_cif", "mIoU CIF (0.5,1,2)"),
                                  ("sec_per_iter", "s / iter"), ("peak_rss_mib", "peak RSS MiB")])
    cost_table = markdown_table(cost_rows, [("variant", "ScaleMatch iteration"), ("sec_per_iter", "s / iter")])
    note = (f"Synthetic multi-scale set: {args.n_labeled} labelled / {args.n_unlabeled} unlabelled / {args.n_val} val "
            f"images of 128 px, 5 classes (1/{round((args.n_labeled + args.n_unlabeled) / args.n_labeled)} labelled). "
            f"ResNet-18 DeepLabV3+ from random init, crop {args.crop}, batch {args.batch}+{args.batch}, "
            f"{args.iters} iterations, SGD lr {args.lr} (head x10), poly, seed {args.seed}, one run each. "
            "mIoU of the final model on val, no selection; peak RSS is the whole training process on CPU.")
    write_results("label_efficiency", {"machine": machine(), "args": vars(args), "rows": rows, "scalematch_cost": cost_rows},
                  table + "\n\n" + cost_table, note)


if __name__ == "__main__":
    main()
