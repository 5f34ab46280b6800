"""Which precision of a package's graph runs: FP32, or the CPU INT8 twin that `scaleseg export --quantize int8`
wrote after it passed its accuracy gate (meta.json ``int8``: graph -> twin file, calibration, gate).

``auto`` takes the best the package has that passed its gate: INT8 where a twin exists, except where a
TensorRT engine will run (engines carry their own precision, recorded in their sidecar)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .backends import Backend, BackendError, current_gpu, find_plan, load_backend

PRECISIONS = ("auto", "fp32", "int8")


def int8_twins(meta: dict, directory: Path) -> dict[str, str]:
    """FP32 graph file -> INT8 twin file, for twins whose gate passed and whose file is in ``directory``."""
    record = meta.get("int8")
    if not isinstance(record, dict) or not isinstance(record.get("gate"), dict) or record["gate"].get("passed") is not True:
        return {}
    graphs = record.get("graphs") if isinstance(record.get("graphs"), dict) else {}
    # Twins are bare file names inside the package; anything else in meta.json is not ours to open.
    return {g: t for g, t in graphs.items() if isinstance(t, str) and Path(t).name == t and (directory / t).is_file()}


def choose_precision(requested: str, has_int8: bool, engine: bool, where: str) -> str:
    """``fp32`` or ``int8`` for one graph. ``engine``: a TensorRT engine is asked for or will be used."""
    if requested not in PRECISIONS:
        raise BackendError(f"unknown precision {requested!r}; choose {', '.join(PRECISIONS)}")
    if requested == "int8":
        if engine:
            raise BackendError(f"{where}: --precision int8 runs the INT8 graph on ONNX Runtime; drop --backend tensorrt "
                               "(a TensorRT engine has the precision it was built with)")
        if not has_int8:
            raise BackendError(f"{where}: the package has no INT8 graph that passed its accuracy gate; export one with "
                               "`scaleseg export ... --quantize int8`, or serve --precision fp32")
        return "int8"
    if requested == "fp32":
        return "fp32"
    return "int8" if has_int8 and not engine else "fp32"


def load_graph(directory: Path, graph: str, meta: dict, kind: str = "auto", requested: str = "auto",
               check: Callable[[Backend], None] = lambda backend: None) -> Backend:
    """The backend for ``graph`` (an FP32 graph file of the package) at the chosen precision; its
    ``precision`` says which one runs."""
    directory = Path(directory)
    twins = int8_twins(meta, directory)
    engine = kind == "tensorrt" or (kind == "auto" and graph in twins and requested == "auto"
                                    and find_plan(directory, graph, current_gpu()) is not None)
    if choose_precision(requested, graph in twins, engine, str(directory / graph)) == "int8":
        return load_backend(directory, "onnxruntime", twins[graph], check, precision="int8")
    return load_backend(directory, kind, graph, check)
