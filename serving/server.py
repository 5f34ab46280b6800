"""The HTTP endpoint: Open Inference Protocol v2 (so ``tritonclient.http`` works unchanged) with the Triton
extensions tools call (model configuration, statistics, repository index / load / unload, compressed
request bodies), `/v1/segment` for plain image files, Prometheus `/metrics`.

Every error, whoever raises it, is answered as {"error": message}: the client's mistakes with 4xx and a
message that says what to change, never a 5xx or a traceback."""
from __future__ import annotations

import asyncio
import base64
import importlib.metadata
import json
import logging
import os
import time
import zlib
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from . import grpc_service, imaging
from .auth import key_matches, presented_key
from .connections import ConnectionDeadlines
from .control import RepositoryControl
from .inference import check_shape, execute, find_model, infer, tensor_spec
from .limits import MIN_SIDE, RequestLimits
from .protocol import HEADER, ProtocolError, encode_infer_response, load_json, parameters, parse_infer_request
from .repository import Repository, ServedModel
from .workers import WorkerSync

log = logging.getLogger("scaleseg.serving")
OPEN_PATHS = ("/v2/health/live", "/v2/health/ready", "/metrics")
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
CONTROL_BODY_LIMIT = 64 * 1024
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
    max_work_pixels: int = RequestLimits.max_work_pixels
    model_repository: str = ""       # root that load requests may take packages from ("" : only model_dir)
    max_models: int = 4
    max_json_values: int = RequestLimits.max_json_values
    workers: int = 1
    sync_dir: str = ""               # shared by the worker processes when workers > 1
    grpc_port: int = 0               # 0: no gRPC endpoint
    grpc_host: str = "127.0.0.1"
    precision: str = "auto"          # fp32, int8, or auto: the package's INT8 graphs where they passed their gate
    header_timeout: float = ConnectionDeadlines.header_s   # seconds a request's line and headers may take in all
    body_timeout: float = ConnectionDeadlines.body_s       # seconds a body may take in all, plus its size at min_body_kbps
    min_body_kbps: float = ConnectionDeadlines.min_body_rate / 1000  # slowest upload rate a body's deadline allows

    @property
    def model_name(self) -> str:
        return self.name or Path(self.model_dir).resolve().name

    @property
    def deadlines(self) -> ConnectionDeadlines:
        return ConnectionDeadlines(self.header_timeout, self.body_timeout, self.min_body_kbps * 1000,
                                   self.limits.max_upload_bytes)

    @property
    def limits(self) -> RequestLimits:
        return RequestLimits(self.max_work_pixels, self.max_batch, MIN_SIDE, int(self.max_upload_mb * 1024 * 1024),
                             self.max_json_values)


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


def _inflate(data: bytes, wbits: int, limit: int, encoding: str) -> bytes:
    """Every stream in ``data`` (gzip allows several members, RFC 1952 2.2), inflated no further than
    ``limit`` bytes in all; bytes after the last stream are refused, not ignored."""
    out, rest = bytearray(), data
    while True:
        inflater = zlib.decompressobj(wbits)
        out += inflater.decompress(rest, limit + 1 - len(out))
        if len(out) > limit:
            raise ProtocolError(f"request body inflates past the {limit}-byte limit", 413)
        if not inflater.eof:
            raise ProtocolError(f"{encoding} request body is truncated")
        rest = inflater.unused_data
        if not rest:
            return bytes(out)
        if encoding != "gzip" or not rest.startswith(b"\x1f\x8b"):
            raise ProtocolError(f"{len(rest)} bytes follow the end of the {encoding} data; send only the compressed body")


def _decompress(data: bytes, encoding: str, limit: int) -> bytes:
    """gzip / deflate (zlib or raw) bodies, as tritonclient's request compression sends them, inflated
    no further than ``limit`` bytes so a small bomb cannot fill memory."""
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}[encoding]
    for bits in (wbits, -zlib.MAX_WBITS) if encoding == "deflate" else (wbits,):
        try:
            return _inflate(data, bits, limit, encoding)
        except zlib.error:
            continue
    raise ProtocolError(f"request body is not valid {encoding} data")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) anything larger than ``limit`` bytes before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ProtocolError(f"request body of {declared} bytes exceeds the {limit}-byte limit", 413)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip", "deflate"):
        raise ProtocolError(f"content encoding {encoding!r} is not accepted; send identity, gzip or deflate", 415)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ProtocolError(f"request body exceeds the {limit}-byte limit", 413)
            chunks.append(chunk)
    except ClientDisconnect:  # the client left, or missed its body deadline: no one reads this answer
        raise ProtocolError(f"the connection closed after {size} bytes of the body", 400) from None
    body = b"".join(chunks)
    return body if encoding == "identity" else _decompress(body, encoding, limit)


