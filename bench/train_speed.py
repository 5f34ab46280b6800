"""Training throughput on this machine: one full optimiser step (forward, backward, SGD) per iteration for
the supervised baseline and ScaleMatch, DeepLabV3+ on ResNet-18 and ResNet-50, crop 321.

ScaleMatch's cost depends on the image scale v drawn each iteration, so each v in V is timed and the
mean (the expected cost under the uniform draw) is reported. Images/s counts every image an iteration
consumes (labelled + unlabelled). Each row runs in a fresh process, so its peak RSS (the child's ru_maxrss:
weights, optimiser state, activations of the step) is that row's alone. ``METHOD+AUX`` adds an auxiliary
loss (e.g. ``fixmatch+contextrast``).

``--ratios`` instead compares, in one run, ScaleMatch with UniMatch at the same crop and batch and float32
with bfloat16 autocast (``--amp-cpu``; float16 on CUDA): the settings are timed in interleaved rounds, one
step each per round, so drift in the shared machine's load hits all of them alike; every ratio is taken
per round and reported as median [min, max]. ScaleMatch's cost per round is its expected cost under its
own draw: the mean over v in V of the mean over the feature scales t paired with v."""
from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, markdown_table, timed, write_results  # noqa: E402
from training.config import AuxConfig, DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig  # noqa: E402
from training.config import ConfigError  # noqa: E402
from training.engine import autocast_dtype, build_method, build_optimizer, cpu_has_bf16  # noqa: E402
from training.methods import StepContext, get_method  # noqa: E402


def fake_batches(b: int, crop: int, k: int, g: torch.Generator):
    def unl():
        return {"weak": torch.randn(b, 3, crop, crop, generator=g), "strong1": torch.randn(b, 3, crop, crop, generator=g),
                "strong2": torch.randn(b, 3, crop, crop, generator=g), "ignore": torch.zeros(b, crop, crop, dtype=torch.long),
                "box1": torch.zeros(b, crop, crop, dtype=torch.uint8), "box2": torch.zeros(b, crop, crop, dtype=torch.uint8)}
    return {"image": torch.randn(b, 3, crop, crop, generator=g), "mask": torch.randint(0, k, (b, crop, crop), generator=g)}, unl(), unl()


def time_method(method_name: str, backbone: str, crop: int, batch: int, iters: int, device: torch.device,
                scales: tuple[float, ...] | None = None) -> dict:
    method, step = make_step(method_name, backbone, crop, batch, device)
    cls = type(method)

    if method_name.partition("+")[0] == "scalematch":
        scales = scales or tuple(method.cfg.img_scales)
    else:
        scales = (None,)
    per_scale = {}
    for v in scales:
        if v is not None:
            fs = 0.75 if v > 1 else 1.25 if v < 1 else 1.0
            method.draw_scales = lambda v=v, fs=fs: (v, fs)
        step()  # warm-up
        per_scale[v] = statistics.median(timed(step, device) for _ in range(iters))
    drawn = [t for v, t in per_scale.items() if v is None or v in getattr(method.cfg, "img_scales", ())]
    sec = statistics.mean(drawn)
    images = batch * (2 if cls.uses_unlabeled else 1)
    row = {"method": method_name, "backbone": backbone, "crop": crop, "batch": f"{batch}+{batch}" if cls.uses_unlabeled else str(batch),
           "sec_per_iter": sec, "images_per_sec": images / sec}
    if v is not None:
        row["sec_per_iter_by_scale"] = {str(k): t for k, t in per_scale.items()}
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        row["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    print(row, flush=True)
    return row


def time_method_alone(*args) -> dict:
    """time_method in a fresh process, so that the peak RSS it reports belongs to this row only."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(time_method, *args).result()


def make_step(method_name: str, backbone: str, crop: int, batch: int, device: torch.device,
              dtype: torch.dtype | None = None, channels_last: bool = False, **method_overrides):
    """(method, step): one optimiser step on fixed random batches, under autocast when ``dtype`` is given.
    ``method_name`` may be METHOD+AUX."""
    torch.manual_seed(0)
    base, _, aux = method_name.partition("+")
    cls = get_method(base)
    overrides = {"conf_thresh": 0.0} if hasattr(cls.Config, "conf_thresh") else {}
    cfg = TrainConfig(method=base, data=DataConfig(crop_size=crop, batch_size=batch),
                      model=ModelConfig(backbone=backbone, pretrained="none"), optim=OptimConfig(lr=0.001), run=RunConfig(),
                      method_cfg=cls.Config(**overrides, **method_overrides), aux=AuxConfig(aux=aux))
    method = build_method(cfg, 21).to(device).train()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    method.to(memory_format=layout)
    opt = build_optimizer(method, cfg)
    batches = [{k: (v.to(device).contiguous(memory_format=layout) if v.dim() == 4 else v.to(device)) for k, v in b.items()}
               for b in fake_batches(batch, crop, 21, torch.Generator().manual_seed(0))]
    ctx = StepContext(0, 0, 100, 10)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = method(*batches, ctx)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return method, step


def expected_flops(parts: list) -> float:
    """FLOPs of one iteration, forward and backward, counted by PyTorch's FlopCounterMode (convolutions and
    matrix products, the arithmetic that dominates), as the probability-weighted sum over ``parts``: one
    (step, weight) for a fixed-cost method, one per (v, t) pair for ScaleMatch. Unlike seconds, this does not
    depend on the machine's load, so it says how much of a time ratio is arithmetic and how much is waste."""
    from torch.utils.flop_counter import FlopCounterMode
    total = 0.0
    for fn, weight in parts:
        with FlopCounterMode(display=False) as counter:
            fn()
        total += weight * counter.get_total_flops()
    return total


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def pinned_draws(method, step) -> list:
    """(step with ScaleMatch's draw pinned to one (v, t) pair, that pair's probability) for every pair."""
    draws = []
    for v, t, weight in method.scale_draws():
        def pinned(v=v, t=t):
            method.draw_scales = lambda: (v, t)
            step()
        draws.append((pinned, weight))
    return draws


