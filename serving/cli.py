"""`scaleseg serve MODEL`: the Open Inference Protocol v2 endpoint over an exported model package."""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .connections import ConnectionDeadlines, DeadlineH11Protocol
from .environment import warn_broken_install
from .limits import BYTES_PER_WORK_PIXEL, RequestLimits
from .precision import PRECISIONS
from .server import ServeConfig, app_from_env, config_to_env, create_app

KEY_ENV = "SCALESEG_API_KEY"
log = logging.getLogger("scaleseg.serving")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scaleseg serve", description="Serve a model package over HTTP (KServe v2 / Triton protocol).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_dir", help="package folder written by `scaleseg export`")
    p.add_argument("--name", default="", help="model name in URLs; empty: the folder's name")
    p.add_argument("--backend", default="auto", choices=["auto", "tensorrt", "onnxruntime"],
                   help="auto: the package's TensorRT engine for this GPU when it loads and warms up, else ONNX Runtime")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="fp32, or int8: the package's CPU INT8 graphs (`scaleseg export --quantize int8`); auto: "
                        "int8 where the package has INT8 graphs that passed their accuracy gate, else fp32")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--max-batch", type=int, default=8, help="most images per request and per executed batch")
    p.add_argument("--max-delay-ms", type=float, default=5.0, help="longest a request waits for batch partners")
    p.add_argument("--max-queue", type=int, default=64, help="images allowed to wait; beyond it requests get 503")
    p.add_argument("--workers", type=int, default=1, help="server processes, each with its own model copy")
    p.add_argument("--api-key", default="", help=f"require this key (X-API-Key or Authorization: Bearer); visible in "
                                                 f"`ps`, so prefer ${KEY_ENV} or --api-key-file")
    p.add_argument("--api-key-file", default="", help="read the key from this file (first line)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body in MB; larger ones get 413")
    p.add_argument("--max-work-pixels", type=int, default=RequestLimits.max_work_pixels,
                   help="most pixels of work per request and per executed batch: height x width x images x the graph's "
                        f"sum of squared scales (CIF 0.5,1,2 costs 5.25 per pixel); about {BYTES_PER_WORK_PIXEL} bytes "
                        "of memory each on CPU")
    p.add_argument("--max-json-values", type=int, default=RequestLimits.max_json_values,
                   help="most output values answered as JSON text; larger outputs must be asked for as binary")
    p.add_argument("--model-repository", default="",
                   help="folder whose model packages POST /v2/repository/models/NAME/load may load; empty: "
                        "only MODEL_DIR reloads")
    p.add_argument("--max-models", type=int, default=4, help="most models loaded at once (a package with a CIF graph is two)")
    p.add_argument("--header-timeout", type=float, default=ConnectionDeadlines.header_s,
                   help="seconds a request's line and headers may take in all; past it: 408 and the connection closes")
    p.add_argument("--body-timeout", type=float, default=ConnectionDeadlines.body_s,
                   help="seconds a request body may take in all, plus its Content-Length at --min-body-kbps; past it: 408")
    p.add_argument("--min-body-kbps", type=float, default=ConnectionDeadlines.min_body_rate / 1000,
                   help="slowest upload, in kB/s, that the body deadline leaves time for")
    p.add_argument("--grpc-port", type=int, default=0,
                   help="also serve the KServe v2 gRPC protocol (tritonclient.grpc) on this port, on --host; 0: off")
    return p


def api_key(args) -> str:
    """The key from --api-key-file, $SCALESEG_API_KEY or --api-key, in that order."""
    if args.api_key_file:
        try:
            lines = Path(args.api_key_file).read_text().splitlines()
        except OSError as err:
            raise SystemExit(f"--api-key-file {args.api_key_file}: cannot read it ({err.strerror})") from None
        if not lines or not lines[0].strip():
            raise SystemExit(f"--api-key-file {args.api_key_file}: the file is empty; put the key on its first line")
        return lines[0].strip()
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV]
    if args.api_key:
        log.warning("--api-key shows the key to anyone who can list processes; use $%s or --api-key-file", KEY_ENV)
    return args.api_key


def main(argv: list[str]) -> int:
    import uvicorn

    args = parser().parse_args(argv)
    warn_broken_install()  # the images start here, not through `scaleseg`
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for flag in ("header_timeout", "body_timeout", "min_body_kbps"):
        if not getattr(args, flag) > 0:
            raise SystemExit(f"--{flag.replace('_', '-')} must be a positive number, got {getattr(args, flag)}")
    cfg = ServeConfig(args.model_dir, args.name, args.backend, args.max_batch, args.max_delay_ms, args.max_queue,
                      api_key(args), args.max_upload_mb, args.max_work_pixels, args.model_repository, args.max_models,
                      args.max_json_values, args.workers, grpc_port=args.grpc_port, grpc_host=args.host,
                      precision=args.precision, header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                      min_body_kbps=args.min_body_kbps)
    http = DeadlineH11Protocol.factory(cfg.deadlines)
    if args.workers > 1:
        cfg.sync_dir = tempfile.mkdtemp(prefix="scaleseg-serve-workers-")
        try:
            config_to_env(cfg)
            uvicorn.run("serving.server:app_from_env", factory=True, host=args.host, port=args.port, workers=args.workers,
                        timeout_graceful_shutdown=30, http=http)
        finally:
            shutil.rmtree(cfg.sync_dir, ignore_errors=True)
    else:
        uvicorn.run(create_app(cfg), host=args.host, port=args.port, timeout_graceful_shutdown=30, http=http)
    return 0


__all__ = ["app_from_env", "main"]


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
