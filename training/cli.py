"""`scaleseg`: one command, one sub-command per stage (data, train, eval)."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from . import __version__
from .config import (SECTIONS, ConfigError, DataConfig, OptimConfig, RunConfig, TrainConfig, add_dataclass_args, check_counts,
                     dataclass_from_namespace, parse_floats, read_config_file, typed_settings)

USER_ERRORS: tuple[type[BaseException], ...] = (FileExistsError, FileNotFoundError)
HELP = argparse.ArgumentDefaultsHelpFormatter  # every command's help shows each flag's default
MAX_SCALE = 4.0  # eval scales: x4 of a 2048x1024 Cityscapes image is already 32M pixels per forward pass
# Later stages plug in by module name, so training never imports them (they import training).
STAGES = {"pretrain": "training.pretrain", "export": "export.cli", "predict": "export.predict", "doctor": "export.doctor",
          "serve": "serving.cli", "label": "app.cli", "app": "app.main", "demo": "app.demo"}


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
    elif args.format == "cityscapes":
        out = import_cityscapes(args.source, args.out, args.labeled or "1/8", args.labeled_list, args.seed, args.force)
    else:
        out, counts = _import_own(args)
        print(f"wrote {out}: {counts['labeled']} labelled, {counts['unlabeled']} unlabelled, {counts['val']} val images")
        return 0
    print(f"wrote {out}")
    return 0


def _import_own(args):
    """The formats users bring from their own tools: folder, coco, cvat, labelstudio."""
    from .data.palette import load_palette
    if args.format == "folder":
        from .data.import_folder import import_folder
        return import_folder(args.source, args.out, args.images or "images", args.masks, load_palette(args.palette),
                             args.mask_format, args.ignore_value, args.ignore_color, args.mask_suffix, args.val,
                             args.seed, args.force)
    if args.format == "coco":
        from .data.import_coco import import_coco
        if not args.images:
            raise SystemExit("scaleseg data import coco: pass --images, the folder holding the images the JSON lists")
        return import_coco(args.source, args.out, args.images, args.panoptic_masks, args.val, args.seed, args.force)
    if args.format == "labelstudio":
        # app may import training, never the reverse at import time: the importer reuses `label pull`'s mask code.
        module = importlib.import_module("app.import_labelstudio")
        if args.source.startswith(("http://", "https://")):
            if args.images or not args.project:
                raise SystemExit("scaleseg data import labelstudio URL: pass --project (the project's id or title) and no "
                                 "--images; the images are fetched from that Label Studio")
            return module.import_labelstudio_url(args.source, args.project, args.out, load_palette(args.palette),
                                                 args.val, args.seed, args.force)
        if not args.images:
            raise SystemExit("scaleseg data import labelstudio: pass --images, the folder holding the project's images "
                             "(or import from the running Label Studio: its URL as SOURCE, with --project)")
        return module.import_labelstudio(args.source, args.out, args.images, load_palette(args.palette), args.val,
                                         args.seed, args.force)
    from .data.import_cvat import import_cvat
    return import_cvat(args.source, args.out, args.images, args.val, args.seed, args.ignore_color, args.force)


def cmd_data_add(args) -> int:
    from .data.ingest import add_paths
    report = add_paths(args.data, args.paths, max_pixels=args.max_pixels, progress=True)
    print(report.summary())
    return 0 if report.added or report.duplicates else 1


def cmd_data_add_class(args) -> int:
    from .data.palette import add_class, hex_color
    added = add_class(args.data, args.name, args.color)
    print(f"added class {added.id} {added.name!r} ({hex_color(added.color)}) to {Path(args.data) / 'classes.json'}. "
          f"Masks keep their ids: label the new class (mask value {added.id}, or `scaleseg label push`), then fine-tune "
          "a run on the earlier classes with `scaleseg train DATA --init-from RUN/best.pt`.")
    return 0


def _class_color(text: str) -> tuple[int, int, int]:
    """argparse type of --color: #rrggbb or R,G,B."""
    from .data.folder import DatasetError
    from .data.palette import parse_color
    try:
        return parse_color([int(p) for p in text.split(",")] if "," in text else text, "--color")
    except (DatasetError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not #rrggbb or R,G,B with integers 0..255, e.g. #ff8000 or "
                                         "255,128,0") from None


