"""Training inputs: the pixel check before a run, mask formats, --pretrained files, --resume settings,
existing output folders, the VOC importer's sets and counts, and eval's scales."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from training.checkpoint import load_checkpoint
from training.cli import main
from training.data import folder
from training.data.folder import DatasetError, load_mask, read_split, write_split
from training.data.importers import choose_labeled, import_voc
from training.data.validate import check_dataset
from training.engine import Trainer

from .conftest import tiny_config


def train(data: Path, out: Path, *extra: str) -> int:
    return main(["train", str(data), "--backbone", "resnet18", "--pretrained", "none", "--crop-size", "32", "--batch-size", "2",
                 "--max-iters", "1", "--eval-every", "1", "--num-workers", "0", "--lr", "0.01", "--device", "cpu",
                 "--out", str(out), *extra])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


# --- 1. pixels are checked before the run starts, in parallel, cached by file fingerprint ----------
def test_bad_val_mask_stops_the_run_before_it_starts(data_copy, tmp_path, capsys):
    val_id = read_split(data_copy, "val")[0]
    Image.fromarray(np.full((48, 48), 9, np.uint8)).save(data_copy / "masks" / f"{val_id}.png")
    with pytest.raises(DatasetError, match=r"class ids \[9\]"):
        Trainer(tiny_config(data_copy, tmp_path / "api"), progress=False)
    assert train(data_copy, tmp_path / "run") == 2
    assert f"{val_id}.png: class ids [9]" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_pixel_check_is_cached_by_file_fingerprint(data_copy, monkeypatch):
    from training.data.pixels import CACHE_NAME
    opened = []
    real_open = folder.Image.open

    def counting_open(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(folder.Image, "open", counting_open)
    (data_copy / CACHE_NAME).unlink(missing_ok=True)  # copied along if an earlier test checked the shared data
    assert check_dataset(data_copy) == []
    assert len(opened) == 6 + 12 + 4 + 6 + 4  # every image, and the masks of labelled and val images
    assert json.loads((data_copy / CACHE_NAME).read_text())
    opened.clear()
    assert check_dataset(data_copy) == [] and opened == []  # unchanged files are not decoded again
    mask = data_copy / "masks" / f"{read_split(data_copy, 'labeled')[0]}.png"
    Image.fromarray(np.full((48, 48), 7, np.uint8)).save(mask)  # new size/mtime: checked again
    assert ["class ids [7]" in p for p in check_dataset(data_copy)] == [True] and opened == [mask.name]
    # Facts (sizes, mask values) are cached, not verdicts: a shorter class list is judged without decoding.
    opened.clear()
    classes = json.loads((data_copy / "classes.json").read_text())[:2]
    (data_copy / "classes.json").write_text(json.dumps(classes))
    problems = check_dataset(data_copy)
    assert problems and all("not in classes.json (0..1" in p for p in problems) and opened == []


# --- 2. the real format of a mask --------------------------------------------------------------------
def test_jpeg_mask_named_png_is_refused(data_copy):
    lab = read_split(data_copy, "labeled")[0]
    path = data_copy / "masks" / f"{lab}.png"
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(path, format="JPEG")  # uniform: decodes to valid ids
    with pytest.raises(DatasetError, match="JPEG file named .png"):
        load_mask(path, 5)
    assert any(f"{lab}.png: a JPEG file named .png" in p for p in check_dataset(data_copy))


# --- 3. bad --pretrained files and backbones: one line, exit 2 -------------------------------------
@pytest.mark.parametrize("content, message", [
    ({"conv.weight": torch.zeros(1)}, "not resnet18 encoder weights"),
    (torchvision.models.resnet34().state_dict(), "resnet34 weights, but --backbone is resnet18"),
    (torchvision.models.resnet18(), "holds pickled objects"),
    (torch.zeros(3), "holds a tensor"),
], ids=["wrong-keys", "other-depth", "pickled-model", "bare-tensor"])
def test_bad_pretrained_file_is_one_clear_line(tiny_data, tmp_path, capsys, content, message):
    weights = tmp_path / "weights.pth"
    torch.save(content, weights)
    assert train(tiny_data, tmp_path / "run", "--pretrained", str(weights)) == 2
    err = one_line_error(capsys)
    assert message in err and str(weights) in err


def test_unknown_backbone_is_one_clear_line(tiny_data, tmp_path, capsys):
    assert train(tiny_data, tmp_path / "run", "--backbone", "resnet152") == 2
    assert "--backbone resnet152" in one_line_error(capsys)


@pytest.mark.parametrize("flag, value", [("--log-every", "0"), ("--save-every", "-5"), ("--eval-every", "-1"),
                                         ("--max-iters", "-2"), ("--snapshot-every", "-3"), ("--batch-size", "0"),
                                         ("--crop-size", "8")])
def test_counts_out_of_range_are_one_clear_line_before_the_run(tiny_data, tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    assert train(tiny_data, out, flag, value) == 2
    assert f"{flag} {value} (must be" in one_line_error(capsys)
    assert not out.exists()


def test_epochs_are_checked_only_when_they_set_the_length(tiny_data, tmp_path, capsys):
    assert train(tiny_data, tmp_path / "run", "--max-iters", "0", "--epochs", "0") == 2
    assert "--epochs 0 (must be 1 or more)" in one_line_error(capsys)
    assert train(tiny_data, tmp_path / "run", "--epochs", "0") == 0  # --max-iters 1 sets the length


# --- 4/5. --resume: changed settings are refused with a diff; the pretrained file is not needed ----
def test_resume_refuses_changed_settings_unless_allowed(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tiny_data, out) == 0
    capsys.readouterr()
    assert train(tiny_data, out, "--resume", "--lr", "0.02", "--batch-size", "4", "--crop-size", "48") == 2
    err = one_line_error(capsys)
    for diff in ("lr: 0.01 -> 0.02", "batch_size: 2 -> 4", "crop_size: 32 -> 48", "--allow-changed"):
        assert diff in err
    assert train(tiny_data, out, "--resume", "--backbone", "resnet34") == 2
    assert "backbone: resnet18 -> resnet34" in one_line_error(capsys)
    assert train(tiny_data, out, "--resume", "--lr", "0.02", "--max-iters", "2", "--allow-changed", "lr,max_iters") == 0
    last = load_checkpoint(out / "last.pt")
    assert last["iteration"] == 2 and last["config"]["optim"]["lr"] == 0.02


def test_resume_refuses_changed_method_options(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tiny_data, out, "--method", "fixmatch") == 0
    capsys.readouterr()
    assert train(tiny_data, out, "--method", "fixmatch", "--resume", "--conf-thresh", "0.5") == 2
    assert "conf_thresh: 0.95 -> 0.5" in one_line_error(capsys)


def test_resume_refuses_changed_data_unless_allowed(data_copy, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(data_copy, out) == 0
    labeled = read_split(data_copy, "labeled")
    write_split(data_copy, "labeled", labeled[1:])
    write_split(data_copy, "unlabeled", read_split(data_copy, "unlabeled") + labeled[:1])
    capsys.readouterr()
    assert train(data_copy, out, "--resume") == 2
    assert "classes or splits changed" in one_line_error(capsys)
    assert train(data_copy, out, "--resume", "--allow-changed", "data") == 0


def test_resume_does_not_need_the_pretrained_file(tiny_data, tmp_path):
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    out = tmp_path / "run"
    assert train(tiny_data, out, "--pretrained", str(weights)) == 0
    weights.rename(tmp_path / "moved.pth")
    assert train(tiny_data, out, "--resume", "--max-iters", "2", "--allow-changed", "max_iters") == 0
    assert load_checkpoint(out / "last.pt")["iteration"] == 2


# --- 6. an existing run is not replaced without --force ----------------------------------------------
def test_train_refuses_existing_run_without_force(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tiny_data, out) == 0
    before = {name: (out / name).read_bytes() for name in ("last.pt", "best.pt", "metrics.jsonl")}
    capsys.readouterr()
    assert train(tiny_data, out, "--lr", "0.02") == 2
    err = one_line_error(capsys)
    assert "--force" in err and "--resume" in err
    assert {name: (out / name).read_bytes() for name in before} == before
    assert train(tiny_data, out, "--lr", "0.02", "--force") == 0
    assert (out / "metrics.jsonl").read_text().count("\n") == before["metrics.jsonl"].count(b"\n")
    assert load_checkpoint(out / "last.pt")["config"]["optim"]["lr"] == 0.02


def test_train_into_a_folder_without_results_needs_no_force(tiny_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "train.log").write_text("the app's log, written before training starts\n")
    assert train(tiny_data, out) == 0


# --- 7. the VOC importer ------------------------------------------------------------------------------
def _voc(tmp_path: Path, n_train: int = 4, n_val: int = 2, n_sbd: int = 3) -> tuple[Path, Path]:
    """A fake VOC2012 (train/val with fine masks) and SBD aug masks for n_sbd further images."""
    voc, sbd = tmp_path / "VOC2012", tmp_path / "SegmentationClassAug"
    for d in (voc / "JPEGImages", voc / "SegmentationClass", voc / "ImageSets" / "Segmentation", sbd):
        d.mkdir(parents=True)
    ids = [f"2007_{i:06d}" for i in range(n_train + n_val + n_sbd)]
    for image_id in ids:
        Image.new("RGB", (8, 8)).save(voc / "JPEGImages" / f"{image_id}.jpg")
        Image.fromarray(np.ones((8, 8), np.uint8)).save(sbd / f"{image_id}.png")
    for image_id in ids[:n_train + n_val]:
        Image.fromarray(np.ones((8, 8), np.uint8)).save(voc / "SegmentationClass" / f"{image_id}.png")
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids[:n_train]) + "\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids[n_train:n_train + n_val]) + "\n")
    return voc, sbd


def test_voc_import_refuses_missing_sbd_folder(tmp_path):
    voc, _ = _voc(tmp_path)
    with pytest.raises(DatasetError, match="nonexistent"):
        import_voc(voc, tmp_path / "out", sbd_masks=tmp_path / "nonexistent")
    assert not (tmp_path / "out").exists()


def test_voc_import_refuses_sbd_mask_without_image(tmp_path):
    voc, sbd = _voc(tmp_path)
    (voc / "JPEGImages" / "2007_000008.jpg").unlink()
    with pytest.raises(DatasetError, match="2007_000008"):
        import_voc(voc, tmp_path / "out", sbd_masks=sbd, labeled="1/2")
    assert not (tmp_path / "out").exists()


def test_voc_import_accepts_split_lists_with_sbd_ids(tmp_path):
    voc, sbd = _voc(tmp_path)
    lst = tmp_path / "labeled.txt"
    lst.write_text("JPEGImages/2007_000000.jpg SegmentationClass/2007_000000.png\n"
                   "JPEGImages/2007_000007.jpg SegmentationClass/2007_000007.png\n")  # 7: an SBD-only id
    out = import_voc(voc, tmp_path / "out", sbd_masks=sbd, labeled="1464", labeled_list=str(lst))
    assert read_split(out, "labeled") == ["2007_000000", "2007_000007"]
    assert "2007_000007" not in read_split(out, "unlabeled") and len(read_split(out, "unlabeled")) == 5
    assert check_dataset(out) == []


@pytest.mark.parametrize("pool, fraction, count", [
    (10582, "1/16", 662), (10582, "1/8", 1323), (10582, "1/4", 2646), (10582, "1/2", 5291),  # VOC train-aug
    (1464, "1/16", 92), (1464, "1/8", 183), (1464, "1/4", 366), (1464, "1/2", 732), (1464, "1/1", 1464),
    (2975, "1/16", 186), (2975, "1/8", 372), (2975, "1/4", 744), (2975, "1/2", 1488), (2975, "1/30", 100),
])
def test_fraction_counts_match_the_official_split_lists(pool, fraction, count):
    # Counts of UniMatch's splits/pascal/* and splits/cityscapes/*/labeled.txt (lines per file).
    assert len(choose_labeled([f"{i:05d}" for i in range(pool)], fraction, None, 0)) == count


# --- 8. eval scales ----------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--scales", "--cif-scales"])
def test_eval_refuses_non_positive_scales(checkpoints, tiny_data, capsys, flag):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(checkpoints["scalematch"]), str(tiny_data), flag, "0,1", "--device", "cpu"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "greater than 0" in err and "Traceback" not in err

