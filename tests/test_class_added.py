"""A class added later: `scaleseg data add-class` appends it to classes.json, and `train --init-from` a run on the
earlier classes keeps that run's weights, re-initialising only the class-shaped part of its classifier."""
from __future__ import annotations

import json
import re
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

from app.versions import Registry, Retrainer, register_initial
from tests.conftest import tiny_config
from training import engine
from training.checkpoint import CheckpointError, inference_payload, load_checkpoint, save_checkpoint
from training.cli import main
from training.data.folder import load_classes, mask_path, read_split
from training.data.validate import check_dataset
from training.engine import Trainer, class_dim
from training.evaluate import score


def test_add_class_appends_the_next_id(data_copy, capsys):
    masks = {p.name: p.read_bytes() for p in (data_copy / "masks").iterdir()}
    assert main(["data", "add-class", str(data_copy), "tree", "--color", "10,200,30"]) == 0
    assert "added class 5 'tree' (#0ac81e)" in capsys.readouterr().out
    assert main(["data", "add-class", str(data_copy), "sky"]) == 0
    classes = load_classes(data_copy)
    assert [(c.id, c.name) for c in classes[5:]] == [(5, "tree"), (6, "sky")] and classes[5].color == (10, 200, 30)
    assert len({c.color for c in classes}) == 7  # the default colour is one no class has
    assert {p.name: p.read_bytes() for p in (data_copy / "masks").iterdir()} == masks
    assert check_dataset(data_copy) == []


@pytest.mark.parametrize("args, message", [
    (["Disc"], "already has the class 'disc' (id 1)"),
    (["tree", "--color", "#800000"], "the class 'disc' already has the colour #800000"),
    (["  "], "a class needs a non-empty name"),
])
def test_add_class_refuses_duplicates_and_clashes(data_copy, capsys, args, message):
    before = (data_copy / "classes.json").read_bytes()
    assert main(["data", "add-class", str(data_copy), *args]) == 2
    assert message in capsys.readouterr().err
    assert (data_copy / "classes.json").read_bytes() == before


def test_add_class_refuses_past_255_classes_and_bad_colours(tmp_path, capsys):
    (tmp_path / "classes.json").write_text(json.dumps([{"id": i, "name": f"c{i}", "color": [i, 0, 0]} for i in range(255)]))
    assert main(["data", "add-class", str(tmp_path), "more"]) == 2
    assert "id 255 means 'ignore', so no class can be added" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "add-class", str(tmp_path), "x", "--color", "300,0,0"])
    assert "is not #rrggbb or R,G,B" in capsys.readouterr().err


def test_init_from_fewer_classes_keeps_the_network_and_grows_the_classifier(checkpoints, data_copy, tmp_path, capsys):
    assert main(["data", "add-class", str(data_copy), "tree"]) == 0
    cfg = tiny_config(data_copy, tmp_path / "run", method="psmt")
    cfg.model.init_from = str(checkpoints["supervised"])
    cfg.run.max_iters = 1
    trainer = Trainer(cfg)
    out = capsys.readouterr().out
    assert "kept 522 tensors: model (encoder, aspp, reduce, fuse), teachers.0 (encoder" in out
    assert "re-initialised for 6 classes (new: tree), the 5 earlier classes' weights kept: model (classifier), " \
           "teachers.0 (classifier), teachers.1 (classifier)" in out
    source = load_checkpoint(checkpoints["supervised"])["inference"]["state_dict"]
    for net in (trainer.method.model, *trainer.method.teachers):
        state = net.state_dict()
        assert all(torch.equal(state[k], v) for k, v in source.items() if not k.startswith("classifier."))
        assert state["classifier.weight"].shape[0] == 6 and torch.equal(state["classifier.weight"][:5], source["classifier.weight"])
        assert torch.equal(state["classifier.bias"][:5], source["classifier.bias"])
        assert not torch.equal(state["classifier.weight"][5], torch.zeros_like(state["classifier.weight"][5]))
    trainer.fit()
    assert load_checkpoint(tmp_path / "run" / "last.pt")["inference"]["state_dict"]["classifier.weight"].shape[0] == 6


@pytest.fixture
def refuse_building(monkeypatch):
    """Refusals come before any network is built."""
    def build(*args, **kwargs):
        raise AssertionError("a network was built before the --init-from checkpoint was checked")
    monkeypatch.setattr(engine, "build_method", build)


