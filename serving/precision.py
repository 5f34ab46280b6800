"""Which precision of a package's graph runs: FP32, or the CPU INT8 twin that `scaleseg export --quantize int8`
wrote after it passed its accuracy gate (meta.json ``int8``: graph -> twin file, calibration, gate).

``auto`` takes the best the package has that passed its gate: INT8 where a twin exists, except where a GPU
would run the FP32 graph (a TensorRT engine carries its own precision, recorded in its sidecar)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .backends import GPU_PROVIDERS, Backend, BackendError, OnnxRuntimeBackend, current_gpu, find_plan, load_backend

PRECISIONS = ("auto", "fp32", "int8")


def int8_twins(meta: dict, directory: Path) -> dict[str, str]:
    """FP32 graph file -> INT8 twin file, for twins whose gate passed and whose file is in ``directory``."""
    record = meta.get("int8")
    if not isinstance(record, dict) or not isinstance(record.get("gate"), dict) or record["gate"].get("passed") is not True:
        return {}
    graphs = record.get("graphs") if isinstance(record.get("graphs"), dict) else {}
    # Twins are bare file names inside the package; anything else in meta.json is not ours to open.
    return {g: t for g, t in graphs.items() if isinstance(t, str) and Path(t).name == t and (directory / t).is_file()}


def choose_precision(requested: str, has_int8: bool, gpu: bool, where: str) -> str:
    """``fp32`` or ``int8`` for one graph. ``gpu``: a GPU (TensorRT engine or GPU execution provider) would
    run the FP32 graph, which ``auto`` prefers to the CPU INT8 graph."""
    if requested not in PRECISIONS:
        raise BackendError(f"unknown precision {requested!r}; choose {', '.join(PRECISIONS)}")
    if requested == "int8" and not has_int8:
        raise BackendError(f"{where}: the package has no INT8 graph that passed its accuracy gate; export one with "
                           "`scaleseg export ... --quantize int8`, or serve --precision fp32")
    if requested == "auto":
        return "int8" if has_int8 and not gpu else "fp32"
    return requested


def gpu_runs(directory: Path, graph: str, kind: str) -> bool:
    """Whether ``load_backend(directory, kind, graph)`` would run the graph on a GPU here."""
    import onnxruntime as ort

    gpu = current_gpu()
    if gpu is None:
        return False
    if kind == "tensorrt" or (kind == "auto" and find_plan(directory, graph, gpu) is not None):
        return True
    return any(p in ort.get_available_providers() for p in GPU_PROVIDERS)


def load_graph(directory: Path, graph: str, meta: dict, kind: str = "auto", requested: str = "auto",
               check: Callable[[Backend], None] = lambda backend: None) -> Backend:
    """The backend for ``graph`` (an FP32 graph file of the package) at the chosen precision; its
    ``precision`` says which one runs. The INT8 graph runs on ONNX Runtime's CPU provider."""
    directory = Path(directory)
    if requested == "int8" and kind == "tensorrt":
        raise BackendError(f"{directory / graph}: --precision int8 runs the CPU INT8 graph on ONNX Runtime; drop "
                           "--backend tensorrt (a TensorRT engine has the precision it was built with)")
    twins = int8_twins(meta, directory)
    gpu = requested == "auto" and graph in twins and gpu_runs(directory, graph, kind)
    if choose_precision(requested, graph in twins, gpu, str(directory / graph)) == "fp32":
        return load_backend(directory, kind, graph, check)
    backend = OnnxRuntimeBackend(directory / twins[graph], providers=["CPUExecutionProvider"], precision="int8")
    check(backend)
    return backend
