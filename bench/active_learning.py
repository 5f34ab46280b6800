"""Active learning: does choosing what to label save labels? Every selection strategy on the same pool, budget
and seeds, on the label-efficiency benchmarks (by default `recoloured`, the one where labels pay most).

One simulation is (benchmark, seed): `scaleseg label simulate`'s code (app/simulate.py) with every strategy,
all starting from the same ``--initial`` labelled images (the seed draws them and seeds training), each round
labelling ``-k`` more and fine-tuning from the round before. The pool and val set are generated once per
benchmark, as in bench/label_efficiency.py. Simulations live in ``--work`` and continue where they stopped.
Results: bench/results/NAME.{json,md} and NAME_curves.png, mean +- std over seeds, with the labels each
strategy needs to reach random selection's final mIoU.

The defaults are the study on the ImageNet encoder (written to bench/results/active_learning_pretrained.*). The
earlier study from random init (bench/results/active_learning.*) was
``--benchmarks synthetic,textures --backbone resnet18 --pretrained none --method scalematch
--strategies random,entropy,margin,least_confidence,scale_disagreement,coreset,combined --initial 8 -k 8
--rounds 3 --iters 60 --initial-iters 400 --crop-size 64 --batch-size 2 --pool 120 --size 64 --n-val 40
--work runs/active_learning --name active_learning``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.simulate import simulate  # noqa: E402
from bench.common import RESULTS, machine, mean_std, plot_bands, write_results  # noqa: E402
from bench.label_efficiency import make_data  # noqa: E402

STRATEGIES = ["random", "entropy", "margin", "least_confidence", "scale_disagreement", "coreset", "combined"]
BUDGET_KEYS = ("backbone", "pretrained", "method", "initial", "k", "rounds", "iters", "initial_iters", "crop_size",
               "batch_size", "lr", "pool", "size", "n_val")


def rows_of(benchmark: str, seed: int, payload: dict) -> list[dict]:
    """One row per (strategy, round) of a simulation's result."""
    return [{"benchmark": benchmark, "seed": seed, "strategy": strategy, "labeled": r["labeled"], "miou": r["miou"],
             "effort": r["effort"]} for strategy, rounds in payload["curves"].items() for r in rounds]


def labels_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """The fewest labelled images at which a (labelled, mIoU) curve reaches ``target``; None if it never does."""
    return next((n for n, miou in sorted(curve) if miou >= target), None)


