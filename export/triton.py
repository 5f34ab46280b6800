"""A Triton Inference Server model repository from an exported package.

<repo>/<name>/config.pbtxt + <name>/1/model.onnx       (platform onnxruntime_onnx)
<repo>/<name>_trt/config.pbtxt + <name>_trt/1/model.plan  (platform tensorrt_plan, when an engine exists)
Input and output dims come from the ONNX graph (batch dimension left to max_batch_size); dynamic
batching is on, so a user who outgrows `scaleseg serve` points the same tritonclient code at Triton.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import onnx

TRITON_TYPES = {"uint8": "TYPE_UINT8", "int32": "TYPE_INT32", "int64": "TYPE_INT64", "float32": "TYPE_FP32",
                "float16": "TYPE_FP16"}


def _tensor_entries(values) -> list[str]:
    entries = []
    for v in values:
        t = v.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        dims = [d.dim_value if d.dim_value > 0 else -1 for d in t.shape.dim][1:]  # drop the batch dimension
        entries.append(f'  {{\n    name: "{v.name}"\n    data_type: {TRITON_TYPES[dtype]}\n    dims: [ {", ".join(map(str, dims))} ]\n  }}')
    return entries


def model_config(name: str, platform: str, model: onnx.ModelProto, max_batch_size: int = 8,
                 max_queue_delay_us: int = 2000, gpu: bool = False) -> str:
    inputs = ",\n".join(_tensor_entries(model.graph.input))
    outputs = ",\n".join(_tensor_entries(model.graph.output))
    kind = "KIND_GPU" if gpu else "KIND_CPU"
    return (f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: {max_batch_size}\n'
            f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n"
            f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}\n"
            f"instance_group [\n  {{\n    count: 1\n    kind: {kind}\n  }}\n]\n")


def write_repository(package: Path, repo: Path, name: str, max_batch_size: int = 8) -> list[Path]:
    """Add this package's models to ``repo`` (created if missing); returns the model folders written."""
    written = []
    graph = onnx.load(str(package / "model.onnx"), load_external_data=False)
    folder = repo / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy2(package / "model.onnx", folder / "1" / "model.onnx")
    (folder / "config.pbtxt").write_text(model_config(name, "onnxruntime_onnx", graph, max_batch_size))
    written.append(folder)
    for plan in sorted(package.glob("model.*.plan")):
        if ".cif." in plan.name:
            continue
        trt_folder = repo / f"{name}_trt"
        (trt_folder / "1").mkdir(parents=True, exist_ok=True)
        shutil.copy2(plan, trt_folder / "1" / "model.plan")
        (trt_folder / "config.pbtxt").write_text(model_config(f"{name}_trt", "tensorrt_plan", graph, max_batch_size, gpu=True))
        written.append(trt_folder)
    return written
