"""`make demo`'s recipe over seeds: does it learn every class (each >= 70 IoU at x1.0) in at most 5 minutes
of training on 2 cores, and what does its ScaleMatch stage add to the supervised stage?

Trains the demo's two stages (app/demo.py `stage_args`, the same commands) on the demo data for each seed,
with the ScaleMatch stage at each of ``--scalematch-lrs``. Runs live in ``--work``; a finished stage is reused,
so an interrupted study continues where it stopped. Training time is the sum of the seconds per iteration the
runs log (evaluation and start-up excluded). Results: bench/results/demo_recipe.{json,md}, mean +- std over seeds.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.demo import (COMMON, DATA, SCALEMATCH_ITERS, SCALEMATCH_LR, SUPERVISED_ITERS, precision_flags,  # noqa: E402
                      run_stage, stage_args)
from bench.common import machine, markdown_table, mean_std, write_results  # noqa: E402
from training.data.synth import synthesize  # noqa: E402
from training.engine import cpu_has_bf16  # noqa: E402

TARGET_IOU, TARGET_MINUTES = 70.0, 5.0


def run_result(run: Path) -> dict:
    """A finished run's last val evaluation (x1.0) and its training seconds, from its metrics.jsonl."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last_val = [r for r in records if "val" in r][-1]["val"]
    return {"miou": last_val["miou"], "iou": last_val["iou"], "train_s": sum(r.get("sec_per_iter", 0.0) for r in records)}


def recipe_slug(argv: list[str]) -> str:
    """A folder name for a stage's recipe: its iterations and a hash of every flag but the seed and the
    folders (its own, and the one it starts from), so a changed recipe never reuses another's runs."""
    kept, args = [], iter(argv[1:])
    for arg in args:
        if arg in ("--seed", "--out", "--init-from"):
            next(args, None)
        else:
            kept.append(arg)
    iters = argv[argv.index("--max-iters") + 1]
    return f"{iters}-{hashlib.sha1(' '.join(kept).encode()).hexdigest()[:8]}"


def summarise(rows: list[dict]) -> list[dict]:
    """One line per recipe: mean +- std of mIoU, of each class's IoU and of the training minutes; the weakest
    class IoU over all seeds, and whether every seed met both targets."""
    out = []
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        rs = [r for r in rows if r["recipe"] == recipe]
        classes = list(rs[0]["iou"])
        worst = min((r["iou"][c], c, r["seed"]) for r in rs for c in classes)
        out.append({"recipe": recipe, "seeds": [r["seed"] for r in rs], "miou": mean_std([r["miou"] for r in rs]),
                    "iou": {c: mean_std([r["iou"][c] for r in rs]) for c in classes},
                    "minutes": mean_std([r["train_s"] / 60 for r in rs]),
                    "weakest": {"iou": worst[0], "class": worst[1], "seed": worst[2]},
                    "meets_target": all(min(r["iou"].values()) >= TARGET_IOU and r["train_s"] / 60 <= TARGET_MINUTES
                                        for r in rs)})
    return out


def table(summary: list[dict]) -> str:
    fmt = "{0:.1f} ± {1:.1f}".format
    classes = list(summary[0]["iou"])
    rows = [{"recipe": s["recipe"], "miou": fmt(*s["miou"]), **{c: fmt(*s["iou"][c]) for c in classes},
             "weakest": f"{s['weakest']['iou']:.1f} ({s['weakest']['class']}, seed {s['weakest']['seed']})",
             "minutes": fmt(*s["minutes"]), "target": "yes" if s["meets_target"] else "no"} for s in summary]
    return markdown_table(rows, [("recipe", "recipe"), ("miou", "mIoU x1.0"), *[(c, c) for c in classes],
                                 ("weakest", "weakest class, any seed"), ("minutes", "training min"),
                                 ("target", f"every class >= {TARGET_IOU:.0f} in <= {TARGET_MINUTES:.0f} min, every seed")])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=str(REPO / "runs" / "demo_recipe"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--supervised-iters", type=int, default=SUPERVISED_ITERS)
    p.add_argument("--iters", type=int, default=SCALEMATCH_ITERS, help="ScaleMatch stage iterations")
    p.add_argument("--scalematch-lrs", type=float, nargs="*", default=[SCALEMATCH_LR],
                   help="one ScaleMatch stage per lr; none measures the supervised stage alone")
    p.add_argument("--supervised-flags", default="",
                   help="extra `scaleseg train` flags of the supervised stage, to screen a recipe change "
                        "(e.g. '--class-weights balanced'); the ScaleMatch stage starts from that stage")
    p.add_argument("--scalematch-flags", default="",
                   help="extra `scaleseg train` flags of the ScaleMatch stage (e.g. '--optimizer sgd')")
    p.add_argument("--name", default="demo_recipe", help="results name")
    p.add_argument("--results", default=None, help="results folder (default bench/results)")
    args = p.parse_args(argv)
    work = Path(args.work)
    data = work / "data"
    if not (data / "classes.json").is_file():
        synthesize(data, force=True, **DATA)
    flags, stage2_flags = shlex.split(args.supervised_flags), shlex.split(args.scalematch_flags)
    bf16 = cpu_has_bf16()
    slug = recipe_slug(stage_args(data, work, work, args.supervised_iters, args.iters, 0, cpu_bf16=bf16)[0] + flags)
    label = f"supervised {args.supervised_iters}" + (f" {args.supervised_flags}" if flags else "")
    rows = []
    for seed in args.seeds:
        warm = work / f"seed{seed}" / f"supervised{slug}"
        supervised, _ = stage_args(data, warm, warm, args.supervised_iters, args.iters, seed, cpu_bf16=bf16)
        run_stage(supervised + flags, warm)
        first = run_result(warm)
        rows.append({"recipe": label, "seed": seed, **first})
        for lr in args.scalematch_lrs:
            recipe = recipe_slug(stage_args(data, warm, warm, args.supervised_iters, args.iters, seed, lr, bf16)[1]
                                 + stage2_flags)
            run = work / f"seed{seed}" / f"scalematch{recipe}-after{slug}"
            _, scalematch = stage_args(data, warm, run, args.supervised_iters, args.iters, seed, lr, bf16)
            run_stage(scalematch + stage2_flags, run)
            second = run_result(run)
            extra = f" {args.scalematch_flags}" if stage2_flags else ""
            rows.append({"recipe": f"+ ScaleMatch {args.iters}, lr {lr:g}{extra}", "seed": seed, **second,
                         "train_s": first["train_s"] + second["train_s"]})
    summary = summarise(rows)
    payload = {"machine": machine(), "data": DATA, "supervised_iters": args.supervised_iters,
               "supervised_flags": args.supervised_flags, "scalematch_flags": args.scalematch_flags, "iters": args.iters,
               "rows": rows, "summary": summary}
    note = (f"The demo data (`app/demo.py` DATA), `app/demo.py` settings ({' '.join(COMMON + precision_flags(bf16))}), "
            f"val mIoU at x1.0 after each stage; seeds {args.seeds}. The ScaleMatch rows' minutes include the "
            "supervised stage they start from.")
    kwargs = {"results": Path(args.results)} if args.results else {}
    write_results(args.name, payload, table(summary), note, script="demo_recipe", **kwargs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
