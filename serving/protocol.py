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
MAX_DIMS = 8


class ProtocolError(Exception):
    """A malformed request; answered with HTTP ``status`` and {"error": message}."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def datatype_of(array: np.ndarray) -> str:
    """The v2 datatype of an array this server made (outputs, or inputs already decoded by DATATYPES),
    so a dtype outside the table is a server fault, never the client's."""
    for name, dtype in DATATYPES.items():
        if array.dtype == dtype:
            return name
    raise TypeError(f"array of dtype {array.dtype} has no Open Inference Protocol datatype")


@dataclass
class TensorSpec:
    """One input as the JSON header declares it, checked for form but not yet decoded."""
    name: str
    datatype: str
    shape: list[int]
    binary_size: int | None = None
    data: object = None


@dataclass
class InferRequest:
    id: str | None
    specs: list[TensorSpec]
    outputs: list[str] | None                     # None: every output
    binary: dict[str, bool] = field(default_factory=dict)
    binary_default: bool = False
    raw: bytes = b""                              # the binary part after the JSON header

    def wants_binary(self, output: str) -> bool:
        return self.binary.get(output, self.binary_default)

    def decode(self) -> dict[str, np.ndarray]:
        """The input tensors; call only after the declared shapes passed the request limits."""
        offset, inputs = 0, {}
        for spec in self.specs:
            dtype = np.dtype(DATATYPES[spec.datatype])
            if spec.binary_size is not None:
                if spec.binary_size != math.prod(spec.shape) * dtype.itemsize:
                    raise ProtocolError(f"input {spec.name!r}: {spec.binary_size} bytes do not hold shape {spec.shape} "
                                        f"of {spec.datatype}")
                if offset + spec.binary_size > len(self.raw):
                    raise ProtocolError(f"input {spec.name!r}: needs {spec.binary_size} binary bytes, "
                                        f"only {len(self.raw) - offset} sent")
                inputs[spec.name] = np.frombuffer(self.raw, dtype, math.prod(spec.shape), offset).reshape(spec.shape)
                offset += spec.binary_size
            else:
                inputs[spec.name] = json_tensor(spec, dtype)
        if offset != len(self.raw):
            raise ProtocolError(f"{len(self.raw) - offset} binary bytes after the last input; check {HEADER}")
        return inputs


def load_json(data: bytes, where: str):
    """JSON a client sent; anything the parser refuses (malformed text, nesting past the recursion limit, an
    integer with more digits than Python converts) is the client's 400, never a server error."""
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ProtocolError(f"malformed JSON in {where}: {err}") from None
    except RecursionError:
        raise ProtocolError(f"{where} nests too deeply to be JSON a request needs") from None
    except ValueError as err:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise ProtocolError(f"{where} holds a number JSON here cannot take ({err}); send numbers of at most "
                            "a few dozen digits") from None


