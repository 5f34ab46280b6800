"""`scaleseg serve MODEL`: the Open Inference Protocol v2 endpoint over an exported model package."""
from __future__ import annotations

import argparse
import logging

from .server import ServeConfig, app_from_env, config_to_env, create_app


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scaleseg serve", description="Serve a model package over HTTP (KServe v2 / Triton protocol).")
    p.add_argument("model_dir", help="package folder written by `scaleseg export`")
    p.add_argument("--name", default="", help="model name in URLs (default: the folder's name)")
    p.add_argument("--backend", default="auto", choices=["auto", "tensorrt", "onnxruntime"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="largest batch the dynamic batcher forms")
    p.add_argument("--max-delay-ms", type=float, default=5.0, help="longest a request waits for batch partners")
    p.add_argument("--max-queue", type=int, default=64, help="images allowed to wait; beyond it requests get 503")
    p.add_argument("--workers", type=int, default=1, help="server processes, each with its own model copy")
    p.add_argument("--api-key", default="", help="require this key (X-API-Key or Authorization: Bearer)")
    p.add_argument("--max-upload-mb", type=float, default=20.0)
    p.add_argument("--max-pixels", type=int, default=4096 * 4096)
    p.add_argument("--grpc-port", type=int, default=0,
                   help="also serve the KServe v2 gRPC protocol (tritonclient.grpc) on this port, on --host; 0: off")
    return p


def main(argv: list[str]) -> int:
    import uvicorn

    args = parser().parse_args(argv)
    cfg = ServeConfig(args.model_dir, args.name, args.backend, args.max_batch, args.max_delay_ms, args.max_queue,
                      args.api_key, args.max_upload_mb, args.max_pixels, args.grpc_port, args.host, args.workers)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.workers > 1:
        config_to_env(cfg)
        uvicorn.run("serving.server:app_from_env", factory=True, host=args.host, port=args.port, workers=args.workers,
                    timeout_graceful_shutdown=30)
    else:
        uvicorn.run(create_app(cfg), host=args.host, port=args.port, timeout_graceful_shutdown=30)
    return 0


__all__ = ["app_from_env", "main"]


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
