"""`scaleseg doctor` and the start-up check of broken installs: this CPU machine for real, and GPU machines,
broken ONNX Runtime mixes and old drivers as faked ``Environment`` snapshots."""
from __future__ import annotations

import json
import sys

import pytest

from export import doctor
from serving import environment
from serving.environment import Environment, problems, serve_backend, to_install
from training import cli
from training.engine import auto_device, device_kind, resolve_device

CPU_ORT = ("CPUExecutionProvider",)
GPU_ORT = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
H200 = dict(torch="2.14.1", torch_cuda="13.0", cuda_available=True, gpus=("NVIDIA H200",), driver="580.95.05",
            driver_cuda="13.0")


def gpu_machine(**changes) -> Environment:
    fields = dict(distributions={"onnxruntime-gpu": "1.24.4", "torch": "2.14.1", "tensorrt-cu13": "11.4.0.106",
                                 "nvidia-modelopt": "0.47.0"},
                  ort_providers=GPU_ORT, tensorrt="11.4.0.106", modelopt="0.47.0", **H200)
    return Environment(**(fields | changes))


def test_this_cpu_machine_reports_cpu_everywhere_and_nothing_broken(capsys):
    assert doctor.main([]) == 0
    out = capsys.readouterr().out
    assert "train --device auto   cpu" in out and "serve --backend auto  ONNX Runtime on CPUExecutionProvider" in out
    assert "NVIDIA driver   none found" in out and "no NVIDIA GPU here" in out and "Problems" not in out
    assert doctor.main(["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["machine"]["distributions"]["onnxruntime"] and data["problems"] == [] and data["to_install"] == []


def test_a_complete_gpu_machine_uses_cuda_and_tensorrt_and_needs_nothing():
    env = gpu_machine()
    assert problems(env) == [] and to_install(env) == []
    data = doctor.report(env)
    assert data["uses"]["train --device auto"] == "cuda (NVIDIA H200)"
    assert "TensorRT 11.4.0.106 engines (fp32, fp16, int8) for NVIDIA H200" in data["uses"]["export"]
    assert serve_backend(env).startswith("a TensorRT engine built for NVIDIA H200") and "CUDAExecutionProvider" in serve_backend(env)
    assert "every backend is installed" in doctor.format_report(data)


def test_tensorrt_11_without_modelopt_builds_fp32_only_and_says_what_to_install():
    env = gpu_machine(modelopt=None, distributions={"onnxruntime-gpu": "1.24.4", "tensorrt-cu13": "11.4.0.106"})
    assert "engines (fp32) for" in " ".join(doctor.export_formats(env))
    (step,) = to_install(env)
    assert "ModelOpt" in step and "constraints-tensorrt.txt" in step


def test_both_onnxruntime_builds_are_a_problem_with_the_exact_fix():
    env = gpu_machine(distributions={"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.24.4"}, ort_providers=CPU_ORT)
    (found,) = problems(env)
    assert "both ONNX Runtime builds" in found.what
    assert found.fix == "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu==1.24.4"
    # Without a GPU the CPU build is the one to keep.
    cpu_only = Environment(distributions={"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.24.4"}, ort_providers=CPU_ORT)
    assert problems(cpu_only)[0].fix.endswith("pip install onnxruntime==1.32.0")
    assert "fix: pip uninstall" in doctor.format_report(doctor.report(cpu_only))


def test_onnxruntime_gpu_without_its_cuda_provider_or_not_importing():
    (found,) = problems(gpu_machine(ort_providers=CPU_ORT))
    assert "CUDA provider is missing" in found.what
    assert found.fix == "pip install --force-reinstall --no-deps onnxruntime-gpu==1.24.4"
    broken = gpu_machine(ort_providers=None, ort_error="ImportError: libcudnn.so.9")
    (found,) = problems(broken)
    assert "does not import (ImportError: libcudnn.so.9)" in found.what
    assert serve_backend(broken).startswith("nothing: ONNX Runtime does not import")
    assert doctor.export_formats(broken) == []


def test_torch_built_for_a_newer_cuda_than_the_driver():
    old = gpu_machine(driver="550.54", driver_cuda="12.4", cuda_available=False, gpus=())
    (found,) = problems(old)
    assert "built for CUDA 13.0" in found.what and "supports CUDA 12.4 at most" in found.what
    assert "branch 580 or newer" in found.fix and "CUDA 12.x" in found.fix
    assert doctor.train_device(old) == "cpu"
    assert problems(gpu_machine(driver_cuda="13.2")) == []  # minor-version compatibility within CUDA 13


def test_gpu_machine_with_the_cpu_builds_lists_the_gpu_and_tensorrt_installs():
    env = Environment(distributions={"onnxruntime": "1.32.0", "torch": "2.14.1"}, ort_providers=CPU_ORT, **H200)
    steps = to_install(env)
    assert steps[0].endswith('pip uninstall -y onnxruntime && pip install -c constraints.txt -e ".[gpu]"')
    assert "constraints-tensorrt.txt" in steps[1] and '-e ".[tensorrt]"' in steps[1]
    assert serve_backend(env) == "ONNX Runtime on CPUExecutionProvider"


def test_device_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    assert [auto_device(True, True), auto_device(False, True), auto_device(False, False)] == ["cuda", "mps", "cpu"]
    assert doctor.train_device(Environment(mps_available=True)) == "mps"
    monkeypatch.setattr("training.engine.mps_available", lambda: True)
    assert device_kind("auto") == "mps"  # this machine has no CUDA
    assert device_kind("cpu") == "cpu"
    monkeypatch.setattr("training.engine.mps_available", lambda: False)
    with pytest.raises(RuntimeError, match="--device mps"):
        resolve_device("mps")


def test_broken_install_is_warned_once_at_start(monkeypatch, capsys):
    broken = Environment(distributions={"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.24.4"}, ort_providers=CPU_ORT)
    monkeypatch.setattr(environment, "probe", lambda full=True: broken)
    environment.warn_broken_install.cache_clear()
    try:
        with pytest.raises(SystemExit):
            cli.main(["--help"])
        err = capsys.readouterr().err
        assert err.count("warning: both ONNX Runtime builds") == 1 and "fix: pip uninstall -y onnxruntime" in err
        environment.warn_broken_install()  # later stages (serving.cli) call it again: no second warning
        assert capsys.readouterr().err == ""
    finally:
        environment.warn_broken_install.cache_clear()


def test_probe_reads_this_machine():
    env = environment.probe()
    assert env.distributions.get("torch") and env.ort_providers and "CPUExecutionProvider" in env.ort_providers
    assert env.driver_cuda is None and not env.cuda_available and env.tensorrt is None
    assert sys.modules.get("tensorrt") is None
