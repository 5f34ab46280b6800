"""`scaleseg label push|pull|status|simulate`: the labeling loop from the command line, for scripts."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tqdm import tqdm

from . import acquisition


def _connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get("LABEL_STUDIO_URL", "http://127.0.0.1:8080"),
                   help="Label Studio URL (env LABEL_STUDIO_URL)")
    # The token defaults to "" and is read from the environment after parsing, so --help never prints it.
    p.add_argument("--token", default="", help="Label Studio access token; empty: env LABEL_STUDIO_API_KEY")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scaleseg label", description="Active labeling with Label Studio.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    push = sub.add_parser("push", help="pick unlabelled images, push them with the model's masks (or, with no model "
                          "yet, without pre-annotations)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    push.add_argument("model", type=Path, nargs="?", default=None,
                      help="model package (scaleseg export); leave it out for a cold start: images picked by coreset on "
                           "ImageNet features or at random, pushed without pre-annotations")
    push.add_argument("data", type=Path, help="dataset folder")
    push.add_argument("-k", "--top-k", type=int, default=8, help="images to send for labeling")
    push.add_argument("--function", default=None, choices=acquisition.FUNCTIONS + ("random",),
                      help="uncertainty (entropy, margin, least_confidence, scale_disagreement), diversity-aware "
                           "(coreset: k-center greedy on encoder features; combined: most uncertain of k feature clusters) "
                           "or random; default: entropy with a model, coreset without")
    push.add_argument("--seed", type=int, default=0, help="seed of --function random")
    push.add_argument("--balance", type=float, default=1.0,
                      help="class balancing of an uncertainty selection; 0 = plain top-k")
    push.add_argument("--project", default="scaleseg", help="Label Studio project title (created if missing)")
    push.add_argument("--switch-project", action="store_true",
                      help="push to --project although this dataset's tasks are in another project")
    push.add_argument("--delivery", default="local", choices=["local", "upload"],
                      help="local: Label Studio serves DATA/images through a local-files storage (same machine); "
                           "upload: the images are uploaded")
    _connection(push)
    pull = sub.add_parser("pull", help="write finished annotations into DATA/masks and splits/labeled.txt",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pull.add_argument("data", type=Path, help="dataset folder the tasks were pushed from")
    pull.add_argument("--overwrite", action="store_true", help="replace existing human masks that differ")
    pull.add_argument("--replace-val", action="append", default=[], metavar="ID",
                      help="replace this validation image's mask with its annotation (repeat per image; never "
                           "added to the training splits)")
    _connection(pull)
    status = sub.add_parser("status", help="what was pushed, what is labelled, what is pending",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    status.add_argument("data", type=Path, help="dataset folder the tasks were pushed from")
    _connection(status)
    sim = sub.add_parser("simulate", help="the labeling loop with an oracle: mIoU against labelled images per strategy",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                         description="Start from --initial labelled images of DATA's pool (its labelled and unlabelled "
                                     "images that have masks); each round select -k with a strategy, reveal their masks, "
                                     "fine-tune and score val. Running it again continues an interrupted simulation.")
    sim.add_argument("data", type=Path, help="dataset folder whose pool images have masks")
    sim.add_argument("--out", type=Path, default=Path("simulation"), help="rounds, checkpoints and results")
    sim.add_argument("--strategies", default="random,entropy,coreset,combined",
                     help=f"comma-separated, from: {', '.join(('random',) + acquisition.FUNCTIONS)}")
    sim.add_argument("--initial", type=int, default=8, help="labelled images at the start (the same for every strategy)")
    sim.add_argument("-k", "--top-k", type=int, default=8, help="images labelled per round")
    sim.add_argument("--rounds", type=int, default=4, help="selection rounds")
    sim.add_argument("--method", default="supervised", help="training method of every round")
    sim.add_argument("--iters", type=int, default=200, help="fine-tuning iterations per round after round 0")
    sim.add_argument("--initial-iters", type=int, default=None,
                     help="round 0's iterations, trained once and shared by every strategy (default: --iters)")
    sim.add_argument("--init-from", type=Path, default=None,
                     help="start round 0 from this checkpoint (e.g. a supervised run on other data) instead of random init")
    sim.add_argument("--crop-size", type=int, default=96, help="training crop of every round")
    sim.add_argument("--batch-size", type=int, default=4, help="labelled (and unlabelled) images per step")
    sim.add_argument("--backbone", default="efficientnet_lite0", help="encoder of every round's network")
    sim.add_argument("--pretrained", default="imagenet", help="round 0's encoder weights: imagenet, none or a .pth file")
    sim.add_argument("--lr", type=float, default=0.01, help="backbone learning rate (head x10)")
    sim.add_argument("--balance", type=float, default=1.0, help="class balancing of the uncertainty strategies")
    sim.add_argument("--seed", type=int, default=0, help="initial labelled set, random picks and training")
    sim.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    return p


def simulate_main(args: argparse.Namespace) -> int:
    from .simulate import SimulationError, simulate

    settings = {"strategies": [s.strip() for s in args.strategies.split(",") if s.strip()], "initial": args.initial,
                "k": args.top_k, "rounds": args.rounds, "method": args.method, "iters": args.iters,
                "initial_iters": args.iters if args.initial_iters is None else args.initial_iters,
                "init_from": str(args.init_from.resolve()) if args.init_from else "",
                "crop_size": args.crop_size, "batch_size": args.batch_size, "backbone": args.backbone,
                "pretrained": args.pretrained, "lr": args.lr,
                "balance": args.balance, "seed": args.seed, "device": args.device}
    try:
        simulate(args.data, args.out, settings)
    except SimulationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out / 'simulation.json'}, simulation.md and simulation.png")
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    p = parser()
    args, extra = p.parse_known_args(argv)
    # `push MODEL -k 8 DATA` (options between the two paths) parsed before MODEL became optional; argparse
    # then takes MODEL for DATA and leaves DATA over.
    if args.command == "push" and args.model is None and len(extra) == 1 and not extra[0].startswith("-"):
        args.model, args.data = args.data, Path(extra[0])
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "push":
        args.function = args.function or ("entropy" if args.model else "coreset")
        if args.model is None:  # before connecting to Label Studio or reading any image
            try:
                acquisition.check_cold_start(args.function)
            except ValueError as err:
                raise SystemExit(f"scaleseg label push: {err}") from None
    return args


def select(args: argparse.Namespace) -> dict[str, dict | None]:
    """image id -> its pre-annotation (None without a model) of the images `label push` sends."""
    from .labeling import load_state, tasked
    from .scoring import score_unlabeled, select_next, select_without_model

    function = args.function
    bar = tqdm(desc="features" if not args.model and function == "coreset" else "scoring", unit="img")

    def step(fraction: float, message: str) -> None:
        bar.update(1)

    try:
        if args.model is None or function == "random":
            chosen = tasked(load_state(args.data))  # already in Label Studio: pick others
            ids = select_without_model(args.data, function, args.top_k, args.seed, chosen, progress=step)
            if args.model is None:
                return dict.fromkeys(ids)
            picks = score_unlabeled(args.model, args.data, "least_confidence", ids=ids, progress=step)
        else:
            picks = select_next(args.model, args.data, function, args.top_k, args.balance, progress=step)[1]
    except ValueError as err:
        raise SystemExit(f"scaleseg label push: {err}") from None
    finally:
        bar.close()
    return {s.image_id: {"labels": s.labels, "confidence": s.confidence, "score": s.score} for s in picks}


def main(argv: list[str]) -> int:
    from .labeling import pull, push, status
    from .labelstudio import LabelStudio

    args = parse(argv)
    if args.command == "simulate":
        return simulate_main(args)
    client = LabelStudio(args.url, args.token or os.environ.get("LABEL_STUDIO_API_KEY", ""))
    try:
        if args.command == "push":
            client.whoami()  # fail fast on a wrong URL or token, before scoring anything
            preds = select(args)
            report = push(client, args.data, preds, args.model.resolve().name if args.model else None, args.project,
                          args.delivery, switch_project=args.switch_project)
            print(f"project {report.project_id}: pushed {len(report.pushed)} task(s) {report.pushed}; "
                  f"{len(report.already)} already there" + ("" if args.model else " (no pre-annotations: no model yet)"))
        elif args.command == "pull":
            report = pull(client, args.data, args.overwrite, replace_val=args.replace_val)
            print(f"written {len(report.written)}, unchanged {len(report.unchanged)}, skipped {len(report.skipped)}, "
                  f"pending {len(report.pending)}, conflicts {len(report.conflicts)} {report.conflicts}")
            if report.imported:
                print(f"  {len(report.imported)} of the written from tasks made in Label Studio: {report.imported}")
            if report.effort:
                print(f"  {report.effort_summary()}")
            for image_id, message in report.errors.items():
                print(f"  error {image_id}: {message}")
            if report.conflicts:
                print("  conflicting human masks were kept; pass --overwrite to replace them")
            if report.protected:
                print(f"  validation images kept their masks: {report.protected}; pass --replace-val ID to replace one")
            return 1 if report.errors else 0
        else:
            print(f"{args.url}: {status(client, args.data).summary()}")
    finally:
        client.close()
    return 0
