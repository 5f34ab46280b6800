"""TensorRT engines from the exported ONNX graphs (needs an NVIDIA GPU and the ``tensorrt`` package).

Precision (research/deploy.md 4.1; TensorRT docs "Explicit Quantization": "Use explicit quantization with
Strong Typing. Precision-control build flags are not required and should not be specified",
https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-explicit-quantization.html):
- INT8: NVIDIA ModelOpt inserts Q/DQ nodes calibrated on unlabelled images (``modelopt.onnx.quantization.
  quantize``), then a strongly typed network is built, on TensorRT 10 and 11 alike. Only on TensorRT 10
  without ModelOpt does the implicit path remain: ``BuilderFlag.INT8`` with an entropy calibrator
  (deprecated since TensorRT 10.1, removed in 11).
- FP16: TensorRT 10 sets ``BuilderFlag.FP16``; TensorRT 11 (flag removed) converts the ONNX to mixed
  precision with ModelOpt AutoCast first and builds it strongly typed.
Every shape (profile, calibration batches) comes from ``serving.shapes``. The engine is specific to the GPU
and TensorRT version; a JSON sidecar records both plus the profile, which serving enforces.
"""
from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.shapes import PROFILE, Profile, calibration_batches

from .onnx_export import ExportError


def tensorrt_major() -> int:
    import tensorrt as trt
    return int(trt.__version__.split(".")[0])


def _gpu_slug() -> tuple[str, str]:
    import torch
    name = torch.cuda.get_device_name(0)
    return name, re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def calibration_arrays(calib: np.ndarray, profile: Profile = PROFILE) -> list[np.ndarray]:
    """The calibration images as contiguous uint8 batches of exactly the profile's opt shape: the size the
    calibrator reports with ``get_batch_size`` and TensorRT reads from each buffer."""
    if calib.dtype != np.uint8 or calib.ndim != 4 or calib.shape[1:] != profile.opt_shape[1:]:
        raise ExportError(f"calibration images must be uint8 [N, {', '.join(map(str, profile.opt_shape[1:]))}], "
                          f"got {calib.dtype} {list(calib.shape)}")
    return [np.ascontiguousarray(calib[a:b]) for a, b in calibration_batches(len(calib), profile)]


def _modelopt_available() -> bool:
    try:
        import modelopt.onnx  # noqa: F401
    except ImportError:
        return False
    return True


def _modelopt_precision(onnx_path: Path, precision: str, calib: np.ndarray | None, profile: Profile) -> Path:
    """A mixed-precision (fp16, AutoCast) or Q/DQ (int8, quantize) copy of the graph, made by NVIDIA ModelOpt.

    ``quantize(onnx_path, quantize_mode, calibration_data: ndarray | dict[str, ndarray], calibration_shapes,
    output_path, ...)``: https://nvidia.github.io/Model-Optimizer/reference/generated/modelopt.onnx.quantization.quantize.html
    ``convert_to_mixed_precision(onnx_path, low_precision_type, keep_io_types, calibration_data)`` where
    calibration_data is the *path* of an .npz file keyed by input name:
    https://nvidia.github.io/Model-Optimizer/guides/8_autocast.html
    """
    try:
        import onnx
        from modelopt.onnx import autocast
        from modelopt.onnx.quantization import quantize
    except ImportError as err:
        raise ExportError(f"--{precision} here needs NVIDIA ModelOpt: pip install 'nvidia-modelopt[onnx]' ({err}).") from None
    out = onnx_path.with_suffix(f".{precision}.onnx")
    if precision == "fp16":
        with tempfile.TemporaryDirectory() as tmp:
            data = None
            if calib is not None:
                data = str(Path(tmp) / "calibration.npz")
                np.savez(data, image=np.concatenate(calibration_arrays(calib, profile)))
            onnx.save(autocast.convert_to_mixed_precision(onnx_path=str(onnx_path), low_precision_type="fp16",
                                                          keep_io_types=True, calibration_data=data), str(out))
    else:
        # Calibrated in batches of the profile's opt shape, trtexec-style "name:NxCxHxW".
        shapes = "image:" + "x".join(map(str, profile.opt_shape))
        quantize(str(onnx_path), quantize_mode="int8", calibration_data={"image": np.concatenate(calibration_arrays(calib, profile))},
                 calibration_shapes=shapes, calibration_method="entropy", calibration_eps=["cuda:0", "cpu"],
                 op_types_to_exclude=["Softmax", "Sigmoid", "ArgMax"], output_path=str(out))
    return out


