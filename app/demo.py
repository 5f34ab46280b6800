"""`scaleseg demo`: the whole loop on embedded defaults, on CPU.

Synthesise a multi-scale dataset, train a model in two stages (supervised on the labelled images, then
ScaleMatch from those weights on labelled + unlabelled images), print its per-class IoU at x0.5 / x1 / x2,
export it (with per-class probabilities and the CIF multi-scale graph), start Label Studio locally unless
a URL is given, and launch the app; the URLs and the Label Studio login are printed. Steps already done
in OUT are reused, so a second run starts in seconds.

Why two stages: ScaleMatch's pseudo-labels and CIF gate are only as good as the network that makes them.
A short supervised stage on the ImageNet EfficientNet-Lite0 encoder (its weights are installed with
scaleseg, so nothing is downloaded) gives that network in a few minutes; ScaleMatch then adds the
unlabelled images and trains CIF for multi-scale inference.
"""
from __future__ import annotations

import argparse
import json
import secrets
import time
from pathlib import Path

# Demo data: 5 classes at 128 px; enough labelled images that every class is seen at many scales. Up to 8
# objects per image (the generator's default is 5): with 5, background is 91 % of the labelled pixels and the
# triangle 1.2 %, and 2,000 iterations did not reliably learn it (docs/benchmarks.md, "The demo's recipe").
DATA = {"num_classes": 5, "n_labeled": 64, "n_unlabeled": 192, "n_val": 48, "size": 128, "seed": 0, "max_objects": 8}
COMMON = ["--config", "small-data", "--num-workers", "1"]  # training/recipes/small-data.yaml
SCALEMATCH_LR = 0.005  # SGD, as the paper: after AdamW, on one seed, it gained 1.5 mIoU where AdamW at 1e-4 gained none
# The supervised stage trains at the small-data recipe's AdamW lr; with 700 iterations the triangle and the ring are
# within 4 points of 70 on one seed (docs/benchmarks.md, the demo's recipe). A ScaleMatch iteration costs about 6
# supervised ones: 800 + 100 trained in 3.0 +- 0.2 minutes on 2 cores (4.0-4.5 at the slower speeds measured before),
# under the 5-minute budget.
SUPERVISED_ITERS, SCALEMATCH_ITERS = 800, 100


def precision_flags(cpu_bf16: bool) -> list[str]:
    """bfloat16 autocast where the CPU computes it natively: 1.3-1.4x faster on Lite0 (bench/train_speed.py
    --ratios); elsewhere emulated bf16 is slower than float32, so the demo stays float32 there."""
    return ["--amp-cpu"] if cpu_bf16 else []


def precision_note(device: str, cpu_bf16: bool) -> str:
    """The line that says where and in which precision the demo trains, and why, before the minutes it costs."""
    if device != "cpu":
        return f"precision: float32 on {device}"
    if cpu_bf16:
        return "precision: bfloat16 autocast (this CPU computes it natively)"
    return ("precision: float32 (this CPU has no native bfloat16); training takes several times as long as "
            "on a CPU with AVX512-BF16")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scaleseg demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("demo"), help="folder for the data, runs, model and logs")
    p.add_argument("--supervised-iters", type=int, default=SUPERVISED_ITERS, help="stage 1: supervised iterations")
    p.add_argument("--iters", type=int, default=SCALEMATCH_ITERS,
                   help="stage 2: ScaleMatch iterations from the stage-1 weights")
    p.add_argument("--port", type=int, default=7860, help="app port")
    p.add_argument("--label-studio-url", default="", help="use this Label Studio instead of starting one")
    p.add_argument("--label-studio-token", default="", help="access token of --label-studio-url")
    p.add_argument("--no-app", action="store_true", help="stop after training, evaluation and export")
    return p


