"""The labeling loop: RLE codec (checked against Label Studio's own), acquisition, and push / annotate /
pull against a real Label Studio server."""
from __future__ import annotations

import json
import subprocess
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from app import acquisition, rle
from app.cli import main as label_main
from app.labeling import (UnknownLabels, annotation_to_mask, effort_by_version, load_state, prediction_result, pull, push,
                          state_path)
from app.labelstudio import LabelStudio, LabelStudioError, label_config
from app.scoring import choose, score_unlabeled
from training.data.folder import class_dicts, load_classes, mask_path, read_split
from training.data.synth import render



def classes_of(data):
    return class_dicts(load_classes(data))


# --- pure functions -----------------------------------------------------------------------------------
def test_rle_round_trips():
    rng = np.random.default_rng(0)
    for values in (rng.integers(0, 4, 5000), np.zeros(300_000), rng.integers(0, 256, 999)):
        values = values.astype(np.uint8)
        assert np.array_equal(rle.decode(rle.encode(values)), values)
    mask = rng.random((37, 53)) > 0.6
    assert np.array_equal(rle.rle_to_mask(rle.mask_to_rle(mask), 37, 53), mask)
    with pytest.raises(ValueError, match="expected 10x10x4"):
        rle.rle_to_mask(rle.mask_to_rle(mask), 10, 10)


def test_acquisition_scores():
    k, h, w = 4, 3, 5
    uniform = {"probs": np.full((k, h, w), 1 / k), "confidence": np.full((h, w), 1 / k), "labels": np.zeros((h, w), int)}
    sure = np.zeros((k, h, w))
    sure[0] = 1
    certain = {"probs": sure, "confidence": np.ones((h, w)), "labels": np.zeros((h, w), int)}
    assert acquisition.score("entropy", uniform) == pytest.approx(np.log(k))
    assert acquisition.score("entropy", certain) == pytest.approx(0, abs=1e-9)
    assert acquisition.score("margin", uniform) == pytest.approx(1) and acquisition.score("margin", certain) == pytest.approx(0)
    assert acquisition.score("least_confidence", uniform) == pytest.approx(0.75)
    flipped = {"labels": np.ones((h, w), int)}
    flipped["labels"][0] = 0
    assert acquisition.score("scale_disagreement", certain, flipped) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="with-probs"):
        acquisition.score("entropy", {"confidence": np.ones((2, 2))})


def test_selection_balances_classes():
    scores = np.array([0.9, 0.85, 0.8, 0.7])
    hist = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], float)
    assert acquisition.select(scores, hist, 2, balance=0) == [0, 1]
    assert acquisition.select(scores, hist, 2, balance=1) == [0, 3]


def test_annotation_rules(tiny_data):
    classes = classes_of(tiny_data)
    labels = np.zeros((6, 8), np.uint8)
    labels[:, 4:] = 2
    result = prediction_result(labels, classes)
    assert [r["value"]["brushlabels"] for r in result] == [["background"], ["square"]]
    assert annotation_to_mask(result, classes, (8, 6)).tolist() == labels.tolist()
    # later regions win where they overlap; unpainted pixels are ignored (255)
    a = np.zeros((6, 8), bool)
    a[:3] = True
    b = np.zeros((6, 8), bool)
    b[:, :2] = True
    regions = [{"type": "brushlabels", "original_width": 8, "original_height": 6,
                "value": {"rle": rle.mask_to_rle(m), "brushlabels": [name]}} for m, name in ((a, "disc"), (b, "ring"))]
    mask = annotation_to_mask(regions, classes, (8, 6))
    assert mask[0, 0] == 4 and mask[0, 5] == 1 and mask[5, 5] == 255
    with pytest.raises(ValueError, match="not exactly one class"):
        annotation_to_mask([{**regions[0], "value": {**regions[0]["value"], "brushlabels": ["zebra"]}}], classes, (8, 6))
    with pytest.raises(ValueError, match="8x6 image, but the image is 9x6"):
        annotation_to_mask(regions, classes, (9, 6))


def test_label_config_lists_classes(tiny_data):
    root = ET.fromstring(label_config(classes_of(tiny_data)))
    labels = root.find("BrushLabels").findall("Label")
    assert [l.get("value") for l in labels] == ["background", "disc", "square", "triangle", "ring"]
    assert labels[1].get("background") == "#800000"


