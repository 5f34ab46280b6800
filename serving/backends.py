"""Inference backends over an exported model package, behind one interface.

Every backend takes uint8 images [N, 3, H, W] and returns the graph's outputs by name (``labels`` int32
[N, H, W], ``confidence`` float32 [N, H, W], optionally ``probs``), because normalisation, resizing,
softmax and argmax live in the graph. Backends:
- ``onnxruntime``: ONNX Runtime with the CUDA / TensorRT execution providers when onnxruntime-gpu and a
  GPU are present, CPU otherwise. ONNX Runtime falls back to CPU silently when a provider cannot load,
  so the providers actually in use are checked against the ones asked for.
- ``tensorrt``: a serialized TensorRT engine run with the tensor-address API (``set_input_shape``,
  ``set_tensor_address``, ``execute_async_v3``) on torch CUDA tensors.
This module imports neither ``training`` nor ``export``.
"""
from __future__ import annotations

import abc
import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np

from .shapes import Profile

log = logging.getLogger("scaleseg.serving")

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


class BackendError(RuntimeError):
    """A backend that cannot run here; the message says what is missing."""


class Backend(abc.ABC):
    name: str
    precision: str = "fp32"         # what the graph computes in: fp32, or int8 / fp16 for quantized graphs and engines
    profile: Profile | None = None  # the input shapes an engine accepts; None: any [N, 3, H, W]

    @abc.abstractmethod
    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 [N, 3, H, W] -> {output name: array}."""

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """What runs the model (providers, GPU), for logs and metadata."""


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, model_path: str | Path, providers: list | None = None, threads: int = 0, precision: str = "fp32",
                 spinning: bool = True):
        import onnxruntime as ort

        self.precision = precision
        # ONNX Runtime's thread-management guide (https://onnxruntime.ai/docs/performance/tune-performance/
        # threading.html): all graph optimisations, and intra-op threads left at 0 (one per physical core, with
        # affinity) unless a caller measured better. The memory pattern traces one run's allocations and reuses
        # them "if the input shapes are the same" (onnxruntime_c_api.h, EnableMemPattern); requests here change
        # size, and measured (bench/results/ort_memory.md) it let RSS grow 44 MiB over 200 runs after the largest
        # image, against 1 MiB without it, at the same speed.
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_mem_pattern = False
        if threads:
            options.intra_op_num_threads = threads
        if not spinning:  # the guide's "session.intra_op.allow_spinning": idle workers sleep at once instead of
            # spinning, which steals the cores from another session run right after (measured: bench/decoder_cost.py)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in GPU_PROVIDERS if p in available] + ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(model_path), options, providers=providers)
        wanted = [p if isinstance(p, str) else p[0] for p in providers]
        in_use = self.session.get_providers()
        missing = [p for p in wanted if p not in in_use and p != "CPUExecutionProvider"]
        if missing and not any(p in in_use for p in GPU_PROVIDERS):
            raise BackendError(f"ONNX Runtime could not start {missing} (running {in_use}); "
                               "install onnxruntime-gpu with a matching CUDA/TensorRT, or use the CPU provider.")
        self.providers = in_use
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(images, dtype=np.uint8)})
        return dict(zip(self.output_names, outs))

    @property
    def description(self) -> str:
        return f"onnxruntime ({', '.join(self.providers)})"


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, plan_path: str | Path):
        info = read_sidecar(plan_path)
        self.profile = Profile.from_dict(info["profile"])
        self.precision = str(info.get("precision", "fp32"))
        try:
            import tensorrt as trt
            import torch
        except ImportError as err:
            raise BackendError(f"TensorRT backend needs the 'tensorrt' and 'torch' packages ({err}).") from None
        if not torch.cuda.is_available():
            raise BackendError("TensorRT backend needs an NVIDIA GPU; none is visible.")
        self.trt, self.torch = trt, torch
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise BackendError(f"{plan_path}: TensorRT {trt.__version__} could not deserialize this engine; it was "
                               "built for another TensorRT version or GPU. Rebuild it with `scaleseg export --tensorrt`.")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.stream = torch.cuda.Stream()

    def _torch_dtype(self, name: str):
        trt, torch = self.trt, self.torch
        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
                 trt.int64: torch.int64, trt.uint8: torch.uint8, trt.int8: torch.int8, trt.bool: torch.bool}
        return table[self.engine.get_tensor_dtype(name)]

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        # Every CUDA operation here (host-to-device copy, allocations, execution, device-to-host copy) is
        # issued on self.stream, so each waits for the one before it without a device-wide sync. PyTorch:
        # "all CUDA kernels queued within its context will be enqueued on a selected stream"
        # (https://pytorch.org/docs/stable/generated/torch.cuda.stream.html); TensorRT:
        # IExecutionContext.execute_async_v3(stream_handle) runs on the given stream and reads the tensor
        # addresses set before it (https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/
        # infer/Core/ExecutionContext.html).
        torch = self.torch
        name = self.inputs[0]
        if not self.context.set_input_shape(name, tuple(images.shape)):
            raise BackendError(f"input shape {tuple(images.shape)} is outside the engine's optimisation profile "
                               f"{self.engine.get_tensor_profile_shape(name, 0)}")
        with torch.cuda.stream(self.stream):
            x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)).to("cuda", non_blocking=True)
            self.context.set_tensor_address(name, x.data_ptr())
            outs = {}
            for out in self.outputs:
                outs[out] = torch.empty(tuple(self.context.get_tensor_shape(out)), dtype=self._torch_dtype(out),
                                        device="cuda")
                self.context.set_tensor_address(out, outs[out].data_ptr())
            ok = self.context.execute_async_v3(self.stream.cuda_stream)
            host = {k: v.to("cpu", non_blocking=True) for k, v in outs.items()}
        self.stream.synchronize()
        if not ok:
            raise BackendError("TensorRT execution failed")
        return {k: v.numpy() for k, v in host.items()}

    @property
    def description(self) -> str:
        return f"tensorrt {self.trt.__version__} on {self.torch.cuda.get_device_name(0)}"


def read_sidecar(plan_path: str | Path) -> dict:
    """An engine's JSON sidecar (GPU, TensorRT version, precision, and the optimisation profile it was built
    with: the one record serving limits, warm-up, parity and Triton read its shapes from), checked."""
    sidecar = Path(f"{plan_path}.json")
    try:
        info = json.loads(sidecar.read_text())
        Profile.from_dict(info["profile"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise BackendError(f"{sidecar}: cannot read the engine's optimisation profile ({err}); "
                           "rebuild the engine with `scaleseg export --tensorrt`.") from None
    return info


def current_gpu() -> str | None:
    """This machine's first CUDA device name, or None without torch or a GPU."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def find_plan(model_dir: str | Path, graph: str, gpu: str | None) -> Path | None:
    """The package's TensorRT engine of ``graph`` built for the GPU named ``gpu`` (its JSON sidecar names both)."""
    if gpu is None:
        return None
    for sidecar in sorted(Path(model_dir).glob("*.plan.json")):
        try:
            info = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and info.get("gpu") == gpu and info.get("graph") == graph:
            return sidecar.with_suffix("")
    return None