def stage_args(data: Path, warm: Path, run: Path, supervised_iters: int, iters: int, seed: int = 0,
               scalematch_lr: float = SCALEMATCH_LR, cpu_bf16: bool = False) -> tuple[list[str], list[str]]:
    """`scaleseg train` arguments of the two stages (bench/demo_recipe.py measures this same recipe)."""
    common = [str(data), *COMMON, *precision_flags(cpu_bf16), "--seed", str(seed), "--force"]
    supervised = ["--method", "supervised", "--max-iters", str(supervised_iters),
                  "--eval-every", str(-(-supervised_iters // 3)), "--out", str(warm)]
    scalematch = ["--method", "scalematch", "--max-iters", str(iters), "--optimizer", "sgd", "--lr", str(scalematch_lr),
                  "--warmup-epochs", "1", "--eval-every", str(iters), "--init-from", str(warm / "last.pt"), "--out", str(run)]
    return common + supervised, common + scalematch


def run_stage(argv: list[str], folder: Path) -> bool:
    """Train one stage unless it already finished; an interrupted stage resumes from its last checkpoint.
    Whether it ran."""
    from training.checkpoint import training_finished
    from training.cli import cmd_train
    last = folder / "last.pt"
    if training_finished(last):
        return False
    cmd_train([("--resume" if last.is_file() else a) if a == "--force" else a for a in argv])
    return True


def train(data: Path, out: Path, args) -> Path:
    """The two-stage recipe; a finished stage is reused, an interrupted one resumes."""
    from training.engine import cpu_has_bf16, device_kind
    warm, run = out / "run-supervised", out / "run"
    cpu_bf16 = cpu_has_bf16()
    supervised, scalematch = stage_args(data, warm, run, args.supervised_iters, args.iters, cpu_bf16=cpu_bf16)
    print(precision_note(device_kind("auto"), cpu_bf16), flush=True)  # the stages train on --device auto
    stages = [("supervised", args.supervised_iters, warm, supervised),
              ("ScaleMatch from the supervised weights", args.iters, run, scalematch)]
    for i, (name, iters, folder, argv) in enumerate(stages, 1):
        start = time.monotonic()
        print(f"stage {i}/2: {name}, {iters} iterations", flush=True)
        if run_stage(argv, folder):
            print(f"stage {i}/2 took {(time.monotonic() - start) / 60:.1f} min", flush=True)
        else:
            print(f"stage {i}/2: already trained in {folder}", flush=True)
    return run / "last.pt"


def summary(out: Path, checkpoint: Path, model: Path, report: dict) -> str:
    x1 = report["scales"]["1.0"]
    weakest = min((v, k) for k, v in x1["iou"].items() if v is not None)
    lines = [
        "",
        "scaleseg demo: done",
        f"  checkpoint   {checkpoint}",
        f"  model        {model}  (model.onnx, model.cif.onnx, meta.json)",
        f"  metrics      {out / 'eval.json'}",
        "  mIoU         " + "  ".join(f"x{s}: {r['miou']:.1f}" for s, r in report["scales"].items()),
        f"  weakest class at x1.0: {weakest[1]} ({weakest[0]:.1f} IoU)",
        "next:",
        f"  scaleseg serve {model} --port 8000                 # Open Inference Protocol v2 endpoint",
        f"  scaleseg eval {checkpoint} {out / 'data'} --cif-scales 0.5,2 --scales 1   # CIF multi-scale inference",
        f"  scaleseg app {model} {out / 'data'}   # predict, rank, label, retrain",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from export.package import export_package
    from training.cli import build_parser, cmd_eval
    from training.data.synth import synthesize

    args = parser().parse_args(argv)
    out = args.out
    data, model = out / "data", out / "model"
    if not (data / "classes.json").is_file():
        synthesize(data, force=True, **DATA)
    checkpoint = train(data, out, args)
    cmd_eval(build_parser().parse_args(["eval", str(checkpoint), str(data), "--json", str(out / "eval.json")]))
    if not (model / "meta.json").is_file():
        export_package(checkpoint, model, with_probs=True, cif_scales=(0.5, 2.0), data=data, force=True)
    print(summary(out, checkpoint, model, json.loads((out / "eval.json").read_text())), flush=True)
    if args.no_app:
        return 0

    url, token, server = args.label_studio_url, args.label_studio_token, None
    if not url:
        from .local_labelstudio import start
        login = out / "label-studio" / "login.json"
        creds = json.loads(login.read_text()) if login.is_file() else {
            "username": "admin@scaleseg.local", "password": secrets.token_urlsafe(9), "token": secrets.token_hex(20)}
        login.parent.mkdir(parents=True, exist_ok=True)
        login.write_text(json.dumps(creds))
        server = start(out / "label-studio", token=creds["token"], username=creds["username"], password=creds["password"])
        url, token = server.url, server.token
        print(f"Label Studio: {url}  (login {creds['username']} / {creds['password']})", flush=True)
    from .ui import launch
    print(f"scaleseg app: http://127.0.0.1:{args.port}/  (Ctrl-C to stop)", flush=True)
    try:
        launch(model, data, out / "work", port=args.port, ls_url=url, ls_token=token)
    finally:
        if server is not None:
            server.stop()
    return 0
