"""The model package (DESIGN.md): written whole into a temp folder, verified, then renamed into place.

MODEL/
  meta.json          format version, classes + colours, input/output spec, method, data fingerprint,
                     metrics, opset, library versions, graphs and their scales, parity report
  model.onnx         single-scale graph
  model.cif.onnx     optional CIF multi-scale graph
  model.int8.onnx, model.cif.int8.onnx   optional CPU INT8 twins (ONNX Runtime QDQ), only if they passed their
                     accuracy gate against the FP32 graphs (meta.json ``int8`` records calibration and gate)
  model.<gpu>.trt<version>.plan (+ .json sidecar)   optional TensorRT engines
  checkpoint.pt      inference weights + config, for retraining and the PyTorch reference
"""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnxruntime
import torch

from serving.backends import OnnxRuntimeBackend, TensorRTBackend, current_gpu, find_plan, read_sidecar
from serving.shapes import PROFILE, Profile, parity_shapes
from training import __version__
from training.checkpoint import CheckpointError, inference_payload, load_checkpoint, load_inference_model, save_checkpoint
from training.data.folder import find_image, staged_folder, read_split
from training.data.transforms import MEAN, STD

from .onnx_export import DEFAULT_OPSET, ExportError, SegmentationGraph, export_graph, io_spec
from .parity import MIN_AGREEMENT, compare, load_images, probe_batches
from .quantize import DEFAULT_CALIB_COUNT, DEFAULT_METHOD, Gate, calibration_inputs, gate_samples, quantize_package

FORMAT_VERSION = 1
GRAPHS = {"single": "model.onnx", "cif": "model.cif.onnx"}


def _check_destination(out: Path, force: bool) -> None:
    if not out.exists() or not any(out.iterdir()):
        return
    meta = out / "meta.json"
    what = "another model package" if meta.is_file() else "other files"
    if not force:
        raise FileExistsError(f"{out}: already holds {what}. Choose another --out, or pass --force to replace it.")


def _image_paths(data: Path | None, split: str) -> list[Path]:
    if data is None or not (data / "splits").is_dir():
        return []
    ids = read_split(data, split, required=False) or read_split(data, "val", required=False)
    return [p for p in (find_image(data, i) for i in ids) if p is not None]


def verify_package(package: Path, data: Path | None = None, sizes: Sequence[tuple[int, int]] | None = None,
                   batch_sizes: Sequence[int] | None = None, min_agreement: float = MIN_AGREEMENT) -> dict:
    """PyTorch vs every available runtime, for each graph; writes the report into meta.json. Unless given, the
    sizes and batch sizes lie inside the profile of the graph's engine for this GPU (its sidecar), if any."""
    meta_path = package / "meta.json"
    meta = json.loads(meta_path.read_text())
    model, _, _ = load_inference_model(load_checkpoint(package / "checkpoint.pt"), package / "checkpoint.pt")
    images = _image_paths(data, "val")
    report = {"images": f"{len(images[:16])} from {data}" if images else "random uint8 images (no --data given)",
              "graphs": {}}
    for graph_file, info in meta["graphs"].items():
        reference = SegmentationGraph(model, info["cif_scales"], meta["with_probs"])
        backends = [OnnxRuntimeBackend(package / graph_file, providers=["CPUExecutionProvider"])]
        plan = find_plan(package, graph_file, current_gpu())
        profile = None
        if plan is not None:
            profile = Profile.from_dict(read_sidecar(plan)["profile"])
            backends.append(TensorRTBackend(plan))
        default_sizes, default_batches = parity_shapes(profile)
        batches = probe_batches(images[:16], sizes or default_sizes, batch_sizes or default_batches)
        report["graphs"][graph_file] = [compare(reference, b, batches, min_agreement) for b in backends]
    report["passed"] = all(r["passed"] for runs in report["graphs"].values() for r in runs)
    meta["parity"] = report
    meta_path.write_text(json.dumps(meta, indent=2))
    return report


