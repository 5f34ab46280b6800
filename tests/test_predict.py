"""`scaleseg predict` and the Python API (serving.segmenter.Segmenter) on the tiny exported package."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.backends import BackendError
from serving.segmenter import Segmenter, tile_starts
from training.cli import main


def _images(folder: Path, n: int = 3, size=(40, 48)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (size[0], size[1], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_segmenter_takes_paths_pil_images_and_arrays(package, tmp_path):
    seg = Segmenter.load(package)
    path = _images(tmp_path)[0]
    labels, confidence = seg.predict(path)
    assert labels.shape == confidence.shape == (40, 48) and labels.dtype == np.uint8
    assert labels.max() < len(seg.classes) and 0 < confidence.min() <= confidence.max() <= 1
    rgb = np.asarray(Image.open(path).convert("RGB"))
    for other in (Image.open(path), rgb):
        again, conf = seg.predict(other)
        assert np.array_equal(again, labels) and np.allclose(conf, confidence)
    with pytest.raises(ValueError, match="uint8"):
        seg.predict(rgb.astype(np.float32))
    with pytest.raises(ValueError, match="at least 16x16"):
        seg.predict(rgb[:8])
    cif = Segmenter.load(package, cif=True)
    assert cif.scales == (0.5, 1.0, 2.0) and cif.predict(rgb)[0].shape == (40, 48)


def test_large_images_are_refused_or_tiled(package):
    seg = Segmenter.load(package, max_work_pixels=32 * 32)
    rgb = np.random.default_rng(1).integers(0, 255, (50, 90, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="larger than this backend takes in one pass"):
        seg.predict(rgb)
    labels, confidence = seg.predict(rgb, tile=True)
    assert labels.shape == (50, 90) and confidence.min() > 0  # every pixel came from some tile
    # Where one tile covers the image, tiling is the plain prediction.
    whole = Segmenter.load(package)
    small = rgb[:32, :32]
    assert np.array_equal(seg.predict(small, tile=True)[0], whole.predict(small)[0])
    assert tile_starts(90, 32) == [0, 24, 48, 58] and tile_starts(20, 32) == [0]


def _video(path: Path, frames: int = 5) -> None:
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (48, 40))
    for i in range(frames):
        writer.write(np.full((40, 48, 3), 40 * i, np.uint8))
    writer.release()


def test_predict_cli_files_folders_globs_video(package, tmp_path, capsys):
    folder = tmp_path / "in"
    _images(folder / "sub", n=2)
    single = _images(tmp_path / "one", n=1)[0]
    _images(tmp_path / "globbed", n=2)
    _video(tmp_path / "clip.avi")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    rc = main(["predict", str(package), str(folder), str(single), str(tmp_path / "globbed" / "*.png"),
               str(tmp_path / "clip.avi"), "--out", str(out), "--every", "2", "--confidence"])
    assert rc == 1  # one file failed; the others are written
    summary = json.loads((out / "predictions.json").read_text())
    names = [r["name"] for r in summary["images"]]
    assert names == ["sub/img0", "sub/img1", "img0", "img0_2", "img1", "clip/frame_000000", "clip/frame_000002", "clip/frame_000004"]
    assert list(summary["failed"]) == ["broken"]
    assert "failed: broken" in capsys.readouterr().err
    for name in names:
        mask = Image.open(out / "masks" / f"{name}.png")
        assert mask.mode == "P" and mask.size == (48, 40)
        assert Image.open(out / "overlays" / f"{name}.png").mode == "RGB"
        assert (out / "confidence" / f"{name}.png").is_file()
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == len(names) and abs(sum(float(rows[0][f"{c['name']}_fraction"]) for c in summary["classes"]) - 1) < 1e-3
    assert not [p for p in out.rglob(".*.tmp")]
    # Outputs written inside a source folder are not segmented again on the next run.
    assert main(["predict", str(package), str(folder / "sub"), "--out", str(folder / "sub" / "pred")]) == 0
    assert main(["predict", str(package), str(folder / "sub"), "--out", str(folder / "sub" / "pred")]) == 0
    assert [r["name"] for r in json.loads((folder / "sub" / "pred" / "predictions.json").read_text())["images"]] == ["img0", "img1"]


def test_predict_from_checkpoint_matches_its_package(package, checkpoints, tmp_path):
    _images(tmp_path / "in", n=2)
    assert main(["predict", str(checkpoints["scalematch"]), str(tmp_path / "in"), "--out", str(tmp_path / "ckpt"),
                 "--no-overlays", "--device", "cpu"]) == 0
    assert main(["predict", str(package), str(tmp_path / "in"), "--out", str(tmp_path / "pkg")]) == 0
    assert not (tmp_path / "ckpt" / "overlays").exists()
    for name in ("img0", "img1"):
        a = np.array(Image.open(tmp_path / "ckpt" / "masks" / f"{name}.png"))
        b = np.array(Image.open(tmp_path / "pkg" / "masks" / f"{name}.png"))
        assert (a == b).mean() > 0.99


def test_predict_errors_are_clear(package, checkpoints, tmp_path, capsys):
    img = _images(tmp_path / "in", n=1)[0]
    assert main(["predict", str(package), str(tmp_path / "nothing*.png"), "--out", str(tmp_path / "o")]) == 2
    assert "nothing to segment" in capsys.readouterr().err
    assert main(["predict", str(checkpoints["supervised"]), str(img), "--out", str(tmp_path / "o"), "--cif"]) == 2
    assert "has no CIF module" in capsys.readouterr().err
    with pytest.raises(BackendError, match="checkpoint"):
        from serving.predict import main as serving_main
        serving_main([str(checkpoints["supervised"]), str(img), "--out", str(tmp_path / "o")])


def test_serving_api_imports_neither_training_nor_export():
    code = ("import sys, serving.segmenter, serving.predict; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('training', 'export', 'torch')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
