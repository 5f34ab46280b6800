"""What this machine has for scaleseg's GPU path, and which mixes of packages are broken, with the fix.

``probe()`` reads the installed distributions, ONNX Runtime's providers, torch's CUDA build, the NVIDIA driver,
TensorRT and ModelOpt into an ``Environment``; everything that decides (``problems``, ``serve_backend``,
``to_install``) is a pure function of that snapshot, so tests build snapshots by hand. Broken mixes found:
- both ONNX Runtime builds: ``onnxruntime`` and ``onnxruntime-gpu`` install the same ``onnxruntime`` module, and
  the one installed last decides whether the CUDA provider exists (onnxruntime issue 26996: "When I install both
  onnxruntime and onnxruntime-gpu packages, I can not use the CUDAExecutionProvider");
- ``onnxruntime-gpu`` without ``CUDAExecutionProvider`` in ``onnxruntime.get_available_providers()``
  (https://onnxruntime.ai/docs/api/python/api_summary.html), e.g. after the CPU build was removed on top of it;
- torch built for a newer CUDA major than the driver supports: ``cuDriverGetVersion`` "Returns the latest CUDA
  version supported by driver ... (1000 major + 10 minor)" (https://docs.nvidia.com/cuda/cuda-driver-api/
  group__CUDA__VERSION.html), and minor-version compatibility holds only "within a CUDA major release family"
  (https://docs.nvidia.com/deploy/cuda-compatibility/minor-version-compatibility.html), so torch then sees no
  GPU and ``--device auto`` silently trains on CPU.
Imports nothing heavy at module level: the serve-cpu image has no torch.
"""
from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.metadata
import sys
from dataclasses import dataclass, field

from .backends import GPU_PROVIDERS

ORT_CPU, ORT_GPU = "onnxruntime", "onnxruntime-gpu"
TENSORRT_DISTS = ("tensorrt-cu13", "tensorrt-cu12", "tensorrt")
# Oldest NVIDIA driver branch per CUDA major (the compatibility guide's table above).
MIN_DRIVER = {13: 580, 12: 525, 11: 450}
INSTALL = {
    "cpu": 'pip install -c constraints.txt -e ".[cpu]"',
    "gpu": 'pip install -c constraints.txt -e ".[gpu]"',
    # TensorRT's library packages fetch their wheels from NVIDIA's index (docs/deployment.md).
    "tensorrt": 'pip install -c constraints-tensorrt.txt -e ".[tensorrt]"',
}


@dataclass(frozen=True)
class Environment:
    """A snapshot of the machine; None means absent (not installed, not importable, no driver)."""
    distributions: dict[str, str] = field(default_factory=dict)  # installed distribution -> version, of those that matter
    ort_providers: tuple[str, ...] | None = None  # onnxruntime.get_available_providers(); None: does not import
    ort_error: str | None = None                  # why onnxruntime did not import
    torch: str | None = None                      # torch.__version__
    torch_cuda: str | None = None                 # torch.version.cuda: the CUDA torch was built for; None for CPU builds
    cuda_available: bool = False                  # torch.cuda.is_available()
    mps_available: bool = False                   # torch.backends.mps.is_available() (Apple silicon)
    gpus: tuple[str, ...] = ()                    # CUDA device names torch sees
    driver: str | None = None                     # NVIDIA driver version (NVML)
    driver_cuda: str | None = None                # newest CUDA the driver supports, "13.0"
    tensorrt: str | None = None                   # tensorrt.__version__ of an importable tensorrt
    tensorrt_error: str | None = None             # why an installed tensorrt did not import
    modelopt: str | None = None                   # nvidia-modelopt version, when modelopt.onnx imports


@dataclass(frozen=True)
class Problem:
    what: str  # what is wrong, in the user's terms
    fix: str   # the exact command(s) or step that repairs it


def _major(version: str | None) -> int | None:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


def problems(env: Environment) -> list[Problem]:
    """The broken mixes of this snapshot (see the module docstring), each with its fix."""
    found = []
    cpu, gpu = env.distributions.get(ORT_CPU), env.distributions.get(ORT_GPU)
    if cpu and gpu:
        keep = (f"pip install onnxruntime-gpu=={gpu}" if env.driver else f"pip install onnxruntime=={cpu}")
        found.append(Problem(
            f"both ONNX Runtime builds are installed (onnxruntime {cpu} and onnxruntime-gpu {gpu}); they share the "
            "`onnxruntime` module, so whichever was installed last decides whether the CUDA provider exists",
            f"pip uninstall -y onnxruntime onnxruntime-gpu && {keep}"))
    elif gpu and env.ort_providers is not None and "CUDAExecutionProvider" not in env.ort_providers:
        found.append(Problem(
            f"onnxruntime-gpu {gpu} is installed but its CUDA provider is missing (providers: "
            f"{', '.join(env.ort_providers)}); its files were overwritten or removed by another ONNX Runtime install",
            f"pip install --force-reinstall --no-deps onnxruntime-gpu=={gpu}"))
    if (cpu or gpu) and env.ort_providers is None:
        name, version = (ORT_GPU, gpu) if gpu else (ORT_CPU, cpu)
        found.append(Problem(f"{name} {version} is installed but does not import ({env.ort_error})",
                             f"pip install --force-reinstall --no-deps {name}=={version}"))
    built, supported = _major(env.torch_cuda), _major(env.driver_cuda)
    if built and supported and built > supported:
        found.append(Problem(
            f"torch {env.torch} is built for CUDA {env.torch_cuda}, but the NVIDIA driver {env.driver or ''} supports "
            f"CUDA {env.driver_cuda} at most: torch sees no GPU and --device auto trains on the CPU",
            f"upgrade the NVIDIA driver to branch {MIN_DRIVER.get(built, 'newer')} or newer (CUDA {built}.x), or install a "
            f"torch build for CUDA {supported}.x (pytorch.org's install selector gives its pip line)"))
    if env.tensorrt_error:
        found.append(Problem(f"TensorRT is installed but does not import ({env.tensorrt_error})", INSTALL["tensorrt"]))
    return found


