"""Inference speed on this machine: PyTorch eager (fp32, and bf16 autocast) vs ONNX Runtime (fp32, and the
INT8 graph of `scaleseg export --quantize int8`) for the exported graph (uint8 in, labels + confidence
out), DeepLabV3+ ResNet-18 / ResNet-50 (or any encoders and decoders given) at 512x512, batch 1 and 8;
the CIF multi-scale graph's cost over the single-scale one; and where ONNX Runtime spends the single-scale
graph's time at batch 1 (its profiler's kernel time by module and by operator). Random weights (speed does
not depend on them; the INT8 graph is calibrated on random images, which sets its ranges but not its cost).
On a GPU machine, ONNX Runtime's CUDA provider is added and asserted to be the one actually running."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, machine, markdown_table, timed, write_results  # noqa: E402
from export.onnx_export import SegmentationGraph, export_graph  # noqa: E402
from export.quantize import quantize_graph  # noqa: E402
from serving.backends import OnnxRuntimeBackend  # noqa: E402
from training.config import ModelConfig  # noqa: E402
from training.models import build_model  # noqa: E402


def measure(fn, repeats: int, device) -> list[float]:
    fn()  # warm-up
    return [timed(fn, device) for _ in range(repeats)]


def row(engine: str, model: dict, graph: str, batch: int, times: list[float]) -> dict:
    p50 = statistics.median(times)
    return {"engine": engine, **model, "graph": graph, "batch": batch, "p50_ms": 1000 * p50,
            "images_per_sec": batch / p50, "min_ms": 1000 * min(times), "max_ms": 1000 * max(times), "runs": len(times)}


def time_shares(path: Path, images: np.ndarray, threads: int, runs: int) -> dict[str, dict[str, float]]:
    """Percent of ONNX Runtime's kernel time over ``runs`` profiled runs (after one unprofiled warm-up), by the
    module a node comes from and by operator type (after ONNX Runtime's fusions, e.g. QLinearConv). The exported
    graph names nodes by module path (/model/encoder/..., /model/aspp/...); "model" is the network's own resizes
    and concatenations (the logits' upsampling among them), "graph" what lies outside the network: the input's
    normalisation, argmax and confidence. The profile goes to a file beside ``path``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix("")) + "-profile"
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: images}
    session.run(None, feed)
    for _ in range(runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    runs_seen = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    warm_end = runs_seen[1] if len(runs_seen) > 1 else 0  # skip the warm-up run's kernels
    by_module, by_op = Counter(), Counter()
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < warm_end:
            continue
        parts = e["name"].strip("/").split("/")
        module = parts[1] if parts[0] == "model" and len(parts) > 2 else ("model" if parts[0] == "model" else "graph")
        by_module[module] += e["dur"]
        by_op[e["args"]["op_name"]] += e["dur"]
    total = sum(by_module.values()) or 1
    return {"by_module": {k: 100 * v / total for k, v in by_module.most_common()},
            "by_op": {k: 100 * v / total for k, v in by_op.most_common()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--backbones", default="resnet18,resnet50")
    p.add_argument("--decoders", default="standard", help="DeepLabV3+ heads to time with each backbone (standard, light)")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--calib-count", type=int, default=8, help="random images that calibrate the INT8 graphs")
    p.add_argument("--profile-runs", type=int, default=3, help="profiled ONNX Runtime runs of each single-scale graph")
    p.add_argument("--name", default="inference", help="results file name (bench/results/NAME.json / .md)")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of NAME.json / .md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    rows, shares = [], []
    models = [{"backbone": b, "decoder": d} for b in args.backbones.split(",") for d in args.decoders.split(",")]
    calib = [np.random.default_rng(i).integers(0, 256, (1, 3, args.size, args.size), dtype=np.uint8)
             for i in range(args.calib_count)]
    with tempfile.TemporaryDirectory(prefix="scaleseg-infer-") as tmp:
        work = Path(tmp)
        for spec in models:
            torch.manual_seed(0)
            config = ModelConfig(backbone=spec["backbone"], pretrained="none", decoder=spec["decoder"])
            model = build_model(config, 21, cif=True).eval()
            graphs = {"single": SegmentationGraph(model), "cif 0.5,1,2": SegmentationGraph(model, (0.5, 2.0))}
            for name, graph in graphs.items():
                path = work / f"{spec['backbone']}-{spec['decoder']}-{name.split()[0]}.onnx"
                export_graph(graph, path)
                ort = OnnxRuntimeBackend(path, providers=["CPUExecutionProvider"], threads=args.threads)
                quantize_graph(path, path.with_suffix(".int8.onnx"), calib)
                int8 = OnnxRuntimeBackend(path.with_suffix(".int8.onnx"), providers=["CPUExecutionProvider"],
                                          threads=args.threads, precision="int8")
                batch_sizes = [int(b) for b in args.batches.split(",")] if name == "single" else [1]
                for b in batch_sizes:
                    images = np.random.default_rng(0).integers(0, 256, (b, 3, args.size, args.size), dtype=np.uint8)
                    x = torch.from_numpy(images)
                    repeats = args.repeats if b == 1 else max(2, args.repeats // 2)
                    with torch.inference_mode():
                        rows.append(row("pytorch eager", spec, name, b, measure(lambda: graph(x), repeats, cpu)))
                        with torch.autocast("cpu", dtype=torch.bfloat16):
                            rows.append(row("pytorch eager bf16", spec, name, b, measure(lambda: graph(x), repeats, cpu)))
                    rows.append(row("onnxruntime cpu", spec, name, b, measure(lambda: ort.infer(images), repeats, cpu)))
                    rows.append(row("onnxruntime cpu int8", spec, name, b, measure(lambda: int8.infer(images), repeats, cpu)))
                    print(*rows[-4:], sep="\n", flush=True)
                    if torch.cuda.is_available():
                        gpu = OnnxRuntimeBackend(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
                        assert gpu.providers[0] == "CUDAExecutionProvider", gpu.providers
                        rows.append(row("onnxruntime cuda", spec, name, b,
                                        measure(lambda: gpu.infer(images), repeats, torch.device("cuda"))))
                if name == "single" and args.profile_runs:
                    one = np.random.default_rng(0).integers(0, 256, (1, 3, args.size, args.size), dtype=np.uint8)
                    for engine, graph_path in (("onnxruntime cpu", path), ("onnxruntime cpu int8", path.with_suffix(".int8.onnx"))):
                        shares.append({"engine": engine, **spec, **time_shares(graph_path, one, args.threads, args.profile_runs)})
                        print(shares[-1], flush=True)

    def same(r: dict, like: dict, engine: str, graph: str | None = None, batch: int | None = None) -> bool:
        return (r["engine"], r["backbone"], r["decoder"], r["graph"], r["batch"]) == \
            (engine, like["backbone"], like["decoder"], graph or like["graph"], batch or like["batch"])

    def throughput(engine: str, like: dict) -> float:
        return next(e["images_per_sec"] for e in rows if same(e, like, engine))

    speedups = [{"backbone": r["backbone"], "decoder": r["decoder"], "graph": r["graph"], "batch": r["batch"],
                 **{f"{key}_over_eager": throughput(engine, r) / r["images_per_sec"]
                    for key, engine in [("bf16", "pytorch eager bf16"), ("ort", "onnxruntime cpu"),
                                        ("int8", "onnxruntime cpu int8")]}}
                for r in rows if r["engine"] == "pytorch eager"]
    cif_cost = []
    for spec in models:
        for engine in ("pytorch eager", "onnxruntime cpu", "onnxruntime cpu int8"):
            single = next(r for r in rows if same(r, spec, engine, "single", 1))
            multi = next(r for r in rows if same(r, spec, engine, "cif 0.5,1,2", 1))
            cif_cost.append({**spec, "engine": engine, "cif_over_single": multi["p50_ms"] / single["p50_ms"]})
    table = markdown_table(rows, [("engine", "engine"), ("backbone", "backbone"), ("decoder", "decoder"), ("graph", "graph"),
                                  ("batch", "batch"), ("p50_ms", "p50 latency ms"), ("min_ms", "min ms"), ("max_ms", "max ms"),
                                  ("images_per_sec", "images / s")])
    table += "\n\n" + markdown_table(speedups, [("backbone", "backbone"), ("decoder", "decoder"), ("graph", "graph"),
                                                ("batch", "batch"), ("bf16_over_eager", "PyTorch bf16 / fp32 throughput"),
                                                ("ort_over_eager", "ONNX Runtime / PyTorch throughput"),
                                                ("int8_over_eager", "ONNX Runtime INT8 / PyTorch throughput")])
    table += "\n\n" + markdown_table(cif_cost, [("backbone", "backbone"), ("decoder", "decoder"), ("engine", "engine"),
                                                ("cif_over_single", "CIF graph latency / single-scale")])
    if shares:
        table += "\n\nONNX Runtime kernel time of the single-scale graph at batch 1, % by module and the top operators:\n\n"
        table += markdown_table([{**{k: s[k] for k in ("engine", "backbone", "decoder")},
                                  "modules": ", ".join(f"{m} {v:.0f}" for m, v in s["by_module"].items() if v >= 0.5),
                                  "operators": ", ".join(f"{o} {v:.0f}" for o, v in list(s["by_op"].items())[:6])}
                                 for s in shares],
                                [("engine", "engine"), ("backbone", "backbone"), ("decoder", "decoder"),
                                 ("modules", "by module (%)"), ("operators", "top operators (%)")])
    write_results(args.name, {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "speedups": speedups,
                              "cif_cost": cif_cost, "time_shares": shares}, table,
                  f"{args.size}x{args.size} uint8 input, graph includes normalisation, upsampling, argmax and max-softmax confidence; "
                  f"{args.threads} threads for both engines; p50 over {args.repeats} runs at batch 1 "
                  f"({max(2, args.repeats // 2)} at batch 8) after one warm-up.", results=args.results, script="inference")


if __name__ == "__main__":
    main()
