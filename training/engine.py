"""The one training loop every method shares: data streams, optimiser and poly LR, AMP, DDP, periodic
validation, best/last checkpoints and exact resume."""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import __version__
from .checkpoint import CheckpointError, inference_payload, load_checkpoint, save_checkpoint
from .config import CONFIG_FILE, ConfigError, TrainConfig, config_yaml, dataclass_from_dict, resolved_config
from .data.datasets import EpochSampler, EvalSet, LabeledSet, UnlabeledSet, collate
from .data.folder import DatasetError, atomic_write, class_pixel_counts, fingerprint, load_classes, read_split
from .data.validate import check_dataset
from .distributed import DistInfo, all_gather_objects, average_buffers, barrier, init_distributed, process_seed
from .evaluate import evaluate
from .losses import balanced_class_weights, cross_entropy, ohem_cross_entropy
from .methods import Method, StepContext, build_aux, get_method
from .run_settings import SNAPSHOTS, check_out_dir, check_resume, snapshot_name, start_out_dir
from .tensorboard import TensorBoard

STREAM_LABELED = 1  # stream ids: labelled 1, unlabelled 2, CutMix partner 3 (the sampler's seeds depend on them)


def auto_device(cuda: bool, mps: bool) -> str:
    """--device auto: an NVIDIA GPU, then Apple's Metal (MPS), then the CPU."""
    return "cuda" if cuda else "mps" if mps else "cpu"


