"""The labeling loop keeps human labels and validation data safe, says where it stands, and fails fast
when Label Studio hangs: against a real Label Studio server where Label Studio is involved."""
from __future__ import annotations

import socket
import sys
import time

import numpy as np
import pytest
from PIL import Image

from app.cli import main as label_main
from app.labeling import load_state, prediction_result, pull, push
from app.labelstudio import LabelStudio, LabelStudioError
from app.versions import _run
from training.data.folder import class_dicts, load_classes, mask_path, read_split


def classes_of(data):
    return class_dicts(load_classes(data))


def read_mask(data, image_id):
    with Image.open(mask_path(data, image_id)) as img:
        return np.array(img)


def pred(labels):
    return {"labels": labels, "confidence": np.ones(labels.shape, np.float32), "score": 0.5}


def test_validation_masks_are_never_replaced_nor_trained_on(label_studio, data_copy):
    data = data_copy
    client = LabelStudio(label_studio.url, label_studio.token)
    val_id = read_split(data, "val")[0]
    truth = read_mask(data, val_id)
    report = push(client, data, {val_id: pred(truth)}, "v1", "val safety")
    (task,) = list(client.tasks(report.project_id))
    other = truth.copy()
    other[:8] = 3
    client.create_annotation(task["id"], prediction_result(other, classes_of(data)))
    labeled = read_split(data, "labeled")

    result = pull(client, data, overwrite=True)
    assert result.protected == [val_id] and result.written == []
    assert np.array_equal(read_mask(data, val_id), truth)
    assert read_split(data, "labeled") == labeled and val_id in read_split(data, "val")

    result = pull(client, data, replace_val=[val_id])  # the explicit, per-image decision
    assert result.written == [val_id] and np.array_equal(read_mask(data, val_id), other)
    assert read_split(data, "labeled") == labeled and val_id in read_split(data, "val")


def test_an_edited_annotation_updates_its_mask_and_another_human_conflicts(label_studio, data_copy):
    data = data_copy
    classes = classes_of(data)
    client = LabelStudio(label_studio.url, label_studio.token)
    image_id = read_split(data, "unlabeled")[0]
    first = np.zeros((48, 48), np.uint8)
    first[10:30, 10:30] = 1
    report = push(client, data, {image_id: pred(first)}, "v1", "edits")
    (task,) = list(client.tasks(report.project_id))
    annotation = client.create_annotation(task["id"], prediction_result(first, classes))
    assert pull(client, data).written == [image_id]

    edited = first.copy()
    edited[30:40] = 2
    client.request("PATCH", f"/api/annotations/{annotation['id']}/", json={"result": prediction_result(edited, classes)})
    result = pull(client, data)
    assert result.written == [image_id] and result.updated == [image_id] and not result.conflicts
    assert np.array_equal(read_mask(data, image_id), edited)
    assert read_split(data, "labeled").count(image_id) == 1

    someone_else = edited.copy()
    someone_else[:5] = 4
    time.sleep(1.1)  # a later updated_at, so this annotation is the latest
    client.create_annotation(task["id"], prediction_result(someone_else, classes))
    result = pull(client, data)
    assert result.conflicts == [image_id] and np.array_equal(read_mask(data, image_id), edited)


def test_changing_the_project_name_is_refused_unless_switching(label_studio, data_copy):
    data = data_copy
    client = LabelStudio(label_studio.url, label_studio.token)
    image_id = read_split(data, "unlabeled")[1]
    labels = np.zeros((48, 48), np.uint8)
    push(client, data, {image_id: pred(labels)}, "v1", "first name")
    with pytest.raises(LabelStudioError, match="'first name'"):
        push(client, data, {image_id: pred(labels)}, "v1", "second name")
    assert not any(p["title"] == "second name" for p in client.projects())
    report = push(client, data, {image_id: pred(labels)}, "v1", "second name", switch_project=True)
    assert report.pushed == [image_id] and load_state(data)["project_title"] == "second name"


def test_status_counts(label_studio, data_copy, capsys):
    from app.labeling import status

    data = data_copy
    client = LabelStudio(label_studio.url, label_studio.token)
    assert status(client, data).summary() == "Nothing pushed from this dataset yet."
    ids = read_split(data, "unlabeled")[2:5]
    labels = np.zeros((48, 48), np.uint8)
    report = push(client, data, {i: pred(labels) for i in ids}, "v1", "counts")
    tasks = list(client.tasks(report.project_id))
    for task in tasks[:2]:
        client.create_annotation(task["id"], prediction_result(labels, classes_of(data)))
    s = status(client, data)
    assert (s.pushed, s.annotated, s.pulled, s.pending) == (3, 2, 0, 1)
    pull(client, data)
    assert "3 pushed, 2 annotated, 2 pulled, 1 pending" in status(client, data).summary()
    assert label_main(["status", str(data), "--url", label_studio.url, "--token", label_studio.token]) == 0
    assert "3 pushed, 2 annotated, 2 pulled, 1 pending" in capsys.readouterr().out


def test_a_label_studio_that_does_not_answer_fails_fast():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    backlog = []
    for _ in range(3):  # fill the accept queue: further connections hang like a stuck server's
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        backlog.append(sock)
    try:
        tic = time.monotonic()
        with pytest.raises(LabelStudioError, match="did not answer within"):
            LabelStudio(f"http://127.0.0.1:{port}", "x" * 40).whoami()
        assert time.monotonic() - tic < 10
    finally:
        for sock in backlog:
            sock.close()
        server.close()


