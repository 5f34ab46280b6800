"""CPU INT8 graphs by ONNX Runtime static quantization, and the accuracy gate they must pass to be written.

The recipe follows ONNX Runtime's "Quantize ONNX Models" guide
(https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html) and its CPU example
(https://github.com/microsoft/onnxruntime-inference-examples/blob/main/quantization/image_classification/cpu/ReadMe.md):
- ``quant_pre_process`` first: shape inference and ONNX Runtime's graph optimisation, so that operators the
  quantizer cannot handle alone (a BatchNormalization after a Conv) are fused before Q/DQ pairs go in;
- ``quantize_static`` in QDQ format with U8S8 (QUInt8 activations, QInt8 per-channel weights). The guide's
  "Data type selection" makes S8S8 the default and names U8S8 the fast x86-64 path (VPMADDUBSW), whose
  saturation AVX512-VNNI avoids. Measured on this machine's VNNI cores (ResNet-18, 512x512, batch 1):
  57 ms against 108 ms for S8S8, where ONNX Runtime left 20 of 30 convolutions unfused in float;
  the accuracy gate below decides per model whether the graph ships;
- calibration on the dataset's unlabelled images, each at its own size with the longer side capped;
- only the convolution-type operators (and the zero Pads of TF "SAME" padding) are quantized
  (``QUANTIZED_OP_TYPES``): the rest measurably lose accuracy;
- then ``integer_pads`` lets those Pads run on the quantized tensor, which ONNX Runtime does not do itself.

The gate compares each INT8 graph with its FP32 graph on the dataset's val images: the fraction of pixels
whose label agrees, and the mIoU (against the val masks) lost. Its decisions are pure functions.
"""
from __future__ import annotations

import contextlib
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from PIL import Image

from serving.backends import OnnxRuntimeBackend
from serving.precision import this_int8_cpu
from training.data.folder import load_image, mask_path, read_mask
from training.evaluate import confusion_matrix, metrics_from_confusion

from .onnx_export import ExportError

GRAPHS = {"model.onnx": "model.int8.onnx", "model.cif.onnx": "model.cif.int8.onnx"}  # FP32 graph -> its INT8 twin
METHODS = ("minmax", "entropy", "percentile")
# Measured on the tiny ScaleMatch model (README "INT8 on CPU"): entropy agreed best with FP32 on both graphs;
# minmax missed the 99 % gate on the single-scale graph, and percentile fails on the CIF graph.
DEFAULT_METHOD = "entropy"
DEFAULT_CALIB_COUNT = 64
CALIB_MAX_SIDE = 512             # calibration images keep their aspect, longer side at most this
GATE_IMAGES = 64                 # val images the gate runs (each at its own size, longer side capped)
GATE_MAX_SIDE = 1024
MIN_AGREEMENT = 0.99
MAX_MIOU_DROP = 0.5              # mIoU points
CONFIDENT = 0.8                  # FP32 confidence from which measure() also reports agreement apart (not gated)
# Only these are quantized. Everything else stays float: the resizes, softmax and the max / argmax that make
# labels and confidence, and CIF's gate and fusion arithmetic (Sigmoid / Mul / Add / Softmax). Measured on the
# tiny model with entropy calibration (README "INT8 on CPU"): quantizing Resize too cost 0.4 points of label
# agreement, every QDQ-capable op 3 points; keeping CIF's own Conv / MatMul or the classifier in float
# changed agreement by at most 0.02 points, so they are quantized.
QUANTIZED_OP_TYPES = ("Conv", "MatMul", "Gemm", "MaxPool", "AveragePool", "GlobalAveragePool", "Relu", "Clip", "Concat",
                      # A zero Pad keeps its input's scale and zero point (the quantizer's QDQPad), so it is exact;
                      # integer_pads then runs it on uint8.
                      "Pad")


@dataclass(frozen=True)
class Gate:
    min_agreement: float = MIN_AGREEMENT
    max_miou_drop: float = MAX_MIOU_DROP


