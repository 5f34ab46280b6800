"""One prepared check of scaleseg's GPU path, about 8 minutes on one NVIDIA GPU, offline, all inside the repo:

1. a synthetic dataset (`scaleseg data synth`) in a temp folder;
2. CUDA training of supervised, UniMatch and ScaleMatch with the small-data recipe (EfficientNet-Lite0, ImageNet
   weights that ship with scaleseg), float16 AMP, a few hundred iterations each (`scaleseg train`);
3. one optimiser step per method timed in float32 and in float16 AMP with channels-last memory
   (bench/train_speed.py's make_step; `scaleseg train` itself keeps the default layout);
4. `torchrun --nproc_per_node N` (N = the GPUs here) training, which converts BatchNorm to SyncBatchNorm over
   NCCL when N >= 2. On one GPU, N = 1 runs the torchrun launch only: with WORLD_SIZE 1 there is no process
   group, so DDP, NCCL and SyncBatchNorm are not exercised, and the results say so;
5. `scaleseg export` of the ScaleMatch run (with a TensorRT engine where TensorRT imports), whose parity check
   covers every runtime of the package, plus ONNX Runtime's CUDA provider against PyTorch where installed;
6. inference throughput per backend (PyTorch CUDA float32 and float16, ONNX Runtime CUDA, TensorRT), measured
   as bench/inference.py measures it.

Writes bench/results/gpu/gpu_check-<GPU>.json and .md. A step whose runtime is not installed is skipped with the
reason and the install line; the exit status is 1 when a step that ran failed or ran past its budget. Without a
CUDA GPU it prints so and exits 0 at once (1 with --require-gpu)."""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import RESULTS, child_env, markdown_table  # noqa: E402
from serving.environment import INSTALL, Environment  # noqa: E402

METHODS = ("supervised", "unimatch", "scalematch")
BACKBONE = "efficientnet_lite0"  # the small-data recipe's encoder
NO_GPU = "no CUDA GPU: nothing to check"


@dataclass(frozen=True)
class Step:
    name: str
    budget_s: int          # wall-clock limit; a subprocess step is stopped there, an in-process one only reported
    skip: str | None = None  # why it does not run here; None: it runs
    note: str = ""         # what the result means on this machine


@dataclass(frozen=True)
class Settings:
    iters: int = 200        # training iterations per method
    torchrun_iters: int = 100
    crop: int = 96          # the small-data recipe's crop
    batch: int = 4          # the small-data recipe's batch
    timing_iters: int = 20  # timed optimiser steps per setting (median)
    size: int = 512         # inference image side
    batches: tuple[int, ...] = (1, 8)
    repeats: int = 20       # timed inference runs per row (median)


def early_exit(cuda_available: bool, require_gpu: bool) -> tuple[int, str] | None:
    """(exit code, message) when there is nothing to check here; None when there is a GPU."""
    if cuda_available:
        return None
    return (1 if require_gpu else 0), NO_GPU + (" (--require-gpu)" if require_gpu else "")


def ort_cuda_skip(env: Environment) -> str | None:
    if env.ort_providers is None:
        return f"ONNX Runtime does not import ({env.ort_error}); install: {INSTALL['gpu']}"
    if "CUDAExecutionProvider" not in env.ort_providers:
        return (f"ONNX Runtime offers no CUDAExecutionProvider (providers: {', '.join(env.ort_providers)}); install: "
                f"pip uninstall -y onnxruntime && {INSTALL['gpu']}")
    return None


def tensorrt_skip(env: Environment) -> str | None:
    if env.tensorrt:
        return None
    if env.tensorrt_error:
        return f"TensorRT is installed but does not import ({env.tensorrt_error}); reinstall: {INSTALL['tensorrt']}"
    return f"TensorRT is not installed; install: {INSTALL['tensorrt']}"


def torchrun_note(gpus: int) -> str:
    if gpus >= 2:
        return f"{gpus} processes, NCCL, BatchNorm converted to SyncBatchNorm"
    return ("one GPU: torchrun launches one process with WORLD_SIZE 1, so no process group is formed and DDP, NCCL "
            "and SyncBatchNorm are not exercised; run on 2 or more GPUs for that")


