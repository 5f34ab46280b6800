"""Inference speed on this machine: PyTorch eager (fp32, and bf16 autocast) vs ONNX Runtime (fp32, and the
INT8 graph of `scaleseg export --quantize int8`) for the exported graph (uint8 in, labels + confidence
out), DeepLabV3+ ResNet-18 / ResNet-50 at 512x512, batch 1 and 8; and the CIF multi-scale graph's cost
over the single-scale one. Random weights (speed does not depend on them; the INT8 graph is calibrated
on random images, which sets its ranges but not its cost). On a GPU machine, ONNX Runtime's CUDA provider
is added and asserted to be the one actually running."""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, markdown_table, timed, write_results  # noqa: E402
from export.onnx_export import SegmentationGraph, export_graph  # noqa: E402
from export.quantize import quantize_graph  # noqa: E402
from serving.backends import OnnxRuntimeBackend  # noqa: E402
from training.config import ModelConfig  # noqa: E402
from training.models import build_model  # noqa: E402


def measure(fn, repeats: int, device) -> list[float]:
    fn()  # warm-up
    return [timed(fn, device) for _ in range(repeats)]


def row(engine: str, backbone: str, graph: str, batch: int, times: list[float]) -> dict:
    p50 = statistics.median(times)
    return {"engine": engine, "backbone": backbone, "graph": graph, "batch": batch, "p50_ms": 1000 * p50,
            "images_per_sec": batch / p50, "runs": len(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--backbones", default="resnet18,resnet50")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--calib-count", type=int, default=8, help="random images that calibrate the INT8 graphs")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    rows, work = [], Path(tempfile.mkdtemp(prefix="scaleseg-infer-"))
    for backbone in args.backbones.split(","):
        torch.manual_seed(0)
        model = build_model(ModelConfig(backbone=backbone, pretrained="none"), 21, cif=True).eval()
        graphs = {"single": SegmentationGraph(model), "cif 0.5,1,2": SegmentationGraph(model, (0.5, 2.0))}
        for name, graph in graphs.items():
            path = work / f"{backbone}-{name.split()[0]}.onnx"
            export_graph(graph, path)
            ort = OnnxRuntimeBackend(path, providers=["CPUExecutionProvider"], threads=args.threads)
            calib = [np.random.default_rng(i).integers(0, 256, (1, 3, args.size, args.size), dtype=np.uint8)
                     for i in range(args.calib_count)]
            quantize_graph(path, path.with_suffix(".int8.onnx"), calib)
            int8 = OnnxRuntimeBackend(path.with_suffix(".int8.onnx"), providers=["CPUExecutionProvider"],
                                      threads=args.threads, precision="int8")
            batch_sizes = [int(b) for b in args.batches.split(",")] if name == "single" else [1]
            for b in batch_sizes:
                images = np.random.default_rng(0).integers(0, 256, (b, 3, args.size, args.size), dtype=np.uint8)
                x = torch.from_numpy(images)
                repeats = args.repeats if b == 1 else max(2, args.repeats // 2)
                with torch.inference_mode():
                    rows.append(row("pytorch eager", backbone, name, b, measure(lambda: graph(x), repeats, cpu)))
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        rows.append(row("pytorch eager bf16", backbone, name, b, measure(lambda: graph(x), repeats, cpu)))
                rows.append(row("onnxruntime cpu", backbone, name, b, measure(lambda: ort.infer(images), repeats, cpu)))
                rows.append(row("onnxruntime cpu int8", backbone, name, b, measure(lambda: int8.infer(images), repeats, cpu)))
                print(*rows[-4:], sep="\n", flush=True)
                if torch.cuda.is_available():
                    gpu = OnnxRuntimeBackend(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
                    assert gpu.providers[0] == "CUDAExecutionProvider", gpu.providers
                    rows.append(row("onnxruntime cuda", backbone, name, b, measure(lambda: gpu.infer(images), repeats, torch.device("cuda"))))
    def throughput(engine: str, like: dict) -> float:
        return next(e["images_per_sec"] for e in rows if e["engine"] == engine
                    and all(e[k] == like[k] for k in ("backbone", "graph", "batch")))

    speedups = [{"backbone": r["backbone"], "graph": r["graph"], "batch": r["batch"],
                 **{f"{key}_over_eager": throughput(engine, r) / r["images_per_sec"]
                    for key, engine in [("bf16", "pytorch eager bf16"), ("ort", "onnxruntime cpu"),
                                        ("int8", "onnxruntime cpu int8")]}}
                for r in rows if r["engine"] == "pytorch eager"]
    cif_cost = []
    for backbone in args.backbones.split(","):
        for engine in ("pytorch eager", "onnxruntime cpu", "onnxruntime cpu int8"):
            single = next(r for r in rows if (r["engine"], r["backbone"], r["graph"], r["batch"]) == (engine, backbone, "single", 1))
            multi = next(r for r in rows if (r["engine"], r["backbone"], r["graph"], r["batch"]) == (engine, backbone, "cif 0.5,1,2", 1))
            cif_cost.append({"backbone": backbone, "engine": engine, "cif_over_single": multi["p50_ms"] / single["p50_ms"]})
    table = markdown_table(rows, [("engine", "engine"), ("backbone", "backbone"), ("graph", "graph"), ("batch", "batch"),
                                  ("p50_ms", "p50 latency ms"), ("images_per_sec", "images / s")])
    table += "\n\n" + markdown_table(speedups, [("backbone", "backbone"), ("graph", "graph"), ("batch", "batch"),
                                                ("bf16_over_eager", "PyTorch bf16 / fp32 throughput"),
                                                ("ort_over_eager", "ONNX Runtime / PyTorch throughput"),
                                                ("int8_over_eager", "ONNX Runtime INT8 / PyTorch throughput")])
    table += "\n\n" + markdown_table(cif_cost, [("backbone", "backbone"), ("engine", "engine"),
                                                ("cif_over_single", "CIF graph latency / single-scale")])
    write_results("inference", {"machine": machine(), "args": vars(args), "rows": rows, "speedups": speedups,
                                "cif_cost": cif_cost}, table,
                  f"{args.size}x{args.size} uint8 input, graph includes normalisation, upsampling, argmax and max-softmax confidence; "
                  f"{args.threads} threads for both engines; p50 over {args.repeats} runs at batch 1 "
                  f"({max(2, args.repeats // 2)} at batch 8) after one warm-up.")


if __name__ == "__main__":
    main()
