"""What a run may take over from its --out folder: another run's results are replaced only with --force,
and --resume continues only with the checkpoint's settings and data unless --allow-changed names them."""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from .config import ConfigError, RunConfig, TrainConfig
from .data.folder import atomic_write, remove_partial_writes

RESULTS = ("last.pt", "best.pt", "metrics.jsonl", "config.yaml", "config.json")  # config.json: earlier runs' settings
# Settings that change neither the weights a run ends with nor its data order, so --resume may change them
# freely. The dataset's path is not compared: its fingerprint is. The encoder initialisation is replaced
# by the checkpoint's weights.
FREE_ON_RESUME = {"run.resume", "run.allow_changed", "run.force", "run.device", "run.log_every", "run.save_every",
                  "run.snapshot_every", "run.eval_every", "run.val_scales", "run.tensorboard", "data.num_workers", "data.root",
                  "model.pretrained", "model.init_from"}
SNAPSHOTS = "snapshots"  # --snapshot-every's folder of slim checkpoints, one per N iterations
SNAPSHOT_PREFIX = "iter_"
SNAPSHOT_FILES = f"{SNAPSHOT_PREFIX}*.pt"  # the names of the checkpoints in it
DATA = "data"  # --allow-changed name for a changed dataset fingerprint (classes.json or splits)


def check_out_dir(out: Path, run: RunConfig) -> None:
    """Refuse to start a new run over another run's results unless --force (or --resume) says so."""
    found = [name for name in RESULTS if (out / name).exists()]
    if found and not (run.resume or run.force):
        raise FileExistsError(f"{out}: holds another run ({', '.join(found)}). Continue it with --resume, "
                              "choose another --out, or pass --force to replace it.")


def snapshot_name(iteration: int) -> str:
    """The file name, inside SNAPSHOTS, of the snapshot taken at ``iteration``."""
    return f"{SNAPSHOT_PREFIX}{iteration:07d}.pt"


def snapshot_iteration(path: Path) -> int | None:
    """The iteration a file named by ``snapshot_name`` was taken at; None for any other name."""
    try:
        return int(path.stem.removeprefix(SNAPSHOT_PREFIX))
    except ValueError:
        return None


def start_out_dir(out: Path, run: RunConfig, iteration: int) -> None:
    """A new run starts from an empty record: a replaced run's best.pt, metrics and TensorBoard events
    must not mix with it. A resumed one keeps its record up to ``iteration``, its checkpoint's. Either way the
    temp files of a write that a kill cut short are removed: the file they were to replace is intact."""
    out.mkdir(parents=True, exist_ok=True)
    remove_partial_writes(out, RESULTS)
    remove_partial_writes(out / SNAPSHOTS, (SNAPSHOT_FILES,))
    if run.resume:
        drop_metrics_after(out, iteration)
        return
    for name in RESULTS:
        (out / name).unlink(missing_ok=True)
    for folder in ("tensorboard", SNAPSHOTS):
        shutil.rmtree(out / folder, ignore_errors=True)


def drop_metrics_after(out: Path, iteration: int) -> None:
    """A resumed run continues from its checkpoint's iteration: the records an interrupted run logged after that
    checkpoint are dropped, or they would be logged twice (and its time per iteration summed twice)."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _iteration(line) <= iteration]
    if len(kept) < len(lines):
        atomic_write(path, lambda fh: fh.write("".join(kept).encode()))


def _iteration(line: str) -> float:
    """A metrics record's iteration; a line a kill cut short counts as after every checkpoint."""
    try:
        return json.loads(line).get("iter", 0)
    except json.JSONDecodeError:
        return float("inf")


def _flat(config: dict) -> dict[str, object]:
    flat = {}
    for section, values in config.items():
        if isinstance(values, dict):
            for name, value in values.items():
                flat[f"{section}.{name}"] = tuple(value) if isinstance(value, list) else value
    return flat


def check_resume(path: Path, saved: dict, cfg: TrainConfig, data_fingerprint: str) -> None:
    """Raise ConfigError listing every setting (old -> new) that differs from checkpoint ``path``'s, and a
    changed dataset, except those the user named in --allow-changed."""
    allowed = {name.strip() for name in cfg.run.allow_changed.split(",") if name.strip()}
    old, new = _flat(saved["config"]), _flat(asdict(cfg))
    changed = [f"{key.split('.', 1)[1]}: {old[key]} -> {new[key]}" for key in new
               if key in old and old[key] != new[key] and key not in FREE_ON_RESUME
               and not {key, key.split(".", 1)[1]} & allowed]
    names = [change.split(":")[0] for change in changed]
    if saved.get("data_fingerprint") not in (None, data_fingerprint) and DATA not in allowed:
        changed.append(f"{cfg.data.root}: classes or splits changed since the run started")
        names.append(DATA)
    if changed:
        raise ConfigError(f"{path}: --resume with other settings than the run's ({'; '.join(changed)}). Pass the run's "
                          f"values, or --allow-changed {','.join(names)} to continue with the new ones.")
