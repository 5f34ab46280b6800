"""Checkpoints: written atomically (temp file, fsync, rename), so a kill or a full disk never leaves a
broken last.pt; loaded with checks that name the file and the problem."""
from __future__ import annotations

from pathlib import Path

import torch

from .data.folder import atomic_write

FORMAT = 1
# What inference, export and retraining need; the optimiser, scaler and RNG states only serve --resume.
INFERENCE_KEYS = ("format", "config", "method", "classes", "inference", "metrics", "best_miou", "iteration", "labeled_count",
                  "data_fingerprint", "version")


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and the fix."""


def save_checkpoint(path: str | Path, payload: dict) -> None:
    payload = {"format": FORMAT, **payload}
    try:
        atomic_write(path, lambda fh: torch.save(payload, fh))
    except OSError as err:
        raise CheckpointError(f"{path}: could not be written ({err.strerror or err}); the previous file is intact. "
                              "Free disk space or choose another --out.") from None


def inference_payload(ckpt: dict) -> dict:
    """The slim form of a checkpoint: network, config and classes, without the training state."""
    return {k: ckpt[k] for k in INFERENCE_KEYS if k in ckpt}


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint. Pass a .pt file written by `scaleseg train`.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err}).") from None
    if not isinstance(ckpt, dict) or "format" not in ckpt or "inference" not in ckpt:
        raise CheckpointError(f"{path}: not a scaleseg checkpoint (missing 'format'/'inference'). "
                              "Pass best.pt or last.pt from a `scaleseg train` output folder.")
    return ckpt


def training_finished(path: str | Path) -> bool:
    """Whether the run whose last.pt this is trained all its iterations: last.pt is also written at every
    epoch's end, so its existence alone does not say that the run finished."""
    path = Path(path)
    if not path.is_file():
        return False
    ckpt = load_checkpoint(path)
    total = ckpt.get("total_iters") or ckpt["config"]["run"]["max_iters"]
    if not total:
        raise CheckpointError(f"{path}: written before checkpoints recorded their total iterations, with --epochs; "
                              "resume it with `scaleseg train ... --resume` to know whether it finished.")
    return ckpt["iteration"] >= total


def load_inference_model(ckpt: dict, path: str | Path = "checkpoint"):
    """(network in eval mode, classes as dicts, TrainConfig) from a loaded checkpoint."""
    from .engine import config_from_checkpoint
    from .models import build_model

    cfg = config_from_checkpoint(ckpt)
    cfg.model.pretrained = ""  # the weights below replace any encoder initialisation
    model = build_model(cfg.model, len(ckpt["classes"]), cif=ckpt["inference"]["cif"])
    try:
        model.load_state_dict(ckpt["inference"]["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the recorded model ({str(err).splitlines()[0]}).") from None
    return model.eval(), ckpt["classes"], cfg