def gate_verdict(agreement: float, miou_fp32: float, miou_int8: float, gate: Gate) -> dict:
    """One INT8 graph's measurements and whether they pass; ``agreement_short`` and ``drop_excess`` say by
    how much each limit was missed (0 when met)."""
    drop = miou_fp32 - miou_int8
    short = max(0.0, gate.min_agreement - agreement)
    excess = max(0.0, drop - gate.max_miou_drop)
    return {"label_agreement": agreement, "miou_fp32": miou_fp32, "miou_int8": miou_int8, "miou_drop": drop,
            "agreement_short": short, "drop_excess": excess, "passed": short == 0 and excess == 0}


def gate_failures(verdicts: dict[str, dict], gate: Gate) -> str:
    """The refusal message for the graphs that missed the gate ('' when all passed)."""
    lines = []
    for graph, v in verdicts.items():
        if v["passed"]:
            continue
        misses = []
        if v["agreement_short"] > 0:
            misses.append(f"label agreement {100 * v['label_agreement']:.2f} % is {100 * v['agreement_short']:.2f} "
                          f"points below {100 * gate.min_agreement:.2f} %")
        if v["drop_excess"] > 0:
            misses.append(f"mIoU drop {v['miou_drop']:.2f} ({v['miou_fp32']:.2f} -> {v['miou_int8']:.2f}) is "
                          f"{v['drop_excess']:.2f} points over {gate.max_miou_drop:.2f}")
        lines.append(f"{graph}: " + "; ".join(misses))
    if not lines:
        return ""
    return ("INT8 accuracy gate failed, nothing was written: " + " | ".join(lines) + ". Try more calibration images "
            "(--calib-count), another --calib-method (" + ", ".join(METHODS) + "), calibration images closer to what "
            "you serve (--calib), or export without --quantize and serve FP32.")


def capped(image: Image.Image, max_side: int, resample) -> Image.Image:
    """The image at its own size, or shrunk so that its longer side is ``max_side``."""
    scale = max_side / max(image.size)
    if scale >= 1:
        return image
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)


def to_batch(image: Image.Image) -> np.ndarray:
    """uint8 [1, 3, H, W] from a PIL image."""
    return np.asarray(image.convert("RGB")).transpose(2, 0, 1)[None].copy()


def calibration_inputs(paths: Sequence[Path], max_side: int = CALIB_MAX_SIDE) -> list[np.ndarray]:
    """One uint8 batch of one per calibration image, each at its own size (longer side capped)."""
    return [to_batch(capped(load_image(p), max_side, Image.BILINEAR)) for p in paths]


