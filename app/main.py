"""`scaleseg app MODEL DATA`: launch the web app."""
from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path


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
    return p


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
    from .ui import launch
    launch(args.model, args.data, args.work, args.host, args.port, args.serving_url, args.label_studio_url,
           args.label_studio_token, auth)
    return 0
