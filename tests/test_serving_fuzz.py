"""Fuzz every route of the serving app with generated malformed requests (hypothesis): whatever the
method, path parameters, query, headers and body, the answer is never a 5xx, and every error has the
one shape {"error": message}. Derandomized, so CI runs the same examples every time."""
from __future__ import annotations

import gzip
import json
import re
import shutil
from urllib.parse import quote

import pytest
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from serving.server import ServeConfig, create_app

ASCII = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=10)  # what a header can carry
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
                    max_leaves=30)
NAMES = st.sampled_from(["seg", "seg_cif", "nope", "..", "%00", "seg/../x"]) | st.text(max_size=12)
DATATYPES = st.sampled_from(["UINT8", "FP32", "BOOL", "INT64", "uint8", "BYTES"]) | JSON
SHAPES = st.lists(st.integers(-2, 70) | st.sampled_from([True, 3, 4096]), max_size=5) | JSON


@st.composite
def infer_body(draw) -> tuple[bytes, dict]:
    """An inference request with each field possibly wrong, JSON data or binary tensors."""
    tensor = {"name": draw(st.sampled_from(["image", "images"]) | JSON), "datatype": draw(DATATYPES),
              "shape": draw(SHAPES)}
    binary = draw(st.booleans())
    if binary:
        tensor["parameters"] = {"binary_data_size": draw(st.integers(-1, 20_000) | JSON)}
    else:
        tensor["data"] = draw(st.lists(st.integers(-300, 300) | st.floats() | st.booleans(), max_size=200) | JSON)
    request = {"inputs": draw(st.sampled_from([[tensor], [tensor, tensor], []]) | JSON)}
    for key in ("outputs", "parameters", "id"):
        if draw(st.booleans()):
            request[key] = draw(st.just([{"name": "labels", "parameters": {"binary_data": draw(JSON)}}]) | JSON)
    head = json.dumps(request).encode()
    tail = draw(st.binary(max_size=20_000)) if binary else b""
    headers = {}
    if binary or draw(st.booleans()):
        headers["Inference-Header-Content-Length"] = draw(st.just(str(len(head))) | ASCII)
    return head + tail, headers


BODIES = (infer_body() | st.binary(max_size=2000).map(lambda b: (b, {}))
          | infer_body().map(lambda b: (b[0].replace(b"1", b"1" + b"0" * 5000, 1), b[1]))  # past the int-digit limit
          | JSON.map(lambda j: (json.dumps(j).replace("0", "9" * 5000, 1).encode(), {}))
          | JSON.map(lambda j: (json.dumps(j).encode(), {}))
          | st.sampled_from([b"[" * 60_000, b"{" * 1000, gzip.compress(bytes(3_000_000))]).map(lambda b: (b, {})))
HEADERS = st.dictionaries(st.sampled_from(["Content-Type", "Content-Encoding", "Authorization", "Content-Length"]),
                          st.sampled_from(["image/png", "multipart/form-data; boundary=x", "gzip", "deflate", "br",
                                           "application/json", "Bearer x", "12"]) | ASCII, max_size=3)
QUERIES = st.dictionaries(st.sampled_from(["alpha", "overlay", "model"]), st.text(max_size=6), max_size=3)


@pytest.fixture(scope="module")
def fuzz_client(package, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-repository")
    shutil.copytree(package, root / "seg")
    cfg = ServeConfig(str(root / "seg"), "seg", "onnxruntime", max_delay_ms=1, max_upload_mb=1,
                      max_work_pixels=200_000, model_repository=str(root), max_models=2)
    with TestClient(create_app(cfg), raise_server_exceptions=False) as client:
        yield client


def routes(app) -> list[tuple[str, str]]:
    found = [(method, r.path) for r in app.routes if isinstance(r, APIRoute) for method in sorted(r.methods)]
    assert len({p for _, p in found}) >= 10, found
    return found


def test_no_request_gets_a_5xx_or_another_error_shape(fuzz_client):
    table = routes(fuzz_client.app)

    @settings(max_examples=400, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(route=st.sampled_from(table), name=NAMES, version=st.sampled_from(["1", "2", "x"]), body=BODIES,
           headers=HEADERS, query=QUERIES)
    def one(route, name, version, body, headers, query):
        method, path = route
        url = re.sub(r"\{name\}", quote(name, safe="") or "x", path).replace("{version}", version)
        content, extra = body
        r = fuzz_client.request(method, url, content=content if method == "POST" else None,
                                headers={**headers, **extra}, params=query)
        assert r.status_code < 500, (method, url, r.status_code, r.text[:300])
        if r.status_code >= 400 and method != "HEAD":  # HEAD answers carry no body
            assert set(r.json()) == {"error"}, (method, url, r.text[:300])

    one()