def load_backend(model_dir: str | Path, kind: str = "auto", graph: str = "model.onnx",
                 check: Callable[[Backend], None] = lambda backend: None, gpu: str | None = None) -> Backend:
    """A backend that has passed ``check`` (the warm-up). ``auto`` takes a TensorRT engine built for ``gpu``
    (default: this machine's) when it loads and passes the check, else ONNX Runtime (GPU providers first when
    present); why the engine was not used is logged."""
    if kind not in ("auto", "onnxruntime", "tensorrt"):
        raise BackendError(f"unknown backend {kind!r}; choose auto, tensorrt or onnxruntime")
    model_dir = Path(model_dir)
    if kind in ("auto", "tensorrt"):
        plan = find_plan(model_dir, graph, gpu or current_gpu())
        if plan is not None:
            try:
                backend = TensorRTBackend(plan)
                check(backend)
                return backend
            except (BackendError, RuntimeError, OSError, ValueError) as err:
                if kind == "tensorrt":
                    raise BackendError(f"{plan}: {err}") from None
                log.warning("%s: TensorRT engine not used (%s); falling back to ONNX Runtime", plan, err)
        elif kind == "tensorrt":
            raise BackendError(f"{model_dir}: no TensorRT engine for this GPU; build one with `scaleseg export --tensorrt`.")
    path = model_dir / graph
    if not path.is_file():
        raise BackendError(f"{path}: missing from the model package.")
    backend = OnnxRuntimeBackend(path)
    check(backend)
    return backend
