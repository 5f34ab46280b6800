"""The HTTP endpoint: Open Inference Protocol v2 (so ``tritonclient.http`` works unchanged), `/v1/segment`
for plain image files, Prometheus `/metrics`, and hot reload through the repository extension."""
from __future__ import annotations

import base64
import hmac
import importlib.metadata
import json
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartParser

from . import grpc_service, imaging, inference
from .backends import BackendError
from .protocol import HEADER, ProtocolError, encode_infer_response, parse_infer_request
from .repository import Repository, ServedModel

log = logging.getLogger("scaleseg.serving")
OPEN_PATHS = ("/v2/health/live", "/v2/health/ready", "/metrics")
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
MIN_SIDE = 16
try:
    VERSION = importlib.metadata.version("scaleseg")
except importlib.metadata.PackageNotFoundError:
    VERSION = "unknown"


@dataclass
class ServeConfig:
    model_dir: str
    name: str = ""
    backend: str = "auto"
    max_batch: int = 8
    max_delay_ms: float = 5.0
    max_queue: int = 64
    api_key: str = ""
    max_upload_mb: float = 20.0
    max_pixels: int = 4096 * 4096
    grpc_port: int = 0             # 0: no gRPC endpoint
    grpc_host: str = "127.0.0.1"
    workers: int = 1

    @property
    def model_name(self) -> str:
        return self.name or Path(self.model_dir).resolve().name


