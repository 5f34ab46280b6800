"""CPU INT8: `scaleseg export --quantize int8` (ONNX Runtime static quantization) writes gated INT8 graphs and
refuses below its gate, `scaleseg serve --precision` serves them (tritonclient), the app says which
precision ran, and the Triton repository gets them as their own models."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime
import pytest
import torch
import tritonclient.http as triton
from google.protobuf import text_format

from app.predictor import Predictor, RemoteBackend
from export.quantize import Gate, gate_failures, gate_verdict
from export.triton import write_repository
from serving.backends import BackendError, OnnxRuntimeBackend
import serving.precision
from serving.precision import (choose_precision, cpu_flags, int8_cpu, int8_cpu_warning, int8_twins, load_graph,
                               this_int8_cpu)
from tests.test_serving import Server, images
from training.cli import main


@pytest.fixture(scope="module")
def int8_package(checkpoints, tiny_data, tmp_path_factory):
    """The ScaleMatch checkpoint exported from the CLI with its CIF graph and --quantize int8. The tiny model
    (mIoU ~3) has near-tied logits, so its label agreement depends on the CPU's int8 kernels: 99 % or more on
    AVX512-VNNI cores, 98.8-99.7 % on AVX2 ones (U8S8 through VPMADDUBSW). A 97 % gate lets it ship on both."""
    out = tmp_path_factory.mktemp("int8") / "seg"
    code = main(["export", str(checkpoints["scalematch"]), "--out", str(out), "--cif-scales", "0.5,2.0",
                 "--data", str(tiny_data), "--quantize", "int8", "--int8-min-agreement", "0.97"])
    assert code == 0
    return out


def test_export_quantize_int8_writes_gated_graphs_and_meta(int8_package, tiny_data, capsys):
    files = {p.name for p in int8_package.iterdir()}
    assert {"model.onnx", "model.cif.onnx", "model.int8.onnx", "model.cif.int8.onnx", "meta.json"} <= files
    meta = json.loads((int8_package / "meta.json").read_text())
    record = meta["int8"]
    assert meta["precisions"] == ["fp32", "int8"]
    assert record["graphs"] == {"model.onnx": "model.int8.onnx", "model.cif.onnx": "model.cif.int8.onnx"}
    assert record["format"] == "QDQ" and record["activations"] == "uint8" and record["weights"] == "int8, per channel"
    for verdict in record["gate"]["graphs"].values():
        assert 0 <= verdict["uncertain_share"] <= 1
        assert verdict["agreement_confident"] is None or 0 <= verdict["agreement_confident"] <= 1
    assert record["calibration"]["method"] == "entropy" and record["calibration"]["count"] == 12  # every unlabelled image
    gate = record["gate"]
    assert gate["passed"] and gate["min_agreement"] == 0.97 and gate["max_miou_drop"] == 0.5
    assert gate["cpu"] == this_int8_cpu()  # which CPU's kernels the gate's numbers hold for
    for verdict in gate["graphs"].values():
        assert verdict["label_agreement"] >= 0.97 and verdict["miou_drop"] <= 0.5 and verdict["images"] == 4
    # the INT8 graph really is quantized: int8 weights behind DequantizeLinear, and smaller than FP32
    import onnx
    graph = onnx.load(str(int8_package / "model.int8.onnx"))
    assert any(n.op_type == "DequantizeLinear" for n in graph.graph.node)
    assert (int8_package / "model.int8.onnx").stat().st_size < 0.5 * (int8_package / "model.onnx").stat().st_size
    # same I/O contract as the FP32 graph
    out = OnnxRuntimeBackend(int8_package / "model.int8.onnx").infer(images(1, 37, 50))
    assert out["labels"].shape == (1, 37, 50) and out["labels"].dtype == np.int32 and out["labels"].max() < 5


def test_failed_int8_gate_refuses_and_writes_nothing(checkpoints, tiny_data, tmp_path, capsys):
    out = tmp_path / "strict"
    code = main(["export", str(checkpoints["supervised"]), "--out", str(out), "--data", str(tiny_data),
                 "--quantize", "int8", "--int8-min-agreement", "1.01", "--calib-count", "4"])
    err = capsys.readouterr().err
    assert code == 2
    assert "INT8 accuracy gate failed, nothing was written" in err and "points below 101.00 %" in err
    assert "--calib-count" in err  # says what to try
    assert not out.exists() and not list(tmp_path.glob(".strict.*"))


def test_quantize_needs_val_masks(checkpoints, data_copy, tmp_path, capsys):
    shutil.rmtree(data_copy / "masks")
    code = main(["export", str(checkpoints["supervised"]), "--out", str(tmp_path / "p"), "--data", str(data_copy),
                 "--quantize", "int8"])
    assert code == 2 and "needs val images with masks" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_gate_verdict_and_message():
    gate = Gate(0.99, 0.5)
    ok = gate_verdict(0.995, 60.0, 59.8, gate)
    assert ok["passed"] and ok["agreement_short"] == 0 and ok["drop_excess"] == 0
    assert gate_verdict(0.99, 60.0, 59.5, gate)["passed"]  # both limits are inclusive
    low = gate_verdict(0.98, 60.0, 58.9, gate)
    assert not low["passed"] and low["agreement_short"] == pytest.approx(0.01) and low["drop_excess"] == pytest.approx(0.6)
    assert not gate_verdict(0.999, 60.0, 59.0, gate)["passed"]  # agreement alone is not enough
    message = gate_failures({"model.int8.onnx": ok, "model.cif.int8.onnx": low}, gate)
    assert "model.int8.onnx" not in message
    assert "model.cif.int8.onnx: label agreement 98.00 % is 1.00 points below 99.00 %" in message
    assert "mIoU drop 1.10 (60.00 -> 58.90) is 0.60 points over 0.50" in message
    assert gate_failures({"model.int8.onnx": ok}, gate) == ""


@pytest.mark.parametrize("requested,has_int8,gpu,expected", [
    ("auto", True, False, "int8"), ("auto", False, False, "fp32"), ("auto", True, True, "fp32"),
    ("fp32", True, False, "fp32"), ("int8", True, False, "int8"), ("int8", True, True, "int8")])
def test_choose_precision(requested, has_int8, gpu, expected):
    assert choose_precision(requested, has_int8, gpu, "pkg/model.onnx") == expected


def test_choose_precision_refusals(int8_package):
    with pytest.raises(BackendError, match="no INT8 graph that passed its accuracy gate.*--quantize int8"):
        choose_precision("int8", False, False, "pkg/model.onnx")
    with pytest.raises(BackendError, match="unknown precision"):
        choose_precision("fp16", True, False, "pkg/model.onnx")
    meta = json.loads((int8_package / "meta.json").read_text())
    with pytest.raises(BackendError, match="drop --backend tensorrt"):
        load_graph(int8_package, "model.onnx", meta, kind="tensorrt", requested="int8")


def test_int8_twins_only_for_passed_gates_and_present_files(tmp_path):
    (tmp_path / "model.int8.onnx").write_bytes(b"x")
    good = {"int8": {"graphs": {"model.onnx": "model.int8.onnx", "model.cif.onnx": "model.cif.int8.onnx"},
                     "gate": {"passed": True}}}
    assert int8_twins(good, tmp_path) == {"model.onnx": "model.int8.onnx"}  # the CIF twin's file is missing
    assert int8_twins({"int8": {**good["int8"], "gate": {"passed": False}}}, tmp_path) == {}
    assert int8_twins({}, tmp_path) == {}
    escape = {"int8": {"graphs": {"model.onnx": "../model.int8.onnx"}, "gate": {"passed": True}}}
    assert int8_twins(escape, tmp_path / "sub") == {}


def test_int8_cpu_says_whether_u8s8_can_saturate():
    x86_info = "processor\t: 0\nvmx flags\t: vnmi ept\nflags\t\t: fpu avx2 avx512_vnni\nbugs\t\t: spectre\n"
    assert cpu_flags(x86_info) == {"fpu", "avx2", "avx512_vnni"}  # not the "vmx flags" line
    assert cpu_flags("processor\t: 0\nFeatures\t: fp asimd asimddp\n") is None  # ARM lists "Features"
    assert int8_cpu("x86_64", cpu_flags(x86_info)) == {"machine": "x86_64", "vnni": True}
    assert int8_cpu("AMD64", frozenset({"avx2", "avx_vnni"}))["vnni"] is True
    assert int8_cpu("x86_64", frozenset({"avx2", "avx512f"}))["vnni"] is False
    assert int8_cpu("x86_64", None)["vnni"] is None  # flags not read
    assert int8_cpu("aarch64", frozenset({"asimddp"}))["vnni"] is None
    vnni, avx2, arm, ppc = ({"machine": "x86_64", "vnni": True}, {"machine": "x86_64", "vnni": False},
                            {"machine": "arm64", "vnni": None}, {"machine": "ppc64le", "vnni": None})
    assert "x86_64, VNNI), and this x86 CPU has no VNNI" in int8_cpu_warning(vnni, avx2, "pkg/model.int8.onnx")
    assert "(arm64), and this x86 CPU has no VNNI" in int8_cpu_warning(arm, avx2, "p")  # ARM does not saturate
    assert int8_cpu_warning(avx2, vnni, "p") is None and int8_cpu_warning(vnni, vnni, "p") is None
    assert int8_cpu_warning(avx2, avx2, "p") is None and int8_cpu_warning(vnni, arm, "p") is None
    assert int8_cpu_warning(ppc, avx2, "p") is None  # no claim about other architectures' kernels
    assert int8_cpu_warning(None, avx2, "p") is None  # a package exported before the gate recorded its CPU
    assert int8_cpu_warning({"machine": "x86_64", "vnni": None}, avx2, "p") is None  # flags unknown there
    assert int8_cpu_warning({"machine": 3, "vnni": "yes"}, avx2, "p") is None  # a foreign meta.json


def test_serving_int8_gated_with_vnni_on_a_cpu_without_warns(int8_package, monkeypatch, caplog):
    meta = json.loads((int8_package / "meta.json").read_text())
    meta["int8"]["gate"]["cpu"] = {"machine": "x86_64", "vnni": True}
    monkeypatch.setattr(serving.precision, "this_int8_cpu", lambda: {"machine": "x86_64", "vnni": False})
    with caplog.at_level("WARNING", logger="scaleseg.serving"):
        assert load_graph(int8_package, "model.onnx", meta, requested="fp32").precision == "fp32"
        assert not caplog.records  # the FP32 graph runs: nothing to warn about
        assert load_graph(int8_package, "model.onnx", meta, requested="int8").precision == "int8"
    assert len(caplog.records) == 1 and "model.int8.onnx: its INT8 accuracy gate ran on a CPU whose int8 sums" in caplog.text


def test_default_precision_is_int8_in_process_and_in_the_app(int8_package, package):
    meta = json.loads((int8_package / "meta.json").read_text())
    assert load_graph(int8_package, "model.cif.onnx", meta).precision == "int8"
    assert load_graph(int8_package, "model.onnx", meta, requested="fp32").precision == "fp32"
    predictor = Predictor(int8_package)
    _, single, cif = predictor.snapshot()
    assert single.precision == "int8" and cif.precision == "int8"
    assert Predictor(package).snapshot()[1].precision == "fp32"  # a package without INT8 graphs


def test_app_predict_says_which_precision_ran(int8_package, data_copy, tmp_path):
    from app.ui import App

    app = App(int8_package, data_copy, tmp_path / "work")
    image = str(data_copy / "images" / "synth_00000.png")
    *_, info, _ = app.predict(image, 0.5, True)
    assert "CIF multi-scale, INT8" in info
    *_, info, _ = app.predict(image, 0.5, False)
    assert "single scale, INT8" in info


def test_serve_precision_int8_with_tritonclient(int8_package):
    with Server(int8_package, "--precision", "int8") as server:
        client = server.client()
        meta = client.get_model_metadata("seg")
        assert meta["parameters"]["precision"] == "int8" and meta["parameters"]["backend"].startswith("onnxruntime")
        assert client.get_model_config("seg")["parameters"]["precision"]["string_value"] == "int8"
        x = images(2, 40, 56)
        result = client.infer("seg", [triton.InferInput("image", list(x.shape), "UINT8").set_data_from_numpy(x)])
        expected = OnnxRuntimeBackend(int8_package / "model.int8.onnx").infer(x)
        assert np.array_equal(result.as_numpy("labels"), expected["labels"])
        assert client.get_model_metadata("seg_cif")["parameters"]["precision"] == "int8"
        assert RemoteBackend(server.url, "seg").precision == "int8"  # what the app shows with --serving-url
        server.stop()
        log = server.proc.stdout.read()
    assert "seg (int8), seg_cif (int8)" in log


def test_serve_precision_int8_refuses_package_without_it(package):
    with pytest.raises(RuntimeError, match="no INT8 graph that passed its accuracy gate"):
        Server(package, "--precision", "int8")


def test_triton_repository_has_int8_models(int8_package, tmp_path):
    from tritonclient.grpc import model_config_pb2

    repo = tmp_path / "repo"
    assert [f.name for f in write_repository(int8_package, repo, "seg")] == ["seg", "seg_int8", "seg_cif", "seg_cif_int8"]
    for model, graph in [("seg_int8", "model.int8.onnx"), ("seg_cif_int8", "model.cif.int8.onnx")]:
        config = text_format.Parse((repo / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert config.name == model and config.platform == "onnxruntime_onnx"
        assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
        assert (repo / model / "1" / "model.onnx").read_bytes() == (int8_package / graph).read_bytes()


def test_eval_scores_the_int8_graph_as_served(int8_package, tiny_data, tmp_path, capsys):
    """`scaleseg eval --precision int8|fp32` on the package runs the graph serving would run at that precision."""
    int8, fp32 = tmp_path / "int8.json", tmp_path / "fp32.json"
    assert main(["eval", str(int8_package), str(tiny_data), "--scales", "1", "--precision", "int8", "--json", str(int8)]) == 0
    assert main(["eval", str(int8_package), str(tiny_data), "--scales", "1", "--precision", "fp32", "--json", str(fp32)]) == 0
    got, reference = json.loads(int8.read_text()), json.loads(fp32.read_text())
    assert got["backend"].endswith("int8") and reference["backend"].endswith("fp32")
    drop = reference["scales"]["1.0"]["miou"] - got["scales"]["1.0"]["miou"]
    assert drop <= json.loads((int8_package / "meta.json").read_text())["int8"]["gate"]["max_miou_drop"] + 1e-6


class _SamePadded(torch.nn.Module):
    """Lite0's pattern: ReLU6, then TF SAME padding in front of stride-2 convolutions (3x3 and a depthwise 5x5)."""

    def __init__(self):
        super().__init__()
        from training.models.encoders.efficientnet_lite import SamePad
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(SamePad(3), torch.nn.Conv2d(3, 8, 3, 2), torch.nn.ReLU6(),
                                        SamePad(5), torch.nn.Conv2d(8, 8, 5, 2, groups=8), torch.nn.ReLU6(),
                                        torch.nn.Conv2d(8, 4, 1))

    def forward(self, image):
        return self.body(image.float() / 255)


