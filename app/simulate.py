"""`scaleseg label simulate DATA`: the active-labeling loop with an oracle, to choose a selection strategy on
one's own data before paying annotators.

Every image of DATA's labelled and unlabelled splits that has a mask is the pool. All strategies start from
the same ``initial`` images drawn from it (``seed``), so round 0 (``initial_iters`` iterations from random
init, or from ``init_from``) is trained once, in OUT/initial, and shared: every strategy's curve starts from
the same model. Each round then scores val, exports the model as the app's retraining does, selects ``k``
of the remaining pool with the strategy (the app's scoring and selection code; ``random`` draws them),
reveals their masks (the oracle) and records the labelling effort their pre-annotations would have cost;
the next round fine-tunes ``iters`` iterations from the round before, with the app's training code.
Results: OUT/simulation.{json,md,png}, mIoU against labelled images, one curve per strategy.

OUT/initial/data and OUT/<strategy>/data are the simulation's own dataset folders (DATA's images and masks
linked, DATA's val split, their own training splits), so DATA is never written. Each finished round is
recorded (OUT/<strategy>/round<r>/row.json, atomically); running the same command again continues after the
last finished round, and a round killed half-way starts over from the round before, with the same seeds, so
the curve is the one an uninterrupted run draws.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from training.config import ConfigError, DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig, check_counts
from training.data.folder import atomic_write, mask_path, read_split, write_split, write_text
from training.methods import METHODS, get_method

from . import acquisition
from .labeling import labeling_effort
from .scoring import score_unlabeled, select_next

STRATEGIES = ("random",) + acquisition.FUNCTIONS
CIF_SCALES = (0.5, 2.0)  # as the app's retraining exports a ScaleMatch model


class SimulationError(ValueError):
    """Settings or data the simulation cannot run with; the message says what to change."""


def oracle_pool(data: Path) -> list[str]:
    """The ids of DATA's labelled and unlabelled splits that have a mask (what the oracle can reveal)."""
    ids = read_split(data, "labeled", required=False) + read_split(data, "unlabeled", required=False)
    return sorted(i for i in set(ids) if mask_path(data, i).is_file())


