"""The TensorRT path, which cannot run here (no TensorRT, no GPU), checked by its logic: every shape fed to an
engine lies inside its optimisation profile, INT8 calibration buffers have the profile's opt shape, the
precision recipe per TensorRT version, the server's engine limits, and `--backend auto` falling back to
ONNX Runtime when a real (invalid) plan file fails to load."""
from __future__ import annotations

import json
import shutil
from itertools import product
from pathlib import Path

import numpy as np
import pytest

from export import cli as export_cli
from export.onnx_export import ExportError
from export.package import _calibration_images
from export.tensorrt_build import build_recipe, calibration_arrays
from serving import shapes
from serving.backends import BackendError, OnnxRuntimeBackend, load_backend, read_sidecar
from serving.inference import check_shape
from serving.limits import RequestLimits
from serving.protocol import ProtocolError
from serving.repository import ServedModel, read_meta, warm_up
from serving.shapes import PROFILE, Profile


def test_every_shape_fed_to_an_engine_lies_inside_its_profile():
    used = {"warm-up": [shapes.WARMUP_SHAPE, shapes.warmup_shape(PROFILE), shapes.warmup_shape(None)],
            "parity": [(n, 3, *size) for size, n in product(shapes.PARITY_SIZES, shapes.PARITY_BATCHES)],
            "calibration": [PROFILE.opt_shape],
            "profile": [PROFILE.min_shape, PROFILE.opt_shape, PROFILE.max_shape]}
    outside = {what: s for what, group in used.items() for s in group if not PROFILE.contains(s)}
    assert not outside, f"shapes outside the TensorRT profile {PROFILE}: {outside}"
    # A narrower engine's warm-up follows that engine's profile, not the default.
    narrow = Profile(min_side=256, opt_side=256, max_side=512, opt_batch=2, max_batch=2)
    assert narrow.contains(shapes.warmup_shape(narrow))


def test_profile_limits_and_sidecar_round_trip():
    assert "maximum of 8" in PROFILE.exceeds((9, 3, 64, 64))
    assert "maximum side of 1024" in PROFILE.exceeds((1, 3, 1025, 64))
    assert "minimum side of 64" in PROFILE.below((1, 3, 63, 500))
    assert PROFILE.exceeds((8, 3, 1024, 1024)) is None and PROFILE.below((1, 3, 64, 64)) is None
    assert Profile.from_dict(PROFILE.to_dict()) == PROFILE
    with pytest.raises(ValueError, match="integer fields"):
        Profile.from_dict({"min_hw": 128, "opt_hw": 512, "max_hw": 1024, "opt_batch": 4, "max_batch": 8})
    with pytest.raises(ValueError, match="inconsistent"):
        Profile(min_side=512, opt_side=256)


def test_int8_calibration_buffers_have_the_profile_opt_shape():
    calib = np.random.default_rng(0).integers(0, 256, (10, 3, PROFILE.opt_side, PROFILE.opt_side), dtype=np.uint8)
    batches = calibration_arrays(calib)
    assert [b.shape for b in batches] == [PROFILE.opt_shape] * 2  # 10 images: two full batches of 4, 2 dropped
    assert all(b.flags["C_CONTIGUOUS"] and b.nbytes == np.prod(PROFILE.opt_shape) for b in batches)
    assert np.array_equal(batches[1], calib[4:8])
    assert shapes.calibration_batches(PROFILE.opt_batch) == [(0, PROFILE.opt_batch)]
    with pytest.raises(ValueError, match="at least 4 images"):
        shapes.calibration_batches(3)
    with pytest.raises(ExportError, match="uint8"):
        calibration_arrays(calib[:, :, :256, :256])


def test_precision_recipe_per_tensorrt_version():
    assert build_recipe(10, "int8", has_modelopt=True) == build_recipe(11, "int8", has_modelopt=True)
    explicit = build_recipe(10, "int8", has_modelopt=True)
    assert explicit.modelopt and explicit.strongly_typed and not explicit.flags and not explicit.calibrator
    implicit = build_recipe(10, "int8", has_modelopt=False)  # deprecated path, only without ModelOpt
    assert implicit.calibrator and implicit.flags == ("FP16", "INT8") and not implicit.strongly_typed
    assert build_recipe(10, "fp16", has_modelopt=True).flags == ("FP16",)
    assert build_recipe(11, "fp16", has_modelopt=True).modelopt
    assert build_recipe(11, "fp32", has_modelopt=False).strongly_typed
    with pytest.raises(ExportError, match="ModelOpt"):
        build_recipe(11, "fp16", has_modelopt=False)


@pytest.fixture
def package_with_bad_engine(package, tmp_path):
    """The package's single-scale graph plus a plan file that is not an engine, whose sidecar names a GPU."""
    folder = tmp_path / "pkg"
    folder.mkdir()
    for name in ("model.onnx", "meta.json"):
        shutil.copy2(package / name, folder / name)
    plan = folder / "model.test-gpu.trt10.13.plan"
    plan.write_bytes(b"this is not a serialized TensorRT engine" * 64)
    (folder / f"{plan.name}.json").write_text(json.dumps({"graph": "model.onnx", "gpu": "Test GPU",
                                                          "tensorrt": "10.13", "profile": PROFILE.to_dict()}))
    return folder


def test_auto_backend_falls_back_to_onnxruntime_when_the_engine_fails(package_with_bad_engine):
    meta = read_meta(package_with_bad_engine)
    backend = load_backend(package_with_bad_engine, "auto", check=lambda b: warm_up(b, meta), gpu="Test GPU")
    assert isinstance(backend, OnnxRuntimeBackend) and backend.profile is None
    with pytest.raises(BackendError, match="model.test-gpu.trt10.13.plan"):
        load_backend(package_with_bad_engine, "tensorrt", gpu="Test GPU")


