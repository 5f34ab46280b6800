"""Transport-neutral inference: find the model, check a request's named arrays against the model and the
server's limits, run them through the model's batcher and pick the requested outputs.

The HTTP and gRPC endpoints both call this. Errors are ``ProtocolError`` with an HTTP status; each transport
maps the status to its own (HTTP as is, gRPC via ``grpc_service.GRPC_CODES``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .batching import QueueFull, ShuttingDown
from .protocol import ProtocolError
from .repository import Repository, ServedModel


@dataclass(frozen=True)
class Limits:
    max_batch: int = 8
    max_pixels: int = 4096 * 4096
    min_side: int = 16


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


def check_images(model: ServedModel, images: np.ndarray, limits: Limits) -> None:
    """The input must be uint8 [N, 3, H, W] within the server's limits and, for a TensorRT engine, inside
    the engine's optimisation profile (larger: 413; smaller: 400)."""
    if images.dtype != np.uint8:
        raise ProtocolError(f"input 'image' must be UINT8, got {images.dtype}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ProtocolError(f"input 'image' must have shape [N, 3, H, W], got {list(images.shape)}")
    n, _, h, w = images.shape
    if not 1 <= n <= limits.max_batch:
        raise ProtocolError(f"batch of {n} images; this server takes 1..{limits.max_batch} per request")
    if min(h, w) < limits.min_side:
        raise ProtocolError(f"images must be at least {limits.min_side}x{limits.min_side} pixels, got {w}x{h}")
    if h * w > limits.max_pixels:
        raise ProtocolError(f"images of {w}x{h} exceed the {limits.max_pixels}-pixel limit", 413)
    profile = model.backend.profile
    if profile is not None:
        if reason := profile.exceeds(images.shape):
            raise ProtocolError(f"{reason}; send smaller images or serve with --backend onnxruntime", 413)
        if reason := profile.below(images.shape):
            raise ProtocolError(f"{reason}; send larger images or serve with --backend onnxruntime")


async def run(model: ServedModel, images: np.ndarray) -> dict[str, np.ndarray]:
    try:
        return await model.batcher.submit(images)
    except QueueFull:
        raise ProtocolError("server busy: the inference queue is full; retry shortly", 503) from None
    except ShuttingDown:
        raise ProtocolError("server is shutting down or reloading this model; retry shortly", 503) from None


async def infer(repo: Repository, name: str, version: str | None, inputs: dict[str, np.ndarray],
                outputs: list[str] | None, limits: Limits) -> tuple[ServedModel, dict[str, np.ndarray]]:
    """(the model that ran, {output name: array}) for ``outputs`` in order (None: every output)."""
    model = find_model(repo, name, version)
    if set(inputs) != {"image"}:
        raise ProtocolError(f"expected exactly one input named 'image', got {sorted(inputs)}")
    known = [o["name"] for o in model.meta["outputs"]]
    unknown = [o for o in outputs or [] if o not in known]
    if unknown:
        raise ProtocolError(f"unknown output(s) {unknown}; this model has {known}")
    check_images(model, inputs["image"], limits)
    results = await run(model, inputs["image"])
    return model, {o: results[o] for o in (outputs if outputs is not None else results)}