def test_a_failed_stage_names_its_cause_and_log(tmp_path):
    log_path = tmp_path / "runs" / "v2" / "train.log"
    log_path.parent.mkdir(parents=True)
    with open(log_path, "w") as log:
        log.write("earlier output\n")
        with pytest.raises(RuntimeError) as err:
            _run("training", [sys.executable, "-c", "import sys; print('step 1'); "
                              "sys.exit('scaleseg train: val id synth_00020 is also in splits/labeled.txt')"], log)
    message = str(err.value)
    assert message.startswith("training failed (exit code 1): scaleseg train: val id synth_00020 is also in splits/labeled.txt")
    assert str(log_path) in message


def test_a_failed_retrain_says_why_and_where_the_log_is(package, data_copy, tmp_path):
    from app.versions import Registry, Retrainer

    registry = Registry(tmp_path / "work")
    registry.add({"name": "v1", "dir": str(package.resolve()), "method": "scalematch", "miou": 0.1})
    labeled = data_copy / "splits" / "labeled.txt"
    labeled.write_text(labeled.read_text() + "no_such_image\n")  # a broken dataset: training refuses at once
    retrainer = Retrainer(registry, data_copy, on_promote=lambda package_dir: None)
    job = retrainer.start("supervised", 2)
    deadline = time.time() + 300
    while retrainer.busy and time.time() < deadline:
        time.sleep(0.5)
    assert job.status == "failed"
    assert job.message.startswith("v2 failed: training failed (exit code 2): ")
    assert "no_such_image" in job.message and str(job.run_dir / "train.log") in job.message
    assert registry.read()["serving"] == "v1"


def test_tasks_made_in_label_studio_are_pulled_with_their_images(label_studio, data_copy, tmp_path, capsys):
    data = data_copy
    classes = classes_of(data)
    client = LabelStudio(label_studio.url, label_studio.token)
    report = push(client, data, {read_split(data, "unlabeled")[0]: None}, None, "made by hand")
    pid = report.project_id
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), np.uint8)).save(photos / "new.png")
    Image.fromarray(rng.integers(0, 255, (60, 60, 3), np.uint8)).save(photos / "big.png")  # over the pixel cap below
    val_id = read_split(data, "val")[0]
    with Image.open(data / "images" / f"{val_id}.png") as img:
        img.save(photos / "copy-of-val.png")  # the same pixels as a validation image, under another name

    def by_hand(image_url, mask=None):
        (task_id,) = client.import_tasks(pid, [{"data": {"image": image_url}}])
        if mask is not None:
            client.create_annotation(task_id, prediction_result(mask, classes))
        return task_id

    new_mask = np.zeros((24, 32), np.uint8)
    new_mask[4:20, 8:24] = 2
    new_task = by_hand(client.upload_image(pid, photos / "new.png"), new_mask)
    big_task = by_hand(client.upload_image(pid, photos / "big.png"), np.zeros((60, 60), np.uint8))
    val_task = by_hand(client.upload_image(pid, photos / "copy-of-val.png"), np.full((48, 48), 3, np.uint8))
    foreign_task = by_hand("http://198.51.100.7/photos/street.png", np.zeros((24, 32), np.uint8))
    by_hand(client.upload_image(pid, photos / "new.png"))  # not labelled yet: nothing comes in
    images_before = sorted(p.name for p in (data / "images").iterdir())
    labeled, unlabeled, val_truth = read_split(data, "labeled"), read_split(data, "unlabeled"), read_mask(data, val_id)

    result = pull(client, data, max_pixels=48 * 48)
    (new_id,) = result.imported
    assert result.written == [new_id] and new_id.startswith("u_")
    assert np.array_equal(read_mask(data, new_id), new_mask)
    with Image.open(data / "images" / f"{new_id}.png") as img:
        assert np.array_equal(np.array(img), np.array(Image.open(photos / "new.png")))
    assert read_split(data, "labeled") == labeled + [new_id] and read_split(data, "unlabeled") == unlabeled
    # the copy of the validation image is that image (de-duplicated by its pixels), so its mask stays
    assert result.protected == [val_id] and np.array_equal(read_mask(data, val_id), val_truth)
    assert val_id not in read_split(data, "labeled")
    assert "larger than the 2,304-pixel limit" in result.errors[f"task {big_task}"]
    assert "198.51.100.7" in result.errors[f"task {foreign_task}"]
    assert f"not on Label Studio at {label_studio.url}" in result.errors[f"task {foreign_task}"]
    assert sorted(p.name for p in (data / "images").iterdir()) == sorted(images_before + [f"{new_id}.png"])
    assert load_state(data)["imported"] == {str(new_task): new_id, str(val_task): val_id}

    # pulling again changes nothing and fetches nothing new; an edit in Label Studio is an update
    again = pull(client, data, max_pixels=48 * 48)
    assert again.written == [] and again.unchanged == [new_id] and read_split(data, "labeled") == labeled + [new_id]
    (task,) = [t for t in client.tasks(pid) if t["id"] == new_task]
    edited = new_mask.copy()
    edited[:4] = 1
    client.request("PATCH", f"/api/annotations/{task['annotations'][0]['id']}/", json={"result": prediction_result(edited, classes)})
    # (under the default caps the big image comes in as well)
    assert label_main(["pull", str(data), "--url", label_studio.url, "--token", label_studio.token]) == 1
    out = capsys.readouterr().out
    assert "written 2" in out and "2 of the written from tasks made in Label Studio: ['" + new_id in out
    assert f"error task {foreign_task}: its image http://198.51.100.7/photos/street.png is not on Label Studio" in out
    assert np.array_equal(read_mask(data, new_id), edited) and read_split(data, "labeled").count(new_id) == 1
    assert len(read_split(data, "labeled")) == len(labeled) + 2
