"""Offline self-training (ST/ST++): the teacher's files, pseudo-labels written once into a resumable cache,
reliability selection, CIF vs multi-scale labelling, the student's stages, export, and bad teachers."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from export.package import export_package
from training import pseudo_labels
from training.checkpoint import CheckpointError, load_checkpoint
from training.cli import main
from training.config import ConfigError
from training.data.folder import read_split
from training.engine import Trainer
from training.methods import selftrain as selftrain_module
from training.models import DeepLabV3Plus

from .conftest import tiny_config

UNLABELED = 12  # tiny_data's unlabelled images; batch 2 makes an epoch 6 iterations
FAST = {"label_scales": (1.0,), "label_flip": False}  # one forward per image where the labelling mode is not tested


@pytest.fixture(scope="module")
def teacher_run(tiny_data, tmp_path_factory) -> Path:
    """A supervised teacher of 4 iterations that kept snapshots at 2 and 4 (last.pt is the final checkpoint)."""
    cfg = tiny_config(tiny_data, tmp_path_factory.mktemp("teacher"))
    cfg.run.snapshot_every = 2
    Trainer(cfg, progress=False).fit()
    return Path(cfg.run.out)


def student_config(data: Path, out: Path, teacher: Path | str, iters: int = 12, **overrides):
    """Two epochs: stage 1 is the first (reliable half), stage 2 the second (all, after round 1)."""
    cfg = tiny_config(data, out, method="selftrain", teacher=str(teacher), **overrides)
    cfg.run.max_iters, cfg.run.eval_every, cfg.run.save_every = iters, iters, iters
    return cfg


def manifest(out: Path, cache: str = "teacher") -> dict:
    return json.loads((out / "pseudo" / cache / "manifest.json").read_text())


def test_snapshots_are_slim_and_rank_the_teacher(teacher_run):
    snaps = sorted(p.name for p in (teacher_run / "snapshots").iterdir())
    assert snaps == ["iter_0000002.pt", "iter_0000004.pt"]
    snap = load_checkpoint(teacher_run / "snapshots" / snaps[0])
    assert snap["iteration"] == 2 and "optimizer" not in snap and "inference" in snap
    teacher = pseudo_labels.find_teacher(str(teacher_run))
    # best.pt labels; the snapshot older than last.pt is compared with last.pt (the one at 4 is last.pt itself)
    assert teacher.label_file == teacher_run / "best.pt"
    assert teacher.rank_files == [teacher_run / "snapshots" / "iter_0000002.pt", teacher_run / "last.pt"]


def test_single_checkpoint_teachers(teacher_run, package, tmp_path):
    assert pseudo_labels.find_teacher(str(package)).rank_files == []
    assert pseudo_labels.find_teacher(str(teacher_run / "last.pt")).rank_files == []
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "last.pt"):
        shutil.copy(teacher_run / name, run / name)
    best_iter = load_checkpoint(run / "best.pt")["iteration"]
    expected = [run / "best.pt", run / "last.pt"] if best_iter < 4 else []
    assert pseudo_labels.find_teacher(str(run)).rank_files == expected


def test_selftrain_labels_once_selects_reliable_images_and_reuses_the_cache(tiny_data, teacher_run, tmp_path):
    out = tmp_path / "student"
    trainer = Trainer(student_config(tiny_data, out, teacher_run), progress=False)
    result = trainer.fit()
    assert result["iterations"] == 12 and np.isfinite(result["best_miou"])

    teacher = manifest(out)
    assert teacher["complete"] and set(teacher["images"]) == set(read_split(tiny_data, "unlabeled"))
    assert teacher["identity"]["mode"] == "multiscale" and len(teacher["identity"]["ranked_by"]) == 2
    assert all(0 <= s["stability"] <= 100 and 0 < s["confidence"] <= 1 for s in teacher["images"].values())
    order, by = pseudo_labels.rank_images(teacher["images"])
    assert by == "stability"

    # stage 1 trains on the most stable half; stage 2 adds the other half, re-labelled by the student
    first = trainer.method.training_sets(trainer, 0)[0]
    assert first.pseudo.ids == order[:6] and len(first.labeled) == 6 and len(first) == 6 + 6
    second = trainer.method.training_sets(trainer, 1)[0]
    assert second.pseudo.ids == order
    assert {second.pseudo.label_dirs[i].name for i in order[:6]} == {"teacher"}
    assert {second.pseudo.label_dirs[i].name for i in order[6:]} == {"round1"}
    round1 = manifest(out, "round1")
    assert round1["complete"] and sorted(round1["images"]) == sorted(order[6:]) and round1["identity"]["iteration"] == 6
    sample = first[(len(first) - 1, 0)]  # labelled images come first, then the pseudo-labelled pool
    assert sample["pseudo"] and sample["box"].shape == (32, 32) and sample["mask"].shape == (32, 32)

    # a new run in the same folder reuses the teacher's labels untouched and forgets the old student's
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "pseudo" / "teacher").rglob("*")}
    cfg = student_config(tiny_data, out, teacher_run)
    cfg.run.force = True
    Trainer(cfg, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "pseudo" / "teacher").rglob("*")} == stamps
    assert not (out / "pseudo" / "round1").exists()


def test_confidence_threshold_ignores_uncertain_pixels(tiny_data, teacher_run, tmp_path):
    out = tmp_path / "s"
    trainer = Trainer(student_config(tiny_data, out, teacher_run, rounds=0, reliable_fraction=1.0, strong_aug=False,
                                     **FAST),
                      progress=False)
    whole = trainer.method.training_sets(trainer, 0)[0].pseudo
    assert len(whole.ids) == UNLABELED
    trainer.method.cfg.conf_thresh = 0.9
    thresholded = trainer.method.training_sets(trainer, 0)[0].pseudo
    ignored = [int((thresholded[(k, 3)]["mask"] == 255).sum() - (whole[(k, 3)]["mask"] == 255).sum()) for k in range(UNLABELED)]
    assert all(n >= 0 for n in ignored) and sum(ignored) > 0
    assert not whole[(0, 3)]["box"].any()  # strong_aug false: weak augmentation only, no CutMix


def test_killed_labelling_pass_resumes_where_it_stopped(tiny_data, teacher_run, tmp_path, monkeypatch):
    out = tmp_path / "s"
    monkeypatch.setattr(pseudo_labels, "MANIFEST_EVERY_S", 0.0)
    real, calls = selftrain_module.label_one, []

    def dies_after_five(*args):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(args[1])
        return real(*args)

    monkeypatch.setattr(selftrain_module, "label_one", dies_after_five)
    with pytest.raises(KeyboardInterrupt):
        Trainer(student_config(tiny_data, out, teacher_run, **FAST), progress=False)
    partial = manifest(out)
    assert not partial["complete"] and sorted(partial["images"]) == sorted(calls)
    assert [p.name for p in out.iterdir()] == ["pseudo"]  # so the same command, without --force, continues it
    cache = out / "pseudo" / "teacher"
    half = [cache / "labels" / ".x.png.k2x9.tmp", cache / "confidence" / "city" / ".x.png.z3.tmp",
            cache / f".{pseudo_labels.MANIFEST}.q1.tmp"]  # a kill mid-write
    for path in half:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half")

    done_before, calls[:] = list(calls), []
    monkeypatch.setattr(selftrain_module, "label_one", lambda *args: calls.append(args[1]) or real(*args))
    Trainer(student_config(tiny_data, out, teacher_run, **FAST), progress=False)
    assert sorted(calls + done_before) == sorted(read_split(tiny_data, "unlabeled"))
    assert manifest(out)["complete"] and len(manifest(out)["images"]) == UNLABELED
    assert not [path for path in half if path.exists()]


def test_cache_of_another_teacher_is_refused_then_rebuilt_with_force(tiny_data, teacher_run, checkpoints, tmp_path):
    out = tmp_path / "s"
    pseudo_labels.label_pool(out / "pseudo" / "teacher", {"teacher": "someone else"}, ["x"],
                             lambda i: {"confidence": 1.0}, rebuild=False, desc="t", progress=False, log=lambda m: None)
    with pytest.raises(CheckpointError, match="another teacher.*--force"):
        Trainer(student_config(tiny_data, out, teacher_run, **FAST), progress=False)
    cfg = student_config(tiny_data, out, teacher_run, **FAST)
    cfg.run.force = True
    Trainer(cfg, progress=False)  # the teacher labels while the run is set up, before it trains
    assert manifest(out)["identity"]["teacher"] == pseudo_labels.file_digest(teacher_run / "best.pt")
    assert len(manifest(out)["images"]) == UNLABELED


@pytest.mark.parametrize("teacher,cif_labels,mode", [("scalematch", True, "cif"), ("scalematch", False, "multiscale"),
                                                    ("supervised", True, "multiscale")])
def test_cif_teacher_labels_by_cif_fusion_others_by_multiscale(tiny_data, checkpoints, tmp_path, monkeypatch, teacher,
                                                               cif_labels, mode):
    fused = []
    real = DeepLabV3Plus.forward_multiscale
    monkeypatch.setattr(DeepLabV3Plus, "forward_multiscale", lambda self, x, s: fused.append(tuple(s)) or real(self, x, s))
    out = tmp_path / "s"
    Trainer(student_config(tiny_data, out, checkpoints[teacher], cif_labels=cif_labels), progress=False)
    identity = manifest(out)["identity"]
    assert identity["mode"] == mode and identity["ranked_by"] == []  # one checkpoint: ranked by confidence
    assert all(s["stability"] is None for s in manifest(out)["images"].values())
    # CIF: one fused prediction per image and per flip; otherwise (also a CIF teacher told not to) never
    assert fused == ([(0.5, 2.0)] * 2 * UNLABELED if mode == "cif" else [])


def test_student_from_teacher_trains_and_exports_with_parity(tiny_data, teacher_run, tmp_path):
    out = tmp_path / "s"
    cfg = student_config(tiny_data, out, teacher_run, iters=2, rounds=0, student_init="teacher")
    trainer = Trainer(cfg, progress=False)
    teacher = load_checkpoint(teacher_run / "best.pt")["inference"]["state_dict"]
    assert all(torch.equal(v, teacher[k]) for k, v in trainer.method.model.state_dict().items())
    assert cfg.model.init_from == str(teacher_run / "best.pt")
    trainer.fit()
    meta = export_package(out / "last.pt", tmp_path / "pkg", data=tiny_data, progress=lambda m: None)
    assert meta["method"] == "selftrain" and meta["parity"]["passed"]


def test_bad_teachers_get_clear_errors(tiny_data, data_copy, teacher_run, tmp_path, capsys):
    with pytest.raises(ConfigError, match="needs --teacher"):
        Trainer(student_config(tiny_data, tmp_path / "a", ""), progress=False)
    with pytest.raises(CheckpointError, match="no such file or folder"):
        Trainer(student_config(tiny_data, tmp_path / "b", tmp_path / "nowhere"), progress=False)
    with pytest.raises(CheckpointError, match="holds no best.pt"):
        Trainer(student_config(tiny_data, tmp_path / "c", tmp_path), progress=False)
    with pytest.raises(ConfigError, match="--reliable-fraction"):
        Trainer(student_config(tiny_data, tmp_path / "d", teacher_run, reliable_fraction=0.0), progress=False)
    with pytest.raises(ConfigError, match="2 stages need 2 epochs"):
        Trainer(student_config(tiny_data, tmp_path / "d", teacher_run, iters=6), progress=False)
    classes = json.loads((data_copy / "classes.json").read_text())
    classes[1]["name"] = "something-else"
    (data_copy / "classes.json").write_text(json.dumps(classes))
    code = main(["train", str(data_copy), "--method", "selftrain", "--teacher", str(teacher_run), "--backbone", "resnet18",
                 "--pretrained", "none", "--device", "cpu", "--num-workers", "0", "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert code == 2 and "predicts classes" in err and "something-else" in err and "Traceback" not in err
    assert not (tmp_path / "e" / "pseudo").exists()
