"""`scaleseg`: one command, one sub-command per stage (data, train, eval)."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from .config import (SECTIONS, DataConfig, OptimConfig, RunConfig, TrainConfig, add_dataclass_args, dataclass_from_namespace,
                     parse_floats)

USER_ERRORS: tuple[type[BaseException], ...] = (FileExistsError, FileNotFoundError)
MAX_SCALE = 4.0  # eval scales: x4 of a 2048x1024 Cityscapes image is already 32M pixels per forward pass
# Later stages plug in by module name, so training never imports them (they import training).
STAGES = {"pretrain": "training.pretrain", "export": "export.cli", "doctor": "export.doctor", "serve": "serving.cli", "label": "app.cli", "app": "app.main", "demo": "app.demo"}


USER_ERROR_TYPES = (("training.config", "ConfigError"), ("training.data.folder", "DatasetError"), ("training.checkpoint", "CheckpointError"),
                    ("export.onnx_export", "ExportError"), ("serving.backends", "BackendError"),
                    ("app.labelstudio", "LabelStudioError"))


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix (message only, exit 2). Evaluated only when something is
    raised, and each import may fail: a serving image has no torch, so no training or export errors."""
    errors = list(USER_ERRORS)
    for module, name in USER_ERROR_TYPES:
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except ImportError:
            pass
    return tuple(errors)


# --- data -------------------------------------------------------------------------------------------
def cmd_data_synth(args) -> int:
    from .data.synth import synthesize
    try:
        out = synthesize(args.out, args.classes, args.n_labeled, args.n_unlabeled, args.n_val, args.size, args.seed,
                         args.force, max_objects=args.max_objects)
    except ValueError as err:  # synthesize checks the counts and sizes before it writes anything
        raise SystemExit(f"scaleseg data synth: {err}") from None
    print(f"wrote {out}: {args.n_labeled} labelled, {args.n_unlabeled} unlabelled, {args.n_val} val images, {args.classes} classes")
    return 0


def cmd_data_check(args) -> int:
    from .data.validate import check_dataset
    problems = check_dataset(args.data, deep=not args.quick, progress=True)
    if problems:
        print(f"{args.data}: {len(problems)} problem(s)")
        for p in problems:
            print(f"  - {p}")
        return 1
    print(f"{args.data}: OK")
    return 0


def cmd_data_import(args) -> int:
    from .data.importers import import_cityscapes, import_voc
    if args.format == "voc":
        out = import_voc(args.source, args.out, args.sbd, args.labeled or "1464", args.labeled_list, args.seed, args.force)
    else:
        out = import_cityscapes(args.source, args.out, args.labeled or "1/8", args.labeled_list, args.seed, args.force)
    print(f"wrote {out}")
    return 0


# --- train ------------------------------------------------------------------------------------------
def _train_parser(method_cls=None) -> argparse.ArgumentParser:
    from .methods import METHODS
    p = argparse.ArgumentParser(prog="scaleseg train", description="Train a segmentation model (one method, one run).")
    p.add_argument("data", nargs="?", help="dataset folder (classes.json, images/, masks/, splits/)")
    p.add_argument("--method", default="supervised", choices=list(METHODS), help="training method")
    for name, cls in SECTIONS.items():
        add_dataclass_args(p, cls, f"{name} options", skip=("root",) if cls is DataConfig else (),
                           defaults=method_cls.optim_defaults if method_cls is not None and cls is OptimConfig else None)
    if method_cls is not None:
        add_dataclass_args(p, method_cls.Config, f"{method_cls.name} options")
    return p


