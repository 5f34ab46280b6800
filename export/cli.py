"""`scaleseg export CKPT --out MODEL ...` and `scaleseg export verify MODEL --data DATA`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from serving.shapes import PROFILE, engine_profile
from training.config import parse_floats

from .quantize import DEFAULT_CALIB_COUNT, DEFAULT_METHOD, MAX_MIOU_DROP, METHODS, MIN_AGREEMENT, Gate


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scaleseg export", description="Checkpoint -> model package (ONNX, CIF graph, "
                                "TensorRT engine, Triton repository), verified against PyTorch.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="best.pt / last.pt from `scaleseg train`")
    p.add_argument("--out", required=True, help="package folder to write")
    p.add_argument("--with-probs", action="store_true", help="also output per-class probabilities")
    p.add_argument("--cif-scales", type=parse_floats, help="also write model.cif.onnx fusing these scales with 1.0, e.g. 0.5,2.0")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset of the graphs")
    p.add_argument("--data", type=Path, help="dataset whose val images drive the parity check (default: the training data)")
    p.add_argument("--tensorrt", action="store_true", help="also build a TensorRT engine (NVIDIA GPU + tensorrt)")
    p.add_argument("--fp16", action="store_true", help="TensorRT engine in FP16")
    p.add_argument("--int8", action="store_true", help="TensorRT engine in INT8, calibrated on --calib")
    engine = p.add_argument_group("TensorRT engine shapes", "the input sizes and batch sizes the engine accepts; "
                                  "serving answers 413 above them and 400 below (named apart from serve --max-batch)")
    engine.add_argument("--engine-min-side", type=positive_int, help=f"smallest image side in pixels (default {PROFILE.min_side})")
    engine.add_argument("--engine-opt-side", type=positive_int, help=f"side TensorRT tunes for and INT8 calibrates at "
                        f"(default {PROFILE.opt_side}, clamped into the sides given)")
    engine.add_argument("--engine-max-side", type=positive_int, help=f"largest image side in pixels (default {PROFILE.max_side}; "
                        "2048 for Cityscapes frames)")
    engine.add_argument("--engine-max-batch", type=positive_int, help=f"most images per execution (default {PROFILE.max_batch})")
    p.add_argument("--calib", type=Path, help="dataset whose unlabelled images calibrate INT8: the TensorRT --int8 "
                   "engine, and --quantize int8 (default there: --data)")
    p.add_argument("--quantize", choices=["int8"], help="also write CPU INT8 graphs (model.int8.onnx, and "
                   "model.cif.int8.onnx with --cif-scales) by ONNX Runtime static quantization; written only if "
                   "they pass the accuracy gate against FP32 on the --data val images")
    p.add_argument("--calib-count", type=positive_int, default=DEFAULT_CALIB_COUNT,
                   help="unlabelled images that calibrate --quantize int8")
    p.add_argument("--calib-method", choices=METHODS, default=DEFAULT_METHOD,
                   help="how --quantize int8 turns activation statistics into ranges")
    p.add_argument("--int8-min-agreement", type=float, default=MIN_AGREEMENT,
                   help="gate: least fraction of val pixels whose INT8 label equals the FP32 label")
    p.add_argument("--int8-max-drop", type=float, default=MAX_MIOU_DROP,
                   help="gate: most mIoU points the INT8 graph may lose against FP32 on the val images")
    p.add_argument("--triton-repo", type=Path, help="also add the package's models to this Triton model repository")
    p.add_argument("--name", help="model name in the Triton repository (default: the package folder's name)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing package at --out and this model's folders in --triton-repo")
    return p


def verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scaleseg export verify", description="Parity of a package's graphs with PyTorch.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", type=Path, help="package folder written by `scaleseg export`")
    p.add_argument("--data", type=Path, help="dataset whose val images are used")
    return p


def main(argv: list[str]) -> int:
    from .package import export_package, verify_package
    from .triton import check_destination, write_repository

    if argv[:1] == ["verify"]:
        args = verify_parser().parse_args(argv[1:])
        report = verify_package(args.model, args.data)
        for graph, runs in report["graphs"].items():
            for r in runs:
                print(f"{graph} on {r['backend']}: label agreement {100 * r['label_agreement']:.4f} %, "
                      f"max |d confidence| {r['max_abs_diff_confidence']:.2e} -> {'ok' if r['passed'] else 'FAILED'}")
        return 0 if report["passed"] else 1
    args = export_parser().parse_args(argv)
    precision = "int8" if args.int8 else "fp16" if args.fp16 else "fp32"
    if (args.fp16 or args.int8) and not args.tensorrt:
        raise SystemExit("scaleseg export: --fp16/--int8 apply to the TensorRT engine; add --tensorrt")
    shape_flags = (args.engine_min_side, args.engine_opt_side, args.engine_max_side, args.engine_max_batch)
    if any(v is not None for v in shape_flags) and not args.tensorrt:
        raise SystemExit("scaleseg export: --engine-* flags shape the TensorRT engine; add --tensorrt")
    try:
        profile = engine_profile(*shape_flags)
    except ValueError as err:
        raise SystemExit(f"scaleseg export: {err}") from None
    triton_name = args.name or Path(args.out).name
    if args.triton_repo:
        check_destination(args.triton_repo, triton_name, args.force)
    meta = export_package(Path(args.checkpoint), Path(args.out), args.with_probs, args.cif_scales, args.opset,
                          args.force, args.data, precision if args.tensorrt else None, args.calib,
                          quantize=args.quantize, calib_count=args.calib_count, calib_method=args.calib_method,
                          int8_gate=Gate(args.int8_min_agreement, args.int8_max_drop), engine_profile=profile)
    for graph, runs in meta["parity"]["graphs"].items():
        for r in runs:
            print(f"{graph} on {r['backend']}: label agreement {100 * r['label_agreement']:.4f} %")
    for graph, v in meta.get("int8", {}).get("gate", {}).get("graphs", {}).items():
        print(f"{graph}: label agreement {100 * v['label_agreement']:.2f} % vs FP32, mIoU drop {v['miou_drop']:.2f} "
              "-> passed the INT8 gate")
    if args.triton_repo:
        for folder in write_repository(Path(args.out), args.triton_repo, triton_name, force=args.force):
            print(f"wrote {folder}")
    print(f"wrote {args.out} ({', '.join(meta['graphs'])}); meta: {json.dumps({'method': meta['method'], 'opset': meta['opset']})}")
    return 0
