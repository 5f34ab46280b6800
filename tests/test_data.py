"""Dataset folder: synthetic generator, validator (every bad input reported), augmentations, sampler, importers."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.cli import main
from training.data import transforms as T
from training.data.datasets import EpochSampler, LabeledSet, UnlabeledSet
from training.data.folder import DatasetError, load_classes, load_mask, read_split, write_split
from training.data.importers import import_cityscapes, import_voc
from training.data.synth import render, synthesize
from training.data.validate import check_dataset


def test_synth_is_deterministic_and_multiscale(tmp_path):
    a = synthesize(tmp_path / "a", n_labeled=2, n_unlabeled=2, n_val=1, size=64, seed=3, progress=False)
    b = synthesize(tmp_path / "b", n_labeled=2, n_unlabeled=2, n_val=1, size=64, seed=3, progress=False)
    c = synthesize(tmp_path / "c", n_labeled=2, n_unlabeled=2, n_val=1, size=64, seed=4, progress=False)
    img = "images/synth_00000.png"
    assert (a / img).read_bytes() == (b / img).read_bytes()
    assert (a / img).read_bytes() != (c / img).read_bytes()
    assert read_split(a, "labeled") == ["synth_00000", "synth_00001"]
    assert not (a / "masks" / "synth_00002.png").exists()  # unlabelled images get no mask
    assert check_dataset(a) == []
    # object areas span a wide range of scales across images
    classes = load_classes(a)
    areas = []
    for i in range(60):
        _, mask = render(i, 0, 128, classes)
        for cid in np.unique(mask[mask > 0]):
            areas.append((mask == cid).mean())
    assert min(areas) < 0.005 and max(areas) > 0.2


def test_synth_max_objects_sets_scene_density(tmp_path):
    classes = load_classes(synthesize(tmp_path / "k", n_labeled=1, n_unlabeled=0, n_val=1, size=32, progress=False))
    def foreground(max_objects):
        return np.mean([(render(i, 0, 64, classes, max_objects=max_objects)[1] > 0).mean() for i in range(40)])
    assert foreground(8) > 1.3 * foreground(5) > 1.3 * foreground(1)
    assert render(3, 0, 64, classes)[0].tobytes() == render(3, 0, 64, classes, max_objects=5)[0].tobytes()
    assert main(["data", "synth", str(tmp_path / "m"), "--max-objects", "8", "--n-labeled", "2", "--n-unlabeled", "0",
                 "--n-val", "1", "--size", "32"]) == 0
    with pytest.raises(SystemExit, match="--max-objects >= 1"):
        main(["data", "synth", str(tmp_path / "z"), "--max-objects", "0"])
    assert not (tmp_path / "z").exists()


def test_synth_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert main(["data", "synth", str(out), "--n-labeled", "1", "--n-unlabeled", "0", "--n-val", "1"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"


def test_check_reports_every_problem_at_once(data_copy, capsys):
    root = data_copy
    (root / "images" / "synth_00000.png").write_bytes(b"not a png")                       # corrupt image
    Image.fromarray(np.full((48, 48), 7, np.uint8)).save(root / "masks" / "synth_00001.png")  # id >= K
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(root / "masks" / "synth_00002.png")    # size mismatch
    (root / "splits" / "val.txt").write_text((root / "splits" / "val.txt").read_text() + "ghost\n")  # no image
    problems = check_dataset(root)
    text = "\n".join(problems)
    assert "synth_00000.png: cannot be read as an image" in text
    assert "class ids [7] are not in classes.json" in text
    assert "mask is 48x40 but its image is 48x48" in text
    assert "no image for id 'ghost'" in text and "val.txt" in text
    assert main(["data", "check", str(root)]) == 1
    assert "4 problem(s)" in capsys.readouterr().out


def test_check_empty_labeled_and_bad_classes(data_copy):
    write_split(data_copy, "labeled", [])
    (data_copy / "classes.json").write_text('[{"id": 0, "name": "bg"}, {"id": 2, "name": "x"}]')
    text = "\n".join(check_dataset(data_copy))
    assert "labeled.txt: empty" in text
    assert "class ids must be exactly 0..1" in text
    (data_copy / "classes.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_classes(data_copy)


def test_mask_must_be_single_channel(tmp_path):
    p = tmp_path / "m.png"
    Image.new("RGB", (4, 4)).save(p)
    with pytest.raises(DatasetError, match="mode RGB"):
        load_mask(p, 3)


def test_weak_augmentation_is_seeded_and_pads_with_ignore():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), np.uint8))
    blank = Image.new("L", img.size, 0)
    out1 = T.weak(img, blank, np.random.default_rng(5), 64, (0.5, 2.0), T.UNLABELED_PAD)
    out2 = T.weak(img, blank, np.random.default_rng(5), 64, (0.5, 2.0), T.UNLABELED_PAD)
    assert np.array_equal(np.array(out1[0]), np.array(out2[0]))
    ignore = T.ignore_from_padding(out1[1])
    assert ignore.shape == (64, 64) and (ignore == 255).any()  # a 30 px image scaled <= 2x must be padded to 64
    s1 = T.strong(out1[0], np.random.default_rng(1))
    s2 = T.strong(out1[0], np.random.default_rng(1))
    assert np.array_equal(np.array(s1), np.array(s2))


def test_cutmix_box_area_and_probability():
    rng = np.random.default_rng(0)
    boxes = [T.cutmix_box(50, rng) for _ in range(400)]
    present = [b for b in boxes if b.any()]
    assert 0.4 < len(present) / len(boxes) < 0.6
    fractions = [float(b.float().mean()) for b in present]
    assert min(fractions) >= 0.01 and max(fractions) <= 0.41


def test_cutmix_box_area_follows_the_official_distribution():
    """The official obtain_cutmix_box draws the area once (uniform 0.02-0.4) and redraws only ratio and
    position: mean area about 0.21 of the crop and a quarter of the boxes above 0.3. Redrawing the area
    on every retry biases boxes small (mean about 0.14, 8.5 % above 0.3)."""
    rng = np.random.default_rng(1)
    fractions = np.array([float(b.float().mean()) for b in (T.cutmix_box(96, rng, p=1.0) for _ in range(1500))])
    assert 0.19 < fractions.mean() < 0.23
    assert 0.2 < (fractions > 0.3).mean() < 0.32


def test_sampler_shards_and_resumes():
    full = [EpochSampler(5, 6, seed=1, stream=2, rank=r, world=2) for r in range(2)]
    for s in full:
        s.set_epoch(3)
    shards = [list(s) for s in full]
    assert len(shards[0]) == len(shards[1]) == 6
    seeds = [seed for shard in shards for _, seed in shard]
    assert len(set(seeds)) == 12  # every position has its own augmentation seed
    resumed = EpochSampler(5, 6, seed=1, stream=2, rank=0, world=2)
    resumed.set_epoch(3, start_sample=4)
    assert list(resumed) == shards[0][4:]
    other_epoch = EpochSampler(5, 6, seed=1, stream=2, rank=0, world=2)
    other_epoch.set_epoch(4)
    assert list(other_epoch) != shards[0]


def test_datasets_yield_expected_tensors(tiny_data):
    lab = LabeledSet(tiny_data, read_split(tiny_data, "labeled"), 5, 32, (0.5, 2.0))
    sample = lab[(0, 123)]
    assert sample["image"].shape == (3, 32, 32) and sample["mask"].dtype == torch.int64
    unl = UnlabeledSet(tiny_data, read_split(tiny_data, "unlabeled"), 32, (0.5, 2.0), num_strong=2)
    u = unl[(1, 7)]
    assert set(u) == {"weak", "ignore", "strong1", "box1", "strong2", "box2"}
    assert torch.equal(unl[(1, 7)]["strong2"], u["strong2"])


def _palette_png(path: Path, arr: np.ndarray) -> None:
    img = Image.fromarray(arr.astype(np.uint8), mode="P")
    img.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def test_import_voc(tmp_path):
    voc = tmp_path / "VOC2012"
    ids = [f"2007_{i:06d}" for i in range(6)]
    for i, image_id in enumerate(ids):
        (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 16), (i * 30, 0, 0)).save(voc / "JPEGImages" / f"{image_id}.jpg")
        mask = np.zeros((16, 20), np.uint8)
        mask[2:6, 3:9] = i + 1
        mask[0] = 255
        _palette_png(voc / "SegmentationClass" / f"{image_id}.png", mask)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids[:4]) + "\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids[4:]) + "\n")
    out = import_voc(voc, tmp_path / "out", labeled="2", seed=0)
    assert len(load_classes(out)) == 21
    assert len(read_split(out, "labeled")) == 2 and len(read_split(out, "unlabeled")) == 2
    assert read_split(out, "val") == ids[4:]
    assert check_dataset(out) == []
    lab = read_split(out, "labeled")[0]
    assert set(np.unique(load_mask(out / "masks" / f"{lab}.png", 21)).tolist()) <= {0, 255, *range(1, 7)}
    lst = tmp_path / "labeled.txt"
    lst.write_text(f"JPEGImages/{ids[1]}.jpg SegmentationClass/{ids[1]}.png\n")
    out2 = import_voc(voc, tmp_path / "out2", labeled_list=str(lst))
    assert read_split(out2, "labeled") == [ids[1]]


def test_import_cityscapes_maps_label_ids(tmp_path):
    root = tmp_path / "cs"
    for split, city, n in (("train", "aachen", 4), ("val", "frankfurt", 1)):
        for i in range(n):
            stem = f"{city}_000000_{i:06d}"
            (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
            (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 8)).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            label_ids = np.array([[7, 8, 26, 33, 0, 4, 24, 11]] * 8, np.uint8).repeat(2, axis=1)
            Image.fromarray(label_ids).save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
    out = import_cityscapes(root, tmp_path / "out", labeled="1/4")
    assert len(read_split(out, "labeled")) == 1 and len(read_split(out, "unlabeled")) == 3
    mask = np.array(Image.open(out / "masks" / "frankfurt_000000_000000.png"))
    assert mask[0, ::2].tolist() == [0, 1, 13, 18, 255, 255, 11, 2]
    assert json.loads((out / "classes.json").read_text())[0]["name"] == "road"
    assert check_dataset(out) == []
