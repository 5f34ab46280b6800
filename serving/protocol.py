"""Open Inference Protocol v2 (KServe v2 / Triton HTTP) tensors: JSON and the binary-tensor extension.

A request body is JSON, or JSON followed by raw tensor bytes when the ``Inference-Header-Content-Length``
header gives the JSON part's length; inputs sent as bytes carry ``parameters.binary_data_size``. Outputs
are returned as bytes when the request asks (per output ``parameters.binary_data`` or request-level
``parameters.binary_data_output``), which is what ``tritonclient.http`` does by default.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

DATATYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
             "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
             "FP32": np.float32, "FP64": np.float64}
HEADER = "Inference-Header-Content-Length"


class ProtocolError(Exception):
    """A malformed request; answered with HTTP ``status`` and {"error": message}."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def datatype_of(array: np.ndarray) -> str:
    for name, dtype in DATATYPES.items():
        if array.dtype == dtype:
            return name
    raise ProtocolError(f"unsupported dtype {array.dtype}", 500)


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None                     # None: every output
    binary: dict[str, bool] = field(default_factory=dict)
    binary_default: bool = False


def _json_part(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    if not body:
        raise ProtocolError("empty request body; send {\"inputs\": [...]} (Open Inference Protocol v2)")
    if header_length is None:
        json_bytes, rest = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError(f"{HEADER} must be an integer, got {header_length!r}") from None
        if not 0 < n <= len(body):
            raise ProtocolError(f"{HEADER} is {n} but the body has {len(body)} bytes")
        json_bytes, rest = body[:n], body[n:]
    try:
        request = json.loads(json_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ProtocolError(f"malformed JSON in the inference header: {err}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or not request["inputs"]:
        raise ProtocolError("the request needs a non-empty \"inputs\" list")
    return request, rest


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    request, binary = _json_part(body, header_length)
    offset, inputs = 0, {}
    for spec in request["inputs"]:
        if not isinstance(spec, dict) or not {"name", "shape", "datatype"} <= set(spec):
            raise ProtocolError("each input needs \"name\", \"shape\" and \"datatype\"")
        name, shape, dtype_name = spec["name"], spec["shape"], spec["datatype"]
        if dtype_name not in DATATYPES:
            raise ProtocolError(f"input {name!r}: unknown datatype {dtype_name!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ProtocolError(f"input {name!r}: shape must be a list of non-negative integers")
        dtype = np.dtype(DATATYPES[dtype_name])
        count = math.prod(shape)
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size != count * dtype.itemsize:
                raise ProtocolError(f"input {name!r}: binary_data_size {size} does not match shape {shape} of {dtype_name}")
            if offset + size > len(binary):
                raise ProtocolError(f"input {name!r}: needs {size} binary bytes, only {len(binary) - offset} sent")
            array = np.frombuffer(binary, dtype=dtype, count=count, offset=offset).reshape(shape)
            offset += size
        else:
            if "data" not in spec:
                raise ProtocolError(f"input {name!r}: has neither \"data\" nor parameters.binary_data_size")
            try:
                array = np.asarray(spec["data"], dtype=dtype)
            except (TypeError, ValueError) as err:
                raise ProtocolError(f"input {name!r}: data is not {dtype_name}: {err}") from None
            if array.size != count:
                raise ProtocolError(f"input {name!r}: {array.size} values for shape {shape}")
            array = array.reshape(shape)
        inputs[name] = array
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} binary bytes after the last input; check {HEADER}")
    outputs, binary_flags = None, {}
    if request.get("outputs") is not None:
        if not isinstance(request["outputs"], list):
            raise ProtocolError("\"outputs\" must be a list")
        outputs = []
        for out in request["outputs"]:
            if not isinstance(out, dict) or "name" not in out:
                raise ProtocolError("each requested output needs a \"name\"")
            outputs.append(out["name"])
            if "binary_data" in (out.get("parameters") or {}):
                binary_flags[out["name"]] = bool(out["parameters"]["binary_data"])
    default = bool((request.get("parameters") or {}).get("binary_data_output", False))
    return InferRequest(request.get("id"), inputs, outputs, binary_flags, default)


def encode_infer_response(model: str, version: str, request: InferRequest,
                          results: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """(body, extra headers); outputs asked for as binary go after the JSON header, in order."""
    names = request.outputs if request.outputs is not None else list(results)
    unknown = [n for n in names if n not in results]
    if unknown:
        raise ProtocolError(f"unknown output(s) {unknown}; this model has {list(results)}")
    outputs, blobs = [], []
    for name in names:
        array = np.ascontiguousarray(results[name])
        entry = {"name": name, "datatype": datatype_of(array), "shape": list(array.shape)}
        if request.binary.get(name, request.binary_default):
            raw = array.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = array.ravel().tolist()
        outputs.append(entry)
    header = {"model_name": model, "model_version": version, "outputs": outputs}
    if request.id is not None:
        header["id"] = request.id
    head = json.dumps(header).encode()
    if not blobs:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(blobs), {HEADER: str(len(head)), "Content-Type": "application/octet-stream"}
