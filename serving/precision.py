"""Which precision of a package's graph runs: FP32, or the CPU INT8 twin that `scaleseg export --quantize int8`
wrote after it passed its accuracy gate (meta.json ``int8``: graph -> twin file, calibration, gate).

``auto`` takes the best the package has that passed its gate: INT8 where a twin exists, except where a GPU
would run the FP32 graph (a TensorRT engine carries its own precision, recorded in its sidecar)."""
from __future__ import annotations

import functools
import logging
import platform
from pathlib import Path
from typing import Callable

from .backends import GPU_PROVIDERS, Backend, BackendError, OnnxRuntimeBackend, current_gpu, find_plan, load_backend

log = logging.getLogger("scaleseg.serving")
PRECISIONS = ("auto", "fp32", "int8")
# x86 cores with either of these multiply U8S8 exactly; without them ONNX Runtime uses VPMADDUBSW, whose 16-bit
# intermediate sums can saturate (https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html,
# "Data type selection").
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})
X86 = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})
# ARM runs U8S8 through widening multiplies or dot-product instructions, which do not saturate.
ARM = frozenset({"aarch64", "arm64", "armv7l", "armv8l"})


def int8_cpu(machine: str, flags: frozenset[str] | None) -> dict:
    """What decides how exactly this CPU runs U8S8: ``vnni`` True / False on x86 where the CPU flags are known,
    None where they are not read (not Linux) or not x86."""
    x86 = machine.lower() in X86
    return {"machine": machine, "vnni": bool(flags & VNNI_FLAGS) if x86 and flags is not None else None}


def cpu_flags(cpuinfo: str) -> frozenset[str] | None:
    """The x86 feature flags of Linux's /proc/cpuinfo text (its first ``flags`` line); None without one."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return None


@functools.cache
def _this_cpu_flags() -> frozenset[str] | None:
    try:
        return cpu_flags(Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace"))
    except OSError:
        return None


def this_int8_cpu() -> dict:
    """``int8_cpu`` of the CPU this process runs on."""
    return int8_cpu(platform.machine(), _this_cpu_flags())


def saturates(cpu: dict | None) -> bool | None:
    """Whether ONNX Runtime's U8S8 kernels can saturate on ``cpu`` (an ``int8_cpu`` record): x86 without VNNI;
    False on VNNI and ARM; None where unknown (an x86 CPU whose flags were not read, another architecture, or a
    record from an older package)."""
    if not isinstance(cpu, dict) or not isinstance(cpu.get("machine"), str):
        return None
    if cpu["machine"].lower() in ARM:
        return False
    if cpu["machine"].lower() not in X86:
        return None
    return None if not isinstance(cpu.get("vnni"), bool) else not cpu["vnni"]


def int8_cpu_warning(gated_on: dict | None, here: dict, where: str) -> str | None:
    """Why the INT8 gate's numbers may not hold here: it ran where U8S8 is exact (x86 with VNNI, or ARM) and
    this CPU is x86 without VNNI. Packages exported before the gate recorded its CPU get no warning."""
    if saturates(gated_on) is not False or saturates(here) is not True:
        return None
    return (f"{where}: its INT8 accuracy gate ran on a CPU whose int8 sums are exact ({gated_on['machine']}"
            f"{', VNNI' if gated_on.get('vnni') else ''}), and this x86 CPU has no VNNI, where U8S8's 16-bit sums "
            "can saturate and labels can differ from FP32 more than the gate measured; compare `scaleseg eval PKG "
            "DATA --precision int8` with `--precision fp32` here, or serve, eval and predict with --precision fp32")


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
    warning = int8_cpu_warning(meta["int8"]["gate"].get("cpu"), this_int8_cpu(), str(directory / twins[graph]))
    if warning:
        log.warning("%s", warning)
    return backend
