"""The install extras: ONNX Runtime's two builds never side by side, `make install` on the CPU build, and the
[tensorrt] extra's own constraints file agreeing with the requirements of every package it pins.

tests/fixtures/tensorrt_metadata.json holds each pinned package's Requires-Dist as published, taken from
`pip install --dry-run --ignore-installed --report R -c constraints-tensorrt.txt ".[gpu]" "nvidia-modelopt[onnx]"`
(and the tensorrt-cu13 sdist's metadata); tensorrt-cu13-libs and -bindings are wheels of NVIDIA's index,
whose metadata is not recorded, so only their pins are checked."""
from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]
METADATA = json.loads((REPO / "tests" / "fixtures" / "tensorrt_metadata.json").read_text())
NVIDIA_INDEX_ONLY = {"tensorrt-cu13-libs", "tensorrt-cu13-bindings"}
ORT_BUILDS = {"onnxruntime", "onnxruntime-gpu"}


def pins(path: Path) -> dict[str, Version]:
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            assert canonicalize_name(name) not in found, f"{path.name}: {name} pinned twice"
            found[canonicalize_name(name)] = Version(version)
    return found


def names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def test_onnxruntime_builds_are_never_installed_side_by_side():
    assert not names(PROJECT["dependencies"]) & ORT_BUILDS, "ONNX Runtime belongs in the cpu / gpu extras"
    assert names(EXTRAS["cpu"]) & ORT_BUILDS == {"onnxruntime"}
    assert names(EXTRAS["gpu"]) & ORT_BUILDS == names(EXTRAS["tensorrt"]) & ORT_BUILDS == {"onnxruntime-gpu"}
    for extra, requirements in EXTRAS.items():
        assert len(names(requirements) & ORT_BUILDS) <= 1, extra
    assert "onnxruntime" not in pins(REPO / "constraints-tensorrt.txt")
    assert re.search(r'pip install .*-c constraints\.txt -e "\.\[cpu,test\]"', (REPO / "Makefile").read_text())


def test_every_pin_of_the_cpu_and_gpu_builds_is_in_constraints():
    pinned = pins(REPO / "constraints.txt")
    for requirement in EXTRAS["cpu"] + EXTRAS["gpu"]:
        req = Requirement(requirement)
        assert pinned[canonicalize_name(req.name)] in req.specifier, requirement


@pytest.mark.parametrize("python", ["3.11", "3.12"])
def test_tensorrt_constraints_agree_with_the_pinned_packages_requirements(python):
    """Walk the [tensorrt] install from pyproject through each pinned package's own requirements (with the
    extras asked of it): every package reached is pinned, and its pin satisfies every requirement on it."""
    pinned = pins(REPO / "constraints-tensorrt.txt")
    env = {"python_version": python, "python_full_version": f"{python}.0", "platform_system": "Linux",
           "platform_machine": "x86_64", "sys_platform": "linux", "os_name": "posix",
           "platform_python_implementation": "CPython", "implementation_name": "cpython"}
    queue = [(Requirement(r), "pyproject.toml") for r in PROJECT["dependencies"] + EXTRAS["tensorrt"]]
    seen, conflicts, walked = set(), [], set()
    while queue:
        req, wanted_by = queue.pop()
        name = canonicalize_name(req.name)
        seen.add(name)
        if name not in pinned:
            conflicts.append(f"{name} (needed by {wanted_by}) is not pinned")
            continue
        if not req.specifier.contains(pinned[name], prereleases=True):
            conflicts.append(f"{wanted_by} needs {req}, pinned {pinned[name]}")
        for extra in sorted(req.extras) or [""]:
            if (name, extra) in walked or name in NVIDIA_INDEX_ONLY:
                continue
            walked.add((name, extra))
            assert METADATA[name]["version"] == str(pinned[name]), f"{name}: metadata of another version"
            for text in METADATA[name]["requires_dist"]:
                dep = Requirement(text)
                if dep.marker is None or dep.marker.evaluate(env | {"extra": extra}):
                    queue.append((dep, f"{name}=={pinned[name]}" + (f"[{extra}]" if extra else "")))
    assert not conflicts, conflicts
    assert {"tensorrt-cu13", "nvidia-modelopt", "onnxruntime-gpu", "onnx"} <= seen
    assert set(pinned) - seen == set(), f"pins nothing needs: {sorted(set(pinned) - seen)}"


def test_tensorrt_pins_match_the_docker_images_and_compose():
    pinned = pins(REPO / "constraints-tensorrt.txt")
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "constraints-tensorrt.txt" in dockerfile
    compose = (REPO / "docker-compose.yml").read_text()
    assert f"TensorRT {pinned['tensorrt-cu13']}" in compose