def plan(env: Environment, settings: Settings = Settings()) -> list[Step]:
    """The steps in order and why any of them is skipped here. The budgets are caps (typical runs take less)
    summing to under 9 minutes, so that the whole check fits a 10-minute command."""
    trt = tensorrt_skip(env)
    return [
        Step("synth", 20),
        # Caps for the default 200 iterations, the whole under 9 minutes. An H200 took 18, 15 and 26 s to train
        # 60 iterations (CUDA start-up included) and 49 s to time the six settings.
        *[Step(f"train {m}", 60 if m == "supervised" else 70) for m in METHODS],
        Step("amp channels-last", 60),
        Step("torchrun", 55, note=torchrun_note(len(env.gpus))),
        Step("export", 130, note="with TensorRT engines" if trt is None else f"ONNX only: {trt}"),
        Step("parity onnxruntime cuda", 20, skip=ort_cuda_skip(env)),
        Step("throughput", 45),
    ]


def throughput_backends(env: Environment) -> list[tuple[str, str | None]]:
    """(backend, skip reason or None) of the throughput table."""
    return [("pytorch cuda fp32", None), ("pytorch cuda fp16", None),
            ("onnxruntime cuda", ort_cuda_skip(env)), ("tensorrt", tensorrt_skip(env))]


def result_name(gpu: str) -> str:
    """Results file name for a GPU, so that checks on different GPUs sit side by side."""
    return "gpu_check-" + (re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") or "gpu")


def train_args(method: str, data: Path, out: Path, iters: int, settings: Settings) -> list[str]:
    """`scaleseg train` arguments (after `train`) of one CUDA run of the small-data recipe, validated once at the end."""
    return [str(data), "--config", "small-data", "--method", method, "--device", "cuda", "--amp",
            "--max-iters", str(iters), "--eval-every", str(iters), "--crop-size", str(settings.crop),
            "--batch-size", str(settings.batch), "--out", str(out), "--log-every", "50"]


def report(steps: list[dict], timing: list[dict], rows: list[dict], skipped_backends: list[dict]) -> str:
    """The Markdown body of the results: steps, training step timing, throughput per backend."""
    parts = [markdown_table(steps, [("name", "step"), ("status", "status"), ("seconds", "s"), ("budget_s", "budget s"),
                                    ("detail", "detail")])]
    if timing:
        parts.append(markdown_table(timing, [("method", "method"), ("setting", "setting"), ("sec_per_iter", "s / iter"),
                                             ("speedup", "speed-up over fp32")]))
    if rows or skipped_backends:
        parts.append(markdown_table(rows + skipped_backends, [("engine", "backend"), ("batch", "batch"),
                                                              ("p50_ms", "p50 latency ms"),
                                                              ("images_per_sec", "images / s"), ("skip", "skipped")]))
    return "\n\n".join(parts)


def speedups(timing: list[dict]) -> list[dict]:
    """Adds each setting's speed-up over the same method's fp32 row."""
    base = {t["method"]: t["sec_per_iter"] for t in timing if t["setting"] == "fp32"}
    return [t | {"speedup": base[t["method"]] / t["sec_per_iter"] if t["method"] in base else None} for t in timing]


# --- running (needs a CUDA GPU) -------------------------------------------------------------------------
def _subprocess(args: list[str], budget_s: int, log: Path) -> str:
    """Run a command with this repo first on the path; its output goes to ``log``."""
    with log.open("w") as out:
        done = subprocess.run(args, cwd=REPO, env=child_env(), stdout=out, stderr=subprocess.STDOUT, timeout=budget_s)
    if done.returncode != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"exit {done.returncode}: " + " | ".join(tail))
    return log.name


def _checkpoint(run: Path) -> Path:
    return run / "best.pt" if (run / "best.pt").is_file() else run / "last.pt"


def _amp_channels_last(settings: Settings) -> list[dict]:
    import torch

    from bench.common import timed
    from bench.train_speed import make_step
    device, rows = torch.device("cuda"), []
    for method in METHODS:
        for setting, dtype, channels_last in [("fp32", None, False), ("fp16 channels-last", torch.float16, True)]:
            _, step = make_step(method, BACKBONE, settings.crop, settings.batch, device, dtype, channels_last)
            step()  # warm-up: allocation and kernel choice
            sec = statistics.median(timed(step, device) for _ in range(settings.timing_iters))
            rows.append({"method": method, "setting": setting, "sec_per_iter": sec})
    return speedups(rows)


