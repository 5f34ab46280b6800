"""The edges an outside black-box run probed (issue 26, HTTP half): JSON numbers past Python's
integer-string limit, repository paths the OS refuses, one package taking over another's model, an empty
X-API-Key beside a valid Bearer token, multi-member and trailing-garbage gzip bodies, HEAD on health.
Every answer is a 4xx in the one {"error": message} shape, never a 5xx."""
from __future__ import annotations

import gzip
import os
import shutil
import zlib

import pytest

from tests.test_serving_hardening import PIXELS, _json, app_client, assert_error, repo_root  # noqa: F401

DIGITS = "9" * 5000  # past sys.get_int_max_str_digits() (4300): json.loads raises ValueError


@pytest.fixture(scope="module")
def root(repo_root, tmp_path_factory):  # noqa: F811
    """A private repository (tests here add odd entries): 'seg' with a CIF graph, 'plain' without."""
    root = tmp_path_factory.mktemp("edges")
    for name in ("seg", "plain"):
        shutil.copytree(repo_root / name, root / name)
    return root


def test_json_integers_past_the_digit_limit_get_400(root):
    with app_client(root) as c:
        infer_bodies = [
            _json(PIXELS).replace(b'"data": [0', f'"data": [{DIGITS}'.encode(), 1),
            _json(PIXELS).replace(b'"shape": [1', f'"shape": [{DIGITS}'.encode(), 1),
            _json(PIXELS, id=None).replace(b'"id": null', f'"id": {DIGITS}'.encode()),
        ]
        for body in infer_bodies:
            assert_error(c.post("/v2/models/seg/infer", content=body), 400, "number")
        head = f'{{"inputs": [{{"name": "image", "shape": [1, 3, 16, 16], "datatype": "UINT8", ' \
               f'"parameters": {{"binary_data_size": {DIGITS}}}}}]}}'.encode()
        r = c.post("/v2/models/seg/infer", content=head + bytes(768), headers={"Inference-Header-Content-Length": str(len(head))})
        assert_error(r, 400, "number")
        control = f'{{"parameters": {{"model_dir": {DIGITS}}}}}'.encode()
        assert_error(c.post("/v2/repository/models/seg/load", content=control), 400, "number")
        assert_error(c.post("/v2/repository/models/seg/unload", content=control), 400, "number")
        assert_error(c.post("/v2/repository/index", content=f'{{"ready": {DIGITS}}}'.encode()), 400, "number")
        assert_error(c.post("/v2/repository/index", content=f"-{DIGITS}".encode()), 400, "number")


def test_repository_paths_the_os_refuses_get_400(root):
    (root / "loop").symlink_to(root / "loop")  # a symbolic link to itself: resolving it never ends
    (root / "pair_a").symlink_to(root / "pair_b")
    (root / "pair_b").symlink_to(root / "pair_a")
    long = "n" * (os.pathconf(root, "PC_NAME_MAX") + 10)
    with app_client(root) as c:
        for name, body in [(long, None), ("loop", None), ("pair_a", None),
                           ("x", {"parameters": {"model_dir": long}}),
                           ("x", {"parameters": {"model_dir": f"seg/{long}/deeper"}}),
                           ("x", {"parameters": {"model_dir": "loop/inside"}}),
                           ("x", {"parameters": {"model_dir": str(root / "pair_b")}})]:
            r = c.post(f"/v2/repository/models/{name}/load", json=body)
            assert_error(r, 400, "cannot be opened")
            assert len(r.text) < 1000  # the over-long name is shortened in the message
        index = c.get("/v2/repository/index")
        assert index.status_code == 200 and {m["name"] for m in index.json()} >= {"seg", "plain"}
        assert c.get("/v2/models/seg/ready").status_code == 200


def test_loading_a_package_never_replaces_a_model_another_package_serves(root):
    """'a' holds a CIF graph, served as 'a_cif'; 'a_cif' is also a package of its own."""
    shutil.copytree(root / "seg", root / "a")
    shutil.copytree(root / "plain", root / "a_cif")
    with app_client(root, max_models=6) as c:
        assert c.post("/v2/repository/models/a_cif/load").json()["models"] == ["a_cif"]
        scales = c.get("/v2/models/a_cif/config").json()["parameters"]["scales"]
        r = c.post("/v2/repository/models/a/load")
        assert_error(r, 409, "'a_cif' is loaded from package 'a_cif'", "/v2/repository/models/a_cif/unload")
        assert c.get("/v2/models/a_cif/config").json()["parameters"]["scales"] == scales  # untouched
        assert c.get("/v2/models/a_cif").json()["versions"] == ["1"]
        assert_error(c.get("/v2/models/a"), 404)  # nothing of 'a' was half-loaded
        assert c.post("/v2/repository/models/a_cif/unload").json() == {"unloaded": ["a_cif"]}
        assert c.post("/v2/repository/models/a/load").json()["models"] == ["a", "a_cif"]
        # a reload drains what it replaces: the old batchers take no new requests and stop
        repo = c.app.state.repo
        old = [repo.get("a").batcher, repo.get("a_cif").batcher]
        assert c.post("/v2/repository/models/a/load").json()["version"] == "2"
        c.portal.call(lambda: __import__("asyncio").sleep(0.2))
        assert all(b.closing for b in old)


def test_empty_x_api_key_does_not_hide_a_valid_bearer_token(root):
    with app_client(root, api_key="s3cret") as c:
        ok = {"Authorization": "Bearer s3cret"}
        assert c.get("/v2/models/seg", headers={"X-API-Key": "", **ok}).status_code == 200
        assert c.get("/v2/models/seg", headers={"X-API-Key": "  ", **ok}).status_code == 200
        assert_error(c.get("/v2/models/seg", headers={"X-API-Key": "", "Authorization": "Bearer no"}), 401)
        assert_error(c.get("/v2/models/seg", headers={"X-API-Key": "wrong", **ok}), 401)  # an explicit key is the one checked


def test_gzip_reads_every_member_and_refuses_trailing_bytes(root):
    body = _json(PIXELS, parameters={"binary_data_output": True})
    half = len(body) // 2
    with app_client(root, max_upload_mb=1) as c:
        def post(data, encoding="gzip"):
            return c.post("/v2/models/seg/infer", content=data, headers={"Content-Encoding": encoding})
        assert post(gzip.compress(body[:half]) + gzip.compress(body[half:])).status_code == 200
        assert_error(post(gzip.compress(body) + b"junk"), 400, "follow the end")
        assert_error(post(gzip.compress(body) + bytes(8)), 400, "follow the end")
        assert_error(post(gzip.compress(body) + gzip.compress(body)[:20]), 400, "truncated")
        assert_error(post(zlib.compress(body) + b"x", "deflate"), 400, "follow the end")
        member = gzip.compress(bytes(600 * 1024))  # each member inflates under the 1 MiB cap, both together past it
        assert_error(post(member + member), 413, "inflates")


def test_head_on_health_routes(root):
    with app_client(root) as c:
        for path in ("/v2/health/live", "/v2/health/ready"):
            assert c.head(path).status_code == 200
