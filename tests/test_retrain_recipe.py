"""The app's retraining recipe comes from the serving model's training config (overridable by `scaleseg app`
flags), runs on --device auto, and a new version gets a TensorRT engine exactly when TensorRT and a GPU are
there; the Models tab says what each version runs on."""
from __future__ import annotations

import json
import shutil

import pytest

from app import main as app_main
from app import versions
from app.spawn import python_command
from app.versions import Registry, Retrainer, RetrainRecipe, export_command, package_runtime, recipe_from_package, train_command


def test_recipe_is_the_serving_models_training_config(package):
    recipe = recipe_from_package(package)
    # tests/conftest.py trains the package with these: scalematch, 1 iteration, crop 32, batch 2, lr 0.01, no workers
    assert recipe == RetrainRecipe(method="scalematch", iterations=1, crop_size=32, batch_size=2, lr=0.01,
                                   backbone="resnet18", pretrained="", num_workers=0, device="auto")
    overridden = recipe_from_package(package, crop_size=64, device="cuda", lr=None)
    assert (overridden.crop_size, overridden.device, overridden.lr) == (64, "cuda", 0.01)
    with pytest.raises(TypeError, match="crop"):
        recipe_from_package(package, crop=64)


def test_a_package_without_a_training_config_keeps_the_defaults(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"method": "unimatch", "backbone": "resnet50"}))
    assert recipe_from_package(tmp_path) == RetrainRecipe(method="unimatch", backbone="resnet50")