def ratio_rows(backbone: str, crop: int, batch: int, rounds: int, device: torch.device) -> dict:
    """Per-round seconds of UniMatch and ScaleMatch (expected over its draw) in float32 and low precision,
    ScaleMatch with the official fused-only labelled loss (no plain-path pass) in float32, and bf16 with
    channels-last for UniMatch; the ratios between them per round."""
    try:
        low = autocast_dtype(device.type, amp=True, amp_cpu=True, cpu_bf16=cpu_has_bf16())
    except ConfigError:
        low = None  # no native bf16 here: float32 rows only
    settings = {}  # name -> list of (step, weight) whose weighted sum is one iteration's expected cost
    for precision, dtype in [("fp32", None)] + ([(str(low).replace("torch.", ""), low)] if low else []):
        _, step = make_step("unimatch", backbone, crop, batch, device, dtype)
        settings[f"unimatch {precision}"] = [(step, 1.0)]
        settings[f"scalematch {precision}"] = pinned_draws(*make_step("scalematch", backbone, crop, batch, device, dtype))
        if dtype is None:
            settings["scalematch fp32 official"] = pinned_draws(*make_step("scalematch", backbone, crop, batch, device,
                                                                          plain_sup_weight=0.0))
        else:
            _, step = make_step("unimatch", backbone, crop, batch, device, dtype, channels_last=True)
            settings[f"unimatch {precision} channels-last"] = [(step, 1.0)]
    for parts in settings.values():  # warm-up: first calls allocate and pick kernels
        for fn, _ in parts:
            fn()
    seconds = {name: [] for name in settings}
    for _ in range(rounds):
        for name, parts in settings.items():
            seconds[name].append(sum(weight * timed(fn, device) for fn, weight in parts))
    flops = {name: expected_flops(parts) for name, parts in settings.items()}
    rows = [{"setting": name, "sec_per_iter": spread(ts), "iters_per_sec": 1 / statistics.median(ts),
             "gflop_per_iter": flops[name] / 1e9} for name, ts in seconds.items()]

    def ratio(num: str, den: str) -> dict | None:
        if num not in seconds or den not in seconds:
            return None
        return {"ratio": f"{num} / {den}", **spread([a / b for a, b in zip(seconds[num], seconds[den])]),
                "flop_ratio": flops[num] / flops[den]}
    precision = str(low).replace("torch.", "") if low else None
    ratios = [r for r in [ratio("scalematch fp32", "unimatch fp32"), ratio("scalematch fp32 official", "unimatch fp32"),
                          ratio(f"scalematch {precision}", f"unimatch {precision}"),
                          ratio("unimatch fp32", f"unimatch {precision}"),
                          ratio("scalematch fp32", f"scalematch {precision}"),
                          ratio(f"unimatch {precision}", f"unimatch {precision} channels-last")] if r]
    return {"rows": rows, "ratios": ratios, "seconds": seconds, "flops": flops}