async def read_json_object(request: Request) -> dict:
    """A small control body (repository load / unload / index): {} when empty, else a JSON object."""
    body = await read_body(request, CONTROL_BODY_LIMIT)
    if not body.strip():
        return {}
    obj = load_json(body, "the body")
    if not isinstance(obj, dict):
        raise ProtocolError("the body must be a JSON object like {\"parameters\": {...}}")
    return obj


def create_app(cfg: ServeConfig) -> FastAPI:
    metrics = Metrics(cfg.max_batch)
    limits = cfg.limits
    repo = Repository(cfg.backend, cfg.max_batch, cfg.max_delay_ms, cfg.max_queue, on_batch=metrics.batch.observe,
                      root=cfg.model_repository or None, max_models=cfg.max_models, max_work_pixels=cfg.max_work_pixels,
                      precision=cfg.precision)
    metrics.queue.set_function(lambda: repo.waiting)
    control = RepositoryControl(repo, WorkerSync(cfg.sync_dir, cfg.workers) if cfg.sync_dir else None)
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await repo.load_pinned(cfg.model_name, cfg.model_dir)
        follower = None
        if control.sync is not None:
            async with control.lock:
                await control.reconcile()
            follower = asyncio.get_running_loop().create_task(control.follow_other_workers())
        grpc_server = None
        if cfg.grpc_port:
            service = grpc_service.InferenceService(repo, control, limits, lambda: state["ready"], cfg.api_key, VERSION, PLATFORMS)
            grpc_server = await grpc_service.start(service, cfg.grpc_host, cfg.grpc_port, limits.max_upload_bytes,
                                                   cfg.workers > 1)
        state["ready"] = True
        yield
        state["ready"] = False
        if grpc_server is not None:
            await grpc_server.stop(grace=30)
        if follower is not None:
            follower.cancel()
        await repo.close()

    app = FastAPI(title="scaleseg serving", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.repo, app.state.metrics, app.state.config, app.state.limits = repo, metrics, cfg, limits

    @app.middleware("http")
    async def guard_and_measure(request: Request, call_next):
        tic = time.perf_counter()
        if cfg.api_key and request.url.path not in OPEN_PATHS:
            given = presented_key(request.headers.get("x-api-key"), request.headers.get("authorization"))
            if not key_matches(given, cfg.api_key):
                metrics.errors.labels("unauthorized").inc()
                return error(401, "missing or wrong API key (send X-API-Key: KEY or Authorization: Bearer KEY)",
                             {"WWW-Authenticate": 'Bearer realm="scaleseg"'})
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
        return error(err.status_code, str(err.detail), getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def on_invalid_parameter(request: Request, err: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in err.errors())
        return error(400, f"invalid request parameter(s): {problems}")

    # --- Open Inference Protocol v2 ------------------------------------------------------------------
    @app.get("/v2")
    async def server_metadata():
        return {"name": "scaleseg", "version": VERSION,
                "extensions": ["binary_tensor_data", "model_repository", "model_configuration", "statistics"]}

    @app.get("/v2/health/live")
    @app.head("/v2/health/live", include_in_schema=False)  # probes that only read the status
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    @app.head("/v2/health/ready", include_in_schema=False)
    async def ready():
        return {"ready": True} if state["ready"] else error(503, "not ready", {"Retry-After": "1"})

    def metadata(model: ServedModel) -> dict:
        return {"name": model.name, "versions": [str(model.version)], "platform": PLATFORMS[model.backend.name],
                "inputs": [tensor_spec(t) for t in model.meta["inputs"]],
                "outputs": [tensor_spec(t) for t in model.meta["outputs"]],
                "parameters": {"classes": model.meta["classes"], "backend": model.backend.description,
                               "precision": model.precision}}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None):
        return metadata(find_model(repo, name, version))

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None):
        model = find_model(repo, name, version)
        if model.batcher.closing or not state["ready"]:
            raise ProtocolError(f"model {name!r} is draining and takes no new requests", 503)
        return {"name": model.name, "ready": True}

    @app.get("/v2/models/{name}/config")
    @app.get("/v2/models/{name}/versions/{version}/config")
    async def model_config(name: str, version: str | None = None):
        """Triton's model configuration extension, in the JSON form of its model config protobuf."""
        model = find_model(repo, name, version)

        def tensor(t: dict) -> dict:
            s = tensor_spec(t)
            return {"name": s["name"], "data_type": f"TYPE_{s['datatype']}", "dims": s["shape"][1:]}
        return {"name": model.name, "platform": PLATFORMS[model.backend.name], "max_batch_size": model.batcher.max_batch,
                "input": [tensor(t) for t in model.meta["inputs"]], "output": [tensor(t) for t in model.meta["outputs"]],
                "dynamic_batching": {"max_queue_delay_microseconds": int(cfg.max_delay_ms * 1000)},
                "version_policy": {"latest": {"num_versions": 1}},
                "parameters": {"scales": {"string_value": ",".join(f"{s:g}" for s in model.scales)},
                               "max_work_pixels": {"string_value": str(cfg.max_work_pixels)},
                               "precision": {"string_value": model.precision}}}

    @app.get("/v2/models/stats")
    @app.get("/v2/models/{name}/stats")
    @app.get("/v2/models/{name}/versions/{version}/stats")
    async def model_stats(name: str | None = None, version: str | None = None):
        models = [find_model(repo, name, version)] if name else list(repo.models.values())
        return {"model_stats": [m.stats.triton(m.name, str(m.version)) for m in models]}

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer_route(name: str, request: Request, version: str | None = None):
        find_model(repo, name, version)  # an unknown model is refused before its body is read
        req = parse_infer_request(await read_body(request, limits.max_upload_bytes), request.headers.get(HEADER))
        model, results = await infer(repo, name, version, req, limits)
        body, headers = encode_infer_response(model.name, str(model.version), req, results)
        return Response(body, headers=headers)

    # --- repository extension ------------------------------------------------------------------------
    @app.get("/v2/repository/index")
    @app.post("/v2/repository/index")
    async def repository_index(request: Request):
        only_ready = (await read_json_object(request)).get("ready") is True
        index = [{"name": m.name, "version": str(m.version), "state": "READY"} for m in repo.models.values()]
        if not only_ready:
            index += [{"name": name, "state": "UNAVAILABLE", "reason": "unloaded"}
                      for name in repo.available() if repo.get(name) is None]
        return index

    @app.post("/v2/repository/models/{name}/load")
    async def load_model(name: str, request: Request):
        return await control.load(name, parameters(await read_json_object(request), "load request"))

    @app.post("/v2/repository/models/{name}/unload")
    async def unload_model(name: str, request: Request):
        parameters(await read_json_object(request), "unload request")
        return await control.unload(name)

    # --- convenience -----------------------------------------------------------------------------
    @app.post("/v1/segment")
    async def segment(request: Request, model: str = "", overlay: bool = False, alpha: float = 0.5):
        name = model or cfg.model_name
        served = find_model(repo, name)
        if not 0 <= alpha <= 1:
            raise ProtocolError(f"alpha must lie in 0..1, got {alpha}")
        data = await read_body(request, limits.max_upload_bytes)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            async def once():
                yield data
            try:
                form = await MultiPartParser(request.headers, once()).parse()
            except MultiPartException as err:
                raise ProtocolError(f"malformed multipart upload: {err.message}") from None
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise ProtocolError("multipart upload needs a file field named 'file'")
            kind = (upload.content_type or "").lower()
            data = await upload.read()
        if kind not in imaging.IMAGE_TYPES:
            raise ProtocolError(f"content type {kind or 'missing'!r} is not an image; send one of {', '.join(imaging.IMAGE_TYPES)}", 415)
        rgb = imaging.decode_image(data, lambda h, w: check_shape(served, (1, 3, h, w), limits))
        tic = time.perf_counter()
        served, out = await execute(repo, name, rgb.transpose(2, 0, 1)[None].copy(), limits)
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
