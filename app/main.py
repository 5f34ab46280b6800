"""`scaleseg app MODEL DATA`: launch the web app."""
from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path

from training.config import MIN_CROP, below_floors, flag_name


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scaleseg app", description="The scaleseg web app (Gradio).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", type=Path, help="model package to start with (scaleseg export)")
    p.add_argument("data", type=Path, help="dataset folder the app adds images and labels to")
    p.add_argument("--work", type=Path, default=Path("scaleseg-work"), help="versions, runs and registry")
    p.add_argument("--serving-url", default="", help="use a running `scaleseg serve` endpoint instead of in-process inference")
    p.add_argument("--label-studio-url", default=os.environ.get("LABEL_STUDIO_URL", ""),
                   help="Label Studio to connect at start (env LABEL_STUDIO_URL); empty: connect in the app")
    # Secrets default to "" and are read from the environment after parsing, so --help never prints them.
    p.add_argument("--label-studio-token", default="",
                   help="Label Studio access token; empty: env LABEL_STUDIO_API_KEY (keeps it off the command line)")
    p.add_argument("--auth", default="",
                   help="user:password required to open the app; empty: env SCALESEG_APP_AUTH (keeps it off the command line)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; a non-loopback one needs --auth")
    p.add_argument("--allow-no-auth", action="store_true",
                   help="serve on a non-loopback --host without --auth (only behind a proxy that authenticates)")
    p.add_argument("--port", type=int, default=7860, help="HTTP port of the app")
    r = p.add_argument_group("retraining", "the Retrain tab's recipe; each defaults to the serving model's own training "
                             "config (its package's train_config)")
    r.add_argument("--method", help="default method of the Retrain tab")
    r.add_argument("--iterations", type=int, help="default iterations of the Retrain tab")
    r.add_argument("--crop-size", type=int, help="square training crop")
    r.add_argument("--batch-size", type=int, help="labelled images per step")
    r.add_argument("--optimizer", choices=["sgd", "adamw"], help="optimizer (--lr is its learning rate)")
    r.add_argument("--lr", type=float, help="backbone learning rate")
    r.add_argument("--backbone", help="encoder of a retraining from scratch")
    r.add_argument("--decoder", choices=["standard", "light"], help="DeepLabV3+ head of a retraining from scratch")
    r.add_argument("--pretrained", help="encoder weights of a retraining from scratch: imagenet, none or a .pth file")
    r.add_argument("--num-workers", type=int, help="data-loading worker processes")
    r.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"],
                   help="where retraining and evaluation run (default auto: CUDA, then Apple MPS, then CPU)")
    return p


RETRAIN_FLOORS = {"iterations": 1, "crop_size": MIN_CROP, "batch_size": 1, "num_workers": 0}  # as `scaleseg train` checks
RETRAIN_FLAGS = ("method", "iterations", "crop_size", "batch_size", "optimizer", "lr", "backbone", "decoder", "pretrained",
                 "num_workers", "device")


def retrain_overrides(args: argparse.Namespace) -> dict:
    """The retraining settings given on the command line (the rest come from the serving model)."""
    return {name: getattr(args, name) for name in RETRAIN_FLAGS if getattr(args, name) is not None}


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    args.auth = args.auth or os.environ.get("SCALESEG_APP_AUTH", "")
    args.label_studio_token = args.label_studio_token or os.environ.get("LABEL_STUDIO_API_KEY", "")
    auth = None
    if args.auth:
        if ":" not in args.auth:
            raise SystemExit("scaleseg app: --auth must be user:password")
        auth = tuple(args.auth.split(":", 1))
    if auth is None and not is_loopback(args.host) and not args.allow_no_auth:
        raise SystemExit(f"scaleseg app: --host {args.host} makes the app reachable from the network, and without --auth "
                         "anyone who reaches it can add images, push to Label Studio and promote models. Give --auth "
                         "user:password (or SCALESEG_APP_AUTH), or --allow-no-auth if a proxy in front authenticates.")
    if low := below_floors({flag_name(name): (getattr(args, name), floor) for name, floor in RETRAIN_FLOORS.items()}):
        raise SystemExit(f"scaleseg app: {low}.")
    from .ui import launch
    launch(args.model, args.data, args.work, args.host, args.port, args.serving_url, args.label_studio_url,
           args.label_studio_token, auth, retrain=retrain_overrides(args))
    return 0