def _color(text: str) -> tuple[int, int, int]:
    """argparse type of --ignore-color."""
    from .data.folder import DatasetError
    from .data.palette import parse_color
    try:
        return parse_color(text, "--ignore-color")
    except DatasetError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# --- train ------------------------------------------------------------------------------------------
def _train_parser(method_cls=None) -> argparse.ArgumentParser:
    from .methods import METHODS
    p = argparse.ArgumentParser(prog="scaleseg train", description="Train a segmentation model (one method, one run). "
                                "Every flag can also be set in a --config file; flags on the command line win.")
    p.add_argument("data", nargs="?", help="dataset folder (classes.json, images/, masks/, splits/)")
    p.add_argument("--config", help="YAML file of settings (a run's config.yaml reruns it; an older run's config.json "
                                    "reads alike), or a shipped recipe by name: small-data; flags given here override it")
    p.add_argument("--method", default=argparse.SUPPRESS, choices=list(METHODS), help="training method (default: supervised)")
    for name, cls in SECTIONS.items():
        add_dataclass_args(p, cls, f"{name} options", skip=("root",) if cls is DataConfig else (),
                           defaults=method_cls.optim_defaults if method_cls is not None and cls is OptimConfig else None)
    if method_cls is not None:
        add_dataclass_args(p, method_cls.Config, f"{method_cls.name} options")
    return p


def parse_train_args(argv: list[str]) -> TrainConfig:
    from .methods import METHODS, get_method
    # First pass finds the config file and the method (help deferred), the second knows that method's options.
    first, _ = _train_parser().parse_known_args([a for a in argv if a not in ("-h", "--help")])
    from_file = read_config_file(first.config) if first.config else {}
    file_method = from_file.pop("method", None)
    if file_method is not None and file_method not in METHODS:
        raise ConfigError(f"{first.config}: method: {file_method!r} is not a method; choose one of {', '.join(METHODS)}.")
    method_cls = get_method(getattr(first, "method", None) or file_method or "supervised")
    ns = _train_parser(method_cls).parse_args(argv)
    ns.method = method_cls.name
    # The file fills in what the command line did not give (flags win); the run's --resume base comes below both.
    for name, value in typed_settings(from_file, [*SECTIONS.values(), method_cls.Config], first.config).items():
        if not hasattr(ns, name):
            setattr(ns, name, value)
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
    check_counts(cfg)
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
DEFAULT_CIF_SCALES = (0.5, 2.0)  # a checkpoint's --cif without --cif-scales, as `scaleseg predict --cif`


def cmd_eval(args) -> int:
    from .evaluate import format_table
    model = Path(args.model)
    if model.is_dir():
        result = _eval_package(args)
    elif model.is_file():
        result = _eval_checkpoint(args)
    else:
        raise FileNotFoundError(f"{model}: no such checkpoint or model package. Pass best.pt or last.pt of "
                                "`scaleseg train`, or a folder written by `scaleseg export`.")
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