def _entropy_calibrator(trt, calib: np.ndarray, cache: Path, profile: Profile):
    """TensorRT 10 implicit INT8 (only without ModelOpt): batches of the profile's opt shape.

    ``IInt8EntropyCalibrator2.get_batch(names)`` returns one device pointer per input, each to a buffer of
    ``get_batch_size()`` images of the calibration profile's opt shape, or None when done:
    https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Int8/EntropyCalibrator2.html
    """
    import torch

    batches = calibration_arrays(calib, profile)

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()
            self.index, self.buffer = 0, None

        def get_batch_size(self):
            return profile.opt_batch

        def get_batch(self, names):
            if self.index >= len(batches):
                return None
            # Kept on self so the device memory outlives TensorRT's read of it.
            self.buffer = torch.from_numpy(batches[self.index]).cuda()
            # A copy from pageable host memory may still be in flight when .cuda() returns; TensorRT reads
            # the buffer on its own stream, so wait for the copy first.
            torch.cuda.synchronize()
            self.index += 1
            return [int(self.buffer.data_ptr())]

        def read_calibration_cache(self):
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data):
            cache.write_bytes(bytes(data))

    return Calibrator()


@dataclass(frozen=True)
class Recipe:
    """How to build an engine of one precision on one TensorRT major version."""
    modelopt: bool                 # convert the ONNX first (AutoCast for fp16, Q/DQ for int8)
    strongly_typed: bool           # NetworkDefinitionCreationFlag.STRONGLY_TYPED, no precision flags
    flags: tuple[str, ...] = ()    # BuilderFlag names
    calibrator: bool = False       # implicit INT8 with the entropy calibrator


def build_recipe(major: int, precision: str, has_modelopt: bool) -> Recipe:
    """The precision path (see the module docstring); an impossible combination is an ExportError."""
    if precision not in ("fp32", "fp16", "int8"):
        raise ExportError(f"unknown precision {precision!r}; choose fp32, fp16 or int8")
    if precision == "fp32":
        return Recipe(modelopt=False, strongly_typed=major >= 11)
    if precision == "int8" and has_modelopt:
        return Recipe(modelopt=True, strongly_typed=True)
    if major >= 11:
        if not has_modelopt:
            raise ExportError(f"--{precision} on TensorRT {major} needs NVIDIA ModelOpt (its precision flags are "
                              "gone): pip install 'nvidia-modelopt[onnx]'.")
        return Recipe(modelopt=True, strongly_typed=True)
    if precision == "fp16":
        return Recipe(modelopt=False, strongly_typed=False, flags=("FP16",))
    return Recipe(modelopt=False, strongly_typed=False, flags=("FP16", "INT8"), calibrator=True)


def build_engine(onnx_path: Path, out_dir: Path, precision: str = "fp32", calib: np.ndarray | None = None,
                 profile: Profile = PROFILE, workspace_gib: float = 4.0) -> Path:
    """Build and serialise an engine next to the graph; returns the plan path.

    TensorRT Python API: Builder.create_network, OnnxParser.parse_from_file, IOptimizationProfile.set_shape
    (min/opt/max), IBuilderConfig.add_optimization_profile / set_flag / set_calibration_profile,
    Builder.build_serialized_network (https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/).
    """
    try:
        import tensorrt as trt
        import torch
    except ImportError as err:
        raise ExportError(f"--tensorrt needs the 'tensorrt' package and an NVIDIA GPU ({err}).") from None
    if not torch.cuda.is_available():
        raise ExportError("--tensorrt needs an NVIDIA GPU; none is visible.")
    if precision == "int8" and calib is None:
        raise ExportError("--int8 needs calibration images: pass --calib DATA (unlabelled images are used).")
    recipe = build_recipe(tensorrt_major(), precision, _modelopt_available())
    source = _modelopt_precision(onnx_path, precision, calib, profile) if recipe.modelopt else onnx_path

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if recipe.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"{source}: TensorRT could not parse the graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    prof = builder.create_optimization_profile()
    prof.set_shape("image", min=profile.min_shape, opt=profile.opt_shape, max=profile.max_shape)
    config.add_optimization_profile(prof)
    for flag in recipe.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if recipe.calibrator:
        config.set_calibration_profile(prof)
        config.int8_calibrator = _entropy_calibrator(trt, calib, out_dir / f"{onnx_path.stem}.calib.cache", profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"{source}: TensorRT failed to build an engine (see the log above).")
    gpu, slug = _gpu_slug()
    path = out_dir / f"{onnx_path.stem}.{slug}.trt{trt.__version__}.plan"
    path.write_bytes(bytes(plan))
    major_cc, minor_cc = torch.cuda.get_device_capability(0)
    sidecar = {"graph": onnx_path.name, "gpu": gpu, "compute_capability": f"{major_cc}.{minor_cc}",
               "tensorrt": trt.__version__, "precision": precision, "profile": profile.to_dict()}
    Path(f"{path}.json").write_text(json.dumps(sidecar, indent=2))
    return path