def test_server_enforces_engine_limits(package):
    """check_shape answers 413 past the engine's maximum size or batch and 400 below its minimum."""
    backend = OnnxRuntimeBackend(package / "model.onnx")
    backend.profile = Profile(min_side=32, opt_side=64, max_side=96, opt_batch=1, max_batch=2)
    model = ServedModel("seg", "seg", 1, package, "model.onnx", read_meta(package), backend, batcher=None)
    limits = RequestLimits(max_work_pixels=10**6, max_batch=8)
    check_shape(model, (2, 3, 96, 40), limits)
    for shape, status, message in [((1, 3, 97, 40), 413, "maximum side of 96"), ((3, 3, 40, 40), 413, "maximum of 2"),
                                   ((1, 3, 20, 40), 400, "minimum side of 32")]:
        with pytest.raises(ProtocolError, match=message) as err:
            check_shape(model, shape, limits)
        assert err.value.status == status


# --- engine shapes the user sets (export --engine-*) ---------------------------------------------------------
PROFILES = [PROFILE, shapes.engine_profile(max_side=2048), shapes.engine_profile(512, 1024, 2048, 2),
            shapes.engine_profile(min_side=256, max_side=256, max_batch=1), shapes.engine_profile(max_side=96),
            shapes.engine_profile(min_side=700), shapes.engine_profile(min_side=32, opt_side=32, max_side=40)]


def test_engine_profile_flags_default_to_todays_profile_and_clamp_what_is_unset():
    assert shapes.engine_profile() == PROFILE
    cityscapes = shapes.engine_profile(max_side=2048)
    assert cityscapes.contains((1, 3, 1024, 2048)) and PROFILE.exceeds((1, 3, 1024, 2048))
    assert shapes.engine_profile(max_side=384) == Profile(64, 384, 384, 4, 8)  # opt side follows the max
    assert shapes.engine_profile(min_side=700) == Profile(700, 700, 1024, 4, 8)
    assert shapes.engine_profile(max_batch=2) == Profile(64, 512, 1024, 2, 2)  # opt batch follows the max
    with pytest.raises(ValueError, match=r"--engine-min-side \(512\) <= --engine-opt-side \(256\)"):
        shapes.engine_profile(min_side=512, opt_side=256)
    with pytest.raises(ValueError, match="--engine-max-batch"):
        shapes.engine_profile(max_batch=0)


@pytest.mark.parametrize("profile", PROFILES, ids=str)
def test_parity_warmup_and_calibration_shapes_lie_inside_every_user_profile(profile):
    sizes, batches = shapes.parity_shapes(profile)
    used = [(n, 3, *size) for size, n in product(sizes, batches)] + [shapes.warmup_shape(profile), profile.opt_shape]
    assert all(profile.contains(s) for s in used), (profile, used)
    assert 1 in batches and max(batches) <= profile.max_batch
    assert shapes.parity_shapes(None) == (shapes.PARITY_SIZES, shapes.PARITY_BATCHES)


def test_calibration_images_follow_the_engine_profile(tiny_data):
    profile = shapes.engine_profile(min_side=32, opt_side=48, max_side=64, max_batch=2)
    images = _calibration_images(tiny_data, profile.opt_side, count=5)
    assert images.shape[1:] == (3, 48, 48)
    assert [b.shape for b in calibration_arrays(images, profile)] == [profile.opt_shape] * 2


def test_export_flags_reach_the_package_and_need_tensorrt(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake_export(*args, **kwargs):
        seen.update(kwargs, tensorrt=args[7])
        raise SystemExit(0)

    monkeypatch.setattr("export.package.export_package", fake_export)
    with pytest.raises(SystemExit):
        export_cli.main(["ckpt.pt", "--out", str(tmp_path / "m"), "--tensorrt", "--fp16", "--engine-max-side", "2048",
                         "--engine-max-batch", "2"])
    assert seen["tensorrt"] == "fp16" and seen["engine_profile"] == Profile(64, 512, 2048, 2, 2)
    with pytest.raises(SystemExit, match="add --tensorrt"):
        export_cli.main(["ckpt.pt", "--out", str(tmp_path / "m"), "--engine-max-side", "2048"])
    with pytest.raises(SystemExit, match="--engine-opt-side"):
        export_cli.main(["ckpt.pt", "--out", str(tmp_path / "m"), "--tensorrt", "--engine-opt-side", "4096"])


def test_the_sidecar_profile_sets_the_server_limits(package, tmp_path):
    """An engine built with --engine-max-side 2048 lets a Cityscapes frame through, read from its sidecar."""
    plan = tmp_path / "model.gpu.trt11.plan"
    profile = shapes.engine_profile(max_side=2048, max_batch=2)
    Path(f"{plan}.json").write_text(json.dumps({"graph": "model.onnx", "gpu": "G", "profile": profile.to_dict()}))
    backend = OnnxRuntimeBackend(package / "model.onnx")
    backend.profile = Profile.from_dict(read_sidecar(plan)["profile"])
    model = ServedModel("seg", "seg", 1, package, "model.onnx", read_meta(package), backend, batcher=None)
    limits = RequestLimits(max_work_pixels=2 * 2048 * 1024, max_batch=8)
    check_shape(model, (2, 3, 1024, 2048), limits)
    with pytest.raises(ProtocolError, match="maximum of 2"):
        check_shape(model, (3, 3, 64, 64), limits)
    Path(f"{plan}.json").write_text(json.dumps({"graph": "model.onnx", "profile": {"max_side": 2048}}))
    with pytest.raises(BackendError, match="rebuild the engine"):
        read_sidecar(plan)
