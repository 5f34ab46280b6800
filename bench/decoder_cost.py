"""What `--decoder light` saves: multiply-adds, parameters and ONNX Runtime CPU throughput (FP32 and the INT8
graph of `scaleseg export --quantize int8`) of DeepLabV3+ with the standard and the light head on one encoder
(EfficientNet-Lite0 by default) at 512x512, batch 1. Random weights (speed does not depend on them; the INT8
graphs are calibrated on random images, which sets their ranges but not their cost). The INT8 graph is timed
as exported and with its zero Pads left in float, which measures what ``integer_pads`` saves. The timed runs of every
(decoder, precision) pair are interleaved round by round, so a change in the machine's load reaches all of
them alike; each row gives the median images/s and the spread (min, max) of its runs. The sessions' idle threads
sleep instead of spinning: a spinning pool took the cores from the session timed next (on 2 cores, the light
head's INT8 graph ran at 17 images/s interleaved with another session against 26 alone; 24 with spinning off)."""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, machine, markdown_table, timed, write_results  # noqa: E402
from export.onnx_export import SegmentationGraph, export_graph  # noqa: E402
from export.quantize import quantize_graph  # noqa: E402
from serving.backends import OnnxRuntimeBackend  # noqa: E402
from training.config import ModelConfig  # noqa: E402
from training.models import DECODERS, build_model  # noqa: E402


INT8, FLOAT_PADS = "int8", "int8, float Pads"  # the shipped INT8 graph, and the same without integer_pads


def macs_by_module(model: nn.Module, side: int) -> dict[str, int]:
    """Multiply-adds of one side x side image through ``model``, by top-level module ('' for the total), as
    torch.utils.flop_counter counts them (convolutions and matrix products; 2 FLOPs per multiply-add). Runs on
    a meta-device copy, so nothing is computed and any size is instant."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(model).eval().to("meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        meta(torch.zeros(1, 3, side, side, device="meta"))
    root = type(model).__name__
    return {name[len(root) + 1:] if name != root else "": sum(ops.values()) // 2
            for name, ops in counter.get_flop_counts().items() if name == root or name.count(".") == 1}


def head_parameters(model: nn.Module) -> int:
    """Parameters outside the encoder: what the decoder choice changes."""
    return sum(p.numel() for p in model.head_parameters())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--decoders", default=",".join(DECODERS))
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--rounds", type=int, default=9, help="timed runs of each (decoder, precision), interleaved")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="ONNX Runtime intra-op threads")
    p.add_argument("--calib-count", type=int, default=4, help="random images that calibrate the INT8 graphs")
    p.add_argument("--no-int8", dest="int8", action="store_false", help="time the FP32 graphs only")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of decoder_cost.json / .md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    images = np.random.default_rng(0).integers(0, 256, (1, 3, args.size, args.size), dtype=np.uint8)
    calib = [np.random.default_rng(i).integers(0, 256, (1, 3, args.size, args.size), dtype=np.uint8)
             for i in range(args.calib_count)]
    sessions, rows = {}, []
    # ONNX Runtime holds each graph in memory once its session is built, so the files go before the timing.
    with tempfile.TemporaryDirectory(prefix="scaleseg-decoder-") as tmp:
        work = Path(tmp)
        for decoder in args.decoders.split(","):
            torch.manual_seed(0)
            model = build_model(ModelConfig(backbone=args.backbone, pretrained="none", decoder=decoder), 21).eval()
            macs = macs_by_module(model, args.size)
            path = work / f"{decoder}.onnx"
            export_graph(SegmentationGraph(model), path)
            sessions[decoder, "fp32"] = OnnxRuntimeBackend(path, providers=["CPUExecutionProvider"], threads=args.threads,
                                                           spinning=False)
            if args.int8:
                for precision, integer_padding in ((INT8, True), (FLOAT_PADS, False)):
                    quantized = work / f"{decoder}.{integer_padding}.int8.onnx"
                    quantize_graph(path, quantized, calib, integer_padding=integer_padding)
                    sessions[decoder, precision] = OnnxRuntimeBackend(quantized, providers=["CPUExecutionProvider"],
                                                                      threads=args.threads, precision="int8", spinning=False)
            for precision in ("fp32", INT8, FLOAT_PADS) if args.int8 else ("fp32",):
                rows.append({"backbone": args.backbone, "decoder": decoder, "precision": precision, "gmac": macs[""] / 1e9,
                             "decoder_gmac": (macs[""] - macs["encoder"]) / 1e9, "head_params_m": head_parameters(model) / 1e6,
                             "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "seconds": []})
    for session in sessions.values():
        session.infer(images)  # warm-up
    for _ in range(args.rounds):
        for row in rows:
            session = sessions[row["decoder"], row["precision"]]
            row["seconds"].append(timed(lambda: session.infer(images), cpu))
    for row in rows:
        per_sec = [1 / s for s in row["seconds"]]
        row.update(images_per_sec=statistics.median(per_sec), images_per_sec_min=min(per_sec),
                   images_per_sec_max=max(per_sec), runs=len(per_sec))
        standard = next((r for r in rows if r["decoder"] == "standard" and r["precision"] == row["precision"]), None)
        row["speedup_over_standard"] = row["images_per_sec"] / standard["images_per_sec"] if standard else None
    for row in rows:
        float_pads = next((r for r in rows if r["decoder"] == row["decoder"] and r["precision"] == FLOAT_PADS), None)
        row["speedup_over_float_pads"] = row["images_per_sec"] / float_pads["images_per_sec"] \
            if row["precision"] == INT8 and float_pads else None
        print({k: v for k, v in row.items() if k != "seconds"}, flush=True)
    table = markdown_table(rows, [("backbone", "backbone"), ("decoder", "decoder"), ("precision", "ONNX Runtime"),
                                  ("gmac", "GMAC"), ("decoder_gmac", "GMAC outside the encoder"),
                                  ("head_params_m", "head params (M)"), ("images_per_sec", "images / s (median)"),
                                  ("images_per_sec_min", "min"), ("images_per_sec_max", "max"),
                                  ("speedup_over_standard", "x standard"),
                                  ("speedup_over_float_pads", "x INT8 with float Pads")])
    write_results("decoder_cost", {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                  table, f"{args.size}x{args.size} uint8 input, batch 1, single-scale graph (normalisation, upsampling, "
                  f"argmax and confidence inside); ONNX Runtime CPU with {args.threads} intra-op threads; {args.rounds} "
                  "timed runs per row after one warm-up, interleaved across rows. MACs by torch.utils.flop_counter "
                  "(convolutions and matrix products).", results=args.results)


if __name__ == "__main__":
    main()