def test_fine_tuning_keeps_the_serving_models_decoder(tmp_path):
    """A package trained with --decoder light retrains with it: --init-from refuses weights of another head."""
    meta = {"method": "supervised", "train_config": {"model": {"backbone": "efficientnet_lite0", "decoder": "light"}}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    recipe = recipe_from_package(tmp_path)
    assert recipe.decoder == "light"
    cmd = train_command(recipe, tmp_path / "data", "supervised", 5, tmp_path / "run", init_from=tmp_path / "c.pt")
    assert cmd[cmd.index("--decoder") + 1] == "light"
    assert app_main.retrain_overrides(app_main.parser().parse_args([str(tmp_path), str(tmp_path), "--decoder", "standard"]))["decoder"] == "standard"


def test_app_refuses_retraining_sizes_a_run_cannot_take_before_it_starts(tmp_path):
    with pytest.raises(SystemExit, match=r"--crop-size 8 \(must be 16 or more\); --batch-size 0 \(must be 1 or more\)"):
        app_main.main([str(tmp_path), str(tmp_path), "--crop-size", "8", "--batch-size", "0"])


def test_train_command_follows_the_recipe(tmp_path):
    weights = tmp_path / "imagenet.pth"
    weights.write_bytes(b"weights")
    recipe = RetrainRecipe(crop_size=256, batch_size=8, optimizer="adamw", lr=0.02, backbone="resnet50", decoder="light",
                           pretrained=str(weights), num_workers=4)
    cmd = train_command(recipe, tmp_path / "data", "unimatch", 300, tmp_path / "run", init_from=None)
    pairs = {flag: cmd[i + 1] for i, flag in enumerate(cmd[:-1]) if flag.startswith("--")}
    head = python_command("training.cli", "train", str(tmp_path / "data"))
    assert cmd[:len(head)] == head
    assert {k: pairs[k] for k in ("--method", "--max-iters", "--crop-size", "--batch-size", "--optimizer", "--lr",
                                  "--backbone", "--decoder", "--num-workers", "--device", "--pretrained")} == {
        "--method": "unimatch", "--max-iters": "300", "--crop-size": "256", "--batch-size": "8", "--optimizer": "adamw",
        "--lr": "0.02", "--backbone": "resnet50", "--decoder": "light", "--num-workers": "4", "--device": "auto", "--pretrained": str(weights)}
    tuned = train_command(recipe, tmp_path / "data", "unimatch", 300, tmp_path / "run", init_from=tmp_path / "c.pt")
    assert "--init-from" in tuned and "--pretrained" not in tuned  # fine-tuning replaces the encoder
    missing = RetrainRecipe(pretrained=str(tmp_path / "elsewhere.pth"))
    cmd = train_command(missing, tmp_path, "supervised", 5, tmp_path / "run", None)
    assert cmd[cmd.index("--pretrained") + 1] == "imagenet"  # the file is gone: published weights, not random init
    old = RetrainRecipe(pretrained="")  # packages made before ImageNet weights were the default
    assert "none" in train_command(old, tmp_path, "supervised", 5, tmp_path / "run", None)


def test_selftrain_retraining_is_taught_by_the_serving_package(tmp_path):
    from training.data.folder import write_split
    write_split(tmp_path, "unlabeled", [f"u{i}" for i in range(40)])  # 10 iterations an epoch at batch 4
    cmd = train_command(RetrainRecipe(), tmp_path, "selftrain", 20, tmp_path / "run", None, teacher=tmp_path / "v1")
    assert cmd[cmd.index("--teacher") + 1] == str(tmp_path / "v1") and cmd[cmd.index("--rounds") + 1] == "1"
    short = train_command(RetrainRecipe(), tmp_path, "selftrain", 15, tmp_path / "run", None, teacher=tmp_path / "v1")
    assert short[short.index("--rounds") + 1] == "0"  # under two epochs: reliable images, then no second stage


def test_export_adds_a_tensorrt_engine_only_where_tensorrt_and_a_gpu_are(monkeypatch, tmp_path):
    assert "--tensorrt" not in export_command(tmp_path / "last.pt", tmp_path / "v2", tmp_path, "supervised", False)
    cmd = export_command(tmp_path / "last.pt", tmp_path / "v2", tmp_path, "scalematch", True)
    assert cmd[-1] == "--tensorrt" and "--cif-scales" in cmd
    assert versions.tensorrt_ready() is False  # this machine: no TensorRT, no GPU
    monkeypatch.setattr(versions.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(versions, "current_gpu", lambda: "NVIDIA H200")
    assert versions.tensorrt_ready() is True
    monkeypatch.setattr(versions, "current_gpu", lambda: None)
    assert versions.tensorrt_ready() is False


def test_models_tab_says_what_a_version_runs_on():
    meta = {"tensorrt": [{"graph": "model.onnx", "gpu": "NVIDIA H200", "tensorrt": "11.4.0.106", "precision": "fp16"},
                         {"graph": "model.cif.onnx", "gpu": "NVIDIA H200", "tensorrt": "11.4.0.106"}]}
    assert package_runtime(meta, "NVIDIA H200") == "TensorRT 11.4.0.106 (fp16)"
    assert package_runtime(meta, "NVIDIA L4") == package_runtime(meta, None) == package_runtime({}, "G") == "ONNX Runtime"


def test_app_flags_override_the_recipe_and_the_retrainer_uses_them(package, tmp_path):
    args = app_main.parser().parse_args(["m", "d", "--crop-size", "64", "--device", "cpu",
                                         "--iterations", "50"])
    overrides = app_main.retrain_overrides(args)
    assert overrides == {"crop_size": 64, "device": "cpu", "iterations": 50}
    registry = Registry(tmp_path / "work")
    assert Retrainer(registry, tmp_path, lambda p: None, overrides).recipe() == RetrainRecipe(crop_size=64, device="cpu",
                                                                                             iterations=50)
    copy = tmp_path / "v1"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("*.onnx", "*.pt"))
    registry.add({"name": "v1", "dir": str(copy), "method": "scalematch", "miou": 0.1})
    recipe = Retrainer(registry, tmp_path, lambda p: None, overrides).recipe()
    assert (recipe.method, recipe.batch_size, recipe.crop_size, recipe.device, recipe.iterations) == ("scalematch", 2, 64, "cpu", 50)
