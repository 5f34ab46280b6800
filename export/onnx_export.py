"""Checkpoint -> ONNX graphs with pre- and post-processing inside, checked and simplified.

Graph I/O (DESIGN.md): input ``image`` uint8 [N, 3, H, W] (dynamic N, H, W); outputs ``labels`` int32
[N, H, W], ``confidence`` float32 [N, H, W] (max softmax probability) and, when asked, ``probs`` float32
[N, K, H, W]. The single-scale graph runs the network once; the CIF graph runs it at every scale and
fuses the predictions with CIF's gates (ScaleMatch's multi-scale inference), all in one graph.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import onnx
import torch
import torch.nn as nn

from training.data.transforms import MEAN, STD

DEFAULT_OPSET = 17
SUPPORTED_OPSETS = range(13, 21)  # CumSum, dynamic Resize and the ops WKV needs exist from 13 on


class ExportError(Exception):
    """The export cannot proceed; the message says why and what to do."""


class SegmentationGraph(nn.Module):
    """uint8 images -> (labels, confidence[, probs]) with normalisation, resizing, argmax and max-softmax confidence."""

    def __init__(self, model: nn.Module, cif_scales: Sequence[float] | None = None, with_probs: bool = False):
        super().__init__()
        self.model, self.cif_scales, self.with_probs = model, tuple(cif_scales or ()), with_probs
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1) * 255)
        # Inference only; the exporter restores the wrapper's mode recursively afterwards, so it must be eval.
        self.eval()

    def forward(self, image: torch.Tensor):
        x = (image.float() - self.mean) / self.std
        logits = self.model.forward_multiscale(x, self.cif_scales) if self.cif_scales else self.model(x)
        if self.with_probs:
            probs = logits.softmax(1)
            confidence, labels = probs.max(1)
            return labels.to(torch.int32), confidence, probs
        # max softmax = 1 / sum_c exp(l_c - l_max), without writing the [N, C, H, W] probabilities: ONNX Runtime's
        # Softmax over axis 1 transposes the whole tensor and took 29 % of a 512x512 ResNet-18 pass.
        peak, labels = logits.max(1)
        confidence = (logits - peak.unsqueeze(1)).exp().sum(1).reciprocal()
        return labels.to(torch.int32), confidence


def output_names(with_probs: bool) -> list[str]:
    return ["labels", "confidence"] + (["probs"] if with_probs else [])


def export_graph(graph: SegmentationGraph, path: Path, opset: int = DEFAULT_OPSET, sample_size: int = 64) -> onnx.ModelProto:
    """Trace, export, check (full), infer shapes and simplify; writes ``path`` and returns the model."""
    if opset not in SUPPORTED_OPSETS:
        raise ExportError(f"opset {opset} is not supported; choose {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}.")
    names = output_names(graph.with_probs)
    dynamic = {"image": {0: "N", 2: "H", 3: "W"}}
    dynamic.update({n: ({0: "N", 2: "H", 3: "W"} if n == "probs" else {0: "N", 1: "H", 2: "W"}) for n in names})
    sample = torch.randint(0, 256, (1, 3, sample_size, sample_size + 16), dtype=torch.uint8)
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter warns about its own deprecation and about slices it cannot fold;
        # neither affects the graph, which is checked and simplified below.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="Constant folding")
        torch.onnx.export(graph, (sample,), str(path), input_names=["image"], output_names=names,
                          dynamic_axes=dynamic, opset_version=opset, do_constant_folding=True, dynamo=False)
    model = onnx.load(str(path))
    for out in model.graph.output:  # the tracer leaves the class dimension symbolic; it is fixed
        if out.name == "probs":
            dim = out.type.tensor_type.shape.dim[1]
            dim.ClearField("dim_param")
            dim.dim_value = graph.model.num_classes
    model = dedupe_initializers(simplify(model))
    onnx.checker.check_model(model, full_check=True)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.save(model, str(path))
    return model


def dedupe_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """One copy of each weight: the CIF graph runs the same network at several scales, and the tracer
    (after folding batch norms into convolutions) emits a copy of every folded weight per use."""
    import hashlib

    first: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    keep = []
    for init in model.graph.initializer:
        key = (init.data_type, tuple(init.dims), hashlib.sha256(onnx.numpy_helper.to_array(init).tobytes()).hexdigest())
        if key in first:
            rename[init.name] = first[key]
        else:
            first[key] = init.name
            keep.append(init)
    if rename:
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        for node in model.graph.node:
            node.input[:] = [rename.get(name, name) for name in node.input]
    return model


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """Graph simplification with onnxslim (constant folding, dead-node removal, op fusion)."""
    import onnxslim
    return onnxslim.slim(model)


def io_spec(model: onnx.ModelProto) -> dict:
    """Names, element types and shapes (symbolic dims as names) of the graph's inputs and outputs."""
    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "datatype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims})
        return out
    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}