def test_scoring_ranks_every_unlabeled_image(package, tiny_data):
    for function in acquisition.FUNCTIONS:
        scored = score_unlabeled(package, tiny_data, function)
        assert len(scored) == 12 and [s.score for s in scored] == sorted((s.score for s in scored), reverse=True)
    picks = choose(scored, tiny_data, 3)
    assert len({p.image_id for p in picks}) == 3


# --- against a real Label Studio ------------------------------------------------------------------------
def test_rle_matches_label_studio_sdk(label_studio, tmp_path):
    """Our codec and the SDK's (label_studio_sdk.converter.brush) read each other's output."""
    mask = np.zeros((23, 31), np.uint8)
    mask[3:15, 4:20] = 255
    mask[18, ::3] = 255
    ours = rle.mask_to_rle(mask > 0)
    script = (
        "import json, sys, numpy as np\n"
        "from label_studio_sdk.converter.brush import decode_rle, mask2rle\n"
        "d = json.load(open(sys.argv[1]))\n"
        "alpha = decode_rle(d['ours']).reshape(23, 31, 4)[:, :, 3]\n"
        "print(json.dumps({'decoded': alpha.tolist(), 'theirs': mask2rle(np.array(d['mask'], dtype=np.uint8))}))\n")
    payload = tmp_path / "in.json"
    payload.write_text(json.dumps({"ours": ours, "mask": mask.tolist()}))
    out = json.loads(subprocess.run([str(label_studio.python), "-c", script, str(payload)], check=True,
                                    capture_output=True, text=True).stdout)
    assert np.array_equal(np.array(out["decoded"]) > 0, mask > 0)
    assert np.array_equal(rle.rle_to_mask(out["theirs"], 23, 31), mask > 0)