def export_package(checkpoint: Path, out: Path, with_probs: bool = False, cif_scales: Sequence[float] | None = None,
                   opset: int = DEFAULT_OPSET, force: bool = False, data: Path | None = None,
                   tensorrt: str | None = None, calib: Path | None = None, progress=print, quantize: str | None = None,
                   calib_count: int = DEFAULT_CALIB_COUNT, calib_method: str = DEFAULT_METHOD,
                   int8_gate: Gate = Gate(), engine_profile: Profile = PROFILE) -> dict:
    """Write the package; returns meta. Fails, leaving nothing at ``out``, if parity is below 99.9 % or, with
    ``quantize="int8"``, if an INT8 graph misses ``int8_gate``. ``engine_profile``: the input shapes the
    TensorRT engines accept, recorded in each engine's sidecar."""
    out = Path(out)
    _check_destination(out, force)
    ckpt = load_checkpoint(checkpoint)
    model, classes, cfg = load_inference_model(ckpt, checkpoint)
    if len(classes) != model.num_classes:
        raise CheckpointError(f"{checkpoint}: records {len(classes)} classes but its network predicts {model.num_classes}.")
    if cif_scales and model.cif is None:
        raise ExportError(f"{checkpoint}: --cif-scales needs a checkpoint with a CIF module (trained with --method "
                          f"scalematch); this one is a {cfg.method!r} run.")
    if data is None and cfg.data.root and Path(cfg.data.root).is_dir():
        data = Path(cfg.data.root)
    if quantize not in (None, "int8"):
        raise ExportError(f"--quantize {quantize!r} is not supported; the only quantized precision is int8.")
    if quantize:  # read before any export work, so missing images fail fast
        if data is None:
            raise ExportError("--quantize int8 gates the INT8 graphs on val images with masks; pass --data DATASET "
                              "(the checkpoint records no dataset folder that exists here).")
        calib_source = calib or data
        calib_paths = _image_paths(calib_source, "unlabeled")[:calib_count]
        if not calib_paths:
            raise ExportError(f"{calib_source}: no images to calibrate INT8 with (splits/unlabeled.txt and "
                              "splits/val.txt list none); give --calib a dataset folder that has some.")
        samples = gate_samples(data, _image_paths(data, "val"))
        calibration = calibration_inputs(calib_paths)

    with staged_folder(out) as tmp:
        graphs = {}
        progress(f"exporting {GRAPHS['single']}")
        onnx_model = export_graph(SegmentationGraph(model, None, with_probs), tmp / GRAPHS["single"], opset)
        graphs[GRAPHS["single"]] = {"cif_scales": [], "scales": [1.0]}
        if cif_scales:
            progress(f"exporting {GRAPHS['cif']} (CIF fusion of scales {', '.join(map(str, cif_scales))} with 1.0)")
            export_graph(SegmentationGraph(model, cif_scales, with_probs), tmp / GRAPHS["cif"], opset)
            graphs[GRAPHS["cif"]] = {"cif_scales": list(cif_scales), "scales": sorted({1.0, *cif_scales})}
        save_checkpoint(tmp / "checkpoint.pt", inference_payload(ckpt))
        meta = {
            "format_version": FORMAT_VERSION, "name": out.name,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "classes": classes, "with_probs": with_probs,
            "input": {"name": "image", "datatype": "uint8", "layout": "NCHW", "channels": "RGB",
                      "normalisation": "inside the graph: (x - 255*mean) / (255*std)", "mean": MEAN, "std": STD},
            **io_spec(onnx_model), "graphs": graphs,
            "method": cfg.method, "backbone": cfg.model.backbone, "decoder": cfg.model.decoder, "crop_size": cfg.data.crop_size,
            "train_config": cfg.to_dict(),
            "data_fingerprint": ckpt.get("data_fingerprint"), "labeled_count": ckpt.get("labeled_count"),
            "iteration": ckpt.get("iteration"), "metrics": ckpt.get("metrics"), "opset": opset,
            "versions": {"scaleseg": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                         "onnxruntime": onnxruntime.__version__},
            "tensorrt": [], "precisions": ["fp32"],
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if tensorrt:
            from .tensorrt_build import build_engine
            calib_images = _calibration_images(calib, engine_profile.opt_side) if calib else None
            for graph_file in graphs:
                progress(f"building TensorRT engine ({tensorrt}, sides {engine_profile.min_side}-"
                         f"{engine_profile.max_side}, batch up to {engine_profile.max_batch}) for {graph_file}")
                plan = build_engine(tmp / graph_file, tmp, tensorrt, calib_images, engine_profile)
                meta["tensorrt"].append(json.loads(Path(f"{plan}.json").read_text()) | {"file": plan.name})
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        progress("verifying parity (PyTorch vs runtimes)")
        report = verify_package(tmp, data)
        if not report["passed"]:
            worst = min(r["label_agreement"] for runs in report["graphs"].values() for r in runs)
            raise ExportError(f"parity check failed: label agreement {100 * worst:.3f} % < {100 * MIN_AGREEMENT:.1f} %; "
                              "nothing was written. Report: " + json.dumps(report["graphs"])[:2000])
        if quantize:
            meta = json.loads((tmp / "meta.json").read_text())  # now with the parity report
            meta["int8"] = quantize_package(tmp, list(graphs), calibration, f"{len(calibration)} from {calib_source}",
                                            samples, len(classes), calib_method, int8_gate, progress)
            meta["precisions"].append("int8")
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return json.loads((out / "meta.json").read_text())


def _calibration_images(data: Path, size: int, count: int = 64) -> np.ndarray:
    """uint8 calibration images of ``size`` (the engine profile's opt side: TensorRT calibrates at the opt
    shape) from the dataset's unlabelled images (val if none)."""
    paths = _image_paths(data, "unlabeled")[:count]
    if not paths:
        raise ExportError(f"{data}: no images to calibrate INT8 with (splits/unlabeled.txt is empty).")
    return load_images(paths, (size, size))