def summarise(rows: list[dict]) -> list[dict]:
    """One line per (benchmark, strategy): the mean +- std curve over seeds, the final mIoU, the mean labelling
    effort, the labels its mean curve needs to reach random's final mean mIoU (and that as a fraction of
    random's labels), its final mIoU gain over random paired by seed (the seeds' shared start cancels), and, for
    scale disagreement, its mean mIoU gain over entropy paired by seed and round."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["benchmark"], r["strategy"]), []).append(r)
    out = []
    for (bench, strategy), rs in sorted(groups.items(), key=lambda g: (g[0][0], STRATEGIES.index(g[0][1]))):
        counts = sorted({r["labeled"] for r in rs})
        curve = [{"labeled": n, "miou": mean_std([r["miou"] for r in rs if r["labeled"] == n])} for n in counts]
        efforts = [r["effort"] for r in rs if r["effort"] is not None]
        out.append({"benchmark": bench, "strategy": strategy, "seeds": sorted({r["seed"] for r in rs}), "curve": curve,
                    "final_miou": curve[-1]["miou"], "effort": mean_std(efforts) if efforts else None})
    for line in out:
        random_line = next((r for r in out if (r["benchmark"], r["strategy"]) == (line["benchmark"], "random")), None)
        if random_line is None:
            continue
        target, random_labels = random_line["final_miou"][0], random_line["curve"][-1]["labeled"]
        needed = labels_to_reach([(p["labeled"], p["miou"][0]) for p in line["curve"]], target)
        line["labels_to_random_final"] = needed
        line["label_fraction_of_random"] = None if needed is None else needed / random_labels
    for line in out:
        if line["strategy"] == "random":
            continue
        final = {r["seed"]: r["miou"] for r in groups.get((line["benchmark"], "random"), [])
                 if r["labeled"] == line["curve"][-1]["labeled"]}
        gains = [r["miou"] - final[r["seed"]] for r in groups[(line["benchmark"], line["strategy"])]
                 if r["labeled"] == line["curve"][-1]["labeled"] and r["seed"] in final]
        line["final_gain_over_random"] = mean_std(gains) if gains else None
    for line in out:
        if line["strategy"] == "scale_disagreement":
            by = {(r["seed"], r["labeled"]): r["miou"] for r in groups.get((line["benchmark"], "entropy"), [])}
            gains = [r["miou"] - by[(r["seed"], r["labeled"])] for r in groups[(line["benchmark"], "scale_disagreement")]
                     if (r["seed"], r["labeled"]) in by]
            line["gain_over_entropy"] = mean_std(gains) if gains else None
    return out


def markdown(summary: list[dict]) -> str:
    def cell(v, scale=1.0):
        return "-" if v is None else f"{scale * v[0]:.1f} ± {scale * v[1]:.1f}"
    lines = []
    for bench in sorted({s["benchmark"] for s in summary}):
        lines_b = [s for s in summary if s["benchmark"] == bench]
        counts = [p["labeled"] for p in lines_b[0]["curve"]]
        scale = any(s["strategy"] == "scale_disagreement" for s in lines_b)
        lines += [f"### {bench}", "",
                  "| strategy | seeds | " + " | ".join(f"mIoU @{n}" for n in counts)
                  + " | labels to reach random's final mIoU | final gain over random | labelling effort % |"
                  + (" gain over entropy |" if scale else ""),
                  "|---|---|" + "---|" * len(counts) + "---|---|---|" + ("---|" if scale else "")]
        for s in lines_b:
            by_n = {p["labeled"]: p["miou"] for p in s["curve"]}
            needed = s.get("labels_to_random_final")
            fraction = s.get("label_fraction_of_random")
            reach = "-" if "labels_to_random_final" not in s else (
                "not reached" if needed is None else f"{needed} ({100 * fraction:.0f} %)")
            lines.append(f"| {s['strategy']} | {len(s['seeds'])} | " + " | ".join(cell(by_n.get(n)) for n in counts)
                         + f" | {reach} | {cell(s.get('final_gain_over_random'))} | {cell(s['effort'], 100)} |"
                         + (f" {cell(s.get('gain_over_entropy'))} |" if scale else ""))
        lines.append("")
    return "\n".join(lines)


def plot_curves(summary: list[dict], path: Path) -> None:
    panels = [(bench, [(f"{s['strategy']} ({len(s['seeds'])} seeds)", [p["labeled"] for p in s["curve"]],
                        [p["miou"][0] for p in s["curve"]], [p["miou"][1] for p in s["curve"]])
                       for s in summary if s["benchmark"] == bench])
              for bench in sorted({s["benchmark"] for s in summary})]
    plot_bands(path, panels, "labelled images", marker="o")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmarks", default="recoloured")
    p.add_argument("--strategies", default=",".join(s for s in STRATEGIES if s != "scale_disagreement"),
                   help="scale_disagreement needs --method scalematch (its CIF graph)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--pretrained", default="imagenet", help="round 0's encoder weights")
    p.add_argument("--method", default="supervised", help="training of every round (scalematch for scale "
                   "disagreement, at about 3x the step)")
    p.add_argument("--initial", type=int, default=10, help="labelled images at the start")
    # 10 + 5 x 6 = 40: 28 labels, the 70 % goal, is a point of the grid.
    p.add_argument("-k", type=int, default=6, help="images labelled per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=300, help="fine-tuning iterations per round")
    p.add_argument("--initial-iters", type=int, default=1200, help="round 0's iterations, trained once per seed and "
                   "shared by every strategy")
    p.add_argument("--crop-size", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.005, help="every round's learning rate, round 0's too; with "
                   "0.01, a trial's 40-iteration fine-tunes from random init lost mIoU (28 to 20 over four rounds)")
    p.add_argument("--pool", type=int, default=600, help="images the oracle can reveal (the label-efficiency study's "
                   "pool, same generator seed)")
    p.add_argument("--size", type=int, default=160, help="image side of every benchmark")
    p.add_argument("--n-val", type=int, default=120)
    p.add_argument("--work", default=str(REPO / "runs" / "active_learning_pretrained"))
    p.add_argument("--results", default=str(RESULTS), help="folder for the JSON, Markdown and PNG results")
    p.add_argument("--name", default="active_learning_pretrained", help="results file name (NAME.json, NAME.md, "
                   "NAME_curves.png)")
    args = p.parse_args()
    budget = {key: getattr(args, key) for key in BUDGET_KEYS}
    rows = []
    for bench in args.benchmarks.split(","):
        data = make_data(bench, Path(args.work) / bench / "data", args.initial, args.pool - args.initial, args.n_val,
                         args.size, 0)
        for seed in map(int, args.seeds.split(",")):
            settings = {"strategies": args.strategies.split(","), "initial": args.initial, "k": args.k,
                        "rounds": args.rounds, "method": args.method, "iters": args.iters,
                        "initial_iters": args.initial_iters, "init_from": "", "crop_size": args.crop_size,
                        "batch_size": args.batch_size, "backbone": args.backbone, "pretrained": args.pretrained,
                        "lr": args.lr, "balance": 1.0,
                        "seed": seed, "device": "cpu"}
            payload = simulate(data, Path(args.work) / bench / f"seed{seed}", settings,
                               progress=lambda m, b=bench, s=seed: print(f"[{b} seed {s}] {m}", flush=True))
            rows += rows_of(bench, seed, payload)
    publish(rows, budget, Path(args.results), args.name)


def publish(rows: list[dict], budget: dict, results: Path, name: str = "active_learning") -> None:
    summary = summarise(rows)
    results.mkdir(parents=True, exist_ok=True)
    plot_curves(summary, results / f"{name}_curves.png")
    # Budgets from before encoders were a choice hold neither key: those studies trained ResNet-18 from random init.
    weights = budget.get("pretrained", "none")
    init = {"imagenet": "ImageNet", "none": "random init"}.get(weights, weights)
    note = (f"`scaleseg label simulate` on {', '.join(sorted({r['benchmark'] for r in rows}))}: DeepLabV3+ on "
            f"{budget.get('backbone', 'resnet18')} ({init}) trained with {budget['method']}, "
            f"{budget['initial']} labelled images to start, {budget['k']} more per round for {budget['rounds']} rounds, "
            f"round 0 trained {budget['initial_iters']} iterations once per seed and shared by every strategy, each "
            f"later round fine-tuned {budget['iters']} iterations from the one before (crop {budget['crop_size']}, batch "
            f"{budget['batch_size']}, lr {budget['lr']}), pool of {budget['pool']} images of {budget['size']} px, "
            f"{budget['n_val']} val images. mIoU x1.0 on val, mean ± std over seeds; labels to reach random's final mIoU "
            "read off the mean curves (the fraction is of random's labels); final gain over random: the last "
            "round's mIoU minus random's, paired by seed; labelling effort: share of pre-annotated "
            "pixels the oracle's masks correct"
            + ("; gain over entropy: scale disagreement minus entropy, paired by seed and round"
               if any(r["strategy"] == "scale_disagreement" for r in rows) else "")
            + f".\n\n![curves]({name}_curves.png)")
    write_results(name, {"machine": machine(), "budget": budget, "summary": summary, "rows": rows},
                  markdown(summary), note, results, script="active_learning")


if __name__ == "__main__":
    main()
