"""`scaleseg data import labelstudio` on an export made by the real Label Studio server."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from app import rle
from app.import_labelstudio import import_labelstudio
from app.labeling import pull
from app.labelstudio import LabelStudio
from training.cli import main
from training.data.folder import DatasetError, load_classes, read_mask, read_split

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="label" toName="image"><Label value="car"/><Label value="tree"/></BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="car"/><Label value="tree"/></PolygonLabels>
</View>"""


CAR = np.zeros((20, 40), bool)
CAR[2:10, 4:12] = True
BRUSH = {"from_name": "label", "to_name": "image", "type": "brushlabels", "original_width": 40, "original_height": 20,
         "value": {"format": "rle", "rle": rle.mask_to_rle(CAR), "brushlabels": ["car"]}}
POLYGON = {"from_name": "poly", "to_name": "image", "type": "polygonlabels", "original_width": 40, "original_height": 20,
           "value": {"points": [[50, 50], [100, 50], [100, 100], [50, 100]], "polygonlabels": ["tree"]}}


def make_project(label_studio, photos, title, stem, n_images, n_tasks, step):
    """`n_images` flat grey photos in `photos`, the first `n_tasks` uploaded to a new project as its tasks."""
    photos.mkdir()
    for i in range(n_images):
        Image.fromarray(np.full((20, 40, 3), step * i, np.uint8)).save(photos / f"{stem}{i}.png")
    client = LabelStudio(label_studio.url, label_studio.token)
    project = client.request("POST", "/api/projects", json={"title": title, "label_config": CONFIG})
    tasks = client.import_tasks(project["id"], [{"data": {"image": client.upload_image(project["id"], photos / f"{stem}{i}.png")}}
                                                for i in range(n_tasks)])
    return client, project, tasks


def test_labelstudio_export_with_brush_and_polygons(label_studio, tmp_path, capsys):
    photos = tmp_path / "photos"
    client, project, tasks = make_project(label_studio, photos, "own labels", "shot", 4, 3, 50)
    client.create_annotation(tasks[0], [BRUSH, POLYGON])
    client.create_annotation(tasks[1], [BRUSH], cancelled=True)  # skipped: the image stays unlabelled
    export = client.request("GET", f"/api/projects/{project['id']}/export", params={"exportType": "JSON"})
    assert "upload" in export[0]["data"]["image"]  # Label Studio's own upload URLs, with its name prefix
    (tmp_path / "export.json").write_text(json.dumps(export))

    out = tmp_path / "data"
    assert main(["data", "import", "labelstudio", str(tmp_path / "export.json"), str(out), "--images", str(photos),
                 "--val", "0"]) == 0
    assert "1 labelled, 3 unlabelled, 0 val images" in capsys.readouterr().out
    assert [c.name for c in load_classes(out)] == ["car", "tree"]
    assert read_split(out, "labeled") == ["shot0"] and sorted(read_split(out, "unlabeled")) == ["shot1", "shot2", "shot3"]
    mask = read_mask(out / "masks" / "shot0.png")
    assert (mask[CAR] == 0).all() and mask[15, 30] == 1 and mask[0, 0] == 255

    # A label the palette lacks is refused with its name; nothing is written.
    assert main(["data", "import", "labelstudio", str(tmp_path / "export.json"), str(tmp_path / "d2"), "--images", str(photos),
                 "--palette", "car"]) == 2
    assert "labels ['tree'] are not in the palette" in capsys.readouterr().err and not (tmp_path / "d2").exists()
    (photos / "shot0.png").unlink()
    with pytest.raises(DatasetError, match="not in .*shot0.png"):
        import_labelstudio(tmp_path / "export.json", tmp_path / "d3", photos)


def test_import_from_the_running_label_studio(label_studio, tmp_path, monkeypatch, capsys):
    photos = tmp_path / "photos"
    client, project, tasks = make_project(label_studio, photos, "served labels", "pic", 3, 3, 60)
    annotation = client.create_annotation(tasks[0], [BRUSH, POLYGON])
    client.create_annotation(tasks[1], [POLYGON])
    out = tmp_path / "data"
    args = ["data", "import", "labelstudio", label_studio.url, str(out), "--project", "served labels", "--val", "0"]

    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    assert main(args) == 2 and "set LABEL_STUDIO_API_KEY" in capsys.readouterr().err  # the token never on argv
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
    with pytest.raises(SystemExit, match="pass --project"):
        main(args + ["--images", str(photos)])
    assert main(args[:-4] + ["--project", "no such project"]) == 2
    assert f"{project['id']} ('served labels')" in capsys.readouterr().err and not out.exists()

    assert main(args) == 0
    assert "2 labelled, 1 unlabelled, 0 val images" in capsys.readouterr().out
    assert [c.name for c in load_classes(out)] == ["car", "tree"]
    assert read_split(out, "labeled") == ["pic0", "pic1"] and read_split(out, "unlabeled") == ["pic2"]  # upload prefix stripped
    mask = read_mask(out / "masks" / "pic0.png")
    assert (mask[CAR] == 0).all() and mask[15, 30] == 1 and mask[0, 0] == 255
    assert np.array_equal(np.array(Image.open(out / "images" / "pic2.png")), np.array(Image.open(photos / "pic2.png")))
    assert not (out / "labeling" / "downloads").exists()
    state = json.loads((out / "labeling" / "state.json").read_text())
    assert state["project_id"] == project["id"] and state["imported"] == {str(t): f"pic{i}" for i, t in enumerate(tasks)}

    # the dataset keeps following the project: an edit is an update, a newly finished task joins training
    client.request("PATCH", f"/api/annotations/{annotation['id']}/", json={"result": [POLYGON]})
    client.create_annotation(tasks[2], [BRUSH])
    report = pull(client, out)
    assert report.updated == ["pic0"] and sorted(report.written) == ["pic0", "pic2"] and report.unchanged == ["pic1"]
    assert read_split(out, "labeled") == ["pic0", "pic1", "pic2"] and read_split(out, "unlabeled") == []
    assert sorted(p.name for p in (out / "images").iterdir()) == ["pic0.png", "pic1.png", "pic2.png"]  # nothing fetched twice

    # a task whose image is on another host is refused by name, and nothing is written
    (foreign,) = client.import_tasks(project["id"], [{"data": {"image": "http://198.51.100.7/x.png"}}])
    assert main(args[:4] + [str(tmp_path / "d2")] + args[5:]) == 2
    err = capsys.readouterr().err
    assert f"task {foreign}: its image http://198.51.100.7/x.png is not on Label Studio" in err and "nothing was written" in err
    assert not (tmp_path / "d2").exists()