def write_ratios(args, device: torch.device) -> None:
    result = ratio_rows(args.backbones.split(",")[0], args.crop, args.batch, args.rounds, device)
    for row in result["rows"]:
        row.update({f"sec_{k}": v for k, v in row.pop("sec_per_iter").items()})
    rows_table = markdown_table(result["rows"], [("setting", "setting"), ("sec_median", "s / iter (median)"),
                                                  ("sec_min", "min"), ("sec_max", "max"), ("iters_per_sec", "it / s"),
                                                  ("gflop_per_iter", "GFLOP / iter")])
    ratio_table = markdown_table(result["ratios"], [("ratio", "ratio of s / iter"), ("median", "median"), ("min", "min"),
                                                    ("max", "max"), ("flop_ratio", "ratio of FLOPs")])
    note = (f"{args.backbones.split(',')[0]}, crop {args.crop}, batch {args.batch}+{args.batch}, {args.rounds} interleaved "
            "rounds of one optimiser step per setting (random inputs, after one warm-up step each); ScaleMatch's "
            "s / iter is its expected cost over its (v, t) draw; 'official' is --plain-sup-weight 0 (the released code's "
            "fused-only labelled loss, no extra decoder pass for the plain path). Ratios are taken per round. GFLOP / iter: "
            "forward and backward, counted by torch.utils.flop_counter (expected over ScaleMatch's draw); a time ratio "
            "below the FLOP ratio means the extra passes run at least as efficiently as UniMatch's.")
    write_results(f"{args.name}_ratios", {"machine": machine(), "device": str(device), "args": vars(args), **result},
                  rows_table + "\n\n" + ratio_table, note, script="train_speed")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--crop", type=int, default=321)
    p.add_argument("--batch", type=int, default=2, help="labelled images per step (unlabelled: the same)")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per setting (median)")
    p.add_argument("--backbones", default="resnet18,resnet50")
    p.add_argument("--methods", default="supervised,scalematch", help="comma-separated; METHOD+AUX adds an "
                   "auxiliary loss, e.g. fixmatch+contextrast")
    p.add_argument("--name", default="train_speed", help="results file name in bench/results/ (--ratios: NAME_ratios)")
    p.add_argument("--ratios", action="store_true", help="ScaleMatch / UniMatch and fp32 / bf16 ratios instead "
                   "(first backbone of --backbones; results in NAME_ratios)")
    p.add_argument("--rounds", type=int, default=5, help="--ratios: interleaved timing rounds")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.ratios:
        write_ratios(args, device)
        return
    rows = [time_method_alone(m, bb, args.crop, args.batch, args.iters, device)
            for bb in args.backbones.split(",") for m in args.methods.split(",")]
    table = markdown_table(rows, [("method", "method"), ("backbone", "backbone"), ("crop", "crop"), ("batch", "batch (l+u)"),
                                  ("sec_per_iter", "s / iter"), ("images_per_sec", "images / s"),
                                  ("peak_rss_mib", "peak RSS MiB")] + ([("peak_gpu_mib", "peak GPU MiB")] if device.type == "cuda" else []))
    write_results(args.name, {"machine": machine(), "device": str(device), "args": vars(args), "rows": rows}, table,
                  "One optimiser step per iteration (forward + backward + SGD), random inputs, median of timed "
                  "iterations; ScaleMatch averaged over its four image scales. Each row ran in a fresh process; "
                  "peak RSS is that process's maximum resident set (on CUDA, peak GPU memory is PyTorch's maximum allocated).",
                  script="train_speed")


if __name__ == "__main__":
    main()
