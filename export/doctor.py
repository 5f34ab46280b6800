"""`scaleseg doctor`: what this machine has (torch, CUDA, driver, GPUs, ONNX Runtime providers, TensorRT,
ModelOpt), what `train`, `export` and `serve --backend auto` will use here, what is broken and how to fix it,
and what to install for the rest. Exit code 1 when a broken mix is found.

It lives in export because export is the stage that imports both training (the device choice) and serving
(the environment probe and the backend order); the decisions are pure functions of a
``serving.environment.Environment`` so tests fake any machine.
"""
from __future__ import annotations

import argparse
import json
import platform
from dataclasses import asdict

from serving.environment import Environment, problems, probe, serve_backend, to_install

from .onnx_export import ExportError
from .tensorrt_build import build_recipe


def train_device(env: Environment) -> str:
    """`train --device auto` here (training.engine.auto_device's order)."""
    from training.engine import auto_device
    kind = auto_device(env.cuda_available, env.mps_available)
    return f"cuda ({env.gpus[0]})" if kind == "cuda" and env.gpus else kind


def export_formats(env: Environment) -> list[str]:
    """The formats `scaleseg export` can write here."""
    if env.ort_providers is None:
        return []
    formats = ["ONNX graphs (model.onnx, --cif-scales model.cif.onnx)", "CPU INT8 graphs (--quantize int8)"]
    major = int(env.tensorrt.split(".")[0]) if env.tensorrt else None
    if major is not None and env.cuda_available:
        precisions = []
        for precision in ("fp32", "fp16", "int8"):
            try:
                build_recipe(major, precision, env.modelopt is not None)
                precisions.append(precision)
            except ExportError:
                pass
        formats.append(f"TensorRT {env.tensorrt} engines ({', '.join(precisions)}) for {env.gpus[0] if env.gpus else 'this GPU'}")
    return formats


def report(env: Environment) -> dict:
    return {"machine": asdict(env) | {"python": platform.python_version(), "platform": platform.platform()},
            "uses": {"train --device auto": train_device(env),
                     "export": export_formats(env) or ["nothing: export needs ONNX Runtime (pip install -c constraints.txt -e \".[cpu]\")"],
                     "serve --backend auto": serve_backend(env)},
            "problems": [asdict(p) for p in problems(env)], "to_install": to_install(env)}


def format_report(data: dict) -> str:
    env = data["machine"]
    ort = " + ".join(f"{name} {env['distributions'][name]}" for name in ("onnxruntime", "onnxruntime-gpu")
                     if name in env["distributions"]) or "not installed"
    driver = f"{env['driver'] or 'version unknown'} (CUDA {env['driver_cuda']})" if env["driver_cuda"] else "none found"
    lines = ["Machine",
             f"  python          {env['python']} on {env['platform']}",
             f"  torch           {env['torch'] or 'not installed'}"
             + (f" (built for CUDA {env['torch_cuda']})" if env["torch_cuda"] else " (CPU build)" if env["torch"] else ""),
             f"  NVIDIA driver   {driver}",
             f"  GPUs            {', '.join(env['gpus']) or 'none visible to torch'}"
             + ("; Apple MPS available" if env["mps_available"] else ""),
             f"  ONNX Runtime    {ort}; providers: {', '.join(env['ort_providers'] or []) or env['ort_error']}",
             f"  TensorRT        {env['tensorrt'] or env['tensorrt_error'] or 'not installed'}",
             f"  ModelOpt        {env['modelopt'] or 'not installed'}",
             "This machine will use"]
    for what, uses in data["uses"].items():
        lines.append(f"  {what:22s}{'; '.join(uses) if isinstance(uses, list) else uses}")
    if data["problems"]:
        lines.append("Problems")
        lines += [f"  - {p['what']}\n    fix: {p['fix']}" for p in data["problems"]]
    lines.append("To install for the rest")
    lines += [f"  - {step}" for step in data["to_install"]] or (
        ["  nothing: no NVIDIA GPU here (CUDA training, ONNX Runtime on CUDA and TensorRT need one)"]
        if not env["driver_cuda"] else ["  nothing: every backend is installed"])
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="scaleseg doctor", description="What this machine has for training, export "
                                "and serving, what each will use, what is broken and what to install.")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    data = report(probe())
    print(json.dumps(data, indent=2) if args.json else format_report(data))
    return 1 if data["problems"] else 0
