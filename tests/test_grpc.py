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


class GrpcServer(Server):
    def __init__(self, model_dir, *flags: str):
        self.grpc_port = free_port()
        super().__init__(model_dir, "--grpc-port", str(self.grpc_port), *flags)
        self.target = f"127.0.0.1:{self.grpc_port}"

    def grpc_client(self) -> tgrpc.InferenceServerClient:
        return tgrpc.InferenceServerClient(self.target)


@pytest.fixture(scope="module")
def server(package):
    s = GrpcServer(package, "--max-pixels", "300000", "--max-upload-mb", "2", "--max-batch", "4")
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


def test_methods_not_offered_answer_unimplemented(server):
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.target))
    for call, request in [(stub.ModelStatistics, pb.ModelStatisticsRequest(name="seg")),
                          (stub.SystemSharedMemoryStatus, pb.SystemSharedMemoryStatusRequest()),
                          (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="seg"))]:
        with pytest.raises(grpc.RpcError) as err:
            call(request)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
