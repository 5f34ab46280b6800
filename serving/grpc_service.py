"""Open Inference Protocol over gRPC (KServe v2 ``inference.GRPCInferenceService``), so ``tritonclient.grpc``
works unchanged: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig,
RepositoryIndex and ModelInfer with typed or raw (binary) tensors; outputs always go back raw.

The message classes are the ones tritonclient ships (``tritonclient.grpc.service_pb2``), generated from
Triton's grpc_service.proto, the proto the client itself speaks: no generator toolchain, no copy that can
drift from the client. It runs on the HTTP server's event loop and shares its repository, batchers and
limits (``inference.py``); client errors map to INVALID_ARGUMENT / NOT_FOUND / RESOURCE_EXHAUSTED /
UNAVAILABLE / UNAUTHENTICATED, never INTERNAL. The receive limit bounds each message before it is parsed.
"""
from __future__ import annotations

import functools
import hmac
import logging
import math
from typing import Callable

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from . import inference
from .protocol import DATATYPES, ProtocolError, datatype_of
from .repository import Repository, ServedModel

log = logging.getLogger("scaleseg.serving")
GRPC_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
              404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
              415: grpc.StatusCode.INVALID_ARGUMENT, 503: grpc.StatusCode.UNAVAILABLE}
# Which InferTensorContents field carries each datatype when a client sends typed values instead of raw bytes.
CONTENTS_FIELDS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
                   "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
                   "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
                   "FP32": "fp32_contents", "FP64": "fp64_contents"}


def _handled(method):
    """Answer a ProtocolError with its gRPC code and message; anything else is logged, never shown."""
    @functools.wraps(method)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            self.authorize(method.__name__, context)
            return await method(self, request, context)
        except ProtocolError as err:
            await context.abort(GRPC_CODES.get(err.status, grpc.StatusCode.INVALID_ARGUMENT), str(err))
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("unhandled error in gRPC %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal server error")
    return wrapper


