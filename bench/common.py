"""Helpers shared by the benchmark scripts: machine description, timing, JSON + Markdown output."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import yaml

from training.checkpoint import load_checkpoint, training_finished
from training.data.datasets import EvalSet
from training.data.folder import image_path, load_image, mask_path, read_split
from training.data.transforms import to_tensor
from training.engine import build_method, config_from_checkpoint

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parents[1]


def child_env(threads: int | None = None) -> dict[str, str]:
    """The environment of a child process a benchmark starts: this checkout first on PYTHONPATH, the caller's own
    entries kept (a machine with packages installed beside the system's), and its thread count if given."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path} | ({"OMP_NUM_THREADS": str(threads)} if threads else {})


def machine() -> dict:
    # cpu_isa: the vector kernels ATen chose (AVX2, AVX512, ...); step times on one set do not compare with another's
    return {"cpu": platform.processor() or platform.machine(), "cpu_isa": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version()}


def require_finished_runs(runs: list[Path]) -> None:
    """Stop with which folder is not a finished `scaleseg train --out` run, before any is scored."""
    for run in runs:
        if not (run / "config.yaml").is_file() or not training_finished(run / "last.pt"):
            raise SystemExit(f"{run}: not a finished `scaleseg train --out` folder (needs config.yaml and the last.pt "
                             "of its final iteration; a run still training has an earlier one).")


def batch_runs_arguments(doc: str, name: str, runs_help: str, batch_help: str, batch: int | None = 4) -> argparse.Namespace:
    """The command line of a script that scores trained runs in batches: RUN..., --batch, --name, --results;
    stops before any work on a batch batch norm cannot normalise by, or on an unfinished run. A default batch
    of None leaves the choice to the script, per run."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help=runs_help)
    p.add_argument("--batch", type=int, default=batch, help=batch_help)
    p.add_argument("--name", default=name, help="results file name (NAME.json, NAME.md)")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.batch is not None and args.batch < 2:
        raise SystemExit(f"--batch {args.batch}: batch norm normalises by the batch, which needs two images or more.")
    require_finished_runs(args.runs)
    return args


def run_data(run: Path) -> Path:
    """The dataset folder a `scaleseg train --out` run trained on."""
    root = Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["root"])
    return root if root.is_absolute() else REPO / root


def load_trained_method(run: Path, expected: str, num_classes: int):
    """The training method (its networks and heads) of a run's last checkpoint; stops on another method's run."""
    ckpt = load_checkpoint(run / "last.pt")
    cfg = config_from_checkpoint(ckpt)
    if cfg.method != expected:
        raise SystemExit(f"{run}: a {cfg.method} run; this script scores {expected} runs.")
    # The checkpoint holds every weight, so the encoder's initial ones are not loaded.
    method = build_method(replace(cfg, model=replace(cfg.model, pretrained="")), num_classes)
    method.load_state_dict(ckpt["method_state"])
    return method, cfg


def set_mode(module: nn.Module, mode: str) -> None:
    """Inference mode, or training mode with every batch norm normalising by its batch and leaving its running
    statistics as they are (momentum 0); dropout is active as in training."""
    module.train(mode == "training")
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0


def scored_splits(data: Path, splits) -> Iterator[tuple[str, list[str] | None]]:
    """(split, its image ids) for each split whose every image has a mask, (split, None) for the others (a
    user's unlabelled pool has none), said once per split."""
    for split in splits:
        ids = read_split(data, split)
        missing = sum(not mask_path(data, i).is_file() for i in ids)
        if missing:
            print(f"{data}: {missing} of the {len(ids)} {split} images have no mask; {split} is not scored", flush=True)
        yield split, None if missing else ids


def require_batch_statistics(x: torch.Tensor, data: Path, split: str) -> None:
    """Stop on a batch of one in training mode, where batch norm has no batch to normalise by."""
    if len(x) == 1:
        raise SystemExit(f"{data}: an image of {split} has a size no neighbour shares, and training mode needs "
                         "batches of two or more; score a benchmark whose images share one size.")


def whole_image_batches(data: Path, ids: list[str], k: int, split: str, size: int, masks: bool = True):
    """(images, masks) of up to ``size`` consecutive images of one shape, normalised as the model takes them (masks
    None unless asked for); a lone last image joins the batch before it when it has that batch's shape, since batch
    norm cannot normalise by a batch of one."""
    samples = EvalSet(data, ids, k, split=split) if masks else (
        {"image": to_tensor(load_image(image_path(data, i, split)))} for i in ids)

    def stacked(group):
        return torch.stack([g["image"] for g in group]), torch.stack([g["mask"] for g in group]) if masks else None
    pending: list[dict] = []
    group: list[dict] = []
    for sample in samples:
        if group and (len(group) == size or sample["image"].shape != group[0]["image"].shape):
            if pending:
                yield stacked(pending)
            pending, group = group, []
        group.append(sample)
    if len(group) == 1 and pending and group[0]["image"].shape == pending[0]["image"].shape:
        pending, group = pending + group, []
    for g in (pending, group):
        if g:
            yield stacked(g)


def mean_std(values: list[float]) -> tuple[float, float]:
    """(mean, sample std) of a study's values over seeds; std 0 for a single value."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def mean_std_cell(values: list[float], digits: int = 1) -> str:
    """A table cell of values over runs: mean ± std, or the value alone for one run."""
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - tic


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """columns: (key, header); floats printed with 3 significant decimals."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return "-" if v is None else str(v)
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "---|" * len(columns)
    body = ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def write_results(name: str, payload: dict, table: str, note: str = "", results: Path = RESULTS,
                  script: str | None = None) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    m = payload["machine"]
    header = f"# {name}\n\nMachine: {m['cores']} cores ({m['cpu']}), torch {m['torch']}, {m['threads']} threads" + \
             (f", GPU {m['cuda']}" if m["cuda"] else ", no GPU") + f". Written by `bench/{script or name}.py`.\n\n"
    (results / f"{name}.md").write_text(header + (note + "\n\n" if note else "") + table + "\n")
    print(table)


def plot_bands(path: Path, panels: list[tuple[str, list[tuple[str, list, list, list]]]], xlabel: str,
               ylabel: str = "val mIoU x1.0", marker: str | None = None, vline: float | None = None) -> None:
    """One panel per (title, curves), side by side; each curve (label, x, mean, std) with its ± std band;
    ``vline`` marks an x in every panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels):
        for label, x, mean, std in curves:
            ax.plot(x, mean, marker=marker, label=label)
            ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.15)
        if vline is not None:
            ax.axvline(vline, color="grey", linestyle=":", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