def gate_samples(data: Path, images: Sequence[Path], count: int = GATE_IMAGES,
                 max_side: int = GATE_MAX_SIDE) -> list[tuple[np.ndarray, np.ndarray]]:
    """(uint8 [1, 3, H, W], mask [H, W]) for up to ``count`` of ``images`` (val images of ``data``) with masks."""
    samples = []
    for image in images:
        mask = mask_path(data, image.stem)
        if not mask.is_file():
            continue
        rgb = capped(load_image(image), max_side, Image.BILINEAR)
        labels = Image.fromarray(read_mask(mask)).resize(rgb.size, Image.NEAREST)
        samples.append((to_batch(rgb), np.asarray(labels)))
        if len(samples) == count:
            break
    if not samples:
        raise ExportError(f"{data}: the INT8 gate needs val images with masks (splits/val.txt and masks/); pass --data "
                          "with a dataset that has them.")
    return samples


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol: ``get_next`` returns one input feed, then None;
    ``set_range`` limits it to a slice (ONNX Runtime's strided calibration calls it)."""

    def __init__(self, batches: Sequence[np.ndarray]):
        self.batches = list(batches)
        self.set_range(0, len(self.batches))

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._feeds = iter([{"image": b} for b in self.batches[start_index:end_index]])

    def get_next(self):
        return next(self._feeds, None)


def _scalar(initializers: dict, name: str) -> np.ndarray | None:
    value = initializers.get(name)
    return value if value is not None and value.size == 1 else None


def integer_pads(model: onnx.ModelProto) -> int:
    """Rewrite, in place, each DequantizeLinear -> zero Pad -> QuantizeLinear with one scale and zero point into a
    Pad of the quantized tensor with the zero point as its value: the same numbers, since Q(DQ(x)) = x and
    Q(0) = zero point. ONNX Runtime runs the QDQ form as written, because its QDQ transformer drops Q/DQ only
    around the data-movement ops it lists (Gather, Reshape, Transpose, Squeeze, Unsqueeze, MaxPool, Resize:
    DropQDQNodesRules in onnxruntime/core/optimizer/qdq_transformer/selectors_actions/
    qdq_selector_action_transformer.cc), not Pad:
    measured on EfficientNet-Lite0 at 512x512, the float round trip of its four SAME-padded stride-2 inputs
    took a third of the INT8 pass. Shape nodes that read a DequantizeLinear's output read its input instead
    (the same shape), and DequantizeLinear nodes left without readers go. Returns the Pads rewritten."""
    graph = model.graph
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    dropped, rewritten = set(), 0
    for node in graph.node:
        if node.op_type != "Pad" or node.output[0] in outputs:
            continue
        mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
        value = node.input[2] if len(node.input) > 2 else ""
        dq, after = producer.get(node.input[0]), readers.get(node.output[0], [])
        if mode != b"constant" or (value and not np.all(initializers.get(value, np.ones(1)) == 0)) \
                or dq is None or dq.op_type != "DequantizeLinear" or len(after) != 1 or after[0].op_type != "QuantizeLinear":
            continue
        q = after[0]
        params = [[_scalar(initializers, n) for n in (*op.input[1:3], "")[:2]] for op in (dq, q)]
        if any(v is None for v in params[0] + params[1]) or params[0][1].dtype != params[1][1].dtype \
                or any(a != b for a, b in zip(params[0], params[1])):
            continue
        node.input[0] = dq.input[0]
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = dq.input[2]
        node.output[0] = q.output[0]
        dropped.add(id(q))
        rewritten += 1
    for node in graph.node:
        source = producer.get(node.input[0]) if node.op_type == "Shape" and node.input else None
        if source is not None and source.op_type == "DequantizeLinear":
            node.input[0] = source.input[0]
    still_read = {name for node in graph.node if id(node) not in dropped for name in node.input} | outputs
    kept = [n for n in graph.node if id(n) not in dropped
            and not (n.op_type == "DequantizeLinear" and n.output[0] not in still_read)]
    del graph.node[:]
    graph.node.extend(kept)
    return rewritten


def quantize_graph(src: Path, dst: Path, calibration: Sequence[np.ndarray], method: str = DEFAULT_METHOD,
                   op_types: Sequence[str] = QUANTIZED_OP_TYPES, integer_padding: bool = True) -> None:
    """``src`` (FP32) -> ``dst`` (QDQ, U8S8, per-channel weights), calibrated on ``calibration``;
    ``integer_padding=False`` leaves the Pads in float (what it saves is measured by bench/decoder_cost.py)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    if method not in METHODS:
        raise ExportError(f"calibration method {method!r} is unknown; choose one of {', '.join(METHODS)}.")
    calib_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                    "percentile": CalibrationMethod.Percentile}[method]
    with tempfile.TemporaryDirectory(prefix="scaleseg-int8-") as work:
        prepared = Path(work) / "prepared.onnx"
        # Symbolic shape inference is for transformer graphs (the CPU example above); on ours it stops short
        # and dumps its partial model into the working directory, so ONNX shape inference alone runs.
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print a line per image
                quantize_static(str(prepared), str(dst), _Reader(calibration), quant_format=QuantFormat.QDQ,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                                op_types_to_quantize=list(op_types),
                                calibrate_method=calib_method, calibration_providers=["CPUExecutionProvider"],
                                # One image per collect_data call: the calibrator keeps only that image's
                                # intermediate tensors before merging its ranges / histograms. (Its other
                                # bound, CalibMaxIntermediateOutputs, discards collected outputs in 1.32.)
                                extra_options={"CalibStridedMinMax": 1})
        except ValueError as err:  # e.g. percentile's histogram of an empty intermediate tensor
            raise ExportError(f"{src.name}: {method} calibration failed ({err}); try --calib-method "
                              f"{DEFAULT_METHOD if method != DEFAULT_METHOD else 'minmax'}.") from None
    if integer_padding:
        model = onnx.load(str(dst))
        integer_pads(model)
        onnx.save(model, str(dst))


def measure(fp32: Path, int8: Path, samples: Sequence[tuple[np.ndarray, np.ndarray]], num_classes: int, gate: Gate) -> dict:
    """Run both graphs on ``samples``; the gate's verdict for the INT8 one, and beside it the share of pixels
    FP32 labels below CONFIDENT and the agreement on the rest (where a disagreement is not a near-tie)."""
    ref = OnnxRuntimeBackend(fp32, providers=["CPUExecutionProvider"])
    got = OnnxRuntimeBackend(int8, providers=["CPUExecutionProvider"])
    agree = total = confident = agree_confident = 0
    cm_ref = torch.zeros(num_classes, num_classes, dtype=torch.long)
    cm_got = torch.zeros_like(cm_ref)
    for image, mask in samples:
        expected = ref.infer(image)
        a, b = expected["labels"][0], got.infer(image)["labels"][0]
        same, sure = a == b, expected["confidence"][0] >= CONFIDENT
        agree, total = agree + int(same.sum()), total + a.size
        confident, agree_confident = confident + int(sure.sum()), agree_confident + int((same & sure).sum())
        target = torch.from_numpy(mask.astype(np.int64))
        cm_ref += confusion_matrix(torch.from_numpy(a.astype(np.int64)), target, num_classes)
        cm_got += confusion_matrix(torch.from_numpy(b.astype(np.int64)), target, num_classes)
    names = [str(k) for k in range(num_classes)]
    return gate_verdict(agree / total, metrics_from_confusion(cm_ref, names)["miou"],
                        metrics_from_confusion(cm_got, names)["miou"], gate) | {
        "images": len(samples), "uncertain_share": 1 - confident / total,
        "agreement_confident": agree_confident / confident if confident else None}


def quantize_package(folder: Path, graphs: Sequence[str], calibration: Sequence[np.ndarray], calib_source: str,
                     samples: Sequence[tuple[np.ndarray, np.ndarray]], num_classes: int, method: str, gate: Gate,
                     progress=print) -> dict:
    """Write the INT8 twin of each of ``graphs`` into ``folder`` and gate it; returns meta.json's ``int8``
    record. Raises ExportError when any graph misses the gate (the caller's staged folder is then discarded)."""
    verdicts, written = {}, {}
    for graph in graphs:
        twin = GRAPHS[graph]
        progress(f"quantizing {graph} -> {twin} (QDQ U8S8, per-channel, {method} calibration on {len(calibration)} images)")
        quantize_graph(folder / graph, folder / twin, calibration, method)
        verdicts[twin] = measure(folder / graph, folder / twin, samples, num_classes, gate)
        written[graph] = twin
        v = verdicts[twin]
        progress(f"{twin} vs {graph} on {v['images']} val images: label agreement {100 * v['label_agreement']:.2f} %, "
                 f"mIoU {v['miou_fp32']:.2f} -> {v['miou_int8']:.2f} (drop {v['miou_drop']:.2f})")
    refusal = gate_failures(verdicts, gate)
    if refusal:
        raise ExportError(refusal)
    return {"graphs": written, "format": "QDQ", "activations": "uint8", "weights": "int8, per channel",
            "quantized_op_types": list(QUANTIZED_OP_TYPES),
            "calibration": {"method": method, "count": len(calibration), "images": calib_source,
                            "max_side": CALIB_MAX_SIDE},
            "gate": {"min_agreement": gate.min_agreement, "max_miou_drop": gate.max_miou_drop, "graphs": verdicts,
                     "passed": True, "cpu": this_int8_cpu()}}
