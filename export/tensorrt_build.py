"""TensorRT engines from the exported ONNX graphs (needs an NVIDIA GPU and the ``tensorrt`` package).

Precision depends on the TensorRT major version (research/deploy.md 4.1):
- TensorRT 10: builder flags. FP16 = ``BuilderFlag.FP16``; INT8 = ``BuilderFlag.INT8`` with an entropy
  calibrator fed by unlabelled images.
- TensorRT 11: networks are strongly typed and those flags and the calibrator are gone. FP16 = convert the
  ONNX to mixed precision first (ModelOpt AutoCast); INT8 = insert Q/DQ nodes calibrated on unlabelled
  images (ModelOpt ``quantize``), then build.
The engine is specific to the GPU and TensorRT version; a JSON sidecar records both plus the profile.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .onnx_export import ExportError


@dataclass
class Profile:
    min_hw: int = 128
    opt_hw: int = 512
    max_hw: int = 1024
    opt_batch: int = 4
    max_batch: int = 8


def tensorrt_major() -> int:
    import tensorrt as trt
    return int(trt.__version__.split(".")[0])


def _gpu_slug() -> tuple[str, str]:
    import torch
    name = torch.cuda.get_device_name(0)
    return name, re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def _modelopt_precision(onnx_path: Path, precision: str, calib: np.ndarray | None) -> Path:
    """TensorRT 11: a mixed-precision (fp16) or Q/DQ (int8) copy of the graph, made by NVIDIA ModelOpt."""
    try:
        import onnx
        from modelopt.onnx import autocast
        from modelopt.onnx.quantization import quantize
    except ImportError as err:
        raise ExportError(f"--{precision} on TensorRT 11 needs NVIDIA ModelOpt: pip install 'nvidia-modelopt[onnx]' ({err}).") from None
    out = onnx_path.with_suffix(f".{precision}.onnx")
    if precision == "fp16":
        data = {"image": calib} if calib is not None else None
        onnx.save(autocast.convert_to_mixed_precision(onnx_path=str(onnx_path), low_precision_type="fp16",
                                                      keep_io_types=True, calibration_data=data), str(out))
    else:
        quantize(str(onnx_path), quantize_mode="int8", calibration_data={"image": calib}, calibration_method="entropy",
                 calibration_eps=["cpu"], op_types_to_exclude=["Softmax", "Sigmoid", "ArgMax"], output_path=str(out))
    return out


def _entropy_calibrator(trt, calib: np.ndarray, cache: Path):
    """TensorRT 10 INT8 calibrator over uint8 images [N, 3, H, W], one image per batch."""
    import torch

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()
            self.index, self.buffer = 0, None

        def get_batch_size(self):
            return 1

        def get_batch(self, names):
            if self.index >= len(calib):
                return None
            self.buffer = torch.from_numpy(calib[self.index:self.index + 1]).cuda()
            self.index += 1
            return [int(self.buffer.data_ptr())]

        def read_calibration_cache(self):
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data):
            cache.write_bytes(bytes(data))

    return Calibrator()


def build_engine(onnx_path: Path, out_dir: Path, precision: str = "fp32", calib: np.ndarray | None = None,
                 profile: Profile | None = None, workspace_gib: float = 4.0) -> Path:
    """Build and serialise an engine next to the graph; returns the plan path."""
    profile = profile or Profile()
    try:
        import tensorrt as trt
        import torch
    except ImportError as err:
        raise ExportError(f"--tensorrt needs the 'tensorrt' package and an NVIDIA GPU ({err}).") from None
    if not torch.cuda.is_available():
        raise ExportError("--tensorrt needs an NVIDIA GPU; none is visible.")
    if precision == "int8" and calib is None:
        raise ExportError("--int8 needs calibration images: pass --calib DATA (unlabelled images are used).")
    major = tensorrt_major()
    source = onnx_path
    if major >= 11 and precision in ("fp16", "int8"):
        source = _modelopt_precision(onnx_path, precision, calib)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if major >= 11 else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"{source}: TensorRT could not parse the graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    prof = builder.create_optimization_profile()
    p = profile
    prof.set_shape("image", min=(1, 3, p.min_hw, p.min_hw), opt=(p.opt_batch, 3, p.opt_hw, p.opt_hw),
                   max=(p.max_batch, 3, p.max_hw, p.max_hw))
    config.add_optimization_profile(prof)
    if major < 11 and precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
            config.set_calibration_profile(prof)
            config.int8_calibrator = _entropy_calibrator(trt, calib, out_dir / f"{onnx_path.stem}.calib.cache")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"{source}: TensorRT failed to build an engine (see the log above).")
    gpu, slug = _gpu_slug()
    path = out_dir / f"{onnx_path.stem}.{slug}.trt{trt.__version__}.plan"
    path.write_bytes(bytes(plan))
    major_cc, minor_cc = torch.cuda.get_device_capability(0)
    sidecar = {"graph": onnx_path.name, "gpu": gpu, "compute_capability": f"{major_cc}.{minor_cc}",
               "tensorrt": trt.__version__, "precision": precision, "profile": asdict(profile)}
    Path(f"{path}.json").write_text(json.dumps(sidecar, indent=2))
    return path
