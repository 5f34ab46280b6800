"""Importers for the formats users bring (folder of images + masks, COCO, CVAT) and `scaleseg data add`,
on small files the tests write."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.cli import main
from training.data.build import make_ids, val_count
from training.data.folder import DatasetError, load_classes, read_mask, read_split
from training.data.import_coco import import_coco
from training.data.import_cvat import import_cvat
from training.data.import_folder import import_folder
from training.data.ingest import add_paths
from training.data.palette import load_palette
from training.data.validate import check_dataset

BG, CAR, TREE = (0, 0, 0), (255, 0, 0), (0, 128, 0)


def _photo(path: Path, w: int = 24, h: int = 16, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _colour_mask(path: Path, w: int = 24, h: int = 16, extra=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[2:8, 3:10] = CAR
    rgb[10:, 12:] = TREE
    if extra is not None:
        rgb[0, :5] = extra
    Image.fromarray(rgb).save(path)


def _colour_source(root: Path, n_labelled: int = 5) -> Path:
    for i in range(n_labelled + 2):
        suffix = ".jpg" if i % 2 else ".png"
        _photo(root / "images" / ("sub" if i == 0 else "") / f"photo {i}{suffix}", seed=i)
        if i < n_labelled:
            _colour_mask(root / "masks" / ("sub" if i == 0 else "") / f"photo {i}.png")
    (root / "palette.yaml").write_text('background: "#000000"\ncar: [255, 0, 0]\ntree: "#008000"\n')
    return root


def test_folder_import_colour_masks_with_palette_file(tmp_path):
    src = _colour_source(tmp_path / "src")
    out, counts = import_folder(src, tmp_path / "data", classes=load_palette(str(src / "palette.yaml")), val="0.4", seed=1)
    assert counts == {"labeled": 3, "unlabeled": 2, "val": 2}
    assert [c.name for c in load_classes(out)] == ["background", "car", "tree"]
    assert check_dataset(out) == []
    assert read_split(out, "unlabeled") == ["photo_5", "photo_6"]
    assert sorted(read_split(out, "labeled") + read_split(out, "val")) == ["photo_1", "photo_2", "photo_3", "photo_4", "sub__photo_0"]
    mask = read_mask(out / "masks" / "sub__photo_0.png")
    assert mask[4, 5] == 1 and mask[12, 20] == 2 and mask[0, 0] == 0
    assert (out / "images" / "photo_1.jpg").read_bytes() == (src / "images" / "photo 1.jpg").read_bytes()
    # The val draw is seeded: the same seed gives the same split, another seed may not.
    again, _ = import_folder(src, tmp_path / "again", classes=load_palette(str(src / "palette.yaml")), val="0.4", seed=1)
    assert read_split(again, "val") == read_split(out, "val")


def test_folder_import_lists_unknown_colours_and_writes_nothing(tmp_path):
    src = _colour_source(tmp_path / "src")
    _colour_mask(src / "masks" / "photo 1.png", extra=(255, 128, 0))
    with pytest.raises(DatasetError) as err:
        import_folder(src, tmp_path / "data", classes=load_palette("background=#000000,car=#ff0000,tree=#008000"))
    assert "#ff8000: 5 pixels in 1 mask(s)" in str(err.value) and "photo 1.png" in str(err.value)
    assert not (tmp_path / "data").exists() and [p.name for p in tmp_path.iterdir()] == ["src"]
    # Named as ignore, the colour becomes 255.
    out, _ = import_folder(src, tmp_path / "data", classes=load_palette("background=#000000,car=#ff0000,tree=#008000"),
                           ignore_colors=[(255, 128, 0)], val="0")
    assert read_mask(out / "masks" / "photo_1.png")[0, :5].tolist() == [255] * 5


def test_folder_import_cli_reports_unknown_colours(tmp_path, capsys):
    src = _colour_source(tmp_path / "src")
    assert main(["data", "import", "folder", str(src), str(tmp_path / "data"), "--palette", "background=#000000,car=#ff0000"]) == 2
    assert "#008000" in capsys.readouterr().err
    assert main(["data", "import", "folder", str(src), str(tmp_path / "data"), "--palette", str(src / "palette.yaml"),
                 "--val", "1"]) == 0
    assert "4 labelled, 2 unlabelled, 1 val images" in capsys.readouterr().out


def test_folder_import_id_masks_infers_classes_and_maps_ignore_value(tmp_path):
    src = tmp_path / "src"
    for i in range(3):
        _photo(src / "images" / f"a{i}.png", seed=i)
        ids = np.zeros((16, 24), np.uint8)
        ids[:4] = i + 1
        ids[-1] = 99  # the tool's "unlabelled" value
        (src / "labels").mkdir(parents=True, exist_ok=True)
        Image.fromarray(ids).save(src / "labels" / f"a{i}_mask.png")
    out, counts = import_folder(src, tmp_path / "data", masks="labels", mask_suffix="_mask", ignore_value=99, val="1")
    assert counts == {"labeled": 2, "unlabeled": 0, "val": 1}
    assert [c.name for c in load_classes(out)] == ["background", "class_1", "class_2", "class_3"]
    mask = read_mask(out / "masks" / "a2.png")
    assert mask[0, 0] == 3 and mask[-1, 0] == 255
    # With a palette of two classes, ids 2 and 3 are listed with their pixel counts.
    with pytest.raises(DatasetError, match=r"value 2: 96 pixels in 1 mask\(s\)"):
        import_folder(src, tmp_path / "d2", masks="labels", mask_suffix="_mask", ignore_value=99, classes=load_palette("bg,thing"))


def test_folder_import_refuses_bad_pairs(tmp_path):
    src = _colour_source(tmp_path / "src")
    palette = load_palette(str(src / "palette.yaml"))
    _colour_mask(src / "masks" / "photo 2.png", w=20)
    with pytest.raises(DatasetError, match=r"photo 2.png: mask is 20x16 but its image .* is 24x16"):
        import_folder(src, tmp_path / "data", classes=palette)
    _colour_mask(src / "masks" / "photo 2.png")
    _colour_mask(src / "masks" / "typo.png")
    with pytest.raises(DatasetError, match="have no image of the same name.*typo.png"):
        import_folder(src, tmp_path / "data", classes=palette)
    (src / "masks" / "typo.png").unlink()
    Image.new("RGB", (24, 16)).save(src / "masks" / "photo 3.jpg")
    with pytest.raises(DatasetError, match="JPEG"):
        import_folder(src, tmp_path / "data", classes=palette)
    assert not (tmp_path / "data").exists()


def test_ids_and_val_counts():
    assert make_ids(["a b.png", "x/a b.jpg", "a b.jpg", "ü.png"]) == ["a_b", "x__a_b", "a_b_2", "_"]
    assert [val_count(s, 10) for s in ("0", "3", "0.2", "1/4", "0.01")] == [0, 3, 2, 2, 1]
    assert val_count("0.5", 1) == 0
    for bad in ("10", "x", "1.5", "-1"):
        with pytest.raises(DatasetError):
            val_count(bad, 10)


def test_palette_inputs(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps([{"id": 1, "name": "car", "color": [255, 0, 0]}, {"id": 0, "name": "bg", "color": "#000000"}]))
    assert [(c.id, c.name, c.color) for c in load_palette(str(tmp_path / "p.json"))] == [(0, "bg", (0, 0, 0)), (1, "car", (255, 0, 0))]
    with pytest.raises(DatasetError, match="share the colour"):
        load_palette("a=#000000,b=#000000")
    with pytest.raises(DatasetError, match="not '#rrggbb'"):
        load_palette("a=#0000")


def _coco_source(root: Path) -> tuple[Path, Path]:
    from pycocotools import mask as coco_mask

    images = root / "train2017"
    for i in range(3):
        _photo(images / f"{i:012d}.jpg", w=20, h=10, seed=i)
    rle_box = np.zeros((10, 20), np.uint8, order="F")
    rle_box[6:9, 15:18] = 1
    rle = coco_mask.encode(np.asfortranarray(rle_box))
    rle["counts"] = rle["counts"].decode()
    coco = {
        "images": [{"id": 1, "file_name": "000000000000.jpg", "height": 10, "width": 20},
                   {"id": 2, "file_name": "000000000001.jpg", "height": 10, "width": 20}],
        "categories": [{"id": 3, "name": "car"}, {"id": 1, "name": "person"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 3, "area": 80, "segmentation": [[0, 0, 10, 0, 10, 8, 0, 8]], "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 1, "area": 4, "segmentation": [[2, 2, 4, 2, 4, 4, 2, 4]], "iscrowd": 0},
            {"id": 12, "image_id": 1, "category_id": 1, "area": 9, "segmentation": rle, "iscrowd": 1},
        ],
    }
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances.json").write_text(json.dumps(coco))
    return root / "annotations" / "instances.json", images


def test_coco_instances_polygons_and_rle(tmp_path):
    ann, images = _coco_source(tmp_path / "coco")
    out, counts = import_coco(ann, tmp_path / "data", images, val="0")
    assert counts == {"labeled": 2, "unlabeled": 1, "val": 0}
    assert [c.name for c in load_classes(out)] == ["background", "person", "car"]
    mask = read_mask(out / "masks" / "000000000000.png")
    assert mask[1, 1] == 2 and mask[3, 3] == 1 and mask[7, 16] == 1 and mask[9, 19] == 0
    assert read_mask(out / "masks" / "000000000001.png").max() == 0  # listed without annotations: all background
    assert read_split(out, "unlabeled") == ["000000000002"]
    assert check_dataset(out) == []


def test_coco_refuses_missing_image_and_bad_category(tmp_path):
    ann, images = _coco_source(tmp_path / "coco")
    data = json.loads(ann.read_text())
    data["annotations"][0]["category_id"] = 7
    ann.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="category_id 7 is not in 'categories'"):
        import_coco(ann, tmp_path / "data", images)
    (images / "000000000001.jpg").unlink()
    with pytest.raises(DatasetError, match="000000000001.jpg: missing image"):
        import_coco(ann, tmp_path / "data", images)
    assert not (tmp_path / "data").exists()


def test_coco_panoptic(tmp_path):
    root = tmp_path / "coco"
    _photo(root / "val2017" / "a.jpg", w=8, h=6)
    seg = np.zeros((6, 8, 3), np.uint8)
    seg[:3] = (1, 1, 0)          # segment 257
    seg[3:, :4] = (5, 0, 0)      # segment 5
    (root / "annotations" / "panoptic_val2017").mkdir(parents=True)
    Image.fromarray(seg).save(root / "annotations" / "panoptic_val2017" / "a.png")
    (root / "annotations" / "panoptic_val2017.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "height": 6, "width": 8}],
        "categories": [{"id": 20, "name": "sky", "isthing": 0, "color": [70, 130, 180]}, {"id": 2, "name": "bicycle", "isthing": 1}],
        "annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": [
            {"id": 257, "category_id": 20, "iscrowd": 0}, {"id": 5, "category_id": 2, "iscrowd": 0}]}]}))
    out, counts = import_coco(root / "annotations" / "panoptic_val2017.json", tmp_path / "data", root / "val2017", val="0")
    assert [(c.name, c.color) for c in load_classes(out)][1] == ("sky", (70, 130, 180))
    mask = read_mask(out / "masks" / "a.png")
    assert mask[0, 0] == 1 and mask[5, 0] == 0 and mask[5, 7] == 255


def test_cvat_segmentation_mask_zip(tmp_path, capsys):
    export = tmp_path / "export"
    (export / "labelmap.txt").parent.mkdir(parents=True)
    (export / "labelmap.txt").write_text("# label:color_rgb:parts:actions\nbackground:0,0,0::\ncar:255,0,0::\ntree:0,128,0::\n")
    for i in range(3):
        _photo(export / "JPEGImages" / f"frame_{i}.jpg", seed=i)
        _colour_mask(export / "SegmentationClass" / f"frame_{i}.png")
    archive = tmp_path / "task.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(export.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(export).as_posix())
    assert main(["data", "import", "cvat", str(archive), str(tmp_path / "data"), "--val", "1"]) == 0
    out = tmp_path / "data"
    assert [c.name for c in load_classes(out)] == ["background", "car", "tree"]
    assert len(read_split(out, "labeled")) == 2 and read_mask(out / "masks" / "frame_0.png")[4, 5] == 1
    # An unpacked export without images takes --images; a colour the labelmap lacks is refused.
    (export / "labelmap.txt").write_text("background:0,0,0::\ncar:255,0,0::\n")
    images = export / "JPEGImages"
    images.rename(tmp_path / "frames")
    with pytest.raises(DatasetError, match="#008000"):
        import_cvat(export, tmp_path / "d2", images=tmp_path / "frames")


def test_data_add_files_folders_globs_and_zips(tmp_path, capsys):
    src = _colour_source(tmp_path / "src")
    data, _ = import_folder(src, tmp_path / "data", classes=load_palette(str(src / "palette.yaml")), val="1")
    new = tmp_path / "new"
    for i in range(4):
        _photo(new / "dir" / f"n{i}.png", seed=100 + i)
    (new / "broken.png").write_bytes(b"not an image")
    with zipfile.ZipFile(new / "batch.zip", "w") as zf:
        zf.write(new / "dir" / "n0.png", "again.png")  # same pixels as n0: a duplicate
        zf.writestr("../evil.png", b"x")
    _photo(new / "g1.png", seed=200)
    before = read_split(data, "unlabeled")
    report = add_paths(data, [new / "dir", str(new / "g*.png"), new / "batch.zip", new / "broken.png"])
    assert len(report.added) == 5 and report.duplicates == ["batch.zip:again.png"]
    assert set(report.invalid) == {"batch.zip:../evil.png", "broken.png"}
    assert read_split(data, "unlabeled") == before + report.added
    assert check_dataset(data) == []
    # The CLI: adding the same folder again adds nothing; a path that matches nothing is refused.
    assert main(["data", "add", str(data), str(new / "dir")]) == 0
    assert "0 added" in capsys.readouterr().out
    assert main(["data", "add", str(data), str(new / "nothing*.png")]) == 2
    assert "nothing matches" in capsys.readouterr().err
