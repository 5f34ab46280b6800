"""Training throughput on this machine: one full optimiser step (forward, backward, SGD) per iteration for
the supervised baseline and ScaleMatch, DeepLabV3+ on ResNet-18 and ResNet-50, crop 321.

ScaleMatch's cost depends on the image scale v drawn each iteration, so each v in V is timed and the
mean (the expected cost under the uniform draw) is reported. Images/s counts every image an iteration
consumes (labelled + unlabelled)."""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, markdown_table, timed, write_results  # noqa: E402
from training.config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig  # noqa: E402
from training.engine import build_method, build_optimizer  # noqa: E402
from training.methods import StepContext, get_method  # noqa: E402


def fake_batches(b: int, crop: int, k: int, g: torch.Generator):
    def unl():
        return {"weak": torch.randn(b, 3, crop, crop, generator=g), "strong1": torch.randn(b, 3, crop, crop, generator=g),
                "strong2": torch.randn(b, 3, crop, crop, generator=g), "ignore": torch.zeros(b, crop, crop, dtype=torch.long),
                "box1": torch.zeros(b, crop, crop, dtype=torch.uint8), "box2": torch.zeros(b, crop, crop, dtype=torch.uint8)}
    return {"image": torch.randn(b, 3, crop, crop, generator=g), "mask": torch.randint(0, k, (b, crop, crop), generator=g)}, unl(), unl()


def time_method(method_name: str, backbone: str, crop: int, batch: int, iters: int, device: torch.device,
                scales: tuple[float, ...] | None = None) -> dict:
    torch.manual_seed(0)
    cls = get_method(method_name)
    cfg = TrainConfig(method=method_name, data=DataConfig(crop_size=crop, batch_size=batch),
                      model=ModelConfig(backbone=backbone), optim=OptimConfig(lr=0.001), run=RunConfig(),
                      method_cfg=cls.Config(conf_thresh=0.0) if method_name == "scalematch" else cls.Config())
    method = build_method(cfg, 21).to(device).train()
    opt = build_optimizer(method, cfg)
    batches = [{k: v.to(device) for k, v in b.items()} for b in fake_batches(batch, crop, 21, torch.Generator().manual_seed(0))]
    ctx = StepContext(0, 0, 100, 10)

    def step():
        loss = method(*batches, ctx)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    if method_name == "scalematch":
        scales = scales or tuple(cfg.method_cfg.img_scales)
    else:
        scales = (None,)
    per_scale = {}
    for v in scales:
        if v is not None:
            fs = 0.75 if v > 1 else 1.25 if v < 1 else 1.0
            method.draw_scales = lambda v=v, fs=fs: (v, fs)
        step()  # warm-up
        per_scale[v] = statistics.median(timed(step, device) for _ in range(iters))
    drawn = [t for v, t in per_scale.items() if v is None or v in getattr(cfg.method_cfg, "img_scales", ())]
    sec = statistics.mean(drawn)
    images = batch * (2 if cls.uses_unlabeled else 1)
    row = {"method": method_name, "backbone": backbone, "crop": crop, "batch": f"{batch}+{batch}" if cls.uses_unlabeled else str(batch),
           "sec_per_iter": sec, "images_per_sec": images / sec}
    if v is not None:
        row["sec_per_iter_by_scale"] = {str(k): t for k, t in per_scale.items()}
    print(row, flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--crop", type=int, default=321)
    p.add_argument("--batch", type=int, default=2, help="labelled images per step (unlabelled: the same)")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per setting (median)")
    p.add_argument("--backbones", default="resnet18,resnet50")
    p.add_argument("--methods", default="supervised,scalematch")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = [time_method(m, bb, args.crop, args.batch, args.iters, device)
            for bb in args.backbones.split(",") for m in args.methods.split(",")]
    table = markdown_table(rows, [("method", "method"), ("backbone", "backbone"), ("crop", "crop"), ("batch", "batch (l+u)"),
                                  ("sec_per_iter", "s / iter"), ("images_per_sec", "images / s")])
    write_results("train_speed", {"machine": machine(), "device": str(device), "args": vars(args), "rows": rows}, table,
                  "One optimiser step per iteration (forward + backward + SGD), random inputs, median of timed "
                  "iterations; ScaleMatch averaged over its four image scales.")


if __name__ == "__main__":
    main()