def ort_gpu_providers(env: Environment) -> list[str]:
    """The GPU providers ONNX Runtime would use here: those it offers, when a GPU is visible."""
    if not env.ort_providers or not (env.gpus or env.driver):
        return []
    return [p for p in GPU_PROVIDERS if p in env.ort_providers]


def serve_backend(env: Environment) -> str:
    """What `scaleseg serve --backend auto` runs a package on here (serving.backends.load_backend's order)."""
    if env.ort_providers is None:
        return "nothing: ONNX Runtime does not import; " + INSTALL["cpu"]
    ort = f"ONNX Runtime on {', '.join(ort_gpu_providers(env) + ['CPUExecutionProvider'])}"
    if env.tensorrt and env.cuda_available and env.gpus:
        return f"a TensorRT engine built for {env.gpus[0]} when the package has one (TensorRT {env.tensorrt}), else {ort}"
    return ort


def to_install(env: Environment) -> list[str]:
    """What to install for the parts this machine could run but lacks (nothing without an NVIDIA GPU)."""
    if not env.driver:
        return []
    steps = []
    if ORT_GPU not in env.distributions:
        steps.append(f"ONNX Runtime on the GPU: pip uninstall -y onnxruntime && {INSTALL['gpu']}")
    if not env.tensorrt:
        steps.append(f"TensorRT engines (export --tensorrt, serve --backend tensorrt): {INSTALL['tensorrt']}")
    elif _major(env.tensorrt) and _major(env.tensorrt) >= 11 and not env.modelopt:
        steps.append(f"FP16/INT8 engines on TensorRT {env.tensorrt} need NVIDIA ModelOpt: {INSTALL['tensorrt']}")
    return steps


# --- probing (the only part that touches the machine) ---------------------------------------------------
def _distributions() -> dict[str, str]:
    found = {}
    for name in (ORT_CPU, ORT_GPU, "torch", "nvidia-modelopt", *TENSORRT_DISTS):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def _library(linux: str, windows: str):
    try:
        return ctypes.CDLL(windows if sys.platform == "win32" else linux)
    except OSError:
        return None


def _driver() -> tuple[str | None, str | None]:
    """(driver version, newest CUDA it supports). CUDA Driver API ``cuDriverGetVersion(int*)`` (no cuInit
    needed) and NVML ``nvmlInit_v2`` / ``nvmlSystemGetDriverVersion(char*, len)`` / ``nvmlShutdown``
    (https://docs.nvidia.com/deploy/nvml-api/group__nvmlSystemQueries.html)."""
    cuda, version, driver = _library("libcuda.so.1", "nvcuda.dll"), ctypes.c_int(0), None
    if cuda is None or cuda.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value == 0:
        return None, None
    nvml = _library("libnvidia-ml.so.1", "nvml.dll")
    if nvml is not None and nvml.nvmlInit_v2() == 0:
        buffer = ctypes.create_string_buffer(96)
        if nvml.nvmlSystemGetDriverVersion(buffer, ctypes.c_uint(96)) == 0:
            driver = buffer.value.decode()
        nvml.nvmlShutdown()
    return driver, f"{version.value // 1000}.{version.value % 1000 // 10}"


def _onnxruntime() -> tuple[tuple[str, ...] | None, str | None]:
    try:
        import onnxruntime
    except Exception as err:  # a half-overwritten install fails with OSError or AttributeError, not only ImportError
        return None, f"{type(err).__name__}: {err}"
    return tuple(onnxruntime.get_available_providers()), None


def _torch() -> dict:
    try:
        import torch
    except ImportError:
        return {}
    mps = getattr(torch.backends, "mps", None)
    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": cuda,
            "mps_available": bool(mps and mps.is_available()),
            "gpus": tuple(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if cuda else ()}


def _module_version(module: str, dist: str | None = None) -> tuple[str | None, str | None]:
    try:
        imported = importlib.import_module(module)
    except Exception as err:  # a wheel without its CUDA libraries fails with OSError at import
        return None, f"{type(err).__name__}: {err}"
    return (importlib.metadata.version(dist) if dist else getattr(imported, "__version__", "unknown")), None


def probe(full: bool = True) -> Environment:
    """This machine's snapshot. ``full=False`` (every start) skips TensorRT and ModelOpt, and imports torch
    only where an NVIDIA driver exists, so a CPU machine pays nothing for it."""
    dists = _distributions()
    driver, driver_cuda = _driver()
    providers, ort_error = _onnxruntime() if {ORT_CPU, ORT_GPU} & set(dists) else (None, "not installed")
    torch_info = _torch() if (full or driver) and "torch" in dists else {}
    trt = trt_error = modelopt = None
    if full and set(TENSORRT_DISTS) & set(dists):
        trt, trt_error = _module_version("tensorrt")
    if full and "nvidia-modelopt" in dists:
        modelopt = _module_version("modelopt.onnx", "nvidia-modelopt")[0]
    return Environment(dists, providers, ort_error, driver=driver, driver_cuda=driver_cuda, tensorrt=trt,
                       tensorrt_error=trt_error, modelopt=modelopt, **torch_info)


@functools.cache
def warn_broken_install() -> list[Problem]:
    """Once per process, at start: print each broken mix and its fix to stderr (the command still runs)."""
    found = problems(probe(full=False))
    for problem in found:
        print(f"warning: {problem.what}.\n  fix: {problem.fix}", file=sys.stderr)
    return found
