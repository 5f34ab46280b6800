"""`scaleseg serve --grpc-port`: tritonclient.grpc, unchanged, against the real server on free loopback ports;
every malformed request gets a client-side status code (never INTERNAL) and the server keeps serving."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from serving.backends import OnnxRuntimeBackend
from tests.test_serving import Server, free_port, images
from tests.test_serving_hardening import repo_root  # noqa: F401


class GrpcServer(Server):
    def __init__(self, model_dir, *flags: str):
        self.grpc_port = free_port()
        super().__init__(model_dir, "--grpc-port", str(self.grpc_port), *flags)
        self.target = f"127.0.0.1:{self.grpc_port}"

    def grpc_client(self) -> tgrpc.InferenceServerClient:
        return tgrpc.InferenceServerClient(self.target)


@pytest.fixture(scope="module")
def server(package):
    s = GrpcServer(package, "--max-work-pixels", "300000", "--max-upload-mb", "2", "--max-batch", "4")
    yield s
    s.stop()


def grpc_infer(client, x, outputs=None, model="seg", datatype="UINT8"):
    inp = tgrpc.InferInput("image", list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    outs = [tgrpc.InferRequestedOutput(name) for name in outputs] if outputs else None
    return client.infer(model, [inp], outputs=outs)


def test_tritonclient_grpc_health_metadata_config_and_inference(server, package):
    client = server.grpc_client()
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("seg") and client.is_model_ready("seg_cif") and not client.is_model_ready("nope")
    assert "binary_tensor_data" in client.get_server_metadata(as_json=True)["extensions"]
    meta = client.get_model_metadata("seg", as_json=True)
    assert meta["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": ["-1", "3", "-1", "-1"]}]
    assert [o["name"] for o in meta["outputs"]] == ["labels", "confidence", "probs"]
    config = client.get_model_config("seg", as_json=True)["config"]
    assert config["max_batch_size"] == 4 and config["input"][0]["data_type"] == "TYPE_UINT8"
    assert [m["name"] for m in client.get_model_repository_index(as_json=True)["models"]] == ["seg", "seg_cif"]
    x = images()
    expected = OnnxRuntimeBackend(package / "model.onnx").infer(x)
    result = grpc_infer(client, x, outputs=["labels", "confidence"])
    assert np.array_equal(result.as_numpy("labels"), expected["labels"])
    assert np.allclose(result.as_numpy("confidence"), expected["confidence"], atol=1e-6)
    assert result.as_numpy("probs") is None
    everything = grpc_infer(client, x)  # no outputs named: all of them
    assert everything.as_numpy("probs").shape == (2, 5, 40, 56)
    assert grpc_infer(client, x, model="seg_cif").as_numpy("labels").shape == (2, 40, 56)


def test_typed_contents_are_checked_not_truncated(server, package):
    """Values sent in ``contents`` (not raw bytes) must fit UINT8 exactly: 300 is refused, not wrapped to 44."""
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.target))
    x = images(1, 20, 24)

    def request(values):
        tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=list(x.shape))
        tensor.contents.uint_contents.extend(values)
        return pb.ModelInferRequest(model_name="seg", inputs=[tensor])

    response = stub.ModelInfer(request(x.ravel().tolist()))
    labels = np.frombuffer(response.raw_output_contents[0], np.int32).reshape(1, 20, 24)
    assert np.array_equal(labels, OnnxRuntimeBackend(package / "model.onnx").infer(x)["labels"])
    bad = x.ravel().tolist()
    bad[0] = 300
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request(bad))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "outside the range of UINT8" in err.value.details()


def _raw_request(x: np.ndarray, raw: bytes | None = None, model="seg", outputs=(), datatype="UINT8", shape=None):
    tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype=datatype, shape=shape or list(x.shape))
    return pb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[x.tobytes() if raw is None else raw],
                                outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=o) for o in outputs])


BAD_REQUESTS = {
    "unknown model": (lambda x: _raw_request(x, model="nope"), grpc.StatusCode.NOT_FOUND, "unknown model"),
    "float input": (lambda x: _raw_request(x.astype(np.float32), datatype="FP32"), grpc.StatusCode.INVALID_ARGUMENT, "UINT8"),
    "raw bytes short": (lambda x: _raw_request(x, raw=x.tobytes()[:-1]), grpc.StatusCode.INVALID_ARGUMENT, "raw bytes"),
    "wrong rank": (lambda x: _raw_request(x, shape=[x.size]), grpc.StatusCode.INVALID_ARGUMENT, "[N, 3, H, W]"),
    "unknown datatype": (lambda x: _raw_request(x, datatype="BF17"), grpc.StatusCode.INVALID_ARGUMENT, "unknown datatype"),
    "unknown output": (lambda x: _raw_request(x, outputs=["logits"]), grpc.StatusCode.INVALID_ARGUMENT, "unknown output"),
    "tiny image": (lambda x: _raw_request(x[:, :, :8, :8].copy()), grpc.StatusCode.INVALID_ARGUMENT, "at least 16x16"),
    "batch too large": (lambda x: _raw_request(np.repeat(x, 5, axis=0)), grpc.StatusCode.INVALID_ARGUMENT, "batch of 5"),
    "too many pixels": (lambda x: _raw_request(np.zeros((1, 3, 600, 600), np.uint8)), grpc.StatusCode.RESOURCE_EXHAUSTED,
                        "pixel limit"),
    "message over the upload limit": (lambda x: _raw_request(np.zeros((1, 3, 1000, 1000), np.uint8)),
                                      grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    "two raw blobs for one input": (lambda x: pb.ModelInferRequest(
        model_name="seg", inputs=_raw_request(x).inputs, raw_input_contents=[x.tobytes(), b""]),
        grpc.StatusCode.INVALID_ARGUMENT, "one per input"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_client_status_codes_and_server_keeps_serving(server, case):
    make, code, message = BAD_REQUESTS[case]
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.target))
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(make(images(1, 32, 32)))
    assert err.value.code() == code and message in err.value.details()
    assert grpc_infer(server.grpc_client(), images(1, 32, 32)).as_numpy("labels").shape == (1, 32, 32)


def test_grpc_api_key(package):
    s = GrpcServer(package, "--api-key", "s3cret")
    try:
        client = s.grpc_client()
        assert client.is_server_live()  # health stays open, as over HTTP
        with pytest.raises(InferenceServerException, match="API key"):
            grpc_infer(client, images(1, 32, 32))
        for headers in ({"x-api-key": "s3cret"}, {"authorization": "bearer s3cret"}):
            inp = tgrpc.InferInput("image", [1, 3, 32, 32], "UINT8").set_data_from_numpy(images(1, 32, 32))
            assert client.infer("seg", [inp], headers=headers).as_numpy("labels").shape == (1, 32, 32)
    finally:
        s.stop()


def test_rpcs_not_offered_answer_unimplemented_after_the_key_and_without_a_traceback(package):
    s = GrpcServer(package, "--api-key", "s3cret")
    try:
        stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(s.target))
        calls = [(stub.SystemSharedMemoryStatus, pb.SystemSharedMemoryStatusRequest()),
                 (stub.CudaSharedMemoryRegister, pb.CudaSharedMemoryRegisterRequest(name="x")),
                 (stub.TraceSetting, pb.TraceSettingRequest()), (stub.LogSettings, pb.LogSettingsRequest())]
        for call, request in calls:
            with pytest.raises(grpc.RpcError) as err:
                call(request)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED  # the key is checked before anything else
            with pytest.raises(grpc.RpcError) as err:
                call(request, metadata=[("x-api-key", "s3cret")])
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and "not offered" in err.value.details()
    finally:
        s.stop()
    log = s.proc.stdout.read()
    assert "Traceback" not in log, log[-3000:]


def _raw_call(target: str, method: str, data: bytes, metadata=()):
    """Bytes on the wire for ``method``, whatever they are; (status code, details)."""
    call = grpc.insecure_channel(target).unary_unary(f"/inference.GRPCInferenceService/{method}")
    try:
        call(data, metadata=metadata, timeout=30)
    except grpc.RpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""


def test_invalid_protobuf_and_impossible_shapes_are_invalid_argument(server):
    bad_tag, short_field, bad_utf8 = b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x0a\x02\xc3\x28"
    for method, data in [(m, d) for m in ("ModelInfer", "ModelMetadata", "RepositoryModelLoad") for d in
                         (bad_tag, short_field, bad_utf8)] + [("ServerLive", bad_tag), ("ServerLive", short_field)]:
        code, details = _raw_call(server.target, method, data)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "protobuf" in details, (method, data, code, details)
    x = images(1, 16, 16)
    for shape in ([1] * 9, [1] * 70, [0, 3, 2 ** 62, 2 ** 62], [0] * 8):
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.target)).ModelInfer(
                _raw_request(x, raw=b"", shape=shape))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (shape, err.value.details())


def test_statistics_and_repository_load_unload_over_grpc(repo_root):
    s = GrpcServer(repo_root / "seg", "--model-repository", str(repo_root), "--api-key", "k")
    try:
        client, key = s.grpc_client(), {"x-api-key": "k"}
        inp = tgrpc.InferInput("image", [1, 3, 32, 32], "UINT8").set_data_from_numpy(images(1, 32, 32))
        client.infer("seg", [inp], headers=key)
        stats = client.get_inference_statistics("seg", headers=key, as_json=True)["model_stats"][0]
        assert stats["name"] == "seg" and int(stats["inference_stats"]["success"]["count"]) == 1
        everything = client.get_inference_statistics(headers=key, as_json=True)["model_stats"]
        assert {m["name"] for m in everything} == {"seg", "seg_cif"}
        with pytest.raises(InferenceServerException, match="API key"):
            client.load_model("plain")
        client.load_model("plain", headers=key)
        assert client.is_model_ready("plain", headers=key)
        index = {m["name"]: m for m in client.get_model_repository_index(headers=key, as_json=True)["models"]}
        assert index["plain"]["state"] == "READY"
        with pytest.raises(InferenceServerException, match="not supported"):
            client.load_model("plain", headers=key, config='{"max_batch_size": 2}')
        request = pb.RepositoryModelLoadRequest(model_name="x")
        request.parameters["model_dir"].string_param = "/etc"
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(s.target)).RepositoryModelLoad(
                request, metadata=[("x-api-key", "k")])
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "outside" in err.value.details()
        client.unload_model("plain", headers=key)
        assert not client.is_model_ready("plain", headers=key)
        index = {m["name"]: m for m in client.get_model_repository_index(headers=key, as_json=True)["models"]}
        assert index["plain"]["state"] == "UNAVAILABLE"
    finally:
        s.stop()