def parse_train_args(argv: list[str]) -> TrainConfig:
    from .methods import get_method
    # First pass finds the method (help deferred), the second knows that method's options.
    first, _ = _train_parser().parse_known_args([a for a in argv if a not in ("-h", "--help")])
    method_cls = get_method(first.method)
    ns = _train_parser(method_cls).parse_args(argv)
    cfg = TrainConfig(method=method_cls.name)
    saved = _saved_config(ns) if getattr(ns, "resume", False) else None
    for name, cls in SECTIONS.items():
        base = getattr(saved, name) if saved else (cls(**method_cls.optim_defaults) if cls is OptimConfig else None)
        setattr(cfg, name, dataclass_from_namespace(cls, ns, base))
    cfg.method_cfg = dataclass_from_namespace(method_cls.Config, ns, saved.method_cfg if saved else None)
    if ns.data:
        cfg.data.root = ns.data
    if not cfg.data.root:
        raise SystemExit("scaleseg train: give the dataset folder, e.g. `scaleseg train DATA --method scalematch`")
    return cfg


def _saved_config(ns) -> TrainConfig | None:
    """With --resume, the saved run's settings are the base; flags given now override them."""
    from .checkpoint import load_checkpoint
    from .engine import config_from_checkpoint
    last = Path(getattr(ns, "out", RunConfig().out)) / "last.pt"
    if not last.is_file():
        raise FileNotFoundError(f"{last}: nothing to resume. Run without --resume first, or pass the run's --out.")
    saved = config_from_checkpoint(load_checkpoint(last))
    saved.run.allow_changed, saved.run.force = "", False  # these hold for one invocation, never inherited
    if saved.method != ns.method:
        raise SystemExit(f"scaleseg train: {last} is a {saved.method!r} run; pass --method {saved.method} to resume it.")
    return saved


def cmd_train(argv: list[str]) -> int:
    from .distributed import shutdown
    from .engine import Trainer
    from .evaluate import format_table
    cfg = parse_train_args(argv)
    if cfg.data.batch_size < 1 or cfg.data.crop_size < 16:
        raise SystemExit("scaleseg train: --batch-size must be >= 1 and --crop-size >= 16")
    try:
        trainer = Trainer(cfg)
        result = trainer.fit()
    finally:
        shutdown()
    if trainer.dist.is_main and result["metrics"]:
        print(format_table(result["metrics"]))
        print(f"best val mIoU {result['best_miou']:.2f}; checkpoints in {cfg.run.out}/")
    return 0


# --- eval -------------------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    import torch

    from .checkpoint import CheckpointError, load_checkpoint, load_inference_model
    from .data.datasets import EvalSet
    from .data.folder import load_classes, read_split
    from .engine import resolve_device
    from .evaluate import evaluate, format_table

    model, classes, cfg = load_inference_model(load_checkpoint(args.checkpoint), args.checkpoint)
    data_classes = load_classes(args.data)
    if [c["name"] for c in classes] != [c.name for c in data_classes]:
        raise CheckpointError(
            f"{args.checkpoint}: trained on {len(classes)} classes {[c['name'] for c in classes]}, but "
            f"{Path(args.data) / 'classes.json'} lists {len(data_classes)} {[c.name for c in data_classes]}. "
            "Evaluate on data with the same classes.")
    if args.cif_scales and model.cif is None:
        raise CheckpointError(f"{args.checkpoint}: has no CIF module ({cfg.method} run); --cif-scales needs a scalematch checkpoint.")
    device = resolve_device(args.device)
    dataset = EvalSet(args.data, read_split(args.data, args.split), len(classes), args.split)
    with torch.inference_mode():
        result = evaluate(model.to(device), dataset, [c["name"] for c in classes], device, args.mode,
                          args.window or cfg.data.crop_size, args.scales, args.cif_scales, progress=True)
    result.update({"checkpoint": str(args.checkpoint), "data": str(args.data), "split": args.split, "images": len(dataset)})
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


