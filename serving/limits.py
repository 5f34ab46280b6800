"""What one request may cost, in pixels of work, checked from sizes alone (a header or a tensor shape)
before anything is decoded or run. Pure functions: the server, the gRPC service and the app share them.

A graph that fuses several scales runs the network once per scale, so an H x W image costs
H * W * sum(s^2 for s in its scales) pixels of work: 1 for the single-scale graph, 1 + 0.25 + 4 = 5.25
for the CIF graph of scales (0.5, 1, 2). A batch costs the sum of its images. The dynamic batcher never
stacks more than ``max_work_pixels`` into one execution, so each loaded model holds at most one batch
of that size in flight.

Memory: ONNX Runtime on CPU needs about ``BYTES_PER_WORK_PIXEL`` per pixel of work for the ResNet-18
DeepLabV3+ package (bench/serve_load.py: a 2048 x 2048 request lifts the server's peak RSS from 0.9 to
2.0 GB; issue 11 saw 3.6 GB for 4000 x 4000). With the defaults (4 Mpx of work, 4 loaded models, a
64-image queue of <= 20 MB uploads) one server process stays under about 7 GiB: 4 x 1.1 GB of
activations + 1.3 GB of queued uploads + the models.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from .protocol import ProtocolError

BYTES_PER_WORK_PIXEL = 270
MIN_SIDE = 16


@dataclass(frozen=True)
class RequestLimits:
    max_work_pixels: int = 2048 * 2048  # per request and per executed batch
    max_batch: int = 8                  # images per request and per executed batch
    min_side: int = MIN_SIDE
    max_upload_bytes: int = 20 * 1024 * 1024
    max_json_values: int = 1_000_000   # output values answered as JSON; past it, binary outputs only


def scale_cost(scales: Iterable[float] = (1.0,)) -> float:
    """Pixels of work per input pixel of a graph that runs the network at ``scales``."""
    return float(sum(s * s for s in scales)) or 1.0


def work_pixels(n: int, height: int, width: int, scales: Iterable[float] = (1.0,)) -> int:
    return math.ceil(n * height * width * scale_cost(scales))


def check_images(n: int, height: int, width: int, scales: Iterable[float], limits: RequestLimits) -> int:
    """The request's pixels of work; ProtocolError 400 for too few / too small, 413 for too much."""
    if not 1 <= n <= limits.max_batch:
        raise ProtocolError(f"batch of {n} images; this server takes 1..{limits.max_batch} per request")
    if min(height, width) < limits.min_side:
        raise ProtocolError(f"images must be at least {limits.min_side}x{limits.min_side} pixels, got {width}x{height}")
    scales = tuple(scales)
    cost = work_pixels(n, height, width, scales)
    if cost > limits.max_work_pixels:
        per_pixel = scale_cost(scales)
        largest = math.isqrt(int(limits.max_work_pixels / per_pixel / n))
        raise ProtocolError(
            f"{n} image(s) of {width}x{height} at {per_pixel:g} pixels of work per pixel cost {cost} pixels of work, "
            f"over this server's {limits.max_work_pixels} pixel limit (about {largest}x{largest} per image at this batch size); "
            "send smaller images or fewer per request", 413)
    return cost


def check_json_output(values: int, limits: RequestLimits) -> None:
    """Outputs asked for as JSON text: refuse (413) before running when they would exceed the cap."""
    if values > limits.max_json_values:
        raise ProtocolError(f"the outputs asked for as JSON hold {values} values, over the {limits.max_json_values}-value "
                            "limit for JSON; ask for binary outputs (parameters.binary_data_output: true, or "
                            "binary_data: true per output) or send smaller images", 413)
