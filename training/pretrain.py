"""`scaleseg pretrain DATA`: self-supervised pretraining of the encoder on the dataset's own images.

Users without ImageNet weights for their domain (microscopy, remote sensing, industrial parts) otherwise
start semi-supervised training from a random encoder, whose first pseudo-labels are noise. This learns an
encoder from every training image, labelled or not, with no labels at all, and writes it in the
torchvision ResNet layout that ``scaleseg train --pretrained`` loads.

The objective is BYOL (Grill et al., NeurIPS 2020) made dense, as DenseCL (Wang et al., CVPR 2021) does
for contrastive learning: two random crops of one image, photometrically distorted; an online network
(encoder, projector, predictor) predicts an EMA target network's projection of the other crop, both for
the pooled image vector and for every feature cell. BYOL needs no negatives, so it works with the small
batches a CPU affords. Dense cells are matched by geometry rather than by feature similarity (DenseCL's
choice, needed there because its crops carry no coordinates): we know where each crop came from, so each
cell of one view is compared with the target at the same image point in the other view, and cells outside
the overlap are left out. Segmentation needs per-pixel features, which the global loss alone does not train.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .config import CONFIG_FILE, ConfigError, config_yaml, flag_name, hp
from .data import transforms as T
from .data.datasets import EpochSampler
from .data.folder import atomic_write, image_path, load_image, read_split
from .models.encoders.resnet import CHANNELS, ResNetEncoder


@dataclass
class PretrainConfig:
    data: str
    out: str = hp("runs/pretrain", "output folder: encoder.pth, metrics.jsonl, config.yaml")
    backbone: str = hp("resnet18", f"encoder to pretrain: {', '.join(CHANNELS)}")
    iters: int = hp(2000, "training iterations")
    crop: int = hp(96, "side of each random view in pixels")
    batch_size: int = hp(16, "images per step; each gives two views")
    lr: float = hp(0.05, "SGD learning rate, cosine-decayed to 0 (momentum 0.9)")
    weight_decay: float = hp(1e-4, "SGD weight decay")
    ema: float = hp(0.99, "BYOL's base target momentum, raised to 1 on a cosine over the run")
    dense_weight: float = hp(0.5, "share of the dense loss in the total, DenseCL's lambda")
    crop_scale: tuple[float, float] = hp((0.3, 1.0), "area range of each random crop, as a fraction of the image")
    proj_dim: int = hp(128, "projection size (BYOL: 256 at ImageNet scale)")
    hidden_dim: int = hp(512, "hidden width of the projector and predictor MLPs")
    seed: int = hp(0, "seed for weights, views and data order")
    device: str = hp("auto", "auto, cpu or cuda")
    num_workers: int = hp(1, "data-loading worker processes")
    log_every: int = hp(20, "append the losses to metrics.jsonl every N iterations")
    force: bool = False
    splits: tuple[str, ...] = field(default=("labeled", "unlabeled"))


# --- views and their geometry ----------------------------------------------------------------------
def sample_crop(width: int, height: int, rng: np.random.Generator, scale: tuple[float, float],
                ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[float, float, float, float]:
    """A random box (x0, y0, x1, y1) in pixels covering ``scale`` of the image area at an aspect ratio in
    ``ratio`` (torchvision's RandomResizedCrop), clipped to the image when the ratio cannot fit."""
    area = rng.uniform(*scale) * width * height
    r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w = min(width, math.sqrt(area * r))
    h = min(height, math.sqrt(area / r))
    x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
    return x0, y0, x0 + w, y0 + h


def correspondence(box_a: torch.Tensor, flip_a: torch.Tensor, box_b: torch.Tensor, flip_b: torch.Tensor,
                   size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each cell of view a's ``size`` x ``size`` feature map, where its centre lies in view b.

    Boxes are [N, 4] image-pixel (x0, y0, x1, y1), flips [N] booleans (the view was mirrored after the
    crop). Returns a ``grid_sample`` grid [N, size, size, 2] in view b's [-1, 1] coordinates
    (align_corners=False) and a [N, size, size] mask of the cells whose point falls inside view b."""
    u = (torch.arange(size, dtype=torch.float32) + 0.5) / size  # cell centres in [0, 1]
    ua = torch.where(flip_a[:, None], 1 - u[None], u[None])  # [N, size], horizontal
    xs = box_a[:, 0:1] + ua * (box_a[:, 2:3] - box_a[:, 0:1])
    ys = box_a[:, 1:2] + u[None] * (box_a[:, 3:4] - box_a[:, 1:2])
    ub = (xs - box_b[:, 0:1]) / (box_b[:, 2:3] - box_b[:, 0:1])
    ub = torch.where(flip_b[:, None], 1 - ub, ub)
    vb = (ys - box_b[:, 1:2]) / (box_b[:, 3:4] - box_b[:, 1:2])
    gx, gy = ub[:, None, :].expand(-1, size, -1), vb[:, :, None].expand(-1, -1, size)
    grid = torch.stack([gx, gy], dim=-1) * 2 - 1
    valid = (gx >= 0) & (gx <= 1) & (gy >= 0) & (gy <= 1)
    return grid, valid


class TwoViews(Dataset):
    """Every training image, labelled or not, as two distorted random crops with their boxes and flips."""

    def __init__(self, root: Path, ids: list[tuple[str, str]], crop: int, scale: tuple[float, float]):
        self.root, self.ids, self.crop, self.scale = root, ids, crop, scale

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, seed = item
        rng = np.random.Generator(np.random.PCG64(seed))
        split, image_id = self.ids[index]
        img = load_image(image_path(self.root, image_id, split))
        sample = {}
        for v in ("a", "b"):
            box = sample_crop(*img.size, rng, self.scale)
            view = img.resize((self.crop, self.crop), resample=2, box=box)  # 2: bilinear
            flip = bool(rng.random() < 0.5)
            if flip:
                view = view.transpose(0)  # FLIP_LEFT_RIGHT
            sample[v] = T.to_tensor(T.strong(view, rng))
            sample[f"box_{v}"] = torch.tensor(box, dtype=torch.float32)
            sample[f"flip_{v}"] = torch.tensor(flip)
        return sample


# --- networks and loss -----------------------------------------------------------------------------
def _mlp(dim_in: int, hidden: int, dim_out: int, dense: bool) -> nn.Sequential:
    """BYOL's MLP (linear, BN, ReLU, linear); as 1x1 convolutions for the dense branch."""
    if dense:
        return nn.Sequential(nn.Conv2d(dim_in, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
                             nn.Conv2d(hidden, dim_out, 1))
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, dim_out))


class Branch(nn.Module):
    """Encoder plus the global and dense projectors: the part the target network mirrors."""

    def __init__(self, backbone: str, hidden: int, proj: int):
        super().__init__()
        self.encoder = ResNetEncoder(backbone, output_stride=16)
        channels = CHANNELS[backbone][3]
        self.global_proj = _mlp(channels, hidden, proj, dense=False)
        self.dense_proj = _mlp(channels, hidden, proj, dense=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.encoder(x)[1]
        return self.global_proj(feat.mean(dim=(2, 3))), self.dense_proj(feat)


def byol_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos, per vector (channel dim 1)."""
    return 2 - 2 * F.cosine_similarity(pred, target.detach(), dim=1)


class DenseBYOL(nn.Module):
    def __init__(self, cfg: PretrainConfig):
        super().__init__()
        self.online = Branch(cfg.backbone, cfg.hidden_dim, cfg.proj_dim)
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        self.global_pred = _mlp(cfg.proj_dim, cfg.hidden_dim, cfg.proj_dim, dense=False)
        self.dense_pred = _mlp(cfg.proj_dim, cfg.hidden_dim, cfg.proj_dim, dense=True)
        self.dense_weight = cfg.dense_weight

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        views = torch.cat([batch["a"], batch["b"]])
        g_on, d_on = self.online(views)
        g_pred, d_pred = self.global_pred(g_on), self.dense_pred(d_on)
        with torch.no_grad():
            g_tgt, d_tgt = self.target(views)
        n = batch["a"].shape[0]
        swap = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])  # each view is scored against the other
        glob = byol_loss(g_pred, g_tgt[swap]).mean()
        boxes, flips = torch.cat([batch["box_a"], batch["box_b"]]), torch.cat([batch["flip_a"], batch["flip_b"]])
        grid, valid = correspondence(boxes, flips, boxes[swap], flips[swap], d_pred.shape[-1])
        matched = F.grid_sample(d_tgt[swap], grid.to(d_tgt.device), mode="bilinear", align_corners=False)
        per_cell = byol_loss(d_pred, matched)
        valid = valid.to(per_cell.device)
        dense = (per_cell * valid).sum() / valid.sum().clamp(min=1)
        total = (1 - self.dense_weight) * glob + self.dense_weight * dense
        return {"loss": total, "global": glob.detach(), "dense": dense.detach(),
                "overlap": valid.float().mean().detach()}

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        for t, o in zip(self.target.parameters(), self.online.parameters()):
            t.mul_(momentum).add_(o.detach(), alpha=1 - momentum)
        for t, o in zip(self.target.buffers(), self.online.buffers()):
            t.copy_(o)


def target_momentum(base: float, step: int, total: int) -> float:
    """BYOL's schedule: base at the start, 1 at the end, on a cosine."""
    return 1 - (1 - base) * (math.cos(math.pi * step / total) + 1) / 2


def torchvision_state(encoder: ResNetEncoder) -> dict[str, torch.Tensor]:
    """The encoder's weights under torchvision's ResNet names (what ``--pretrained`` loads)."""
    rename = {"stem.0.": "conv1.", "stem.1.": "bn1."}
    out = {}
    for key, value in encoder.state_dict().items():
        for old, new in rename.items():
            if key.startswith(old):
                key = new + key[len(old):]
        out[key] = value.detach().cpu().clone()
    return out


# --- the run ---------------------------------------------------------------------------------------
def _loader(cfg: PretrainConfig, root: Path) -> tuple[DataLoader, EpochSampler, int]:
    ids = [(split, i) for split in cfg.splits for i in read_split(root, split, required=False)]
    if len(ids) < cfg.batch_size:
        raise ConfigError(f"{root}: {len(ids)} training images in splits {', '.join(cfg.splits)}; pretraining needs "
                          f"at least --batch-size ({cfg.batch_size}). Add unlabelled images or lower --batch-size.")
    dataset = TwoViews(root, ids, cfg.crop, cfg.crop_scale)
    per_epoch = len(ids) // cfg.batch_size * cfg.batch_size
    sampler = EpochSampler(len(dataset), per_epoch, cfg.seed, stream=7)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        drop_last=True, persistent_workers=cfg.num_workers > 0)
    return loader, sampler, len(ids)


def pretrain(cfg: PretrainConfig, progress: bool = True) -> Path:
    """Train and write ``OUT/encoder.pth`` (torchvision layout) and ``OUT/metrics.jsonl``; returns the weights path."""
    from .engine import resolve_device, seed_everything
    root, out = Path(cfg.data), Path(cfg.out)
    if cfg.backbone not in CHANNELS:
        raise ConfigError(f"--backbone {cfg.backbone}: not available; choose {', '.join(CHANNELS)}.")
    if cfg.iters < 1 or cfg.crop < 32 or cfg.batch_size < 2:
        raise ConfigError("scaleseg pretrain: needs --iters >= 1, --crop >= 32 and --batch-size >= 2 "
                          "(BatchNorm in the projector needs two images).")
    loader, sampler, n_images = _loader(cfg, root)
    weights = out / "encoder.pth"
    if weights.exists() and not cfg.force:
        raise ConfigError(f"{weights}: exists. Choose another --out, or pass --force to replace it.")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    model = DenseBYOL(cfg).to(device)
    params = [p for name, p in model.named_parameters() if not name.startswith("target.")]
    optim = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optim, lambda k: 0.5 * (1 + math.cos(math.pi * k / cfg.iters)))
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    text = config_yaml(asdict(cfg)).encode()
    atomic_write(out / CONFIG_FILE, lambda fh: fh.write(text))
    print(f"pretrain {cfg.backbone}: {n_images} images, {cfg.iters} iterations, batch {cfg.batch_size} x 2 views, "
          f"crop {cfg.crop}, {device}", flush=True)
    bar = tqdm(total=cfg.iters, desc="pretrain", unit="it", disable=not progress, dynamic_ncols=True)
    step, epoch = 0, 0
    model.train()
    while step < cfg.iters:
        sampler.set_epoch(epoch)
        epoch += 1
        for batch in loader:
            step, loss = _step(model, optim, schedule, batch, device, step, cfg)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if step == cfg.iters:
                break
    bar.close()
    atomic_write(weights, lambda fh: torch.save(torchvision_state(model.online.encoder), fh))
    print(f"encoder weights: {weights}\nnext: scaleseg train {root} --backbone {cfg.backbone} --pretrained {weights} ...",
          flush=True)
    return weights