def scales(text: str) -> tuple[float, ...]:
    """argparse type of the eval scale lists: at least one, each in (0, MAX_SCALE]."""
    try:
        values = parse_floats(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers such as 0.5,1,2") from None
    if not values or not all(0 < v <= MAX_SCALE for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: each scale must be greater than 0 and at most {MAX_SCALE:g}, e.g. 0.5,1,2")
    return values


# --- entry point ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scaleseg", description="Semi-supervised segmentation: data, train, eval.")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="create, import and check dataset folders").add_subparsers(dest="data_command", required=True)
    s = data.add_parser("synth", help="write a synthetic multi-scale dataset")
    s.add_argument("out")
    s.add_argument("--classes", type=int, default=5, help="number of classes including background (2-9)")
    s.add_argument("--n-labeled", type=int, default=16)
    s.add_argument("--n-unlabeled", type=int, default=240)
    s.add_argument("--n-val", type=int, default=40)
    s.add_argument("--size", type=int, default=128, help="image side in pixels")
    s.add_argument("--max-objects", type=int, default=5, help="each image holds 1 to this many objects")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="replace an existing non-empty folder")
    s.set_defaults(func=cmd_data_synth)
    c = data.add_parser("check", help="report every problem in a dataset folder")
    c.add_argument("data")
    c.add_argument("--quick", action="store_true", help="structure only; do not decode images and masks")
    c.set_defaults(func=cmd_data_check)
    i = data.add_parser("import", help="import Pascal VOC 2012 (+SBD) or Cityscapes")
    i.add_argument("format", choices=["voc", "cityscapes"])
    i.add_argument("source", help="VOCdevkit/VOC2012 folder, or the Cityscapes root")
    i.add_argument("out")
    i.add_argument("--sbd", help="VOC: folder of SegmentationClassAug masks (10,582 aug set)")
    i.add_argument("--labeled", help="labelled subset: a count (92) or a fraction (1/16); VOC default 1464, Cityscapes 1/8")
    i.add_argument("--labeled-list", help="file of labelled ids (UniMatch split files work)")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--force", action="store_true")
    i.set_defaults(func=cmd_data_import)

    sub.add_parser("pretrain", help="self-supervised encoder pretraining on the dataset's own images "
                   "(see `scaleseg pretrain --help`)", add_help=False)
    sub.add_parser("train", help="train a model (see `scaleseg train --help`)", add_help=False)
    sub.add_parser("export", help="checkpoint -> ONNX / TensorRT / Triton package (see `scaleseg export --help`)", add_help=False)
    sub.add_parser("serve", help="serve a model package over HTTP (see `scaleseg serve --help`)", add_help=False)
    sub.add_parser("doctor", help="torch/CUDA/driver, GPUs, ONNX Runtime, TensorRT: what train/export/serve use here, "
                   "what is broken and what to install (see `scaleseg doctor --help`)", add_help=False)
    sub.add_parser("demo", help="the whole loop on embedded defaults: data, training, export, Label Studio, app", add_help=False)
    sub.add_parser("app", help="the web app: predict, rank, label with Label Studio, retrain (see `scaleseg app --help`)", add_help=False)
    sub.add_parser("label", help="active labeling with Label Studio: push, pull, status (see `scaleseg label --help`)", add_help=False)

    e = sub.add_parser("eval", help="mIoU, per-class IoU and scale robustness of a checkpoint")
    e.add_argument("checkpoint")
    e.add_argument("data")
    e.add_argument("--split", default="val")
    e.add_argument("--mode", default="whole", choices=["whole", "sliding"])
    e.add_argument("--window", type=int, default=0, help="sliding window side; default the training crop")
    e.add_argument("--scales", type=scales, default=(0.5, 1.0, 2.0), help="input scales (robustness protocol)")
    e.add_argument("--cif-scales", type=scales, default=None, help="CIF multi-scale inference, e.g. 0.5,2.0")
    e.add_argument("--device", default="auto")
    e.add_argument("--json", help="also write the result as JSON")
    e.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["doctor"]:  # doctor reports the same problems itself
        # The one check every stage shares at start (pure stdlib at import; serving is in every install).
        from serving.environment import warn_broken_install
        warn_broken_install()
    try:
        if argv and argv[0] == "train":
            return cmd_train(argv[1:])
        if argv and argv[0] in STAGES:
            return importlib.import_module(STAGES[argv[0]]).main(argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except _user_errors() as err:
        # Errors raised in a data-loader worker arrive wrapped in its traceback; keep the message only.
        message = str(err).strip().splitlines()[-1] if "Original Traceback" in str(err) else str(err)
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