class Metrics:
    def __init__(self, max_batch: int):
        self.registry = CollectorRegistry()
        self.requests = Counter("scaleseg_requests", "HTTP requests", ["endpoint", "code"], registry=self.registry)
        self.latency = Histogram("scaleseg_request_latency_seconds", "request latency", ["endpoint"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.batch = Histogram("scaleseg_batch_size", "images per executed batch", registry=self.registry,
                               buckets=tuple(range(1, max_batch + 1)))
        self.queue = Gauge("scaleseg_queue_depth", "images waiting for inference", registry=self.registry)
        self.errors = Counter("scaleseg_errors", "failed requests", ["kind"], registry=self.registry)


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) anything larger than ``limit`` bytes before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ProtocolError(f"request body of {declared} bytes exceeds the {limit}-byte limit", 413)
    if request.headers.get("content-encoding", "identity") != "identity":
        raise ProtocolError("compressed request bodies are not accepted; send identity encoding", 415)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ProtocolError(f"request body exceeds the {limit}-byte limit", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(cfg: ServeConfig) -> FastAPI:
    metrics = Metrics(cfg.max_batch)
    repo = Repository(cfg.backend, cfg.max_batch, cfg.max_delay_ms, cfg.max_queue, on_batch=metrics.batch.observe)
    metrics.queue.set_function(lambda: repo.waiting)
    limit = int(cfg.max_upload_mb * 1024 * 1024)
    state = {"ready": False}
    limits = inference.Limits(cfg.max_batch, cfg.max_pixels, MIN_SIDE)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await repo.load(cfg.model_name, cfg.model_dir)
        if (Path(cfg.model_dir) / "model.cif.onnx").is_file():
            await repo.load(f"{cfg.model_name}_cif", cfg.model_dir, graph="model.cif.onnx")
        grpc_server = None
        if cfg.grpc_port:
            service = grpc_service.InferenceService(repo, limits, lambda: state["ready"], cfg.api_key, VERSION, PLATFORMS)
            grpc_server = await grpc_service.start(service, cfg.grpc_host, cfg.grpc_port, limit, cfg.workers > 1)
        state["ready"] = True
        yield
        state["ready"] = False
        if grpc_server is not None:
            await grpc_server.stop(grace=30)
        await repo.close()

    app = FastAPI(title="scaleseg serving", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.repo, app.state.metrics, app.state.config = repo, metrics, cfg

    @app.middleware("http")
    async def guard_and_measure(request: Request, call_next):
        tic = time.perf_counter()
        if cfg.api_key and request.url.path not in OPEN_PATHS:
            given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), cfg.api_key.encode()):
                metrics.errors.labels("unauthorized").inc()
                return error(401, "missing or wrong API key (send X-API-Key or Authorization: Bearer)")
        try:
            response = await call_next(request)
        except Exception:  # never leak a stack trace to the client
            log.exception("unhandled error on %s", request.url.path)
            metrics.errors.labels("internal").inc()
            response = error(500, "internal server error")
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - tic)
        if response.status_code >= 400:
            metrics.errors.labels("client" if response.status_code < 500 else "server").inc()
        return response

    @app.exception_handler(ProtocolError)
    async def on_protocol_error(request: Request, err: ProtocolError):
        return error(err.status, str(err), {"Retry-After": "1"} if err.status == 503 else None)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, err: StarletteHTTPException):
        return error(err.status_code, str(err.detail))

    def model_or_404(name: str, version: str | None = None) -> ServedModel:
        return inference.find_model(repo, name, version)

    # --- Open Inference Protocol v2 ------------------------------------------------------------------
    @app.get("/v2")
    async def server_metadata():
        return {"name": "scaleseg", "version": VERSION, "extensions": ["binary_tensor_data", "model_repository"]}

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        return {"ready": True} if state["ready"] else error(503, "not ready")

    def metadata(model: ServedModel) -> dict:
        spec = inference.tensor_spec
        return {"name": model.name, "versions": [str(model.version)], "platform": PLATFORMS[model.backend.name],
                "inputs": [spec(t) for t in model.meta["inputs"]], "outputs": [spec(t) for t in model.meta["outputs"]],
                "parameters": {"classes": model.meta["classes"], "backend": model.backend.description}}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None):
        return metadata(model_or_404(name, version))

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None):
        model = model_or_404(name, version)
        return {"name": model.name, "ready": not model.batcher.closing}

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str | None = None):
        model = model_or_404(name, version)
        req = parse_infer_request(await read_body(request, limit), request.headers.get(HEADER))
        _, results = await inference.infer(repo, model.name, str(model.version), req.inputs, None, limits)
        body, headers = encode_infer_response(model.name, str(model.version), req, results)
        return Response(body, headers=headers)

    @app.get("/v2/repository/index")
    @app.post("/v2/repository/index")
    async def repository_index():
        return [{"name": m.name, "version": str(m.version), "state": "READY"} for m in repo.models.values()]

    @app.post("/v2/repository/models/{name}/load")
    async def load_model(name: str, request: Request):
        body = await read_body(request, 64 * 1024)
        try:
            params = (json.loads(body) if body else {}).get("parameters") or {}
        except (json.JSONDecodeError, AttributeError):
            raise ProtocolError("load request body must be JSON like {\"parameters\": {\"model_dir\": PATH}}") from None
        current = repo.get(name)
        graph = current.graph if current else "model.onnx"
        try:
            model = await repo.load(name, params.get("model_dir"), graph=graph)
        except (BackendError, OSError, ValueError) as err:
            kept = f"; version {current.version} keeps serving" if current else ""
            return error(400, f"could not load {name!r}: {err}{kept}")
        return {"name": model.name, "version": str(model.version), "backend": model.backend.description}

    # --- convenience -----------------------------------------------------------------------------
    @app.post("/v1/segment")
    async def segment(request: Request, model: str = "", overlay: bool = False, alpha: float = 0.5):
        served = model_or_404(model or cfg.model_name)
        data = await read_body(request, limit)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            async def once():
                yield data
            form = await MultiPartParser(request.headers, once()).parse()
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise ProtocolError("multipart upload needs a file field named 'file'")
            kind = (upload.content_type or "").lower()
            data = await upload.read()
        if kind not in imaging.IMAGE_TYPES:
            raise ProtocolError(f"content type {kind or 'missing'!r} is not an image; send one of {', '.join(imaging.IMAGE_TYPES)}", 415)
        rgb = imaging.decode_image(data, cfg.max_pixels)
        images = rgb.transpose(2, 0, 1)[None].copy()
        inference.check_images(served, images, limits)
        tic = time.perf_counter()
        out = await inference.run(served, images)
        labels, confidence = out["labels"][0], out["confidence"][0]
        classes = served.meta["classes"]
        result = {"model": served.name, "version": str(served.version), "width": rgb.shape[1], "height": rgb.shape[0],
                  "latency_ms": 1000 * (time.perf_counter() - tic),
                  "mask_png": base64.b64encode(imaging.mask_png(labels, classes)).decode(),
                  "stats": imaging.class_stats(labels, confidence, classes)}
        if overlay:
            result["overlay_png"] = base64.b64encode(imaging.png_bytes(imaging.overlay(rgb, labels, classes, alpha))).decode()
        return result

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


ENV_CONFIG = "SCALESEG_SERVE_CONFIG"


def app_from_env() -> FastAPI:
    """Factory for uvicorn's multi-worker mode: each worker process builds its app from the environment."""
    return create_app(ServeConfig(**json.loads(os.environ[ENV_CONFIG])))


def config_to_env(cfg: ServeConfig) -> None:
    os.environ[ENV_CONFIG] = json.dumps(asdict(cfg))