def _step(model: DenseBYOL, optim, schedule, batch: dict, device, step: int, cfg: PretrainConfig) -> tuple[int, float]:
    """One optimisation step and its log line; returns the new step count and the loss."""
    batch = {k: v.to(device, non_blocking=True) if k in ("a", "b") else v for k, v in batch.items()}
    losses = model(batch)
    if not torch.isfinite(losses["loss"]):
        raise ConfigError(f"scaleseg pretrain: the loss became {losses['loss'].item()} at iteration {step}; "
                          f"--lr {cfg.lr} is too high for this data, lower it.")
    optim.zero_grad(set_to_none=True)
    losses["loss"].backward()
    optim.step()
    schedule.step()
    step += 1
    model.update_target(target_momentum(cfg.ema, step, cfg.iters))
    if step % cfg.log_every == 0 or step == cfg.iters:
        record = {"iter": step, **{k: round(v.item(), 5) for k, v in losses.items()}, "lr": schedule.get_last_lr()[0]}
        with open(Path(cfg.out) / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
    return step, losses["loss"].item()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scaleseg pretrain", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data", help="dataset folder; its labelled and unlabelled images are used, without masks")
    defaults = PretrainConfig(data="")
    for f in ("out", "backbone", "iters", "crop", "batch_size", "lr", "weight_decay", "ema", "dense_weight",
              "proj_dim", "hidden_dim", "seed", "device", "num_workers", "log_every"):
        value = getattr(defaults, f)
        meta = PretrainConfig.__dataclass_fields__[f].metadata
        p.add_argument(flag_name(f), type=type(value), default=value,
                       help=meta["help"])
    p.add_argument("--crop-scale", type=float, nargs=2, default=defaults.crop_scale, metavar=("MIN", "MAX"),
                   help=PretrainConfig.__dataclass_fields__["crop_scale"].metadata.get("help"))
    p.add_argument("--force", action="store_true", help="replace an existing OUT/encoder.pth")
    return p


def main(argv: list[str]) -> int:
    ns = parser().parse_args(argv)
    cfg = PretrainConfig(**{k: (tuple(v) if k == "crop_scale" else v) for k, v in vars(ns).items()})
    pretrain(cfg)
    return 0
