"""The inference core every transport shares (HTTP in ``server``, gRPC in ``grpc_service``): a request's
declared inputs are checked against the request limits and, for a TensorRT engine, its optimisation
profile before any tensor is decoded; the images run on the model that is current when they execute (a
reload never fails a request), and the named outputs come back. Errors are ``ProtocolError`` with the
HTTP status to answer (gRPC maps it to a code with ``grpc_service.GRPC_CODES``)."""
from __future__ import annotations

import time

import numpy as np

from .batching import QueueFull, ShuttingDown
from .limits import RequestLimits, check_images, check_json_output
from .protocol import InferRequest, ProtocolError, TensorSpec
from .repository import Repository, ServedModel

IMAGE = "image"


def tensor_spec(spec: dict) -> dict:
    """A graph input/output from meta.json in protocol terms: Triton datatype names, -1 for dynamic dimensions."""
    return {"name": spec["name"], "datatype": spec["datatype"].upper().replace("FLOAT", "FP"),
            "shape": [d if isinstance(d, int) else -1 for d in spec["shape"]]}


def find_model(repo: Repository, name: str, version: str | None = None) -> ServedModel:
    model = repo.get(name)
    if model is None:
        raise ProtocolError(f"unknown model {name!r}; this server has {sorted(repo.models)}", 404)
    if version not in (None, "", str(model.version)):
        raise ProtocolError(f"model {name!r} has version {model.version}, not {version!r}", 404)
    return model


def check_inputs(model: ServedModel, specs: list[TensorSpec], limits: RequestLimits) -> tuple[int, int, int]:
    """(N, H, W) of the one ``image`` input, from its declared shape; 400 / 413 before decoding."""
    names = [s.name for s in specs]
    if names != [IMAGE]:
        raise ProtocolError(f"expected exactly one input named 'image', got {sorted(names)}")
    spec = specs[0]
    if spec.datatype != "UINT8":
        raise ProtocolError(f"input 'image' must be UINT8, got {spec.datatype}")
    if len(spec.shape) != 4 or spec.shape[1] != 3:
        raise ProtocolError(f"input 'image' must have shape [N, 3, H, W], got {spec.shape}")
    check_shape(model, spec.shape, limits)
    return spec.shape[0], spec.shape[2], spec.shape[3]


def check_shape(model: ServedModel, shape: list[int] | tuple[int, ...], limits: RequestLimits) -> None:
    """[N, 3, H, W] within the server's pixels-of-work budget and, for a TensorRT engine, inside the
    engine's optimisation profile (larger: 413; smaller: 400)."""
    n, _, h, w = shape
    check_images(n, h, w, model.scales, limits)
    profile = model.backend.profile
    if profile is not None:
        if reason := profile.exceeds(tuple(shape)):
            raise ProtocolError(f"{reason}; send smaller images or serve with --backend onnxruntime", 413)
        if reason := profile.below(tuple(shape)):
            raise ProtocolError(f"{reason}; send larger images or serve with --backend onnxruntime")


def output_names(model: ServedModel, requested: list[str] | None) -> list[str]:
    available = [o["name"] for o in model.meta["outputs"]]
    if requested is None:
        return available
    unknown = [n for n in requested if n not in available]
    if unknown:
        raise ProtocolError(f"unknown output(s) {unknown}; model {model.name!r} has {available}")
    if len(set(requested)) != len(requested):
        raise ProtocolError(f"outputs {requested}: each output may be asked for once")
    return requested


def json_values(model: ServedModel, names: list[str], n: int, h: int, w: int) -> int:
    """How many numbers the outputs ``names`` hold (``probs`` has one plane per class)."""
    return sum(n * h * w * (model.num_classes if name == "probs" else 1) for name in names)


async def execute(repo: Repository, name: str, images: np.ndarray, limits: RequestLimits) -> tuple[ServedModel, dict]:
    """Run ``images`` on the model serving ``name`` now. A reload that finishes while the request waits
    (its body still uploading, or queued on the version being drained) sends it to the new version."""
    tic = time.monotonic_ns()
    while True:
        model = find_model(repo, name)
        check_shape(model, images.shape, limits)  # a reload may have brought another graph
        try:
            outputs = await model.batcher.submit(images)
        except QueueFull:
            model.stats.record_request(False, time.monotonic_ns() - tic)
            raise ProtocolError("server busy: the inference queue is full; retry shortly", 503) from None
        except ShuttingDown:
            if repo.get(name) not in (None, model):
                continue
            raise ProtocolError("server is shutting down or unloading this model; retry shortly", 503) from None
        except Exception:
            model.stats.record_request(False, time.monotonic_ns() - tic)
            raise
        model.stats.record_request(True, time.monotonic_ns() - tic)
        return model, outputs


async def infer(repo: Repository, name: str, version: str | None, request: InferRequest,
                limits: RequestLimits) -> tuple[ServedModel, dict[str, np.ndarray]]:
    """A parsed request -> (the model that ran it, {output name: array} in the order asked for)."""
    model = find_model(repo, name, version)
    n, h, w = check_inputs(model, request.specs, limits)
    names = output_names(model, request.outputs)
    check_json_output(json_values(model, [o for o in names if not request.wants_binary(o)], n, h, w), limits)
    images = request.decode()[IMAGE]
    model, results = await execute(repo, name, images, limits)
    return model, {o: results[o] for o in names}


async def infer_arrays(repo: Repository, name: str, version: str | None, specs: list[TensorSpec], decode,
                       outputs: list[str] | None, limits: RequestLimits) -> tuple[ServedModel, dict[str, np.ndarray]]:
    """``infer`` for a transport whose outputs are all binary (gRPC, its messages bounded by their size), so no
    JSON cap applies; ``decode()`` -> {name: array} runs only once the declared ``specs`` passed the limits."""
    model = find_model(repo, name, version)
    check_inputs(model, specs, limits)
    names = output_names(model, outputs)
    model, results = await execute(repo, name, decode()[IMAGE], limits)
    return model, {o: results[o] for o in names}