def _json_part(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    if not body:
        raise ProtocolError("empty request body; send {\"inputs\": [...]} (Open Inference Protocol v2)")
    if header_length is None:
        json_bytes, rest = body, b""
    else:
        if not header_length.isdigit():
            raise ProtocolError(f"{HEADER} must be a non-negative integer, got {header_length!r}")
        n = int(header_length)
        if not 0 < n <= len(body):
            raise ProtocolError(f"{HEADER} is {n} but the body has {len(body)} bytes")
        json_bytes, rest = body[:n], body[n:]
    request = load_json(json_bytes, "the inference header")
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or not request["inputs"]:
        raise ProtocolError("the request needs a non-empty \"inputs\" list")
    return request, rest


def parameters(obj: dict, where: str) -> dict:
    """The ``parameters`` object of a request, input or output ({} when absent)."""
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ProtocolError(f"{where}: \"parameters\" must be a JSON object, got {type(params).__name__}")
    return params


def _flag(params: dict, key: str, where: str) -> bool | None:
    value = params.get(key)
    if value is not None and not isinstance(value, bool):
        raise ProtocolError(f"{where}: parameters.{key} must be true or false")
    return value


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _input_spec(spec) -> TensorSpec:
    if not isinstance(spec, dict) or not {"name", "shape", "datatype"} <= set(spec):
        raise ProtocolError("each input needs \"name\", \"shape\" and \"datatype\"")
    name, shape, datatype = spec["name"], spec["shape"], spec["datatype"]
    if not isinstance(name, str):
        raise ProtocolError("input \"name\" must be a string")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise ProtocolError(f"input {name!r}: unknown datatype {datatype!r}; use one of {', '.join(DATATYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_count(d) for d in shape):
        raise ProtocolError(f"input {name!r}: shape must be a list of at most {MAX_DIMS} non-negative integers")
    params = parameters(spec, f"input {name!r}")
    size = params.get("binary_data_size")
    if size is not None:
        expected = math.prod(shape) * np.dtype(DATATYPES[datatype]).itemsize
        if not _is_count(size) or size != expected:
            raise ProtocolError(f"input {name!r}: binary_data_size {size!r} does not match shape {shape} of {datatype} "
                                f"({expected} bytes)")
        return TensorSpec(name, datatype, shape, size)
    if "data" not in spec:
        raise ProtocolError(f"input {name!r}: has neither \"data\" nor parameters.binary_data_size")
    return TensorSpec(name, datatype, shape, None, spec["data"])


def json_tensor(spec: TensorSpec, dtype: np.dtype) -> np.ndarray:
    """JSON ``data`` as ``dtype``, refusing values the type cannot hold instead of wrapping or truncating."""
    where = f"input {spec.name!r}"
    try:
        raw = np.asarray(spec.data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise ProtocolError(f"{where}: data must be a flat or nested list of numbers of one shape") from None
    if raw.dtype.kind not in "biuf":
        raise ProtocolError(f"{where}: data must hold only {spec.datatype} numbers")
    if raw.dtype.kind != "b" and any(type(v) is bool for v in np.asarray(spec.data, dtype=object).flat):
        raise ProtocolError(f"{where}: {spec.datatype} data must be numbers, not true/false")
    if raw.size != math.prod(spec.shape):
        raise ProtocolError(f"{where}: {raw.size} values for shape {spec.shape}")
    if dtype.kind == "b":
        if raw.dtype.kind != "b":
            raise ProtocolError(f"{where}: BOOL data must be true or false")
    elif raw.dtype.kind == "b":
        raise ProtocolError(f"{where}: {spec.datatype} data must be numbers, not true/false")
    elif dtype.kind in "iu":
        if raw.dtype.kind == "f" and not np.array_equal(raw, np.floor(raw)):
            raise ProtocolError(f"{where}: {spec.datatype} data must be whole numbers; got fractions or NaN")
        info = np.iinfo(dtype)
        if raw.size and (raw.min() < info.min or raw.max() > info.max):
            raise ProtocolError(f"{where}: {spec.datatype} values must lie in {info.min}..{info.max}; "
                                f"got {raw.min():g}..{raw.max():g}")
    elif raw.size and np.isfinite(raw).all() and np.abs(raw).max() > np.finfo(dtype).max:
        raise ProtocolError(f"{where}: values exceed the range of {spec.datatype}")
    return raw.astype(dtype).reshape(spec.shape)


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    """The request's header, checked for form; tensors stay undecoded until ``InferRequest.decode``."""
    request, raw = _json_part(body, header_length)
    specs = [_input_spec(spec) for spec in request["inputs"]]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ProtocolError(f"input names must be unique, got {names}")
    outputs, binary_flags = None, {}
    if request.get("outputs") is not None:
        if not isinstance(request["outputs"], list):
            raise ProtocolError("\"outputs\" must be a list")
        outputs = []
        for out in request["outputs"]:
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise ProtocolError("each requested output needs a \"name\" string")
            outputs.append(out["name"])
            flag = _flag(parameters(out, f"output {out['name']!r}"), "binary_data", f"output {out['name']!r}")
            if flag is not None:
                binary_flags[out["name"]] = flag
    default = _flag(parameters(request, "request"), "binary_data_output", "request") or False
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("\"id\" must be a string")
    return InferRequest(request_id, specs, outputs, binary_flags, default, raw)


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
        if request.wants_binary(name):
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
