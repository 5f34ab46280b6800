"""Export: ONNX graphs (single-scale and CIF) vs PyTorch on ONNX Runtime, package hygiene, Triton config,
bad input. TensorRT tests run only where TensorRT and a GPU are present."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from export import package as package_module
from export.onnx_export import ExportError, SegmentationGraph
from export.package import export_package
from export.triton import write_repository
from serving.backends import OnnxRuntimeBackend
from training.checkpoint import CheckpointError, load_checkpoint, load_inference_model
from training.cli import main


def test_package_contents_and_meta(package, tiny_data):
    meta = json.loads((package / "meta.json").read_text())
    assert {p.name for p in package.iterdir()} == {"meta.json", "model.onnx", "model.cif.onnx", "checkpoint.pt"}
    assert meta["inputs"] == [{"name": "image", "datatype": "uint8", "shape": ["N", 3, "H", "W"]}]
    assert [o["name"] for o in meta["outputs"]] == ["labels", "confidence", "probs"]
    assert meta["outputs"][0]["datatype"] == "int32" and meta["outputs"][2]["shape"] == ["N", 5, "H", "W"]
    assert meta["graphs"]["model.cif.onnx"]["scales"] == [0.5, 1.0, 2.0]
    assert meta["method"] == "scalematch" and meta["opset"] == 17 and len(meta["classes"]) == 5
    assert meta["data_fingerprint"] and meta["versions"]["onnxruntime"]
    assert meta["parity"]["passed"] and "from" in meta["parity"]["images"]
    for runs in meta["parity"]["graphs"].values():
        assert runs[0]["label_agreement"] >= 0.999 and runs[0]["max_abs_diff_probs"] < 1e-4
    # the CIF graph shares the network's weights between scales instead of copying them
    assert (package / "model.cif.onnx").stat().st_size < 1.2 * (package / "model.onnx").stat().st_size


@pytest.mark.parametrize("graph_file,cif", [("model.onnx", None), ("model.cif.onnx", (0.5, 2.0))])
@pytest.mark.parametrize("shape", [(1, 3, 37, 50), (4, 3, 64, 48)])
def test_onnxruntime_matches_pytorch(package, graph_file, cif, shape):
    model, _, _ = load_inference_model(load_checkpoint(package / "checkpoint.pt"))
    reference = SegmentationGraph(model, cif, with_probs=True)
    images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    with torch.no_grad():
        labels, conf, probs = (t.numpy() for t in reference(torch.from_numpy(images)))
    got = OnnxRuntimeBackend(package / graph_file, providers=["CPUExecutionProvider"]).infer(images)
    assert got["labels"].shape == shape[:1] + shape[2:] and got["labels"].dtype == np.int32
    assert (got["labels"] == labels).mean() >= 0.999
    assert np.abs(got["probs"] - probs).max() < 1e-4
    assert np.allclose(got["probs"].sum(1), 1, atol=1e-5) and np.allclose(got["confidence"], got["probs"].max(1))


def test_triton_repository_config_parses_and_matches_graph(package, tmp_path):
    from tritonclient.grpc import model_config_pb2

    folders = write_repository(package, tmp_path / "repo", "seg")
    assert [f.name for f in folders] == ["seg", "seg_cif"]
    config = text_format.Parse((tmp_path / "repo" / "seg" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == "seg" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 8
    assert config.HasField("dynamic_batching")
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("image", model_config_pb2.TYPE_UINT8, [3, -1, -1])]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("labels", model_config_pb2.TYPE_INT32, [-1, -1]), ("confidence", model_config_pb2.TYPE_FP32, [-1, -1]),
        ("probs", model_config_pb2.TYPE_FP32, [5, -1, -1])]
    assert (tmp_path / "repo" / "seg" / "1" / "model.onnx").read_bytes() == (package / "model.onnx").read_bytes()


def test_export_cli_verify(package, tiny_data, capsys):
    assert main(["export", "verify", str(package), "--data", str(tiny_data)]) == 0
    assert "model.cif.onnx on onnxruntime" in capsys.readouterr().out


def test_bad_inputs(checkpoints, package, tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"nope")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        export_package(junk, tmp_path / "a", progress=lambda m: None)
    with pytest.raises(ExportError, match="needs a checkpoint with a CIF module"):
        export_package(checkpoints["supervised"], tmp_path / "b", cif_scales=(0.5,), progress=lambda m: None)
    with pytest.raises(ExportError, match="opset 9 is not supported"):
        export_package(checkpoints["supervised"], tmp_path / "c", opset=9, progress=lambda m: None)
    assert not (tmp_path / "c").exists()
    assert main(["export", str(checkpoints["supervised"]), "--out", str(package)]) == 2
    assert "already holds another model package" in capsys.readouterr().err
    assert (package / "model.cif.onnx").is_file()  # untouched


def test_failed_parity_writes_nothing(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(package_module, "MIN_AGREEMENT", 1.01)  # impossible: every comparison fails
    real_verify = package_module.verify_package
    monkeypatch.setattr(package_module, "verify_package", lambda pkg, data: real_verify(pkg, data, min_agreement=1.01))
    with pytest.raises(ExportError, match="parity check failed"):
        export_package(checkpoints["supervised"], tmp_path / "p", progress=lambda m: None)
    assert not (tmp_path / "p").exists() and not list(tmp_path.glob(".p.*"))


def _tensorrt_missing() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt package is not installed (it needs an NVIDIA GPU; not installable on the CPU CI machines)"
    if not torch.cuda.is_available():
        return "no NVIDIA GPU visible"
    return None


@pytest.mark.skipif(_tensorrt_missing() is not None, reason=str(_tensorrt_missing()))
def test_tensorrt_engine_parity(checkpoints, tiny_data, tmp_path):
    meta = export_package(checkpoints["scalematch"], tmp_path / "trt", cif_scales=(0.5, 2.0), data=tiny_data,
                          tensorrt="fp32", progress=lambda m: None)
    assert len(meta["tensorrt"]) == 2
    for graph_file, runs in meta["parity"]["graphs"].items():
        assert any(r["backend"].startswith("tensorrt") and r["passed"] for r in runs), graph_file


def test_graph_stays_in_eval_mode_after_export(checkpoints, tmp_path):
    from export.onnx_export import export_graph

    model, _, _ = load_inference_model(load_checkpoint(checkpoints["supervised"]))
    graph = SegmentationGraph(model)
    export_graph(graph, tmp_path / "m.onnx")
    assert not graph.training and not model.training
    labels, _ = graph(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))  # batch 1 would fail in training mode
    assert labels.shape == (1, 32, 32)


def test_graph_without_probs_gives_the_same_labels_and_confidence_without_a_softmax(checkpoints, tmp_path):
    from export.onnx_export import export_graph

    model, _, _ = load_inference_model(load_checkpoint(checkpoints["supervised"]))
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 3, 40, 56), dtype=np.uint8))
    with torch.no_grad():
        labels, conf, probs = SegmentationGraph(model, with_probs=True)(images)
        lean_labels, lean_conf = SegmentationGraph(model)(images)
    assert torch.equal(lean_labels, labels) and torch.allclose(lean_conf, probs.max(1).values, atol=1e-6)
    onnx_model = export_graph(SegmentationGraph(model), tmp_path / "m.onnx")
    # the full softmax cost 29 % of a 512x512 ONNX Runtime pass; only --with-probs graphs may carry one
    assert "Softmax" not in {n.op_type for n in onnx_model.graph.node}
    got = OnnxRuntimeBackend(tmp_path / "m.onnx", providers=["CPUExecutionProvider"]).infer(images.numpy())
    assert (got["labels"] == lean_labels.numpy()).mean() >= 0.999
    assert np.abs(got["confidence"] - lean_conf.numpy()).max() < 1e-5