def test_label_studio_installs_once_when_two_callers_start_it_together(tmp_path, monkeypatch):
    """The second caller waits on the install lock and finds the first's install, instead of running pip beside it."""
    import threading
    import time
    import types

    from app import local_labelstudio

    venv, calls = tmp_path / "ls-venv", []

    def install(cmd, check):
        calls.append(cmd[0])
        time.sleep(0.3)  # long enough for the other caller to arrive while this one installs
        (venv / "bin").mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(local_labelstudio, "VENV", venv)
    monkeypatch.setattr(local_labelstudio, "subprocess", types.SimpleNamespace(run=install))
    found = []
    callers = [threading.Thread(target=lambda: found.append(local_labelstudio.ensure_venv())) for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(30)
    assert found == [venv / "bin" / "label-studio"] * 2
    assert len(calls) == 2  # one venv, one pip install
    assert (venv / f".label-studio-{local_labelstudio.VERSION}").is_file()


def test_a_failed_label_studio_install_releases_the_lock_for_the_next_caller(tmp_path, monkeypatch):
    import subprocess
    import types

    from app import local_labelstudio

    venv, calls = tmp_path / "ls-venv", []

    def install(cmd, check):
        calls.append(cmd[0])
        if len(calls) == 2:  # the first caller's pip fails: no marker is written
            raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(local_labelstudio, "VENV", venv)
    monkeypatch.setattr(local_labelstudio, "subprocess", types.SimpleNamespace(run=install))
    with pytest.raises(subprocess.CalledProcessError):
        local_labelstudio.ensure_venv()
    assert not (venv / f".label-studio-{local_labelstudio.VERSION}").exists()
    assert local_labelstudio.ensure_venv() == venv / "bin" / "label-studio"  # not blocked by the failed caller
    assert len(calls) == 4 and (venv / f".label-studio-{local_labelstudio.VERSION}").is_file()


def test_connection_errors_are_clear(label_studio):
    with pytest.raises(LabelStudioError, match="rejected the token"):
        LabelStudio(label_studio.url, "0" * 40).whoami()
    with pytest.raises(LabelStudioError, match="not reachable"):
        LabelStudio("http://127.0.0.1:9", "x" * 40).whoami()


def test_push_annotate_pull(label_studio, package, data_copy, capsys):
    data = data_copy
    client = LabelStudio(label_studio.url, label_studio.token)
    scored = score_unlabeled(package, data, "entropy")
    picks = choose(scored, data, 3)
    preds = {s.image_id: {"labels": s.labels, "confidence": s.confidence, "score": s.score} for s in picks}
    report = push(client, data, preds, "model-v1", "scaleseg test")
    assert sorted(report.pushed) == sorted(preds)
    tasks = list(client.tasks(report.project_id))
    assert len(tasks) == 3
    for task in tasks:
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == "model-v1" and prediction["result"][0]["type"] == "brushlabels"
        assert task["data"]["image"].startswith("/data/local-files/?d=")
    # the image is served to the labeller through the local-files storage
    image = client._send("GET", tasks[0]["data"]["image"])
    assert image.status_code == 200 and image.content[:4] == b"\x89PNG"

    # pushing again, even after losing the state file, never duplicates a task
    assert push(client, data, preds, "model-v1", "scaleseg test").pushed == []
    state_path(data).unlink()
    assert push(client, data, preds, "model-v1", "scaleseg test").pushed == []
    assert len(list(client.tasks(report.project_id))) == 3

    # a labeller annotates: the true mask on two tasks, skips the third
    classes = classes_of(data)
    truth = {}
    for task in tasks[:2]:
        image_id = task["data"]["scaleseg_id"]
        _, truth[image_id] = render(int(image_id.split("_")[1]), 0, 48, load_classes(data))
        client.create_annotation(task["id"], prediction_result(truth[image_id], classes))
    skipped_id = tasks[2]["data"]["scaleseg_id"]
    client.create_annotation(tasks[2]["id"], [], cancelled=True)

    before = read_split(data, "labeled")
    result = pull(client, data)
    assert sorted(result.written) == sorted(truth) and result.skipped == [skipped_id] and not result.errors
    # the labelling effort: the share of each true mask's pixels where the pushed pre-annotation was wrong
    for image_id, mask in truth.items():
        labelled = mask != 255
        expected = float((preds[image_id]["labels"][labelled] != mask[labelled]).mean())
        assert result.effort[image_id] == pytest.approx(expected)
        assert load_state(data)["pulled"][image_id]["effort"] == pytest.approx(expected)
        assert load_state(data)["pulled"][image_id]["model_version"] == "model-v1"
    assert effort_by_version(load_state(data))["model-v1"] == (pytest.approx(np.mean(list(result.effort.values()))), 2)
    for image_id, mask in truth.items():
        assert np.array_equal(np.array(Image.open(mask_path(data, image_id))), mask)
    assert read_split(data, "labeled") == before + result.written
    assert not set(truth) & set(read_split(data, "unlabeled"))
    assert set(load_state(data)["pulled"]) == set(truth)

    # a human mask is never silently replaced
    first = next(iter(truth))
    edited = truth[first].copy()
    edited[:10] = 3
    client.create_annotation(tasks[0]["id"], prediction_result(edited, classes))
    again = pull(client, data)
    assert again.conflicts == [first] and np.array_equal(np.array(Image.open(mask_path(data, first))), truth[first])
    assert label_main(["pull", str(data), "--url", label_studio.url, "--token", label_studio.token, "--overwrite"]) == 0
    assert np.array_equal(np.array(Image.open(mask_path(data, first))), edited)
    out = capsys.readouterr().out
    assert "written 1" in out and "labelling effort:" in out
    labelled = edited != 255
    assert load_state(data)["pulled"][first]["effort"] == pytest.approx(
        float((preds[first]["labels"][labelled] != edited[labelled]).mean()))


def test_pull_refuses_unknown_labels_and_writes_nothing(label_studio, package, data_copy):
    client = LabelStudio(label_studio.url, label_studio.token)
    scored = score_unlabeled(package, data_copy, "least_confidence")[:2]
    preds = {s.image_id: {"labels": s.labels, "confidence": s.confidence, "score": s.score} for s in scored}
    report = push(client, data_copy, preds, "v1", "scaleseg unknown labels")
    tasks = {t["data"]["scaleseg_id"]: t for t in client.tasks(report.project_id)}
    good, bad_id = scored[1], scored[0].image_id
    client.create_annotation(tasks[good.image_id]["id"], prediction_result(good.labels, classes_of(data_copy)))
    bad = prediction_result(scored[0].labels, classes_of(data_copy))
    bad[0]["value"]["brushlabels"] = ["zebra"]
    client.create_annotation(tasks[bad_id]["id"], bad)
    labeled = read_split(data_copy, "labeled")
    with pytest.raises(UnknownLabels) as err:
        pull(client, data_copy)
    assert f"'zebra' in task(s) {tasks[bad_id]['id']}" in str(err.value) and "nothing was pulled" in str(err.value)
    assert '"id": 5' in str(err.value)  # how to add it: the next id of classes.json
    # the well-labelled task is held back too: a pull is all or nothing on labels
    assert not mask_path(data_copy, bad_id).exists() and not mask_path(data_copy, good.image_id).exists()
    assert read_split(data_copy, "labeled") == labeled
    # once the class is in classes.json, both come in
    classes = json.loads((data_copy / "classes.json").read_text())
    (data_copy / "classes.json").write_text(json.dumps(classes + [{"id": 5, "name": "zebra", "color": [9, 9, 9]}]))
    assert sorted(pull(client, data_copy).written) == sorted(preds)


def test_cold_start_push_without_a_model(label_studio, data_copy, capsys):
    data = data_copy
    connection = ["--project", "cold start", "--url", label_studio.url, "--token", label_studio.token]
    assert label_main(["push", str(data), "-k", "3"] + connection) == 0
    assert "pushed 3 task(s)" in capsys.readouterr().out
    state = load_state(data)
    client = LabelStudio(label_studio.url, label_studio.token)
    tasks = list(client.tasks(state["project_id"]))
    assert len(tasks) == 3 and all(not t["predictions"] for t in tasks)  # no model: no pre-annotation
    first = {t["data"]["scaleseg_id"] for t in tasks}
    assert first <= set(read_split(data, "unlabeled")) and all(state["tasks"][i]["model_version"] is None for i in first)
    assert not (data / "labeling" / "preannotations").exists()
    # the next cold push picks other images (diversity around what was sent), and random draws by seed
    assert label_main(["push", str(data), "-k", "2"] + connection) == 0
    assert label_main(["push", str(data), "-k", "2", "--function", "random", "--seed", "1"] + connection) == 0
    ids = [t["data"]["scaleseg_id"] for t in client.tasks(state["project_id"])]
    assert len(ids) == 7 == len(set(ids))
    with pytest.raises(SystemExit, match="--function entropy needs a model's predictions; pass a model package"):
        label_main(["push", str(data), "--function", "entropy"] + connection)
    # a finished cold-start task is pulled as any other (no pre-annotation: no labelling effort)
    mask = np.zeros((48, 48), np.uint8)
    client.create_annotation(tasks[0]["id"], prediction_result(mask, classes_of(data)))
    result = pull(client, data)
    assert result.written == [tasks[0]["data"]["scaleseg_id"]] and result.effort == {}


def test_push_by_upload_and_disk_full_on_pull(label_studio, package, data_copy, monkeypatch):
    from app import labeling

    client = LabelStudio(label_studio.url, label_studio.token)
    scored = score_unlabeled(package, data_copy, "margin")[:2]
    preds = {s.image_id: {"labels": s.labels, "confidence": s.confidence, "score": s.score} for s in scored}
    report = push(client, data_copy, preds, "v1", "scaleseg upload", delivery="upload")
    tasks = list(client.tasks(report.project_id))
    assert len(tasks) == 2 and all(t["data"]["image"].startswith("/data/upload/") for t in tasks)
    assert client._send("GET", tasks[0]["data"]["image"]).content[:4] == b"\x89PNG"
    for task in tasks:
        client.create_annotation(task["id"], prediction_result(preds[task["data"]["scaleseg_id"]]["labels"], classes_of(data_copy)))

    def disk_full(path, mask):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(labeling, "write_mask", disk_full)
    result = pull(client, data_copy)
    assert set(result.errors) == set(preds) and all("No space left" in e for e in result.errors.values())
    assert result.written == [] and not any(mask_path(data_copy, i).exists() for i in preds)
    assert not set(preds) & set(read_split(data_copy, "labeled"))
