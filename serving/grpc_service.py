"""Open Inference Protocol over gRPC (KServe v2 ``inference.GRPCInferenceService``), so ``tritonclient.grpc``
works unchanged: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig,
ModelStatistics, RepositoryIndex, RepositoryModelLoad / Unload, ModelInfer and ModelStreamInfer with typed
or raw (binary) tensors; outputs always go back raw.

The message classes are the ones tritonclient ships (``tritonclient.grpc.service_pb2``), generated from
Triton's grpc_service.proto, the proto the client itself speaks: no generator toolchain, no copy that can
drift from the client. Every RPC of that service is registered here with the request left as bytes, so
the API key is checked first, a message that is not valid protobuf is the client's INVALID_ARGUMENT, and
an RPC this server does not offer (shared memory, trace and log settings) answers UNIMPLEMENTED: all
without a traceback. It runs on the HTTP server's event loop and shares its repository, batchers, limits
(``inference.py``) and repository control (``control.py``); client errors map to INVALID_ARGUMENT /
NOT_FOUND / PERMISSION_DENIED / FAILED_PRECONDITION / RESOURCE_EXHAUSTED / UNAVAILABLE / UNAUTHENTICATED,
never INTERNAL. The receive limit bounds each message before it is parsed.
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from . import inference
from .auth import key_matches, presented_key
from .control import RepositoryControl
from .limits import RequestLimits
from .protocol import DATATYPES, MAX_DIMS, ProtocolError, TensorSpec, datatype_of
from .repository import Repository, ServedModel

log = logging.getLogger("scaleseg.serving")
# An RPC of the protocol that this server does not offer is the client's request, not a server fault: 405
# (method not allowed) inside, UNIMPLEMENTED on the wire.
GRPC_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
              403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
              405: grpc.StatusCode.UNIMPLEMENTED, 409: grpc.StatusCode.FAILED_PRECONDITION,
              413: grpc.StatusCode.RESOURCE_EXHAUSTED, 415: grpc.StatusCode.INVALID_ARGUMENT,
              503: grpc.StatusCode.UNAVAILABLE}
SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
# Which InferTensorContents field carries each datatype when a client sends typed values instead of raw bytes.
CONTENTS_FIELDS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
                   "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
                   "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
                   "FP32": "fp32_contents", "FP64": "fp64_contents"}


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


def declared_inputs(request: pb.ModelInferRequest) -> list[TensorSpec]:
    """The inputs as the request declares them, checked for form (as HTTP checks its JSON header) before
    any tensor is decoded."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise ProtocolError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; send one per input")
    specs: list[TensorSpec] = []
    for tensor in request.inputs:
        name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
        if datatype not in DATATYPES:
            raise ProtocolError(f"input {name!r}: unknown datatype {datatype!r}; use one of {', '.join(DATATYPES)}")
        if len(shape) > MAX_DIMS or any(d < 0 for d in shape):
            raise ProtocolError(f"input {name!r}: shape must be a list of at most {MAX_DIMS} non-negative integers, "
                                f"got {shape[:MAX_DIMS + 1]}")
        if any(s.name == name for s in specs):
            raise ProtocolError(f"input {name!r} is given twice")
        specs.append(TensorSpec(name, datatype, shape))
    return specs


