"""A Triton Inference Server model repository from an exported package.

<repo>/<name>/config.pbtxt + <name>/1/model.onnx                (single-scale graph, onnxruntime_onnx, CPU)
<repo>/<name>_cif/config.pbtxt + <name>_cif/1/model.onnx        (CIF graph, when the package has one)
<repo>/<name>[_cif]_trt/config.pbtxt + 1/model.<gpu>.plan        (tensorrt_plan on KIND_GPU, when engines exist;
                                                                  one plan per compute capability)
<repo>/<name>[_cif]_int8/config.pbtxt + 1/model.onnx            (the CPU INT8 graph, onnxruntime_onnx on KIND_CPU,
                                                                  when the package has one that passed its gate)
Input and output dims come from the ONNX graph (batch dimension left to max_batch_size); dynamic batching is
on, so a user who outgrows `scaleseg serve` points the same tritonclient code at Triton. The models are
written into a staging folder first and then moved into place: an existing model folder is replaced only
with ``force``, and ``_trt`` folders that this package no longer has an engine for are removed with it.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from serving.precision import int8_twins
from serving.shapes import Profile

TRITON_TYPES = {"uint8": "TYPE_UINT8", "int32": "TYPE_INT32", "int64": "TYPE_INT64", "float32": "TYPE_FP32",
                "float16": "TYPE_FP16"}
GRAPHS = {"model.onnx": "", "model.cif.onnx": "_cif"}   # graph file -> model name suffix
VERSION = "1"
VARIANTS = ("", "_trt", "_int8")                         # FP32 ONNX, TensorRT engines, CPU INT8 ONNX


@dataclass
class TritonModel:
    name: str
    platform: str
    graph: onnx.ModelProto
    files: dict[str, Path]                  # file name in the version folder -> source
    max_batch_size: int
    gpu: bool = False
    cc_files: dict[str, str] = field(default_factory=dict)  # compute capability -> plan file name
    note: str = ""


def _tensor_entries(values) -> list[str]:
    entries = []
    for v in values:
        t = v.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        dims = [d.dim_value if d.dim_value > 0 else -1 for d in t.shape.dim][1:]  # drop the batch dimension
        entries.append(f'  {{\n    name: "{v.name}"\n    data_type: {TRITON_TYPES[dtype]}\n    dims: [ {", ".join(map(str, dims))} ]\n  }}')
    return entries


def model_config(model: TritonModel, max_queue_delay_us: int = 2000) -> str:
    """config.pbtxt; ``cc_model_filenames`` lets Triton pick the plan built for the GPU it runs on
    (https://docs.nvidia.com/deeplearning/triton-inference-server/user-guide/docs/user_guide/model_configuration.html)."""
    inputs = ",\n".join(_tensor_entries(model.graph.graph.input))
    outputs = ",\n".join(_tensor_entries(model.graph.graph.output))
    kind = "KIND_GPU" if model.gpu else "KIND_CPU"
    note = f"# {model.note}\n" if model.note else ""
    cc = "".join(f'cc_model_filenames {{\n  key: "{k}"\n  value: "{v}"\n}}\n' for k, v in sorted(model.cc_files.items()))
    return (f'{note}name: "{model.name}"\nplatform: "{model.platform}"\nmax_batch_size: {model.max_batch_size}\n'
            f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n{cc}"
            f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}\n"
            f"instance_group [\n  {{\n    count: 1\n    kind: {kind}\n  }}\n]\n")


def _engines(package: Path, graph_file: str) -> list[tuple[Path, dict]]:
    """(plan, sidecar) for every engine of ``graph_file`` in the package."""
    found = []
    for sidecar in sorted(package.glob("*.plan.json")):
        info = json.loads(sidecar.read_text())
        plan = sidecar.with_suffix("")
        if info.get("graph") == graph_file and plan.is_file():
            found.append((plan, info))
    return found


def package_models(package: Path, name: str, max_batch_size: int = 8) -> list[TritonModel]:
    """The Triton models this package provides: each of its graphs, and a GPU model per graph with engines."""
    models = []
    twins = int8_twins(json.loads((package / "meta.json").read_text()), package)
    for graph_file, suffix in GRAPHS.items():
        if not (package / graph_file).is_file():
            continue
        graph = onnx.load(str(package / graph_file), load_external_data=False)
        models.append(TritonModel(f"{name}{suffix}", "onnxruntime_onnx", graph, {"model.onnx": package / graph_file},
                                  max_batch_size))
        if graph_file in twins:
            models.append(TritonModel(f"{name}{suffix}_int8", "onnxruntime_onnx", graph,
                                      {"model.onnx": package / twins[graph_file]}, max_batch_size,
                                      note=f"{twins[graph_file]}: INT8 (ONNX Runtime QDQ) for CPUs; gated against {graph_file}"))
        engines = _engines(package, graph_file)
        if not engines:
            continue
        files, cc_files, notes, batch = {}, {}, [], max_batch_size
        for plan, info in engines:
            cc = info.get("compute_capability", "")
            if cc in cc_files:  # another GPU of the same compute capability: its engine is interchangeable
                continue
            files[plan.name] = plan
            cc_files[cc] = plan.name
            notes.append(f"{plan.name}: TensorRT {info.get('tensorrt')} for {info.get('gpu')} (compute capability {cc})")
            batch = min(batch, Profile.from_dict(info["profile"]).max_batch)
        models.append(TritonModel(f"{name}{suffix}_trt", "tensorrt_plan", graph, files, batch, gpu=True,
                                  cc_files=cc_files, note="; ".join(notes) + ". Triton must run the same TensorRT version."))
    return models


def candidate_names(name: str) -> list[str]:
    """Every model folder a package called ``name`` can write, engines or not."""
    return [f"{name}{suffix}{variant}" for suffix in GRAPHS.values() for variant in VARIANTS]


def check_destination(repo: Path, name: str, force: bool) -> None:
    """Refuse, before any work, to replace model folders of ``name`` in ``repo`` without ``force``."""
    existing = [n for n in candidate_names(name) if (repo / n).exists()]
    if existing and not force:
        raise FileExistsError(f"{repo}: already holds model folder(s) {', '.join(existing)}. Pass --force to replace "
                              "them, or choose another --name.")


def write_repository(package: Path, repo: Path, name: str, max_batch_size: int = 8, force: bool = False) -> list[Path]:
    """Add this package's models to ``repo`` (created if missing); returns the model folders written."""
    check_destination(repo, name, force)
    models = package_models(package, name, max_batch_size)
    repo.mkdir(parents=True, exist_ok=True)
    # Staged beside the repository (same file system, so the moves are renames), never inside it, where a
    # polling Triton would take a half-written folder for a model.
    with tempfile.TemporaryDirectory(dir=repo.resolve().parent, prefix=f".{repo.name}-staging-") as staging:
        for model in models:
            version = Path(staging) / model.name / VERSION
            version.mkdir(parents=True)
            for file_name, source in model.files.items():
                shutil.copy2(source, version / file_name)
            (version.parent / "config.pbtxt").write_text(model_config(model))
        for stale in candidate_names(name):  # replaced folders, and _trt / _int8 folders this package lacks now
            if (repo / stale).exists():
                shutil.rmtree(repo / stale)
        for model in models:
            (Path(staging) / model.name).rename(repo / model.name)
    return [repo / m.name for m in models]