def mps_available() -> bool:
    """torch.backends.mps.is_available() "Return a bool indicating if MPS is currently available"
    (https://pytorch.org/docs/stable/backends.html#torch-backends-mps); builds without it have no such module."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def device_kind(name: str) -> str:
    """The device type a --device value means on this machine: cuda, mps or cpu."""
    return auto_device(torch.cuda.is_available(), mps_available()) if name == "auto" else name


def resolve_device(name: str, dist: DistInfo | None = None) -> torch.device:
    name = device_kind(name)
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda asked for, but no CUDA device is visible")
        return torch.device("cuda", dist.local_rank if dist else 0)
    if name == "mps" and not mps_available():
        raise RuntimeError("--device mps asked for, but this torch has no Metal (MPS) device; use --device cpu")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX tiles). Without it oneDNN emulates
    bf16 and autocast is slower than float32. torch has no public check; these are the ones its own CPU
    tests use (torch.cpu._is_avx512_bf16_supported / _is_amx_tile_supported)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def autocast_dtype(device_type: str, amp: bool, amp_cpu: bool, cpu_bf16: bool) -> torch.dtype | None:
    """The training forward's autocast dtype, None for float32. CUDA: float16 with loss scaling (--amp). CPU:
    bfloat16 (--amp-cpu), the only low-precision dtype CPU autocast supports
    (https://pytorch.org/docs/stable/amp.html#cpu-ops-that-can-autocast-to-bfloat16); bfloat16 keeps float32's
    exponent range, so it needs no GradScaler."""
    if device_type == "cuda":
        return torch.float16 if amp else None
    if device_type == "cpu" and amp_cpu:
        if not cpu_bf16:
            raise ConfigError("--amp-cpu: this CPU has no native bfloat16 (AVX512-BF16 or AMX), so bf16 would be "
                              "emulated and slower than float32; drop --amp-cpu.")
        return torch.bfloat16
    return None


# oneDNN's bfloat16 weight gradient of a stride-2 3x3 convolution over a 1x1 map is garbage (huge or
# non-finite values; torch 2.14 here; pytorch/pytorch#169688 reports other strided bf16 CPU convolutions
# wrong): ResNet's layer3 sees 1x1 maps for inputs under 16 px.
MIN_BF16_INPUT = 16


def check_bf16_input_size(cfg: TrainConfig) -> None:
    """Refuse --amp-cpu when a training pass would feed the encoder an image under MIN_BF16_INPUT px (a small
    crop, or ScaleMatch's smallest image scale of it)."""
    smallest_scale = min(getattr(cfg.method_cfg, "img_scales", None) or (1.0,))
    smallest = int(cfg.data.crop_size * min(smallest_scale, 1.0))
    if smallest < MIN_BF16_INPUT:
        raise ConfigError(f"--amp-cpu: the smallest training image would be {smallest} px (--crop-size "
                          f"{cfg.data.crop_size} x scale {min(smallest_scale, 1.0)}); bfloat16 convolution gradients on "
                          f"CPU are wrong below {MIN_BF16_INPUT} px. Use a larger --crop-size, or drop --amp-cpu.")


def supervised_class_weights(kind: str, root: Path, labeled_ids: list[str], num_classes: int) -> torch.Tensor | None:
    """--class-weights: None for 'none'; for 'balanced', weights from the labelled masks' pixel counts."""
    if kind == "none":
        return None
    if kind != "balanced":
        raise ConfigError(f"--class-weights must be none or balanced, got {kind!r}")
    return balanced_class_weights(class_pixel_counts(root, labeled_ids, num_classes))


def build_method(cfg: TrainConfig, num_classes: int, class_weights: torch.Tensor | None = None) -> Method:
    method_cls = get_method(cfg.method)
    o = cfg.optim
    if o.ohem:
        def sup_loss(logits, target):
            return ohem_cross_entropy(logits, target, o.ohem_thresh, o.ohem_min_kept, class_weights)
    else:
        def sup_loss(logits, target):
            return cross_entropy(logits, target, class_weights)
    # On --resume the checkpoint replaces the encoder's initial weights, so their file is not needed.
    model_cfg = replace(cfg.model, pretrained="") if cfg.run.resume else cfg.model
    method = method_cls(cfg.method_cfg, model_cfg, num_classes, sup_loss)
    if cfg.aux.aux:
        method.aux = build_aux(cfg.aux, method.model, num_classes)
    return method


def build_optimizer(method: Method, cfg: TrainConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = method.param_groups(o.lr, o.head_lr_mult)
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
    raise ConfigError(f"--optimizer must be sgd or adamw, got {o.optimizer!r}")


def poly_lr(optimizer: torch.optim.Optimizer, iteration: int, total: int, power: float) -> float:
    factor = (1 - iteration / total) ** power
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: TrainConfig, progress: bool = True):
        self.cfg = cfg
        self.device_kind = device_kind(cfg.run.device)
        self.dist = init_distributed(self.device_kind)
        self.device = resolve_device(cfg.run.device, self.dist)
        self.progress = progress and self.dist.is_main
        self.out = Path(cfg.run.out)
        self.root = Path(cfg.data.root)
        check_out_dir(self.out, cfg.run)

        problems = check_dataset(self.root, progress=self.progress)
        if problems:
            raise DatasetError(f"{self.root}: {len(problems)} dataset problem(s), nothing was trained:\n  " + "\n  ".join(problems))
        self.classes = load_classes(self.root)
        self.labeled_ids = read_split(self.root, "labeled")
        self.unlabeled_ids = read_split(self.root, "unlabeled", required=False)
        self.val_ids = read_split(self.root, "val")
        self.data_fingerprint = fingerprint(self.root)

        self.class_weights = supervised_class_weights(cfg.optim.class_weights, self.root, self.labeled_ids,
                                                      len(self.classes))
        if self.class_weights is not None:
            self.class_weights = self.class_weights.to(self.device)  # once, not a copy per loss call
            if self.progress:
                print("class weights: " + ", ".join(f"{c.name} {w:.2f}" for c, w in zip(self.classes, self.class_weights.tolist())),
                      flush=True)

        # Settings that cannot work are refused before any weights are read or downloaded.
        self.init_source = (init_source(Path(cfg.model.init_from), self.classes, self.root)
                            if cfg.model.init_from and not cfg.run.resume else None)
        b, world = cfg.data.batch_size, self.dist.world
        if b < 2 and not (self.device_kind == "cuda" and world > 1):
            raise ConfigError(f"--batch-size {b}: BatchNorm (ASPP's image-pooling branch) needs at least 2 images per "
                             "process; use --batch-size 2 or more (under torchrun on CUDA, SyncBatchNorm makes 1 per GPU work).")
        seed_everything(cfg.run.seed)
        # A resumed or --init-from run overwrites the encoder at once, so its published weights are not read.
        fresh = cfg.run.resume or cfg.model.init_from
        build_cfg = replace(cfg, model=replace(cfg.model, pretrained="none")) if fresh else cfg
        self.method = build_method(build_cfg, len(self.classes), self.class_weights).to(self.device)
        if self.progress:
            source = f"from {cfg.model.init_from}" if cfg.model.init_from and not cfg.run.resume else (
                "from the checkpoint" if cfg.run.resume else self.method.model.encoder.weights_source)
            print(f"encoder: {cfg.model.backbone}, weights {source}", flush=True)
        if self.method.uses_unlabeled and not self.unlabeled_ids:
            raise DatasetError(f"{self.root / 'splits' / 'unlabeled.txt'}: method {cfg.method!r} needs unlabelled images; "
                               "list some there or use --method supervised.")
        self.sync_bn = self.device_kind == "cuda" and self.dist.enabled
        if self.sync_bn:
            self.method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.method)
        # Same initial weights everywhere (seeded above); from here on each process draws its own numbers.
        seed_everything(process_seed(cfg.run.seed, self.dist.rank))
        self.optimizer = build_optimizer(self.method, cfg)
        self.extra_optimizers = self.method.extra_optimizers()
        self.amp_dtype = autocast_dtype(self.device.type, cfg.optim.amp, cfg.optim.amp_cpu,
                                        cfg.optim.amp_cpu and cpu_has_bf16())
        if self.amp_dtype == torch.bfloat16:
            check_bf16_input_size(cfg)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        epoch_len = len(self.unlabeled_ids) if self.unlabeled_ids else len(self.labeled_ids)
        self.iters_per_epoch = max(1, epoch_len // (b * world))
        self.total_iters = cfg.run.max_iters or cfg.run.epochs * self.iters_per_epoch
        self.eval_every = cfg.run.eval_every or self.iters_per_epoch
        self.save_every = cfg.run.save_every or self.iters_per_epoch
        self.iteration, self.best_miou, self.last_metrics = 0, -1.0, None
        self.board = TensorBoard(self.out / "tensorboard") if cfg.run.tensorboard and self.dist.is_main else None
        self.method.prepare(self)
        if cfg.run.resume:
            self._resume()
        elif cfg.model.init_from:  # selftrain's --student-init teacher names it only in prepare()
            self._init_from(self.init_source or init_source(Path(cfg.model.init_from), self.classes, self.root))
        self.ddp = DistributedDataParallel(self.method, broadcast_buffers=False) if self.dist.enabled else self.method

    # --- data --------------------------------------------------------------------------------------
    def _loader(self, dataset, stream: int, epoch: int, start: int) -> DataLoader:
        b = self.cfg.data.batch_size
        sampler = EpochSampler(len(dataset), self.iters_per_epoch * b, self.cfg.run.seed, stream, self.dist.rank, self.dist.world)
        sampler.set_epoch(epoch, start * b)
        # An explicit generator keeps loader start-up from drawing on the global RNG (exact resume).
        return DataLoader(dataset, batch_size=b, sampler=sampler, num_workers=self.cfg.data.num_workers,
                          collate_fn=collate, drop_last=True, pin_memory=self.device.type == "cuda",
                          generator=torch.Generator().manual_seed(self.cfg.run.seed),
                          persistent_workers=False)

    def _streams(self, epoch: int, start: int):
        sets = self.method.training_sets(self, epoch) or self._default_sets()
        return zip(*(self._loader(dataset, stream, epoch, start) for stream, dataset in enumerate(sets, STREAM_LABELED)))

    def _default_sets(self) -> list:
        """[labelled, unlabelled, partner] as far as the method uses them; the stream ids follow this order."""
        d, m = self.cfg.data, self.method
        scale = (d.scale_min, d.scale_max)
        sets = [LabeledSet(self.root, self.labeled_ids, len(self.classes), d.crop_size, scale)]
        if m.uses_unlabeled:
            unl = UnlabeledSet(self.root, self.unlabeled_ids, d.crop_size, scale, m.num_strong_views)
            sets += [unl, unl] if m.needs_partner else [unl]
        return sets

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    # --- checkpoints -------------------------------------------------------------------------------
    def _payload(self) -> dict:
        net = self.method.inference_model()
        return {
            "iteration": self.iteration, "total_iters": self.total_iters, "best_miou": self.best_miou,
            "metrics": self.last_metrics,
            "method_state": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
            "extra_optimizers": [o.state_dict() for o in self.extra_optimizers],
            "scaler": self.scaler.state_dict(), "rng": all_gather_objects(rng_state()),
            "config": asdict(self.cfg), "method": self.cfg.method,
            "classes": [asdict(c) for c in self.classes],
            "inference": {"state_dict": net.state_dict(), "cif": net.cif is not None},
            "labeled_count": len(self.labeled_ids), "data_fingerprint": self.data_fingerprint, "version": __version__,
        }

    def _sync_buffers(self) -> None:
        """BatchNorm statistics become one set across processes before they are validated or saved
        (SyncBatchNorm keeps them equal already)."""
        if self.dist.enabled and not self.sync_bn:
            average_buffers(self.method)

    def _save(self, name: str, payload: dict | None = None) -> None:
        payload = payload or self._payload()
        if self.dist.is_main:
            save_checkpoint(self.out / name, payload)

    def _resume(self) -> None:
        path = self.out / "last.pt"
        ckpt = load_checkpoint(path)
        saved = [(c["id"], c["name"]) for c in ckpt["classes"]]
        ours = [(c.id, c.name) for c in self.classes]
        if saved != ours:
            raise CheckpointError(f"{path}: trained on classes {saved}, but {self.root / 'classes.json'} has {ours}. "
                                  "Resume with the same dataset classes, or start a new run in another --out.")
        if ckpt["method"] != self.cfg.method:
            raise CheckpointError(f"{path}: a {ckpt['method']!r} run; pass --method {ckpt['method']} to resume it.")
        check_resume(path, ckpt, self.cfg, self.data_fingerprint)
        try:
            self.method.load_state_dict(ckpt["method_state"])
        except RuntimeError as err:
            raise CheckpointError(f"{path}: weights do not fit this run's model ({str(err).splitlines()[0]}).") from None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for opt, state in zip(self.extra_optimizers, ckpt.get("extra_optimizers", [])):
            opt.load_state_dict(state)
        self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration, self.best_miou, self.last_metrics = ckpt["iteration"], ckpt["best_miou"], ckpt["metrics"]
        states = ckpt["rng"]
        if len(states) != self.dist.world:
            raise CheckpointError(f"{path}: written by {len(states)} processes, resumed with {self.dist.world}; "
                                  "resume with the same number of processes for an exact continuation.")
        set_rng_state(states[self.dist.rank])

    def _init_from(self, source: InitSource) -> None:
        """Start from another run's network (CIF is kept from it when both have one, else fresh). A tensor shaped by
        the class count (the classifier) of a run on fewer classes keeps the earlier classes' weights; the new
        classes' part keeps this run's initialisation."""
        names = {id(module): name for name, module in self.method.named_modules()}
        kept, grown = [], []
        for net, prefix in self.method.init_targets():
            own = {k: v for k, v in net.state_dict().items() if k.startswith(prefix)}
            missing = [k for k in own if k not in source.state and not k.startswith("cif.")]
            dims = {k: class_dim(source.state[k].shape, own[k].shape, source.num_classes, len(self.classes))
                    for k in own if k in source.state and own[k].shape != source.state[k].shape}
            wrong = [k for k, dim in dims.items() if dim is None]
            if missing or wrong:
                raise CheckpointError(f"{source.path}: does not fit --backbone {self.cfg.model.backbone} --decoder "
                                      f"{self.cfg.model.decoder} ({len(missing)} missing, {len(wrong)} differently shaped "
                                      "tensors); give the run's own --backbone and --decoder.")
            weights = {k: v for k, v in source.state.items() if k in own and k not in dims}
            for k, dim in dims.items():
                weights[k] = own[k].clone()
                weights[k].narrow(dim, 0, source.num_classes).copy_(source.state[k])
            net.load_state_dict(weights, strict=False)
            where = names[id(net)]
            kept += [f"{where}.{k}" for k in weights if k not in dims]
            grown += [f"{where}.{k}" for k in dims]
        if self.progress:
            networks = [names[id(net)] for net, _ in self.method.init_targets()]
            print(init_report(source, self.classes, kept, grown, list(self.method.state_dict()), networks), flush=True)

    # --- loop --------------------------------------------------------------------------------------
    def validate(self) -> dict:
        val = EvalSet(self.root, self.val_ids, len(self.classes))
        d, r = self.cfg.data, self.cfg.run
        scales = tuple(sorted(set(r.val_scales) | {1.0}))
        return evaluate(self.method.inference_model(), val, [c.name for c in self.classes], self.device,
                        r.eval_mode, d.crop_size, scales=scales, rank=self.dist.rank, world=self.dist.world)

    def _log(self, record: dict) -> None:
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
            if self.board is not None:
                self.board.write(record)

    def fit(self) -> dict:
        cfg = self.cfg
        if self.dist.is_main:
            start_out_dir(self.out, cfg.run, self.iteration)
            if self.board is not None:
                self.board.open()
            text = config_yaml(resolved_config(cfg)).encode()
            atomic_write(self.out / CONFIG_FILE, lambda fh: fh.write(text))
        bar = tqdm(total=self.total_iters, initial=self.iteration, desc=f"train {cfg.method}", unit="it",
                   disable=not self.progress, dynamic_ncols=True)
        self.method.train()
        tic = time.time()
        while self.iteration < self.total_iters:
            epoch, start = divmod(self.iteration, self.iters_per_epoch)
            for batches in self._streams(epoch, start):
                if self.iteration >= self.total_iters:
                    break
                self._step(batches, epoch, bar, tic)
                tic = time.time()
        bar.close()
        if self.board is not None:
            self.board.close()
        barrier()
        return {"iterations": self.iteration, "best_miou": self.best_miou, "metrics": self.last_metrics}

    def _step(self, batches, epoch: int, bar, tic: float) -> None:
        cfg, it = self.cfg, self.iteration
        labeled = self._to_device(batches[0])
        unlabeled = self._to_device(batches[1]) if len(batches) > 1 else None
        partner = self._to_device(batches[2]) if len(batches) > 2 else None
        ctx = StepContext(it, epoch, self.total_iters, self.iters_per_epoch)
        lr = poly_lr(self.optimizer, it, self.total_iters, cfg.optim.poly_power)
        optimizers = (self.optimizer, *self.extra_optimizers)
        for opt in self.extra_optimizers:
            poly_lr(opt, it, self.total_iters, cfg.optim.poly_power)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            losses = self.ddp(labeled, unlabeled, partner, ctx)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"iteration {it}: loss is {loss.item()}; lower --lr or check the labels.")
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.optim.clip_grad_norm > 0:
            for opt in optimizers:
                self.scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(self.method.parameters(), cfg.optim.clip_grad_norm)
        for opt in optimizers:
            self.scaler.step(opt)
        self.scaler.update()
        self.method.after_step(ctx)
        self.iteration = it + 1

        if self.iteration % cfg.run.log_every == 0 or self.iteration == self.total_iters:
            record = {"iter": self.iteration, "epoch": epoch, "lr": lr, "sec_per_iter": time.time() - tic,
                      **{k: float(v.detach()) for k, v in losses.items()}}
            self._log(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}")
        bar.update()

        done = self.iteration == self.total_iters
        evaluate_now = self.iteration % self.eval_every == 0 or done
        save_now = self.iteration % self.save_every == 0 or done
        snapshot_now = cfg.run.snapshot_every > 0 and self.iteration % cfg.run.snapshot_every == 0
        if evaluate_now or save_now or snapshot_now:
            self._sync_buffers()
        if snapshot_now:
            self._save(f"{SNAPSHOTS}/{snapshot_name(self.iteration)}", inference_payload(self._payload()))
        if evaluate_now:
            result = self.validate()
            miou = result["scales"]["1.0"]["miou"]
            self.last_metrics = result
            self._log({"iter": self.iteration, "val_miou": miou, "val": result["scales"]["1.0"],
                       "val_miou_by_scale": {s: r["miou"] for s, r in result["scales"].items()}})
            if self.progress:
                bar.write(f"iter {self.iteration}: val mIoU {miou:.2f} (best {max(miou, self.best_miou):.2f})")
            if miou > self.best_miou:
                self.best_miou = miou
                self._save("best.pt")
        if save_now:
            self._save("last.pt")


@dataclass
class InitSource:
    """The network weights --init-from starts from, and the classes they were trained on."""
    path: Path
    state: dict
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def init_source(path: Path, classes: list, root: Path) -> InitSource:
    """--init-from's checkpoint, once its classes fit the dataset's: the same, or the first of them in the same
    order (classes added later, as `scaleseg data add-class` appends them)."""
    ckpt = load_checkpoint(path)
    old, new = [c["name"] for c in ckpt["classes"]], [c.name for c in classes]
    if len(old) > len(new):
        raise CheckpointError(f"{path}: trained on {len(old)} classes {old}, but {root / 'classes.json'} lists "
                              f"{len(new)} {new}; --init-from can add classes, never drop them. Start from a run on "
                              "these classes, or without --init-from.")
    if new[:len(old)] != old:
        raise CheckpointError(f"{path}: trained on classes {old}, but {root / 'classes.json'} lists {new}; --init-from "
                              "needs the run's classes first, in the same order (new classes after them, as `scaleseg "
                              "data add-class` appends them), or its classifier would label pixels as the wrong class.")
    return InitSource(path, ckpt["inference"]["state_dict"], old)


def class_dim(old: torch.Size, new: torch.Size, old_classes: int, new_classes: int) -> int | None:
    """The dimension by which a tensor of a run on ``old_classes`` differs from this run's on ``new_classes``; None
    when the shapes differ in another way."""
    differ = [d for d, (a, b) in enumerate(zip(old, new)) if a != b]
    if len(old) != len(new) or len(differ) != 1 or (old[differ[0]], new[differ[0]]) != (old_classes, new_classes):
        return None
    return differ[0]


def init_report(source: InitSource, classes: list, kept: list[str], grown: list[str], every: list[str],
                networks: list[str]) -> str:
    """What --init-from kept, re-initialised for new classes, and left fresh: state-dict keys of the method, by
    network (``networks``: the names of those it loads) and module."""
    def modules(keys):
        groups: dict[str, list[str]] = {}
        for key in keys:
            net = next((n for n in networks if key.startswith(f"{n}.")), None)
            if net is None:
                groups.setdefault(key.split(".")[0], [])
            else:
                groups.setdefault(net, []).append(key[len(net) + 1:].split(".")[0])
        return ", ".join(f"{g} ({', '.join(dict.fromkeys(parts))})" if parts else g for g, parts in groups.items())

    added = [c.name for c in classes[source.num_classes:]]
    lines = [f"init from {source.path}: kept {len(kept)} tensors: {modules(kept)}"]
    if grown:
        lines.append(f"  re-initialised for {len(classes)} classes (new: {', '.join(added)}), the {source.num_classes} "
                     f"earlier classes' weights kept: {modules(grown)}")
    loaded = {*kept, *grown}
    fresh = [k for k in every if k not in loaded and not k.endswith("num_batches_tracked")]
    if fresh:
        lines.append(f"  fresh (not in the checkpoint's network): {modules(fresh)}")
    return "\n".join(lines)


def config_from_checkpoint(ckpt: dict) -> TrainConfig:
    raw = dict(ckpt["config"])
    method_cls = get_method(raw.pop("method"))
    method_cfg = dataclass_from_dict(method_cls.Config, raw.pop("method_cfg") or {})
    cfg = dataclass_from_dict(TrainConfig, raw)
    cfg.method, cfg.method_cfg = method_cls.name, method_cfg
    return cfg
