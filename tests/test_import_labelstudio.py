"""`scaleseg data import labelstudio` on an export made by the real Label Studio server."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from app import rle
from app.import_labelstudio import import_labelstudio
from app.labelstudio import LabelStudio
from training.cli import main
from training.data.folder import DatasetError, load_classes, read_mask, read_split

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="label" toName="image"><Label value="car"/><Label value="tree"/></BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="car"/><Label value="tree"/></PolygonLabels>
</View>"""


def test_labelstudio_export_with_brush_and_polygons(label_studio, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(4):
        Image.fromarray(np.full((20, 40, 3), 50 * i, np.uint8)).save(photos / f"shot{i}.png")
    client = LabelStudio(label_studio.url, label_studio.token)
    project = client.request("POST", "/api/projects", json={"title": "own labels", "label_config": CONFIG})
    tasks = client.import_tasks(project["id"], [{"data": {"image": client.upload_image(project["id"], photos / f"shot{i}.png")}}
                                                for i in range(3)])
    car = np.zeros((20, 40), bool)
    car[2:10, 4:12] = True
    brush = {"from_name": "label", "to_name": "image", "type": "brushlabels", "original_width": 40, "original_height": 20,
             "value": {"format": "rle", "rle": rle.mask_to_rle(car), "brushlabels": ["car"]}}
    polygon = {"from_name": "poly", "to_name": "image", "type": "polygonlabels", "original_width": 40, "original_height": 20,
               "value": {"points": [[50, 50], [100, 50], [100, 100], [50, 100]], "polygonlabels": ["tree"]}}
    client.create_annotation(tasks[0], [brush, polygon])
    client.create_annotation(tasks[1], [brush], cancelled=True)  # skipped: the image stays unlabelled
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
    assert (mask[car] == 0).all() and mask[15, 30] == 1 and mask[0, 0] == 255

    # A label the palette lacks is refused with its name; nothing is written.
    assert main(["data", "import", "labelstudio", str(tmp_path / "export.json"), str(tmp_path / "d2"), "--images", str(photos),
                 "--palette", "car"]) == 2
    assert "labels ['tree'] are not in the palette" in capsys.readouterr().err and not (tmp_path / "d2").exists()
    (photos / "shot0.png").unlink()
    with pytest.raises(DatasetError, match="not in .*shot0.png"):
        import_labelstudio(tmp_path / "export.json", tmp_path / "d3", photos)