def test_quantized_same_padding_runs_on_uint8_with_identical_outputs(tmp_path):
    import onnx

    import export.quantize as quantize
    src = tmp_path / "net.onnx"
    torch.onnx.export(_SamePadded().eval(), (torch.zeros(1, 3, 32, 34, dtype=torch.uint8),), str(src), input_names=["image"],
                      dynamic_axes={"image": {2: "H", 3: "W"}}, opset_version=17, dynamo=False)
    rng = np.random.default_rng(0)
    calib = [rng.integers(0, 256, (1, 3, 32, 32), dtype=np.uint8) for _ in range(4)]
    quantize.quantize_graph(src, tmp_path / "folded.onnx", calib, "minmax")
    quantize.quantize_graph(src, tmp_path / "plain.onnx", calib, "minmax", integer_padding=False)
    folded, plain = (onnx.load(str(tmp_path / f"{n}.onnx")).graph for n in ("folded", "plain"))
    producer = {o: n.op_type for n in folded.node for o in n.output}
    pads = [n for n in folded.node if n.op_type == "Pad"]
    assert len(pads) == 2 and all(producer[p.input[0]] != "DequantizeLinear" for p in pads)
    assert len(folded.node) < len(plain.node)
    sessions = [OnnxRuntimeBackend(tmp_path / f"{n}.onnx", providers=["CPUExecutionProvider"]) for n in ("folded", "plain")]
    for side in [(32, 32), (31, 45), (17, 8)]:  # even and odd sides pad differently
        x = rng.integers(0, 256, (1, 3, *side), dtype=np.uint8)
        a, b = (s.infer(x) for s in sessions)
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_integer_pads_leaves_pads_it_cannot_run_exactly():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from export.quantize import integer_pads

    def graph(q_scale: float, pad_value: float):
        inits = [numpy_helper.from_array(np.array(v, dtype=t), n) for n, v, t in
                 [("s", 0.5, np.float32), ("z", 3, np.uint8), ("s2", q_scale, np.float32), ("pads", [0, 0, 0, 1, 0, 0, 1, 1], np.int64),
                  ("v", pad_value, np.float32)]]
        nodes = [helper.make_node("DequantizeLinear", ["x", "s", "z"], ["f"]),
                 helper.make_node("Pad", ["f", "pads", "v"], ["p"], mode="constant"),
                 helper.make_node("QuantizeLinear", ["p", "s2", "z"], ["y"]),
                 helper.make_node("Shape", ["f"], ["shape"])]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 1, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 1, 3, 4]),
                               helper.make_tensor_value_info("shape", TensorProto.INT64, [4])], inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    x = np.array([[[[0, 7], [200, 255]]]], np.uint8)
    for q_scale, pad_value, folds in [(0.5, 0.0, 1), (0.25, 0.0, 0), (0.5, 1.0, 0)]:
        model = graph(q_scale, pad_value)
        before = onnxruntime.InferenceSession(model.SerializeToString()).run(None, {"x": x})
        assert integer_pads(model) == folds
        onnx.checker.check_model(model)
        after = onnxruntime.InferenceSession(model.SerializeToString()).run(None, {"x": x})
        assert all(np.array_equal(a, b) for a, b in zip(before, after))
        ops = [n.op_type for n in model.graph.node]
        assert ops == (["Pad", "Shape"] if folds else ["DequantizeLinear", "Pad", "QuantizeLinear", "Shape"])