def check_settings(data: Path, settings: dict) -> list[str]:
    """The pool, after checking that the settings can run on DATA; SimulationError otherwise."""
    unknown = [s for s in settings["strategies"] if s not in STRATEGIES]
    if unknown or not settings["strategies"]:
        raise SimulationError(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    if settings["method"] not in METHODS:
        raise SimulationError(f"unknown method {settings['method']!r}; choose from {', '.join(METHODS)}")
    if "scale_disagreement" in settings["strategies"] and settings["method"] != "scalematch":
        raise SimulationError("scale_disagreement compares single-scale and CIF multi-scale predictions, which only a "
                              "ScaleMatch model has: pass --method scalematch or leave scale_disagreement out")
    if min(settings["initial"], settings["k"], settings["rounds"], settings["iters"], settings["initial_iters"]) < 1:
        raise SimulationError("--initial, -k, --rounds, --iters and --initial-iters must each be at least 1")
    try:
        check_counts(train_config(settings, data, Path("."), 0, ""))
    except ConfigError as err:
        raise SimulationError(str(err)) from None
    if settings["init_from"] and not Path(settings["init_from"]).is_file():
        raise SimulationError(f"--init-from {settings['init_from']}: no such checkpoint; give a scaleseg checkpoint "
                              "(RUN/last.pt) or leave it out to start round 0 from random init")
    pool = oracle_pool(data)
    needed = settings["initial"] + settings["k"] * settings["rounds"]
    if len(pool) < needed:
        raise SimulationError(f"{data}: {len(pool)} labelled or unlabelled images have masks, but --initial "
                              f"{settings['initial']} + {settings['rounds']} rounds x {settings['k']} need {needed}; "
                              "lower them or add masks")
    val = read_split(data, "val", required=False)
    if not val or not all(mask_path(data, i).is_file() for i in val):
        raise SimulationError(f"{data / 'splits' / 'val.txt'}: the simulation scores every round on val; list "
                              "validation ids there, each with its mask")
    return pool


def start_or_resume(out: Path, settings: dict) -> dict:
    """The settings of a new simulation, recorded; or of a resumed one, checked to be the same but for the
    strategies, which add up (a strategy added later runs beside those already finished)."""
    path = out / "settings.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v and k != "strategies"}
        if changed:
            raise SimulationError(f"{out}: holds a simulation with other settings "
                                  f"({'; '.join(f'{k}: {a} -> {b}' for k, (a, b) in changed.items())}); pass its "
                                  "settings to continue it, or another --out")
        settings = {**settings, "strategies": list(dict.fromkeys(saved["strategies"] + settings["strategies"]))}
    write_text(path, json.dumps(settings, indent=2))
    return settings


def simulation_data(folder: Path, data: Path) -> Path:
    """A dataset folder of the simulation: DATA's classes, val split, images and masks (linked, never written);
    the training splits are its own."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(data / "classes.json", folder / "classes.json")
    for name in ("images", "masks"):
        link = folder / name
        if not link.is_symlink():
            link.symlink_to((data / name).resolve(), target_is_directory=True)
    write_split(folder, "val", read_split(data, "val"))
    return folder


def train_config(settings: dict, data: Path, out: Path, round_: int, init_from: Path | str) -> TrainConfig:
    method = get_method(settings["method"])
    iters = settings["iters"] if round_ else settings["initial_iters"]
    return TrainConfig(
        method=method.name,
        data=DataConfig(root=str(data), crop_size=settings["crop_size"], batch_size=settings["batch_size"], num_workers=0),
        model=ModelConfig(backbone=settings["backbone"], pretrained=settings["pretrained"], init_from=str(init_from)),
        optim=OptimConfig(**{**method.optim_defaults, "lr": settings["lr"]}),
        run=RunConfig(out=str(out), max_iters=iters, eval_every=iters, save_every=iters,
                      seed=settings["seed"] * 1000 + round_, device=settings["device"], force=True),
        method_cfg=method.Config())


def write_splits(folder: Path, labeled: list[str], pool: list[str]) -> None:
    write_split(folder, "labeled", labeled)
    write_split(folder, "unlabeled", [i for i in pool if i not in set(labeled)])


def initial_round(settings: dict, data: Path, out: Path, pool: list[str], progress=print) -> dict:
    """Round 0, shared by every strategy: trained once on the initial images, scored and exported;
    {labeled, miou, package, data, checkpoint}."""
    from export.package import export_package
    from training.engine import Trainer

    here = out / "initial"
    row_path = here / "row.json"
    if not row_path.is_file():
        sim_data = simulation_data(here / "data", data)
        write_splits(sim_data, sorted(random.Random(settings["seed"]).sample(pool, settings["initial"])), pool)
        progress(f"round 0 (every strategy): training on {settings['initial']} labelled images")
        result = Trainer(train_config(settings, sim_data, here / "train", 0, settings["init_from"]), progress=False).fit()
        export_package(here / "train" / "last.pt", here / "package", with_probs=True, force=True, data=sim_data,
                       cif_scales=CIF_SCALES if settings["method"] == "scalematch" else None, progress=lambda m: None)
        write_text(row_path, json.dumps({"labeled": settings["initial"],
                                         "miou": result["metrics"]["scales"]["1.0"]["miou"]}, indent=1))
    return {**json.loads(row_path.read_text()), "package": here / "package", "data": here / "data",
            "checkpoint": here / "train" / "last.pt"}


def select_round(strategy: str, settings: dict, package: Path, data: Path, round_: int) -> list[tuple[str, np.ndarray]]:
    """(id, pre-annotation) of the k images the strategy picks from the unlabelled split."""
    if strategy == "random":
        ids = random.Random(settings["seed"] * 1000 + round_).sample(read_split(data, "unlabeled"), settings["k"])
        by_id = {s.image_id: s for s in score_unlabeled(package, data, "least_confidence", ids=ids)}
        return [(i, by_id[i].labels) for i in ids]
    _, picks = select_next(package, data, strategy, settings["k"], settings["balance"])
    return [(s.image_id, s.labels) for s in picks]


def run_strategy(strategy: str, settings: dict, initial: dict, out: Path, pool: list[str], progress=print) -> list[dict]:
    """Every round of one strategy, continuing after the last recorded one; the rows, one per round."""
    from export.package import export_package
    from training.engine import Trainer

    folder = out / strategy
    sim_data = simulation_data(folder / "data", initial["data"])
    labeled = read_split(initial["data"], "labeled")
    rows = []
    while (folder / f"round{len(rows)}" / "row.json").is_file():
        rows.append(json.loads((folder / f"round{len(rows)}" / "row.json").read_text()))
        labeled += rows[-1]["picks"]
    for round_ in range(len(rows), settings["rounds"] + 1):
        write_splits(sim_data, labeled, pool)
        here = folder / f"round{round_}"
        if round_:
            before = folder / f"round{round_ - 1}" / "train" / "last.pt" if round_ > 1 else initial["checkpoint"]
            progress(f"{strategy} round {round_}: training on {len(labeled)} labelled images")
            result = Trainer(train_config(settings, sim_data, here / "train", round_, before), progress=False).fit()
            miou, package = result["metrics"]["scales"]["1.0"]["miou"], here / "package"
        else:
            miou, package = initial["miou"], initial["package"]
        row = {"strategy": strategy, "round": round_, "labeled": len(labeled), "miou": miou, "picks": [], "effort": None}
        if round_ < settings["rounds"]:
            if round_:
                export_package(here / "train" / "last.pt", package, with_probs=True, force=True, data=sim_data,
                               cif_scales=CIF_SCALES if settings["method"] == "scalematch" else None,
                               progress=lambda m: None)
            picks = select_round(strategy, settings, package, sim_data, round_)
            efforts = [labeling_effort(pre, np.array(Image.open(mask_path(sim_data, i)))) for i, pre in picks]
            efforts = [e for e in efforts if e is not None]
            row.update(picks=[i for i, _ in picks], effort=float(np.mean(efforts)) if efforts else None)
        write_text(here / "row.json", json.dumps(row, indent=1))
        progress(f"{strategy} round {round_}: mIoU {row['miou']:.2f} with {row['labeled']} labelled"
                 + (f", labelling effort {100 * row['effort']:.1f} %" if row["effort"] is not None else ""))
        if round_ > 1:  # only the latest checkpoint is needed to go on; the shared round 0 stays
            shutil.rmtree(folder / f"round{round_ - 1}" / "package", ignore_errors=True)
            shutil.rmtree(folder / f"round{round_ - 1}" / "train", ignore_errors=True)
        labeled += row["picks"]
        rows.append(row)
    return rows


def simulate(data: Path, out: Path, settings: dict, progress=print) -> dict:
    """Run (or continue) the simulation; writes and returns OUT/simulation.json's content."""
    data, out = Path(data), Path(out)
    settings = {**settings, "data": str(data.resolve())}
    pool = check_settings(data, settings)
    out.mkdir(parents=True, exist_ok=True)
    settings = start_or_resume(out, settings)
    initial = initial_round(settings, data, out, pool, progress)
    curves = {s: run_strategy(s, settings, initial, out, pool, progress) for s in settings["strategies"]}
    payload = {"settings": settings, "curves": curves}
    write_text(out / "simulation.json", json.dumps(payload, indent=1))
    write_text(out / "simulation.md", markdown(payload))
    plot(curves, out / "simulation.png", f"{data.name}: {settings['method']}, round 0 {settings['initial_iters']} "
                                         f"iterations, then {settings['iters']} per round")
    return payload


def markdown(payload: dict) -> str:
    curves = payload["curves"]
    counts = sorted({r["labeled"] for rows in curves.values() for r in rows})
    lines = [f"# Active-labeling simulation on {payload['settings']['data']}", "",
             "mIoU (x1.0, val) after training on that many labelled images; the labelling effort is the share of "
             "pixels the next round's picks would have needed corrected in their pre-annotations.", "",
             "| labelled | " + " | ".join(curves) + " |", "|---|" + "---|" * len(curves)]
    for n in counts:
        cells = []
        for rows in curves.values():
            row = next((r for r in rows if r["labeled"] == n), None)
            cells.append("-" if row is None else f"{row['miou']:.2f}"
                         + ("" if row["effort"] is None else f" (effort {100 * row['effort']:.1f} %)"))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy, rows in curves.items():
        ax.plot([r["labeled"] for r in rows], [r["miou"] for r in rows], marker="o", label=strategy)
    ax.set_xlabel("labelled images")
    ax.set_ylabel("val mIoU x1.0")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)
