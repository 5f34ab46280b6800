"""docker-compose.yml as data (no Docker engine here): GPU reservations for the GPU serving service and
Triton, TensorRT versions named and consistent with constraints-tensorrt.txt, non-root users, and Label Studio without
a filesystem-wide document root or default credentials; plus the local-files URL the app computes."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from app.labeling import local_files_url

REPO = Path(__file__).resolve().parents[1]
COMPOSE_TEXT = (REPO / "docker-compose.yml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
SERVICES = COMPOSE["services"]


def gpu_devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


@pytest.mark.parametrize("name", ["serving-gpu", "triton"])
def test_gpu_services_reserve_a_gpu(name):
    (device,) = gpu_devices(SERVICES[name])
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == 1
    assert SERVICES[name]["profiles"]  # opt-in: `docker compose up` alone needs no GPU


def test_gpu_serving_uses_the_serve_gpu_target_and_grpc():
    assert SERVICES["serving-gpu"]["build"]["target"] == "serve-gpu"
    for name in ("serving", "serving-gpu"):
        command = SERVICES[name]["command"]
        assert command[:2] == ["--grpc-port", "8001"]
        # the app promotes versions from /work/versions: serving may load packages from there only
        repository = command[command.index("--model-repository") + 1]
        assert any(v.split(":")[1] == repository for v in SERVICES[name]["volumes"])


def test_tensorrt_versions_are_named_and_match_the_dockerfile():
    pinned = re.search(r"^tensorrt-cu\d+==([\d.]+)$", (REPO / "constraints-tensorrt.txt").read_text(), re.M).group(1)
    comments = "\n".join(line for line in COMPOSE_TEXT.splitlines() if line.strip().startswith("#"))
    assert f"TensorRT {pinned}" in comments and pinned in comments.split("Triton 26.09")[1]
    assert SERVICES["triton"]["image"].endswith("tritonserver:26.09-py3}")


def test_our_services_run_as_a_non_root_user():
    for name in ("serving", "serving-gpu", "app"):
        uid = re.fullmatch(r"\$\{SCALESEG_UID:-(\d+)\}:\$\{SCALESEG_GID:-(\d+)\}", SERVICES[name]["user"])
        assert uid and int(uid.group(1)) != 0 and int(uid.group(2)) != 0


def test_label_studio_has_no_root_document_root_and_no_default_credentials():
    env = SERVICES["label-studio"]["environment"]
    assert env["LOCAL_FILES_DOCUMENT_ROOT"] == SERVICES["app"]["environment"]["LOCAL_FILES_DOCUMENT_ROOT"] == "/data"
    assert "./demo/data:/data:ro" in SERVICES["label-studio"]["volumes"]
    secrets = {k: v for k, v in {**env, **SERVICES["app"]["environment"]}.items()
               if k in ("LABEL_STUDIO_USERNAME", "LABEL_STUDIO_PASSWORD", "LABEL_STUDIO_USER_TOKEN", "LABEL_STUDIO_API_KEY")}
    assert len(secrets) == 4
    for key, value in secrets.items():  # required from the environment, never a default
        assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", value), f"{key} has a default or a literal value: {value}"


def test_local_files_url_is_relative_to_the_document_root(tmp_path):
    image = tmp_path / "data" / "images" / "a.png"
    assert local_files_url(image, str(tmp_path / "data")) == "/data/local-files/?d=images/a.png"
    assert local_files_url(image, "/") == "/data/local-files/?d=" + str(image.resolve()).lstrip("/")
    with pytest.raises(ValueError, match="outside Label Studio's LOCAL_FILES_DOCUMENT_ROOT"):
        local_files_url(image, str(tmp_path / "elsewhere"))
