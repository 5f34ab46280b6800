"""Shared fixtures: a tiny synthetic dataset and a tiny, fast training configuration."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from app import local_labelstudio
from export.package import export_package
from training.config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
from training.data.synth import synthesize
from training.engine import Trainer
from training.methods import get_method

# `make test` runs the suite on two pytest-xdist workers (`--dist loadfile`: a file's tests, and so its module
# fixtures, stay on one worker); the cores are shared between them.
# The subprocesses tests start (the CLI, benchmarks, servers) get the same share unless OMP_NUM_THREADS is set or
# they choose their own: more threads than cores make OpenMP's waiting threads spin against the other worker.
# A worker whose files use Label Studio starts its own server (the session fixture).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, os.cpu_count() or 1) // WORKERS)
torch.set_num_threads(THREADS)
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """5 classes, 6 labelled / 12 unlabelled / 4 val images of 48 px; never modified by tests (the pre-run
    check adds its cache file)."""
    root = tmp_path_factory.mktemp("data") / "synth"
    return synthesize(root, num_classes=5, n_labeled=6, n_unlabeled=12, n_val=4, size=48, seed=0, progress=False)


@pytest.fixture
def data_copy(tiny_data, tmp_path) -> Path:
    """A private copy of the tiny dataset that a test may damage."""
    dst = tmp_path / "data"
    shutil.copytree(tiny_data, dst)
    return dst


# PRCL's official sampling caps (256 anchors x 512 negatives per class) cost ~10 s a step even on tiny
# images; smaller caps run the same code, for tests that check every method rather than PRCL itself.
SMALL_SAMPLING = {"prcl": {"num_queries": 8, "num_negatives": 16, "num_virtual": 2}}


def tiny_config(root: Path, out: Path, method: str = "supervised", **method_overrides) -> TrainConfig:
    method_cls = get_method(method)
    return TrainConfig(
        method=method,
        data=DataConfig(root=str(root), crop_size=32, batch_size=2, num_workers=0),
        model=ModelConfig(backbone="resnet18", pretrained="none"),
        optim=OptimConfig(lr=0.01),
        run=RunConfig(out=str(out), max_iters=4, eval_every=2, save_every=1, seed=0, device="cpu"),
        method_cfg=method_cls.Config(**method_overrides),
    )


@pytest.fixture(scope="session")
def checkpoints(tiny_data, tmp_path_factory):
    """One-iteration checkpoints: a ScaleMatch one (with CIF) and a supervised one."""
    out = {}
    for method in ("scalematch", "supervised"):
        cfg = tiny_config(tiny_data, tmp_path_factory.mktemp(method), method=method)
        cfg.run.max_iters = 1
        Trainer(cfg, progress=False).fit()
        out[method] = Path(cfg.run.out) / "last.pt"
    return out


@pytest.fixture(scope="session")
def package(checkpoints, tiny_data, tmp_path_factory):
    """The ScaleMatch checkpoint exported with probs and the CIF graph; tests must not modify it."""
    out = tmp_path_factory.mktemp("pkg") / "seg"
    export_package(checkpoints["scalematch"], out, with_probs=True, cif_scales=(0.5, 2.0), data=tiny_data, progress=lambda m: None)
    return out


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """A real Label Studio server (own venv, free loopback port, SQLite in a temp folder)."""
    server = local_labelstudio.start(tmp_path_factory.mktemp("label-studio"))
    yield server
    server.stop()
