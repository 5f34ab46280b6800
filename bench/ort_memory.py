"""Does ONNX Runtime's resident memory stay bounded when every request has another image size?

Runs one CPU session first on the largest image, then on random smaller sizes, in a fresh process per
session setting, and records the process's RSS after each run: memory that keeps growing after the
largest image has been seen is memory the session does not bound. Settings compared (ONNX Runtime SessionOptions): the defaults
scaleseg serves with (CPU memory arena and memory pattern on), memory pattern off, and the arena off.
The memory pattern traces one run's allocations and reuses them "if the input shapes are the same"
(onnxruntime_c_api.h, EnableMemPattern); the arena keeps freed blocks for reuse.

  python bench/ort_memory.py [--model MODEL.onnx] [--runs 60] [--max-side 512] [--threads 0]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = {"default (arena + memory pattern)": {},
            "memory pattern off": {"enable_mem_pattern": False},
            "arena off": {"enable_cpu_mem_arena": False}}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def run_session(model: str, options: dict, runs: int, max_side: int, threads: int = 0, seed: int = 0) -> list[float]:
    """RSS (MiB) after each of ``runs`` inferences (the first at ``max_side`` square, the rest at random
    sizes between 64 and ``max_side``), then the median milliseconds per megapixel."""
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    for key, value in options.items():
        setattr(so, key, value)
    session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    trace, ms_per_mpix = [], []
    for i in range(runs):
        h, w = (max_side, max_side) if i == 0 else rng.integers(64, max_side + 1, 2)
        image = rng.integers(0, 256, (1, 3, h, w), dtype=np.uint8)
        tic = time.perf_counter()
        session.run(None, {"image": image})
        ms_per_mpix.append(1000 * (time.perf_counter() - tic) / (h * w / 1e6))
        trace.append(rss_mb())
    return trace + [statistics.median(ms_per_mpix)]


def summary(name: str, trace: list[float]) -> dict:
    trace, ms_per_mpix = trace[:-1], trace[-1]
    half = len(trace) // 2
    return {"setting": name, "rss_after_largest_mb": trace[0], "rss_max_first_half_mb": max(trace[1:half]),
            "rss_max_second_half_mb": max(trace[half:]), "rss_last_mb": trace[-1],
            "growth_after_largest_mb": max(trace[1:]) - trace[0], "median_ms_per_megapixel": ms_per_mpix}


def random_resnet18_graph(work: Path) -> str:
    """The default graph: a random-weight ResNet-18 DeepLabV3+ exported into ``work``."""
    import torch

    from export.onnx_export import SegmentationGraph, export_graph
    from training.config import ModelConfig
    from training.models import build_model

    torch.manual_seed(0)
    path = work / "resnet18.onnx"
    export_graph(SegmentationGraph(build_model(ModelConfig(backbone="resnet18", pretrained="none"), 21).eval()), path)
    return str(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="ONNX graph with a uint8 'image' input (default: a random-weight ResNet-18 graph)")
    p.add_argument("--runs", type=int, default=60)
    p.add_argument("--max-side", type=int, default=512)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ONNX Runtime's default)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:  # one setting, in its own process so that RSS is its own
        print(json.dumps(run_session(args.model, SETTINGS[args.child], args.runs, args.max_side, args.threads)))
        return
    from bench.common import machine, markdown_table, write_results

    with tempfile.TemporaryDirectory(prefix="scaleseg-mem-") as tmp:
        model = args.model or random_resnet18_graph(Path(tmp))
        rows, traces = [], {}
        for name in SETTINGS:
            out = subprocess.run([sys.executable, __file__, "--model", model, "--runs", str(args.runs), "--max-side",
                                  str(args.max_side), "--threads", str(args.threads), "--child", name],
                                 check=True, capture_output=True, text=True)
            traces[name] = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(summary(name, traces[name]))
            print(rows[-1], flush=True)
    table = markdown_table(rows, [("setting", "session setting"), ("rss_after_largest_mb", "RSS after the largest image (MiB)"),
                                  ("rss_max_first_half_mb", "max RSS, first half"),
                                  ("rss_max_second_half_mb", "max RSS, second half"),
                                  ("growth_after_largest_mb", "growth after the largest"),
                                  ("median_ms_per_megapixel", "median ms / megapixel")])
    write_results("ort_memory", {"machine": machine(), "args": vars(args), "rows": rows, "traces": traces}, table,
                  f"{args.runs} single-image runs, the first at {args.max_side}x{args.max_side}, the rest at random sizes "
                  f"64..{args.max_side} per side; one process per setting, "
                  f"{args.threads or 'default'} intra-op threads.")


if __name__ == "__main__":
    main()
