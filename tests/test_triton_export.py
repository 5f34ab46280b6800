"""`scaleseg export --triton-repo`: the CIF graph too, versioned folders, no overwrite without --force, stale
`_trt` folders removed, and GPU instance groups (with a plan per compute capability) for TensorRT models."""
from __future__ import annotations

import json
import shutil

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from export.triton import write_repository
from serving.shapes import PROFILE, Profile
from training.cli import main


def parse(folder):
    return text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


@pytest.fixture
def package_with_engines(package, tmp_path):
    """A copy of the package with two engine files (bytes, not runnable here) and their sidecars."""
    folder = tmp_path / "pkg-trt"
    shutil.copytree(package, folder)
    for slug, gpu, cc, profile in [("nvidia-h100", "NVIDIA H100", "9.0", PROFILE),
                                   ("nvidia-l4", "NVIDIA L4", "8.9", Profile(max_batch=4, opt_batch=2))]:
        plan = folder / f"model.{slug}.trt11.4.0.plan"
        plan.write_bytes(slug.encode() * 100)
        (folder / f"{plan.name}.json").write_text(json.dumps({
            "graph": "model.onnx", "gpu": gpu, "compute_capability": cc, "tensorrt": "11.4.0",
            "precision": "fp16", "profile": profile.to_dict()}))
    return folder


def test_repository_has_cif_graph_in_versioned_folders(package, tmp_path):
    repo = tmp_path / "repo"
    assert [f.name for f in write_repository(package, repo, "seg")] == ["seg", "seg_cif"]
    for model, graph in [("seg", "model.onnx"), ("seg_cif", "model.cif.onnx")]:
        assert (repo / model / "1" / "model.onnx").read_bytes() == (package / graph).read_bytes()
        config = parse(repo / model)
        assert config.name == model and config.platform == "onnxruntime_onnx"
        assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no staging folder left behind


def test_refuses_to_overwrite_without_force(package, tmp_path):
    repo = tmp_path / "repo"
    write_repository(package, repo, "seg")
    (repo / "seg" / "1" / "model.onnx").write_bytes(b"someone else's model")
    with pytest.raises(FileExistsError, match="--force"):
        write_repository(package, repo, "seg")
    assert (repo / "seg" / "1" / "model.onnx").read_bytes() == b"someone else's model"
    write_repository(package, repo, "seg", force=True)
    assert (repo / "seg" / "1" / "model.onnx").read_bytes() == (package / "model.onnx").read_bytes()
    write_repository(package, repo, "other")  # another name beside it is no overwrite
    assert {p.name for p in repo.iterdir()} == {"seg", "seg_cif", "other", "other_cif"}


def test_engines_get_gpu_instance_groups_and_stale_trt_folders_go(package, package_with_engines, tmp_path):
    repo = tmp_path / "repo"
    folders = write_repository(package_with_engines, repo, "seg")
    assert [f.name for f in folders] == ["seg", "seg_trt", "seg_cif"]
    config = parse(repo / "seg_trt")
    assert config.platform == "tensorrt_plan"
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
    assert dict(config.cc_model_filenames) == {"9.0": "model.nvidia-h100.trt11.4.0.plan",
                                               "8.9": "model.nvidia-l4.trt11.4.0.plan"}
    assert config.max_batch_size == 4  # the smallest engine profile's maximum batch
    assert "TensorRT 11.4.0" in (repo / "seg_trt" / "config.pbtxt").read_text()
    assert sorted(p.name for p in (repo / "seg_trt" / "1").iterdir()) == sorted(config.cc_model_filenames.values())
    # Re-exported from a package without engines: the old GPU model must not survive beside the new graph.
    write_repository(package, repo, "seg", force=True)
    assert sorted(p.name for p in repo.iterdir()) == ["seg", "seg_cif"]


def test_export_cli_checks_the_repository_before_exporting(checkpoints, package, tmp_path, capsys):
    repo = tmp_path / "repo"
    write_repository(package, repo, "seg")
    out = tmp_path / "pkg"
    code = main(["export", str(checkpoints["supervised"]), "--out", str(out), "--triton-repo", str(repo), "--name", "seg"])
    assert code != 0 and "--force" in capsys.readouterr().err
    assert not out.exists()  # refused before any work