def decode_inputs(request: pb.ModelInferRequest, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """{name: array} from typed ``contents`` or from ``raw_input_contents`` (one entry per input, in order);
    call after the declared shapes passed the request limits."""
    raw = request.raw_input_contents
    inputs = {}
    for i, (tensor, spec) in enumerate(zip(request.inputs, specs)):
        dtype, count = np.dtype(DATATYPES[spec.datatype]), math.prod(spec.shape)
        if raw:
            if len(raw[i]) != count * dtype.itemsize:
                raise ProtocolError(f"input {spec.name!r}: {len(raw[i])} raw bytes, shape {spec.shape} of {spec.datatype} "
                                    f"needs {count * dtype.itemsize}")
            inputs[spec.name] = np.frombuffer(raw[i], dtype=dtype).reshape(spec.shape)
        else:
            inputs[spec.name] = _typed_values(spec.name, tensor, spec.datatype, dtype, count).reshape(spec.shape)
    return inputs


def _tensor_metadata(spec: dict) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(**inference.tensor_spec(spec))


class InferenceService:
    OPEN_METHODS = ("ServerLive", "ServerReady")

    def __init__(self, repo: Repository, control: RepositoryControl, limits: RequestLimits, is_ready: Callable[[], bool],
                 api_key: str, server_version: str, platforms: dict[str, str]):
        self.repo, self.control, self.limits, self.is_ready, self.api_key = repo, control, limits, is_ready, api_key
        self.server_version, self.platforms = server_version, platforms

    # --- every RPC passes here: key, then parsing, then the method -----------------------------------------
    def authorize(self, method: str, context: grpc.aio.ServicerContext) -> None:
        """Same key and rule as HTTP, in metadata ``x-api-key`` or ``authorization: Bearer KEY``."""
        if not self.api_key or method in self.OPEN_METHODS:
            return
        meta = {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        if not key_matches(presented_key(meta.get("x-api-key"), meta.get("authorization")), self.api_key):
            raise ProtocolError("missing or wrong API key (send metadata x-api-key or authorization: Bearer)", 401)

    def method(self, name: str):
        implementation = getattr(self, name, None)
        if implementation is None:
            raise ProtocolError(f"{name} is not offered by this server (no shared memory, trace or log settings); "
                                "send tensors in the request and see the server's own log", 405)
        return implementation

    @staticmethod
    def parse(name: str, request_class, data: bytes):
        try:
            return request_class.FromString(data)
        except (DecodeError, RecursionError, ValueError):
            raise ProtocolError(f"the {name} request is not a valid {request_class.DESCRIPTOR.full_name} protobuf "
                                "message") from None

    def unary(self, name: str, request_class):
        async def handle(data: bytes, context: grpc.aio.ServicerContext):
            try:
                self.authorize(name, context)
                method = self.method(name)
                return await method(self.parse(name, request_class, data))
            except ProtocolError as err:
                await context.abort(GRPC_CODES.get(err.status, grpc.StatusCode.INVALID_ARGUMENT), str(err))
            except grpc.aio.AbortError:
                raise
            except Exception:  # a server fault: logged here, never shown to the client
                log.exception("unhandled error in gRPC %s", name)
                await context.abort(grpc.StatusCode.INTERNAL, "internal server error")
        return handle

    def stream(self, name: str, request_class):
        """ModelStreamInfer: one response per request, a client error in the response's ``error_message``
        (as Triton does), so one bad request does not end the stream."""
        async def handle(requests, context: grpc.aio.ServicerContext):
            try:
                self.authorize(name, context)
            except ProtocolError as err:
                await context.abort(GRPC_CODES[err.status], str(err))
            async for data in requests:
                try:
                    response = await self.ModelInfer(self.parse(name, request_class, data))
                    yield pb.ModelStreamInferResponse(infer_response=response)
                except ProtocolError as err:
                    yield pb.ModelStreamInferResponse(error_message=str(err))
                except Exception:
                    log.exception("unhandled error in gRPC %s", name)
                    yield pb.ModelStreamInferResponse(error_message="internal server error")
        return handle

    def handler(self) -> grpc.GenericRpcHandler:
        """Every RPC of GRPCInferenceService, requests left as bytes for ``parse``."""
        handlers = {}
        for rpc in SERVICE.methods:
            request_class = getattr(pb, rpc.input_type.name)
            if rpc.client_streaming or rpc.server_streaming:
                handlers[rpc.name] = grpc.stream_stream_rpc_method_handler(
                    self.stream(rpc.name, request_class), response_serializer=lambda m: m.SerializeToString())
            else:
                handlers[rpc.name] = grpc.unary_unary_rpc_method_handler(
                    self.unary(rpc.name, request_class), response_serializer=lambda m: m.SerializeToString())
        return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)

    # --- the RPCs offered ----------------------------------------------------------------------------
    async def ServerLive(self, request):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request):
        return pb.ServerReadyResponse(ready=self.is_ready())

    async def ModelReady(self, request):
        model = self.repo.get(request.name)
        ok = model is not None and request.version in ("", str(model.version)) and not model.batcher.closing
        return pb.ModelReadyResponse(ready=ok)

    async def ServerMetadata(self, request):
        return pb.ServerMetadataResponse(name="scaleseg", version=self.server_version,
                                         extensions=["binary_tensor_data", "model_repository", "model_configuration",
                                                     "statistics"])

    async def ModelMetadata(self, request):
        model = inference.find_model(self.repo, request.name, request.version)
        return pb.ModelMetadataResponse(name=model.name, versions=[str(model.version)],
                                        platform=self.platforms[model.backend.name],
                                        inputs=[_tensor_metadata(t) for t in model.meta["inputs"]],
                                        outputs=[_tensor_metadata(t) for t in model.meta["outputs"]])

    async def ModelConfig(self, request):
        model = inference.find_model(self.repo, request.name, request.version)
        return pb.ModelConfigResponse(config=model_config(model, self.platforms[model.backend.name]))

    async def ModelStatistics(self, request):
        """Triton's statistics extension: one model (``name``) or every loaded one (no name)."""
        models = ([inference.find_model(self.repo, request.name, request.version)] if request.name
                  else list(self.repo.models.values()))
        return json_format.ParseDict({"model_stats": [m.stats.triton(m.name, str(m.version)) for m in models]},
                                     pb.ModelStatisticsResponse())

    async def RepositoryIndex(self, request):
        index = [pb.RepositoryIndexResponse.ModelIndex(name=m.name, version=str(m.version), state="READY")
                 for m in self.repo.models.values()]
        if not request.ready:
            index += [pb.RepositoryIndexResponse.ModelIndex(name=name, state="UNAVAILABLE", reason="unloaded")
                      for name in self.repo.available() if self.repo.get(name) is None]
        return pb.RepositoryIndexResponse(models=index)

    async def RepositoryModelLoad(self, request):
        params = {}
        for key, value in request.parameters.items():
            kind = value.WhichOneof("parameter_choice")
            params[key] = getattr(value, kind) if kind else None
        await self.control.load(request.model_name, params)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request):
        await self.control.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def ModelInfer(self, request):
        specs = declared_inputs(request)
        names = [o.name for o in request.outputs] or None
        model, results = await inference.infer_arrays(self.repo, request.model_name, request.model_version, specs,
                                                      lambda: decode_inputs(request, specs), names, self.limits)
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
    server.add_generic_rpc_handlers((service.handler(),))
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as err:
        raise OSError(f"cannot listen for gRPC on {host}:{port} ({err}); choose another --grpc-port") from None
    if bound == 0:
        raise OSError(f"cannot listen for gRPC on {host}:{port}; choose another --grpc-port")
    await server.start()
    log.info("gRPC (KServe v2 GRPCInferenceService) on %s:%d", host, bound)
    return server
