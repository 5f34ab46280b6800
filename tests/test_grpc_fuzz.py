"""Fuzz every RPC of the gRPC endpoint with generated requests (hypothesis), as tests/test_serving_fuzz.py
does for the HTTP routes: random bytes, messages of the RPC's type with every field drawn from odd values,
and inference requests with odd datatypes, shapes and contents. Whatever arrives, the status is never
INTERNAL or UNKNOWN, the server keeps serving, and its log holds no traceback. Derandomized, so CI runs the
same examples every time."""
from __future__ import annotations

import math

import grpc
import pytest
import tritonclient.grpc as tgrpc
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb

from serving.grpc_service import SERVICE
from tests.test_grpc import GrpcServer
from tests.test_serving import images
from tests.test_serving_hardening import repo_root  # noqa: F401

KEY = "k"
STRINGS = st.sampled_from(["seg", "seg_cif", "plain", "nope", "image", "labels", "probs", "UINT8", "FP32", "BYTES",
                           "", "1", "2", "model_dir", "../..", "/etc", "x" * 300, "é", "\x00"]) | st.text(max_size=10)
INTS = st.sampled_from([0, 1, 3, 16, 32, -1, 2 ** 31, 2 ** 62, -(2 ** 63)]) | st.integers(-5, 70)
SCALARS = {FieldDescriptor.TYPE_STRING: STRINGS, FieldDescriptor.TYPE_BYTES: st.binary(max_size=64),
           FieldDescriptor.TYPE_BOOL: st.booleans(), FieldDescriptor.TYPE_FLOAT: st.floats(width=32),
           FieldDescriptor.TYPE_DOUBLE: st.floats()}
UNSIGNED = (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED32,
            FieldDescriptor.TYPE_FIXED64)


def _scalar(field: FieldDescriptor):
    if field.type in SCALARS:
        return SCALARS[field.type]
    if field.type == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values])
    bits = 32 if field.type in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_SINT32,
                                FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32) else 64
    low, high = (0, 2 ** bits - 1) if field.type in UNSIGNED else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return INTS.filter(lambda v: low <= v <= high)


@st.composite
def message(draw, cls, depth: int = 0):
    """An instance of ``cls`` with a random subset of its fields set to drawn values."""
    msg = cls()
    for field in cls.DESCRIPTOR.fields:
        if depth > 3 or not draw(st.booleans()):
            continue
        target = getattr(msg, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            for key in draw(st.lists(STRINGS, max_size=2)):
                if value_field.message_type is None:
                    target[key] = draw(_scalar(value_field))
                else:
                    target[key].CopyFrom(draw(message(value_field.message_type._concrete_class, depth + 1)))
        elif field.message_type is not None:
            kind = field.message_type._concrete_class
            if field.label == FieldDescriptor.LABEL_REPEATED:
                target.extend(draw(st.lists(message(kind, depth + 1), max_size=2)))
            else:
                target.CopyFrom(draw(message(kind, depth + 1)))
        elif field.label == FieldDescriptor.LABEL_REPEATED:
            target.extend(draw(st.lists(_scalar(field), max_size=4)))
        else:
            setattr(msg, field.name, draw(_scalar(field)))
    return msg


@st.composite
def infer_request(draw) -> pb.ModelInferRequest:
    """An inference request near a valid one: the right input name, a plausible shape, raw or typed data."""
    shape = draw(st.lists(st.integers(0, 40), min_size=0, max_size=10)
                 | st.sampled_from([[1, 3, 16, 16], [2, 3, 20, 24], [1, 3, 600, 600], [0, 3, 2 ** 40, 2 ** 40]]))
    datatype = draw(st.sampled_from(["UINT8", "UINT8", "FP32", "INT64", "BOOL", "BYTES", "uint8"]))
    tensor = pb.ModelInferRequest.InferInputTensor(name=draw(st.sampled_from(["image", "images", ""])),
                                                   datatype=datatype, shape=shape)
    request = pb.ModelInferRequest(model_name=draw(st.sampled_from(["seg", "seg_cif", "nope"])),
                                   model_version=draw(st.sampled_from(["", "1", "x"])), inputs=[tensor])
    count = math.prod(shape)
    if draw(st.booleans()):
        size = count if count <= 20_000 and draw(st.booleans()) else draw(st.integers(0, 2000))
        request.raw_input_contents.extend([bytes(size)] * draw(st.sampled_from([1, 1, 2])))
    elif count <= 5000:
        tensor.contents.uint_contents.extend(draw(st.lists(st.integers(0, 300), min_size=count, max_size=count)))
    for name in draw(st.lists(st.sampled_from(["labels", "confidence", "probs", "logits"]), max_size=3)):
        request.outputs.add(name=name)
    return request


METHODS = [m for m in SERVICE.methods if not m.client_streaming]
PAYLOADS = {m.name: st.binary(max_size=200) | message(getattr(pb, m.input_type.name)).map(lambda x: x.SerializeToString())
            for m in SERVICE.methods}
PAYLOADS["ModelInfer"] = PAYLOADS["ModelInfer"] | infer_request().map(lambda x: x.SerializeToString())
BAD = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


@pytest.fixture(scope="module")
def fuzz_server(repo_root):  # noqa: F811
    s = GrpcServer(repo_root / "seg", "--model-repository", str(repo_root), "--api-key", KEY, "--max-work-pixels",
                   "200000", "--max-upload-mb", "1", "--max-models", "3", "--max-delay-ms", "1")
    yield s
    s.stop()


def test_no_rpc_gets_internal_or_unknown_and_nothing_is_logged_as_a_traceback(fuzz_server):
    channel = grpc.insecure_channel(fuzz_server.target)
    calls = {m.name: channel.unary_unary(f"/{SERVICE.full_name}/{m.name}") for m in METHODS}
    stream = channel.stream_stream(f"/{SERVICE.full_name}/ModelStreamInfer")
    keys = st.sampled_from([[("x-api-key", KEY)]] * 4 + [[], [("authorization", f"Bearer {KEY}")], [("x-api-key", "")]])

    @settings(max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data(), metadata=keys)
    def one(data, metadata):
        method = data.draw(st.sampled_from([m.name for m in METHODS] + ["ModelStreamInfer"]))
        payload = data.draw(PAYLOADS[method])
        try:
            if method == "ModelStreamInfer":
                list(stream(iter([payload, payload]), metadata=metadata, timeout=30))
            else:
                calls[method](payload, metadata=metadata, timeout=30)
        except grpc.RpcError as err:
            assert err.code() not in BAD, (method, payload[:200], err.code(), err.details())

    one()
    client, key = fuzz_server.grpc_client(), {"x-api-key": KEY}
    client.load_model("seg", headers=key)  # the fuzz may have unloaded it
    inp = tgrpc.InferInput("image", [1, 3, 32, 32], "UINT8").set_data_from_numpy(images(1, 32, 32))
    assert client.infer("seg", [inp], headers=key).as_numpy("labels").shape == (1, 32, 32)
    fuzz_server.stop()
    log = fuzz_server.proc.stdout.read()
    assert "Traceback" not in log and "Exception" not in log, log[-3000:]