def _ort_cuda_parity(package: Path) -> dict:
    from export.parity import compare, probe_batches
    from export.onnx_export import SegmentationGraph
    from serving.backends import OnnxRuntimeBackend
    from serving.shapes import parity_shapes
    from training.checkpoint import load_checkpoint, load_inference_model
    model, _, _ = load_inference_model(load_checkpoint(package / "checkpoint.pt"), package / "checkpoint.pt")
    backend = OnnxRuntimeBackend(package / "model.onnx", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    if backend.providers[0] != "CUDAExecutionProvider":
        raise RuntimeError(f"ONNX Runtime fell back to {backend.providers}")
    sizes, batch_sizes = parity_shapes(None)
    result = compare(SegmentationGraph(model).eval(), backend, probe_batches([], sizes, batch_sizes))
    if not result["passed"]:
        raise RuntimeError(f"label agreement {result['label_agreement']:.5f} below the gate")
    return result


def throughput_row(engine: str, cfg, batch: int, times: list[float]) -> dict:
    """One throughput row in bench/inference.py's form, naming the measured model's encoder and head."""
    from bench.inference import row
    return row(engine, {"backbone": cfg.model.backbone, "decoder": cfg.model.decoder}, "single", batch, times)


def _throughput(package: Path, env: Environment, settings: Settings) -> tuple[list[dict], list[dict]]:
    import numpy as np
    import torch

    from bench.inference import measure
    from export.onnx_export import SegmentationGraph
    from serving.backends import OnnxRuntimeBackend, TensorRTBackend, current_gpu, find_plan
    from training.checkpoint import load_checkpoint, load_inference_model
    cuda = torch.device("cuda")
    model, _, cfg = load_inference_model(load_checkpoint(package / "checkpoint.pt"), package / "checkpoint.pt")
    graph = SegmentationGraph(model).eval().to(cuda)
    runners, skipped = {}, []
    for name, skip in throughput_backends(env):
        if skip:
            skipped.append({"engine": name, "skip": skip})
        elif name == "onnxruntime cuda":
            runners[name] = OnnxRuntimeBackend(package / "model.onnx",
                                               providers=["CUDAExecutionProvider", "CPUExecutionProvider"]).infer
        elif name == "tensorrt":
            plan_path = find_plan(package, "model.onnx", current_gpu())
            if plan_path is None:
                skipped.append({"engine": name, "skip": "the export built no engine for this GPU"})
            else:
                runners[name] = TensorRTBackend(plan_path).infer
    rows = []
    for b in settings.batches:
        images = np.random.default_rng(0).integers(0, 256, (b, 3, settings.size, settings.size), dtype=np.uint8)
        x = torch.from_numpy(images).to(cuda)
        with torch.inference_mode():
            rows.append(throughput_row("pytorch cuda fp32", cfg, b, measure(lambda: graph(x), settings.repeats, cuda)))
            with torch.autocast("cuda", dtype=torch.float16):
                rows.append(throughput_row("pytorch cuda fp16", cfg, b,
                                measure(lambda: graph(x), settings.repeats, cuda)))
        for name, infer in runners.items():  # host uint8 in, host labels out: what serving pays per request
            rows.append(throughput_row(name, cfg, b, measure(lambda: infer(images), settings.repeats, cuda)))
    return rows, skipped


def export_args(checkpoint: Path, package: Path, env: Environment, settings: Settings) -> list[str]:
    """`scaleseg export` arguments: single-scale and CIF graphs, and a TensorRT engine where TensorRT imports, its
    profile narrowed to the sizes measured here so that the build fits the budget."""
    args = ["export", str(checkpoint), "--out", str(package), "--cif-scales", "0.5,2.0"]
    if tensorrt_skip(env) is None:
        args += ["--tensorrt", "--engine-min-side", "64", "--engine-opt-side", "256",
                 "--engine-max-side", str(max(512, settings.size)), "--engine-max-batch", str(max(settings.batches))]
    return args


class Check:
    """Runs the plan's steps in a work folder and collects what each one measured."""

    def __init__(self, env: Environment, settings: Settings, work: Path):
        self.env, self.settings, self.work = env, settings, work
        self.data, self.runs, self.package = work / "data", work / "runs", work / "package"
        self.steps = plan(env, settings)
        self.budget = {s.name: s.budget_s for s in self.steps}
        self.timing, self.rows, self.skipped, self.parity = [], [], [], {}

    def scaleseg(self, args: list[str], step: str, launcher: list[str] | None = None) -> str:
        return _subprocess([sys.executable, "-m", *(launcher or []), "training.cli", *args], self.budget[step],
                           self.work / f"{step.replace(' ', '-')}.log")

    def run_step(self, name: str) -> str:
        s = self.settings
        if name == "synth":
            from training.data.synth import synthesize
            return str(synthesize(self.data, n_labeled=16, n_unlabeled=64, n_val=8, size=128, progress=False))
        if name.startswith("train "):
            method = name.split()[1]
            return self.scaleseg(["train", *train_args(method, self.data, self.runs / method, s.iters, s)], name)
        if name == "amp channels-last":
            self.timing = _amp_channels_last(s)
            return f"{len(self.timing)} settings timed"
        if name == "torchrun":
            launcher = ["torch.distributed.run", "--standalone", f"--nproc_per_node={max(1, len(self.env.gpus))}", "-m"]
            args = train_args("unimatch", self.data, self.runs / "torchrun", s.torchrun_iters, s)
            return self.scaleseg(["train", *args], name, launcher)
        if name == "export":
            log = self.scaleseg(export_args(_checkpoint(self.runs / "scalematch"), self.package, self.env, s), name)
            self.parity.update(json.loads((self.package / "meta.json").read_text())["parity"])
            return log
        if name == "parity onnxruntime cuda":
            self.parity["onnxruntime cuda"] = _ort_cuda_parity(self.package)
            return "passed"
        if name == "throughput":
            self.rows, self.skipped = _throughput(self.package, self.env, s)
            return f"{len(self.rows)} rows"
        raise ValueError(f"unknown step {name!r}")

    def run(self) -> dict:
        done = []
        for step in self.steps:
            entry = {"name": step.name, "budget_s": step.budget_s}
            if step.skip:
                done.append(entry | {"status": "skipped", "detail": step.skip})
                continue
            print(f"[gpu_check] {step.name} (budget {step.budget_s} s)", flush=True)
            tic = time.perf_counter()
            try:
                detail, status = self.run_step(step.name), "ok"
            except subprocess.TimeoutExpired:
                detail, status = f"stopped at its budget of {step.budget_s} s", "timeout"
            except Exception as err:  # one failing step must not hide the others' results
                detail, status = f"{type(err).__name__}: {err}"[:500], "failed"
            seconds = time.perf_counter() - tic
            done.append(entry | {"status": status, "seconds": seconds,
                                 "detail": "; ".join(x for x in (detail, step.note) if x)})
            print(f"[gpu_check] {step.name}: {status} in {seconds:.0f} s", flush=True)
        return {"steps": done, "timing": self.timing, "rows": self.rows, "skipped_backends": self.skipped,
                "parity": self.parity}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--require-gpu", action="store_true", help="exit 1 instead of 0 when there is no CUDA GPU")
    p.add_argument("--iters", type=int, default=Settings.iters, help="training iterations per method")
    p.add_argument("--results", type=Path, default=RESULTS / "gpu", help="folder for the JSON and Markdown results")
    p.add_argument("--keep", type=Path, help="work in this folder and keep it (data, runs, package, logs) "
                   "instead of a temp folder removed at the end")
    args = p.parse_args(argv)
    import torch
    stop = early_exit(torch.cuda.is_available(), args.require_gpu)
    if stop:
        print(stop[1])
        return stop[0]
    from bench.common import machine, write_results
    from serving.environment import probe, problems
    env = probe()
    settings = Settings(iters=args.iters)
    with tempfile.TemporaryDirectory(prefix="scaleseg-gpu-check-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = Check(env, settings, work).run()
    gpu = env.gpus[0]
    payload = {"machine": machine(), "gpus": list(env.gpus), "driver": env.driver, "torch_cuda": env.torch_cuda,
               "onnxruntime_providers": list(env.ort_providers or ()), "tensorrt": env.tensorrt,
               "problems": [asdict(x) for x in problems(env)], "settings": asdict(settings), **result}
    note = (f"{BACKBONE} (small-data recipe), crop {settings.crop}, batch {settings.batch}, {settings.iters} CUDA AMP "
            f"iterations per method on synthetic data; step timing: median of {settings.timing_iters} optimiser steps; "
            f"throughput: {settings.size}x{settings.size} uint8 in, labels out, p50 of {settings.repeats} runs after one "
            "warm-up. Written by `python bench/gpu_check.py`.")
    write_results(result_name(gpu), payload, report(result["steps"], result["timing"], result["rows"],
                                                   result["skipped_backends"]),
                  note, results=args.results, script="gpu_check")
    return 0 if all(s["status"] in ("ok", "skipped") for s in result["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