def _scored_classes(args, source: str | Path, classes: list[dict], error: type[Exception]) -> tuple[list[str], int]:
    """(the names of the classes to score, the dataset's class count), once the model's classes and the dataset's
    agree (else ``error``). With --known-classes, the classes that this model, or the model it names, was trained on
    are scored; the dataset may have gained classes after them (`data add-class`)."""
    from .data.folder import load_classes
    ours, theirs = [c["name"] for c in classes], [c.name for c in load_classes(args.data)]
    listed = Path(args.data) / "classes.json"
    if args.known_classes is None:
        if ours != theirs:
            added = len(ours) < len(theirs) and theirs[:len(ours)] == ours
            hint = (f" The dataset gained {theirs[len(ours):]} since: --known-classes scores the {len(ours)} classes "
                    "this model knows; train with `--init-from` this model's checkpoint to learn the new ones."
                    if added else " Evaluate on data with the same classes.")
            raise error(f"{source}: trained on {len(ours)} classes {ours}, but {listed} lists {len(theirs)} {theirs}.{hint}")
        return ours, len(theirs)
    if theirs[:len(ours)] != ours:
        raise error(f"{source}: trained on {len(ours)} classes {ours}, but {listed} lists {len(theirs)} {theirs}. "
                    "--known-classes needs the model's classes first in classes.json, in the same order, as "
                    "`scaleseg data add-class` keeps them; evaluate on data with the model's classes.")
    known, named = ours, source
    if args.known_classes:  # another model's classes: an old model's, to compare this one with it
        named = args.known_classes
        known = [c["name"] for c in _model_classes(Path(named), error)]
        if ours[:len(known)] != known:
            raise error(f"--known-classes {named}: trained on {known}, but {source} on {ours}; the classes of the model "
                        "named must be the first classes of the model scored, in the same order.")
    if len(known) < len(theirs):
        print(f"scoring the {len(known)} classes {named} knows; pixels labelled {theirs[len(known):]} are ignored",
              flush=True)
    return known, len(theirs)


def _model_classes(model: Path, error: type[Exception]) -> list[dict]:
    """The classes of a model package (its meta.json) or a checkpoint."""
    from .checkpoint import load_checkpoint
    if (model / "meta.json").is_file():
        return json.loads((model / "meta.json").read_text())["classes"]
    if model.is_file():
        return load_checkpoint(model)["classes"]
    raise error(f"--known-classes {model}: no such checkpoint or model package. Pass a model's best.pt or last.pt, or "
                "a folder written by `scaleseg export`, or give --known-classes no value for the scored model's classes.")


def _refuse(args, flags: dict[str, object], why: str) -> None:
    """Exit naming the ``flags`` given a value other than their default: they do not apply to this kind of model."""
    given = [flag for flag, default in flags.items() if getattr(args, flag.lstrip("-").replace("-", "_")) != default]
    if given:
        raise SystemExit(f"scaleseg eval: {', '.join(given)}: {why}")


def _eval_checkpoint(args) -> dict:
    import torch

    from .checkpoint import CheckpointError, load_checkpoint, load_inference_model
    from .data.datasets import EvalSet
    from .data.folder import read_split
    from .engine import resolve_device
    from .evaluate import evaluate

    _refuse(args, {"--backend": "auto", "--precision": "auto", "--tile": False},
            "these choose how a model package runs; pass the package folder to score it (a checkpoint takes "
            "--mode sliding for large images).")
    model, classes, cfg = load_inference_model(load_checkpoint(args.model), args.model)
    names, count = _scored_classes(args, args.model, classes, CheckpointError)
    cif_scales = args.cif_scales or (DEFAULT_CIF_SCALES if args.cif else None)
    if cif_scales and model.cif is None:
        raise CheckpointError(f"{args.model}: has no CIF module ({cfg.method} run); --cif and --cif-scales need a scalematch checkpoint.")
    device = resolve_device(args.device)
    dataset = EvalSet(args.data, read_split(args.data, args.split), count, args.split)
    with torch.inference_mode():
        result = evaluate(model.to(device), dataset, names, device, args.mode, args.window or cfg.data.crop_size,
                          args.scales, cif_scales, progress=True)
    return {**result, "checkpoint": str(args.model), "data": str(args.data), "split": args.split, "images": len(dataset)}