def test_init_from_refuses_more_or_reordered_classes(checkpoints, tiny_data, tmp_path, refuse_building):
    ckpt = inference_payload(load_checkpoint(checkpoints["supervised"]))
    more = dict(ckpt, classes=[*ckpt["classes"], {"id": 5, "name": "tree", "color": [9, 9, 9]}])
    save_checkpoint(tmp_path / "more.pt", more)
    classes = [dict(c) for c in ckpt["classes"]]
    classes[1]["name"], classes[2]["name"] = classes[2]["name"], classes[1]["name"]
    save_checkpoint(tmp_path / "reordered.pt", dict(ckpt, classes=classes))
    cfg = tiny_config(tiny_data, tmp_path / "run")
    cfg.model.init_from = str(tmp_path / "more.pt")
    with pytest.raises(CheckpointError, match="trained on 6 classes .* can add classes, never drop them"):
        Trainer(cfg, progress=False)
    cfg.model.init_from = str(tmp_path / "reordered.pt")
    with pytest.raises(CheckpointError, match="needs the run's classes first, in the same order"):
        Trainer(cfg, progress=False)


def test_class_dim():
    assert class_dim(torch.Size([5, 256, 1, 1]), torch.Size([6, 256, 1, 1]), 5, 6) == 0
    assert class_dim(torch.Size([5]), torch.Size([6]), 5, 6) == 0
    assert class_dim(torch.Size([5, 256, 1, 1]), torch.Size([6, 128, 1, 1]), 5, 6) is None  # another backbone too
    assert class_dim(torch.Size([64, 3, 7, 7]), torch.Size([32, 3, 7, 7]), 5, 6) is None


def paint_val(data, value: int) -> None:
    """Every val mask's top-left 12x12 corner set to ``value``: a new class's pixels, or their ignored twin."""
    for image_id in read_split(data, "val"):
        mask = np.array(Image.open(mask_path(data, image_id)))
        mask[:12, :12] = value
        Image.fromarray(mask).save(mask_path(data, image_id))