def _typed_values(name: str, tensor, datatype: str, dtype: np.dtype, count: int) -> np.ndarray:
    """An input sent in ``contents``: every value must fit the datatype exactly (no wrap-around, no truncation)."""
    field = CONTENTS_FIELDS.get(datatype)
    if field is None:
        raise ProtocolError(f"input {name!r}: datatype {datatype} cannot be sent in contents; send raw_input_contents")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise ProtocolError(f"input {name!r}: {len(values)} values in contents.{field} for shape {list(tensor.shape)}")
    wide = np.asarray(values)
    array = wide.astype(dtype)
    if not np.array_equal(array.astype(wide.dtype), wide):
        raise ProtocolError(f"input {name!r}: contents.{field} holds values outside the range of {datatype}")
    return array


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """{name: array} from typed ``contents`` or from ``raw_input_contents`` (one entry per input, in order)."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise ProtocolError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; send one per input")
    inputs = {}
    for i, tensor in enumerate(request.inputs):
        name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
        if datatype not in DATATYPES:
            raise ProtocolError(f"input {name!r}: unknown datatype {datatype!r}")
        if any(d < 0 for d in shape):
            raise ProtocolError(f"input {name!r}: shape {shape} has negative dimensions")
        if name in inputs:
            raise ProtocolError(f"input {name!r} is given twice")
        dtype, count = np.dtype(DATATYPES[datatype]), math.prod(shape)
        if raw:
            if len(raw[i]) != count * dtype.itemsize:
                raise ProtocolError(f"input {name!r}: {len(raw[i])} raw bytes, shape {shape} of {datatype} needs "
                                    f"{count * dtype.itemsize}")
            inputs[name] = np.frombuffer(raw[i], dtype=dtype).reshape(shape)
        else:
            inputs[name] = _typed_values(name, tensor, datatype, dtype, count).reshape(shape)
    return inputs


def _tensor_metadata(spec: dict) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(**inference.tensor_spec(spec))


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    OPEN_METHODS = ("ServerLive", "ServerReady")

    def __init__(self, repo: Repository, limits: inference.Limits, is_ready: Callable[[], bool], api_key: str,
                 server_version: str, platforms: dict[str, str]):
        self.repo, self.limits, self.is_ready, self.api_key = repo, limits, is_ready, api_key
        self.server_version, self.platforms = server_version, platforms

    def authorize(self, method: str, context: grpc.aio.ServicerContext) -> None:
        """Same key as HTTP, in metadata ``x-api-key`` or ``authorization: Bearer KEY`` (scheme case-insensitive)."""
        if not self.api_key or method in self.OPEN_METHODS:
            return
        meta = {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        scheme, _, token = meta.get("authorization", "").partition(" ")
        given = meta.get("x-api-key") or (token.strip() if scheme.lower() == "bearer" else "")
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise ProtocolError("missing or wrong API key (send metadata x-api-key or authorization: Bearer)", 401)

    @_handled
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @_handled
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.is_ready())

    @_handled
    async def ModelReady(self, request, context):
        model = self.repo.get(request.name)
        ok = model is not None and request.version in ("", str(model.version)) and not model.batcher.closing
        return pb.ModelReadyResponse(ready=ok)

    @_handled
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="scaleseg", version=self.server_version,
                                         extensions=["binary_tensor_data", "model_repository"])

    @_handled
    async def ModelMetadata(self, request, context):
        model = inference.find_model(self.repo, request.name, request.version)
        return pb.ModelMetadataResponse(name=model.name, versions=[str(model.version)],
                                        platform=self.platforms[model.backend.name],
                                        inputs=[_tensor_metadata(t) for t in model.meta["inputs"]],
                                        outputs=[_tensor_metadata(t) for t in model.meta["outputs"]])

    @_handled
    async def ModelConfig(self, request, context):
        model = inference.find_model(self.repo, request.name, request.version)
        return pb.ModelConfigResponse(config=model_config(model, self.platforms[model.backend.name]))

    @_handled
    async def RepositoryIndex(self, request, context):
        return pb.RepositoryIndexResponse(models=[
            pb.RepositoryIndexResponse.ModelIndex(name=m.name, version=str(m.version), state="READY")
            for m in self.repo.models.values()])

    @_handled
    async def ModelInfer(self, request, context):
        inputs = decode_inputs(request)
        names = [o.name for o in request.outputs] or None
        model, results = await inference.infer(self.repo, request.model_name, request.model_version, inputs, names,
                                               self.limits)
        response = pb.ModelInferResponse(model_name=model.name, model_version=str(model.version), id=request.id)
        for name, array in results.items():
            array = np.ascontiguousarray(array)
            response.outputs.add(name=name, datatype=datatype_of(array), shape=list(array.shape))
            response.raw_output_contents.append(array.tobytes())
        return response


def model_config(model: ServedModel, platform: str):
    """The model's configuration in Triton's ModelConfig message (what ``get_model_config`` returns)."""
    from tritonclient.grpc import model_config_pb2 as mc

    def tensors(specs, kind):  # dims leave out the batch dimension, which max_batch_size covers
        return [kind(name=t["name"], data_type=mc.DataType.Value("TYPE_" + t["datatype"]), dims=t["shape"][1:])
                for t in map(inference.tensor_spec, specs)]
    return mc.ModelConfig(name=model.name, platform=platform, max_batch_size=model.batcher.max_batch,
                          input=tensors(model.meta["inputs"], mc.ModelInput),
                          output=tensors(model.meta["outputs"], mc.ModelOutput))


async def start(service: InferenceService, host: str, port: int, max_message_bytes: int,
                shared_port: bool = False) -> grpc.aio.Server:
    """Serve on host:port; with ``shared_port`` (several worker processes) each binds it with SO_REUSEPORT."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message_bytes),
                                      ("grpc.max_send_message_length", -1),
                                      ("grpc.so_reuseport", 1 if shared_port else 0)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as err:
        raise OSError(f"cannot listen for gRPC on {host}:{port} ({err}); choose another --grpc-port") from None
    if bound == 0:
        raise OSError(f"cannot listen for gRPC on {host}:{port}; choose another --grpc-port")
    await server.start()
    log.info("gRPC (KServe v2 GRPCInferenceService) on %s:%d", host, bound)
    return server
