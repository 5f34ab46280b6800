"""`scaleseg demo`: the whole loop on embedded defaults, on CPU.

Synthesise a multi-scale dataset, train ScaleMatch briefly, print its metrics at x0.5 / x1 / x2, export
it (with per-class probabilities and the CIF multi-scale graph), start Label Studio locally unless a URL
is given, and launch the app; the URLs and the Label Studio login are printed. Steps already done in
OUT are reused, so a second run starts in seconds.
"""
from __future__ import annotations

import argparse
import json
import secrets
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scaleseg demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("demo"))
    p.add_argument("--iters", type=int, default=200, help="ScaleMatch training iterations")
    p.add_argument("--port", type=int, default=7860, help="app port")
    p.add_argument("--label-studio-url", default="", help="use this Label Studio instead of starting one")
    p.add_argument("--label-studio-token", default="")
    p.add_argument("--no-app", action="store_true", help="stop after training, evaluation and export")
    return p


def main(argv: list[str]) -> int:
    from export.package import export_package
    from training.cli import cmd_eval, cmd_train
    from training.data.synth import synthesize

    args = parser().parse_args(argv)
    out = args.out
    data, run, model = out / "data", out / "run", out / "model"
    if not (data / "classes.json").is_file():
        synthesize(data, num_classes=5, n_labeled=16, n_unlabeled=160, n_val=40, size=128, seed=0, force=True)
    if not (run / "best.pt").is_file():
        cmd_train([str(data), "--method", "scalematch", "--backbone", "resnet18", "--crop-size", "96", "--batch-size", "4",
                   "--max-iters", str(args.iters), "--eval-every", str(max(1, args.iters // 3)), "--lr", "0.01",
                   "--warmup-epochs", "2", "--out", str(run), "--force"])  # an interrupted demo run starts over
    cmd_eval(argparse.Namespace(checkpoint=str(run / "best.pt"), data=str(data), split="val", mode="whole", window=0,
                                scales=(0.5, 1.0, 2.0), cif_scales=None, device="auto", json=str(out / "eval.json")))
    if not (model / "meta.json").is_file():
        export_package(run / "best.pt", model, with_probs=True, cif_scales=(0.5, 2.0), data=data, force=True)
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