def eval_json(args, out) -> dict:
    assert main(["eval", *map(str, args), "--scales", "1", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_eval_known_classes_ignores_the_pixels_of_added_classes(checkpoints, package, data_copy, tmp_path, capsys):
    ignored = tmp_path / "ignored"  # the same val masks with the new class's pixels marked 255 and the old classes.json
    shutil.copytree(data_copy, ignored)
    paint_val(ignored, 255)
    assert main(["data", "add-class", str(data_copy), "tree"]) == 0
    paint_val(data_copy, 5)
    old = checkpoints["supervised"]
    capsys.readouterr()
    assert main(["eval", str(old), str(data_copy)]) == 2
    assert "gained ['tree'] since: --known-classes scores the 5 classes this model knows" in capsys.readouterr().err
    for model in (old, package):  # a checkpoint in PyTorch and a package through serving's Segmenter
        known = eval_json([model, data_copy, "--known-classes"], tmp_path / "known.json")
        assert f"scoring the 5 classes {model} knows; pixels labelled ['tree'] are ignored" in capsys.readouterr().out
        assert known["scales"] == eval_json([model, ignored], tmp_path / "same.json")["scales"]
        assert list(known["scales"]["1.0"]["iou"]) == [c.name for c in load_classes(ignored)]

    # a model on all 6 classes, scored on the 5 the old one knows: the same pixels, and its "tree" is wrong where
    # it lands on an old class
    cfg = tiny_config(data_copy, tmp_path / "new", method="supervised")
    cfg.model.init_from, cfg.run.max_iters = str(old), 1
    Trainer(cfg, progress=False).fit()
    new = tmp_path / "new" / "last.pt"
    assert len(eval_json([new, data_copy], tmp_path / "all.json")["scales"]["1.0"]["iou"]) == 6
    capsys.readouterr()
    versus = eval_json([new, data_copy, "--known-classes", old], tmp_path / "versus.json")
    assert f"scoring the 5 classes {old} knows" in capsys.readouterr().out
    assert list(versus["scales"]["1.0"]["iou"]) == [c.name for c in load_classes(ignored)]


def test_eval_known_classes_refuses_what_does_not_line_up(checkpoints, data_copy, tmp_path, capsys):
    old = checkpoints["supervised"]
    assert main(["eval", str(old), str(data_copy), "--known-classes", str(tmp_path / "gone.pt")]) == 2
    assert "--known-classes " + str(tmp_path / "gone.pt") + ": no such checkpoint or model package" in capsys.readouterr().err
    ckpt = inference_payload(load_checkpoint(old))
    other = [dict(c) for c in ckpt["classes"]]
    other[1]["name"], other[2]["name"] = other[2]["name"], other[1]["name"]
    save_checkpoint(tmp_path / "reordered.pt", dict(ckpt, classes=other))
    assert main(["eval", str(old), str(data_copy), "--known-classes", str(tmp_path / "reordered.pt")]) == 2
    assert "must be the first classes of the model scored, in the same order" in capsys.readouterr().err
    (data_copy / "classes.json").write_text(json.dumps([{"id": c["id"], "name": c["name"], "color": c["color"]} for c in other]))
    assert main(["eval", str(old), str(data_copy), "--known-classes"]) == 2
    assert "--known-classes needs the model's classes first in classes.json" in capsys.readouterr().err


def test_a_prediction_of_a_class_not_scored_counts_against_the_true_class():
    # scored: classes 0 and 1; class 2 (added later) and 255 are ignored in the truth, and a prediction of 2 on a
    # pixel of class 0 is a miss for class 0
    sample = {"image": torch.zeros(1, 3, 2, 3), "mask": torch.tensor([[0, 0, 1], [1, 2, 255]]), "id": "a"}
    pred = torch.tensor([[[0, 2, 1], [1, 1, 0]]])
    result = score(lambda x: pred, [dict(sample, image=sample["image"][0])], ["a", "b"], torch.device("cpu"))["1.0"]
    assert result["iou"] == {"a": 50.0, "b": 100.0} and result["miou"] == 75.0 and result["pixel_acc"] == 75.0


def paint_labeled(data, value: int) -> None:
    """The new class in the training masks too, so a retraining sees it."""
    for image_id in read_split(data, "labeled"):
        mask = np.array(Image.open(mask_path(data, image_id)))
        mask[-12:, -12:] = value
        Image.fromarray(mask).save(mask_path(data, image_id))


def test_app_retrain_after_a_class_was_added(package, data_copy, tmp_path):
    """The serving model knows 5 classes, the dataset 6: selftrain (whose teacher could never label the new class)
    becomes supervised, and the new version is compared with the serving one on the 5 classes both know."""
    registry = Registry(tmp_path / "work")
    register_initial(registry, package, data_copy, "cpu")
    assert main(["data", "add-class", str(data_copy), "tree"]) == 0
    paint_val(data_copy, 5)
    paint_labeled(data_copy, 5)
    promoted = []
    retrainer = Retrainer(registry, data_copy, promoted.append, {"device": "cpu"})
    job = retrainer.start("selftrain", 2, from_current=True)
    assert job.method == "supervised" and job.added == ["tree"]
    assert job.note == "selftrain's teacher, the serving model v1, knows 5 classes and not ['tree']: training supervised instead"
    deadline = time.time() + 300
    while retrainer.busy and time.time() < deadline:
        time.sleep(0.5)
    assert job.status == "done", job.message
    assert "--init-from" in (job.run_dir / "train.log").read_text()  # from the serving model's weights
    def classes(report: str) -> list[str]:
        return list(json.loads((job.run_dir / report).read_text())["scales"]["1.0"]["iou"])
    assert len(classes("eval-new.json")) == 6 and classes("eval-new-known.json") == classes("eval-serving.json")
    assert len(classes("eval-serving.json")) == 5
    new, compared, serving = (job.result[k]["miou"] for k in ("new", "compared", "serving"))
    assert job.promoted == (compared >= serving) and bool(promoted) == job.promoted
    assert (f"v2 (ONNX Runtime): mIoU {new:.2f} on all 6 classes; on the 5 classes v1 knows {compared:.2f} vs serving "
            f"{serving:.2f}") in job.message and job.message.endswith(f"({job.note})")


@pytest.mark.parametrize("damage, message", [
    (lambda classes: "[{", "not valid JSON"),
    (lambda classes: json.dumps([classes[0], dict(classes[1], name=classes[2]["name"]),
                                 dict(classes[2], name=classes[1]["name"]), *classes[3:]]),
     "Classes can only be added after the existing ones (`scaleseg data add-class`), never renamed, reordered or removed"),
    (lambda classes: json.dumps(classes[:4]), "never renamed, reordered or removed"),
])
def test_app_retrain_refuses_a_broken_or_changed_classes_json(package, data_copy, tmp_path, damage, message):
    registry = Registry(tmp_path / "work")
    registry.add({"name": "v1", "dir": str(package), "method": "scalematch"})
    classes = json.loads((data_copy / "classes.json").read_text())
    (data_copy / "classes.json").write_text(damage(classes))
    retrainer = Retrainer(registry, data_copy, lambda package: None, {"device": "cpu"})
    with pytest.raises(RuntimeError, match=re.escape(message)) as err:
        retrainer.start("supervised", 2)
    assert "nothing was started" in str(err.value) and retrainer.job is None