def _eval_package(args) -> dict:
    """Score the graph a model package serves, on the backend and precision `scaleseg serve` would pick (or the ones
    asked for), through serving's own Segmenter."""
    from serving.backends import BackendError
    from serving.repository import read_meta
    from serving.segmenter import GRAPHS, Segmenter

    from .data.datasets import EvalSet
    from .data.folder import read_split
    from .evaluate import evaluate_segmenter

    directory = Path(args.model)
    if not (directory / "meta.json").is_file():
        runs = [directory / name for name in ("best.pt", "last.pt") if (directory / name).is_file()]
        hint = (f"it holds a training run: pass {runs[0]} to score its checkpoint, or export it with `scaleseg export "
                f"{runs[0]} --out MODEL` and pass MODEL" if runs else
                "pass a folder written by `scaleseg export`, or a checkpoint (.pt) written by `scaleseg train`")
        raise BackendError(f"{directory}: not a model package (it has no meta.json); {hint}.")
    _refuse(args, {"--mode": "whole", "--window": 0, "--cif-scales": None, "--device": "auto"},
            "checkpoint options; a model package runs the graph it serves: --cif picks its CIF graph (scales fixed at "
            "export), --backend the runtime, --tile segments large images in tiles.")
    meta = read_meta(directory)
    names, count = _scored_classes(args, directory, meta["classes"], BackendError)
    segmenter = Segmenter.load(directory, cif=args.cif, backend=args.backend, precision=args.precision)
    print(f"{directory}: {GRAPHS[args.cif]} on {segmenter.description}", flush=True)
    cif_scales = meta["graphs"][GRAPHS[args.cif]]["cif_scales"] if args.cif else ()
    dataset = EvalSet(args.data, read_split(args.data, args.split), count, args.split, normalise=False)
    try:
        result = evaluate_segmenter(segmenter, dataset, names, args.scales, cif_scales, args.tile, progress=True)
    except ValueError as err:
        raise BackendError(f"{directory}: {err}. --tile segments large images in tiles; --scales 1 scores the "
                           "images at their own size.") from None
    return {**result, "package": str(directory), "backend": segmenter.description, "data": str(args.data),
            "split": args.split, "images": len(dataset)}


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
    from serving.precision import PRECISIONS  # serving is in every install and imports no training code
    p = argparse.ArgumentParser(prog="scaleseg", description="Semi-supervised segmentation: data, training, export, "
                                "serving and active labeling. `scaleseg COMMAND --help` explains each command.")
    p.add_argument("--version", action="version", version=f"scaleseg {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="create, import and check dataset folders").add_subparsers(dest="data_command", required=True)
    s = data.add_parser("synth", help="write a synthetic multi-scale dataset", formatter_class=HELP)
    s.add_argument("out", help="dataset folder to write")
    s.add_argument("--classes", type=int, default=5, help="number of classes including background (2-9)")
    s.add_argument("--n-labeled", type=int, default=16, help="labelled training images (with masks)")
    s.add_argument("--n-unlabeled", type=int, default=240, help="unlabelled training images (masks kept for simulations)")
    s.add_argument("--n-val", type=int, default=40, help="validation images")
    s.add_argument("--size", type=int, default=128, help="image side in pixels")
    s.add_argument("--max-objects", type=int, default=5, help="each image holds 1 to this many objects")
    s.add_argument("--seed", type=int, default=0, help="seed of the generator: the same seed writes the same images")
    s.add_argument("--force", action="store_true", help="replace an existing non-empty folder")
    s.set_defaults(func=cmd_data_synth)
    c = data.add_parser("check", help="report every problem in a dataset folder", formatter_class=HELP)
    c.add_argument("data", help="dataset folder")
    c.add_argument("--quick", action="store_true", help="structure only; do not decode images and masks")
    c.set_defaults(func=cmd_data_check)
    i = data.add_parser("import", help="import a folder of images + masks, COCO, CVAT, Label Studio, Pascal VOC 2012 (+SBD) or Cityscapes",
                        description="Write a dataset folder from another format (atomically), then check it as `data check` does.",
                        formatter_class=HELP)
    i.add_argument("format", choices=["folder", "coco", "cvat", "labelstudio", "voc", "cityscapes"], help="the source's format")
    i.add_argument("source", help="folder: the folder holding images/ and masks/; coco: the annotation JSON; cvat: the "
                   "'Segmentation mask 1.1' zip or its folder; labelstudio: the JSON export, or the URL of the running Label Studio "
                   "(with --project; token from env LABEL_STUDIO_API_KEY); voc: VOCdevkit/VOC2012; cityscapes: the Cityscapes root")
    i.add_argument("out", help="dataset folder to write (must not exist or be empty, unless --force)")
    i.add_argument("--seed", type=int, default=0, help="seed of the labelled (voc, cityscapes) or val (others) draw (default: %(default)s)")
    i.add_argument("--force", action="store_true", help="replace an existing non-empty OUT folder")
    own = i.add_argument_group("folder, coco, cvat and labelstudio options")
    own.add_argument("--val", default="0.2", help="labelled images set aside for validation: a count (10) or a fraction (0.2, 1/5) (default: %(default)s)")
    own.add_argument("--images", default=None, help="folder: image folder relative to SOURCE (default images); coco: the "
                     "image folder (required); cvat: the image folder when the export has no JPEGImages/; labelstudio: the "
                     "project's images (required with a JSON export)")
    own.add_argument("--project", default=None, help="labelstudio from a URL: the project's id or title")
    own.add_argument("--masks", default="masks", help="folder: mask folder relative to SOURCE (default: %(default)s)")
    own.add_argument("--mask-suffix", default="", help="folder: what mask names add to their image's name, e.g. _mask")
    own.add_argument("--mask-format", default="auto", choices=["auto", "ids", "colors"],
                     help="folder: masks hold class ids or RGB colours; auto: greyscale and palette PNGs are ids, RGB are colours (default: %(default)s)")
    own.add_argument("--palette", default=None, help="folder, labelstudio: the classes, as a YAML/JSON file or inline "
                     "(background=#000000,car=#ff0000; names only for id masks); default: ids 0..max, named class_<id>")
    own.add_argument("--ignore-value", type=int, default=255, help="folder: the class-id value that means 'not labelled' (default: %(default)s)")
    own.add_argument("--ignore-color", action="append", default=[], type=_color,
                     help="folder, cvat: a colour that means 'not labelled' (#rrggbb); repeat for several")
    own.add_argument("--panoptic-masks", default=None, help="coco panoptic: the folder of segment PNGs (default: the "
                     "JSON's path without .json, as COCO ships it)")
    vc = i.add_argument_group("voc and cityscapes options")
    vc.add_argument("--sbd", help="VOC: folder of SegmentationClassAug masks (10,582 aug set)")
    vc.add_argument("--labeled", help="labelled subset: a count (92) or a fraction (1/16); VOC default 1464, Cityscapes 1/8")
    vc.add_argument("--labeled-list", help="file of labelled ids (UniMatch split files work)")
    i.set_defaults(func=cmd_data_import)
    a = data.add_parser("add", help="add unlabelled images (files, folders, globs, zips) to a dataset",
                        description="Decode, de-duplicate and store images as the app's upload does; they join splits/unlabeled.txt.",
                        formatter_class=HELP)
    a.add_argument("data", help="dataset folder")
    a.add_argument("paths", nargs="+", help="image files, folders (searched recursively), glob patterns or .zip archives")
    a.add_argument("--max-pixels", type=int, default=40_000_000, help="refuse images with more pixels than this (default: %(default)s)")
    a.set_defaults(func=cmd_data_add)
    ac = data.add_parser("add-class", help="append a class to a dataset's classes.json",
                         description="Append a class (the next id) to DATA/classes.json, atomically. The earlier ids keep "
                         "their meaning, so masks stay valid, and `scaleseg train --init-from` a run on the earlier classes "
                         "keeps its weights and learns the new class.", formatter_class=HELP)
    ac.add_argument("data", help="dataset folder")
    ac.add_argument("name", help="the new class's name (unique, case-insensitively)")
    ac.add_argument("--color", type=_class_color, default=None, help="its colour in masks and overlays, #rrggbb or "
                    "R,G,B; without it, the first VOC palette colour no class has")
    ac.set_defaults(func=cmd_data_add_class)

    sub.add_parser("pretrain", help="self-supervised encoder pretraining on the dataset's own images "
                   "(see `scaleseg pretrain --help`)", add_help=False)
    sub.add_parser("train", help="train a model (see `scaleseg train --help`)", add_help=False)
    sub.add_parser("export", help="checkpoint -> ONNX / TensorRT / Triton package (see `scaleseg export --help`)", add_help=False)
    sub.add_parser("predict", help="segment files, folders, globs and videos into masks on disk (see `scaleseg predict --help`)",
                   add_help=False)
    sub.add_parser("serve", help="serve a model package over HTTP (see `scaleseg serve --help`)", add_help=False)
    sub.add_parser("doctor", help="torch/CUDA/driver, GPUs, ONNX Runtime, TensorRT: what train/export/serve use here, "
                   "what is broken and what to install (see `scaleseg doctor --help`)", add_help=False)
    sub.add_parser("demo", help="the whole loop on embedded defaults: data, training, export, Label Studio, app", add_help=False)
    sub.add_parser("app", help="the web app: predict, rank, label with Label Studio, retrain (see `scaleseg app --help`)", add_help=False)
    sub.add_parser("label", help="active labeling with Label Studio: push, pull, status (see `scaleseg label --help`)", add_help=False)

    e = sub.add_parser("eval", help="mIoU, per-class IoU and scale robustness of a checkpoint or a model package",
                       description="Score a checkpoint, or a model package exactly as it is served (its ONNX, INT8 or "
                       "TensorRT graph), on a dataset split with masks.", formatter_class=HELP)
    e.add_argument("model", help="best.pt or last.pt of `scaleseg train`, or a model package folder of `scaleseg export`")
    e.add_argument("data", help="dataset folder with the model's classes")
    e.add_argument("--split", default="val", help="split whose images (with masks) are scored: val, labeled or unlabeled")
    e.add_argument("--scales", type=scales, default=(0.5, 1.0, 2.0), help="input scales (robustness protocol)")
    e.add_argument("--cif", action="store_true", help="CIF multi-scale inference: a package's CIF graph "
                   "(model.cif.onnx), or a checkpoint's CIF module at --cif-scales (0.5,2.0 unless given)")
    e.add_argument("--known-classes", nargs="?", const="", default=None, metavar="MODEL",
                   help="score only the classes the model knows when the dataset gained classes since it was trained "
                   "(`data add-class`): pixels of the new classes are ignored. With MODEL (a checkpoint or package "
                   "on fewer classes), score MODEL's classes, to compare a new model with an old one on the same classes")
    e.add_argument("--json", help="also write the result as JSON")
    ck = e.add_argument_group("checkpoint options")
    ck.add_argument("--mode", default="whole", choices=["whole", "sliding"],
                    help="whole image at once, or sliding windows (the Cityscapes protocol)")
    ck.add_argument("--window", type=int, default=0, help="sliding window side; 0: the training crop")
    ck.add_argument("--cif-scales", type=scales, default=None, help="CIF multi-scale inference, e.g. 0.5,2.0")
    ck.add_argument("--device", default="auto", help="auto, cpu or cuda")
    pk = e.add_argument_group("model package options (as `scaleseg predict` and `serve`)")
    pk.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt"],
                    help="auto takes a TensorRT engine built for this GPU when present, else ONNX Runtime")
    pk.add_argument("--precision", default="auto", choices=PRECISIONS,
                    help="auto: the INT8 graph where the package has one and no GPU runs the FP32 graph")
    pk.add_argument("--tile", action="store_true", help="segment images larger than one pass takes in overlapping tiles")
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
    except SystemExit:  # --help and a stage's own refusals: before _user_errors(), which imports torch
        raise
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
