"""`scaleseg eval` on a model package scores the graph it serves (through serving's Segmenter) with the same metric
code and output as a checkpoint's eval; the FP32 package scores as its checkpoint does."""
from __future__ import annotations

import json

import pytest

from serving.shapes import Profile
from tests.test_export import _tensorrt_missing
from training.cli import main


def scores(path) -> dict[str, float]:
    return {s: r["miou"] for s, r in json.loads(path.read_text())["scales"].items()}


def test_fp32_package_scores_as_its_checkpoint(package, checkpoints, tiny_data, tmp_path, capsys):
    ckpt, pkg = tmp_path / "ckpt.json", tmp_path / "pkg.json"
    assert main(["eval", str(checkpoints["scalematch"]), str(tiny_data), "--device", "cpu", "--json", str(ckpt)]) == 0
    capsys.readouterr()
    assert main(["eval", str(package), str(tiny_data), "--precision", "fp32", "--json", str(pkg)]) == 0
    out = capsys.readouterr().out
    assert "model.onnx on onnxruntime (" in out and "), fp32" in out and "| **mIoU** |" in out and "IoU @x0.5" in out
    report = json.loads(pkg.read_text())
    assert report["package"] == str(package) and report["images"] == 4 and report["mode"] == "whole"
    assert list(scores(pkg)) == ["0.5", "1.0", "2.0"]
    for scale, miou in scores(ckpt).items():
        assert scores(pkg)[scale] == pytest.approx(miou, abs=0.5), scale  # the same pixels up to float rounding

    # the CIF graph against the checkpoint's CIF module at the scales it was exported with
    assert main(["eval", str(checkpoints["scalematch"]), str(tiny_data), "--cif", "--scales", "1", "--device", "cpu",
                 "--json", str(ckpt)]) == 0
    assert main(["eval", str(package), str(tiny_data), "--cif", "--scales", "1", "--precision", "fp32", "--json", str(pkg)]) == 0
    assert json.loads(pkg.read_text())["mode"] == json.loads(ckpt.read_text())["mode"] == "whole+cif:0.5,2.0"
    assert scores(pkg)["1.0"] == pytest.approx(scores(ckpt)["1.0"], abs=0.5)


def test_eval_refuses_what_is_neither_and_other_classes(package, checkpoints, tiny_data, data_copy, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(tmp_path / "empty"), str(tiny_data)]) == 2
    assert "not a model package (it has no meta.json)" in capsys.readouterr().err
    run = checkpoints["supervised"].parent
    assert main(["eval", str(run), str(tiny_data)]) == 2
    assert f"pass {run / 'best.pt'} to score its checkpoint" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nothing"), str(tiny_data)]) == 2
    assert "no such checkpoint or model package" in capsys.readouterr().err

    classes = json.loads((data_copy / "classes.json").read_text())
    (data_copy / "classes.json").write_text(json.dumps(classes + [{"id": 5, "name": "tree", "color": [9, 9, 9]}]))
    assert main(["eval", str(package), str(data_copy)]) == 2
    err = capsys.readouterr().err
    assert "trained on 5 classes" in err and "lists 6" in err and "gained ['tree']" in err and "--init-from" in err
    classes[1]["name"], classes[2]["name"] = classes[2]["name"], classes[1]["name"]
    (data_copy / "classes.json").write_text(json.dumps(classes))
    assert main(["eval", str(package), str(data_copy)]) == 2
    assert "Evaluate on data with the same classes" in capsys.readouterr().err

    with pytest.raises(SystemExit, match="--mode, --device: checkpoint options"):
        main(["eval", str(package), str(tiny_data), "--mode", "sliding", "--device", "cpu"])
    with pytest.raises(SystemExit, match="--precision: these choose how a model package runs"):
        main(["eval", str(checkpoints["supervised"]), str(tiny_data), "--precision", "int8"])


def test_package_eval_names_the_image_a_backend_refuses(package, tiny_data, capsys):
    """48 px images at x0.25 are under the 16 px every backend needs."""
    assert main(["eval", str(package), str(tiny_data), "--scales", "0.25"]) == 2
    err = capsys.readouterr().err
    assert "at x0.25" in err and "at least 16x16" in err and "--scales 1" in err


@pytest.mark.skipif(_tensorrt_missing() is not None, reason=str(_tensorrt_missing()))
def test_tensorrt_package_scores_as_its_checkpoint(checkpoints, tiny_data, tmp_path):
    from export.package import export_package
    out = tmp_path / "trt"
    export_package(checkpoints["scalematch"], out, data=tiny_data, tensorrt="fp32", progress=lambda m: None,
                   engine_profile=Profile(min_side=16, opt_side=64, max_side=128, opt_batch=1, max_batch=2))
    ckpt, pkg = tmp_path / "ckpt.json", tmp_path / "pkg.json"
    assert main(["eval", str(checkpoints["scalematch"]), str(tiny_data), "--scales", "1", "--json", str(ckpt)]) == 0
    assert main(["eval", str(out), str(tiny_data), "--backend", "tensorrt", "--scales", "1", "--json", str(pkg)]) == 0
    assert json.loads(pkg.read_text())["backend"].startswith("tensorrt")
    assert scores(pkg)["1.0"] == pytest.approx(scores(ckpt)["1.0"], abs=0.5)
