"""Issue 11, HTTP half: cost per request bounded before decoding, client errors never 5xx and always one
shape, 16-bit and EXIF-rotated images, auth, draining, hot reload of sibling graphs and of every worker,
confined repository load / unload, and the Triton extensions tools call. Most tests drive the real app
in-process (Starlette's TestClient runs its lifespan); the multi-worker and upload-during-reload tests
start the real server."""
from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import threading
import time
import zlib

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from starlette.testclient import TestClient

from export.package import export_package
from serving.server import ServeConfig, create_app
from tests.test_serving import Server, images, infer


def png(array: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", **save)
    return buf.getvalue()


def binary_request(shape, body: bytes | None = None, outputs=None, binary_out=True) -> tuple[bytes, dict]:
    size = int(np.prod(shape))
    head = {"inputs": [{"name": "image", "shape": list(shape), "datatype": "UINT8", "parameters": {"binary_data_size": size}}],
            "parameters": {"binary_data_output": binary_out}}
    if outputs:
        head["outputs"] = [{"name": o} for o in outputs]
    head = json.dumps(head).encode()
    return head + (bytes(size) if body is None else body), {"Inference-Header-Content-Length": str(len(head))}


@pytest.fixture(scope="module")
def repo_root(package, checkpoints, tmp_path_factory):
    """A model repository: the CIF package as 'seg', a supervised one without CIF as 'plain'."""
    root = tmp_path_factory.mktemp("repository")
    shutil.copytree(package, root / "seg")
    export_package(checkpoints["supervised"], root / "plain", progress=lambda m: None)
    return root


def app_client(root, **overrides) -> TestClient:
    cfg = ServeConfig(str(root / "seg"), "seg", "onnxruntime", max_delay_ms=1, model_repository=str(root), **overrides)
    return TestClient(create_app(cfg), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(repo_root):
    with app_client(repo_root, max_work_pixels=300_000, max_json_values=50_000, max_upload_mb=2) as c:
        yield c


def assert_error(r, status: int, *words: str):
    assert r.status_code == status, r.text[:500]
    assert set(r.json()) == {"error"}, r.text[:500]
    for word in words:
        assert word in r.json()["error"], r.text
    assert "Traceback" not in r.text and " object at 0x" not in r.text


# --- cost per request ---------------------------------------------------------------------------------
def test_oversized_png_refused_from_its_header_in_milliseconds(repo_root):
    zeros = png(np.zeros((4000, 4000), np.uint8))  # ~ 46 KB on the wire, 16 Mpx once decoded
    assert len(zeros) < 100_000
    with app_client(repo_root) as c:  # default limits
        tic = time.perf_counter()
        r = c.post("/v1/segment", content=zeros, headers={"Content-Type": "image/png"})
        assert time.perf_counter() - tic < 1.0
    assert_error(r, 413, "pixels of work", "limit")


def test_cif_graph_costs_its_sum_of_squared_scales(client):
    # 200x200 = 40,000 px: fine single-scale, x 5.25 = 210,000 px of work on the CIF graph; 240x240 is not
    body, headers = binary_request((1, 3, 240, 240))
    assert client.post("/v2/models/seg/infer", content=body, headers=headers).status_code == 200
    r = client.post("/v2/models/seg_cif/infer", content=body, headers=headers)
    assert_error(r, 413, "5.25 pixels of work per pixel")
    body, headers = binary_request((2, 3, 180, 180))  # a batch costs the sum of its members: 2 x 170,100
    assert_error(client.post("/v2/models/seg_cif/infer", content=body, headers=headers), 413)


def test_size_is_refused_before_tensor_bytes_are_read(client):
    """The declared shape alone is refused: the 2048x2048 tensor's bytes were never sent."""
    body, headers = binary_request((1, 3, 2048, 2048), body=b"")
    assert_error(client.post("/v2/models/seg/infer", content=body, headers=headers), 413, "2048x2048")


def test_batcher_never_stacks_past_the_work_budget(package):
    import asyncio

    from serving.backends import OnnxRuntimeBackend
    from serving.batching import DynamicBatcher

    sizes = []

    async def scenario():
        batcher = DynamicBatcher(OnnxRuntimeBackend(package / "model.onnx"), max_batch=8, max_delay_ms=50,
                                 on_batch=sizes.append, max_work=3 * 32 * 32)
        batcher.start()
        await asyncio.gather(*(batcher.submit(images(1, 32, 32, seed=k)) for k in range(7)))
        await batcher.drain()

    asyncio.run(scenario())
    assert sum(sizes) == 7 and max(sizes) <= 3, sizes


def test_json_outputs_are_capped_and_binary_ones_are_not(client):
    x = images(1, 100, 120)  # probs: 5 x 12,000 values, over the 50,000-value JSON cap of this client
    body, headers = binary_request(x.shape, x.tobytes(), outputs=["probs"], binary_out=False)
    assert_error(client.post("/v2/models/seg/infer", content=body, headers=headers), 413, "binary")
    body, headers = binary_request(x.shape, x.tobytes(), outputs=["probs"], binary_out=True)
    assert client.post("/v2/models/seg/infer", content=body, headers=headers).status_code == 200


# --- client errors: 400 with one shape ------------------------------------------------------------------
def _json(data, shape=None, datatype="UINT8", **extra) -> bytes:
    return json.dumps({"inputs": [{"name": "image", "shape": shape or [1, 3, 16, 16], "datatype": datatype,
                                   "data": data}], **extra}).encode()


PIXELS = [0] * (3 * 16 * 16)


@pytest.mark.parametrize("case,body,words", [
    ("uint8 300", _json([300] + PIXELS[1:]), ["0..255"]),
    ("uint8 -1", _json([-1] + PIXELS[1:]), ["0..255"]),
    ("uint8 1.7", _json([1.7] + PIXELS[1:]), ["whole numbers"]),
    ("uint8 true", _json([True] + PIXELS[1:]), ["not true/false"]),
    ("huge int", _json([2 ** 70] + PIXELS[1:]), ["numbers"]),
    ("strings", _json(["a"] * len(PIXELS)), ["numbers"]),
    ("ragged", _json([[1, 2], [3]]), ["one shape"]),
    ("parameters list", _json(PIXELS, parameters=[1]), ["parameters"]),
    ("input parameters list", json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "UINT8", "data": [1],
                                                       "parameters": [1]}]}).encode(), ["parameters"]),
    ("shape bool", _json(PIXELS, shape=[True, 3, 16, 16]), ["shape"]),
    ("output name list", _json(PIXELS, outputs=[{"name": ["labels"]}]), ["name"]),
    ("binary flag string", _json(PIXELS, outputs=[{"name": "labels", "parameters": {"binary_data": "yes"}}]), ["true or false"]),
    ("deep nesting", b"[" * 100_000, ["nests too deeply"]),
    ("datatype list", _json(PIXELS, datatype=["UINT8"]), ["datatype"]),
])
def test_malformed_infer_requests_get_400(client, case, body, words):
    assert_error(client.post("/v2/models/seg/infer", content=body), 400, *words)


def test_load_with_bad_model_dir_gets_400_or_403(client, tmp_path):
    assert_error(client.post("/v2/repository/models/seg/load", json={"parameters": {"model_dir": 5}}), 400, "model_dir")
    assert_error(client.post("/v2/repository/models/seg/load", json={"parameters": [1]}), 400, "parameters")
    assert_error(client.post("/v2/repository/models/seg/load", content=b"[" * 60_000), 400, "nests too deeply")
    assert_error(client.post("/v2/repository/models/x/load", json={"parameters": {"model_dir": str(tmp_path)}}), 403,
                 "outside")
    assert_error(client.post("/v2/repository/models/x/load", json={"parameters": {"model_dir": "../../etc"}}), 403)


def test_truncated_graph_on_reload_gets_400_and_old_version_serves(client, repo_root):
    damaged = repo_root / "damaged"
    shutil.copytree(repo_root / "plain", damaged)
    data = (damaged / "model.onnx").read_bytes()
    (damaged / "model.onnx").write_bytes(data[: len(data) // 2])
    before = client.get("/v2/models/seg").json()["versions"]
    r = client.post("/v2/repository/models/seg/load", json={"parameters": {"model_dir": "damaged"}})
    assert_error(r, 400, "model.onnx", "damaged", "keeps serving")
    assert client.get("/v2/models/seg").json()["versions"] == before


def test_query_parameter_errors_have_the_one_shape(client, tiny_data):
    image = (tiny_data / "images" / "synth_00000.png").read_bytes()
    headers = {"Content-Type": "image/png"}
    assert_error(client.post("/v1/segment?alpha=abc", content=image, headers=headers), 400, "alpha")
    assert_error(client.post("/v1/segment?alpha=3", content=image, headers=headers), 400, "alpha")
    assert_error(client.get("/no/such/route"), 404)
    assert_error(client.get("/v2/models/seg/infer"), 405)


def test_unreadable_image_message_names_no_object(client):
    assert_error(client.post("/v1/segment", content=b"not an image at all", headers={"Content-Type": "image/png"}),
                 400, "not a readable image")


def test_sixteen_bit_png_is_scaled_not_white(client):
    from serving.imaging import decode_image

    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    rgb = decode_image(png(ramp), lambda h, w: None)
    assert rgb.dtype == np.uint8 and rgb.shape == (64, 64, 3)
    assert rgb.min() == 0 and rgb.max() == 255 and 120 <= rgb.mean() <= 135  # a ramp, not 99.6 % white
    r = client.post("/v1/segment", content=png(ramp), headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text


def test_exif_orientation_is_applied(client):
    from serving.imaging import decode_image

    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = png(wide, exif=exif.tobytes())
    upright = decode_image(data, lambda h, w: None)
    assert upright.shape == (40, 20, 3) and upright[:20].min() == 255 and upright[20:].max() == 0
    r = client.post("/v1/segment", content=data, headers={"Content-Type": "image/png"})
    assert r.status_code == 200 and (r.json()["width"], r.json()["height"]) == (20, 40)


def test_model_ready_answers_503_while_draining(repo_root):
    with app_client(repo_root) as c:
        assert c.get("/v2/models/seg/ready").status_code == 200
        model = c.app.state.repo.get("seg")
        c.portal.call(model.batcher.drain)  # what shutdown does to every model
        assert_error(c.get("/v2/models/seg/ready"), 503, "draining")


# --- auth ------------------------------------------------------------------------------------------------
def test_auth_challenge_scheme_case_and_docs_behind_key(repo_root):
    with app_client(repo_root, api_key="s3cret") as c:
        r = c.get("/v2/models/seg")
        assert_error(r, 401, "API key")
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        for scheme in ("Bearer", "bearer", "BEARER"):
            assert c.get("/v2/models/seg", headers={"Authorization": f"{scheme} s3cret"}).status_code == 200
        for path in ("/openapi.json", "/docs"):
            assert c.get(path).status_code == 401
            assert c.get(path, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/v2/health/ready").status_code == 200


def test_api_key_from_file_or_environment_not_argv(tmp_path, monkeypatch):
    from serving.cli import api_key, parser

    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert api_key(parser().parse_args(["m", "--api-key-file", str(key_file)])) == "from-file"
    monkeypatch.setenv("SCALESEG_API_KEY", "from-env")
    assert api_key(parser().parse_args(["m"])) == "from-env"
    key_file.write_text("")
    with pytest.raises(SystemExit, match="empty"):
        api_key(parser().parse_args(["m", "--api-key-file", str(key_file)]))


# --- repository: siblings, confinement, bounds, unload; Triton extensions ------------------------------------
def test_siblings_switch_together_and_load_unload_are_bounded(repo_root):
    with app_client(repo_root, max_models=3) as c:
        assert c.get("/v2/models/seg_cif").json()["versions"] == ["1"]
        r = c.post("/v2/repository/models/seg/load", json={"parameters": {"model_dir": "seg"}})
        assert r.status_code == 200 and r.json()["models"] == ["seg", "seg_cif"]
        assert c.get("/v2/models/seg_cif").json()["versions"] == ["2"]  # the sibling switched too
        r = c.post("/v2/repository/models/seg/load", json={"parameters": {"model_dir": "plain"}})
        assert r.status_code == 200 and r.json()["models"] == ["seg"]
        assert_error(c.get("/v2/models/seg_cif"), 404)  # the new package has no CIF graph: none stays on the old one
        assert c.post("/v2/repository/models/plain/load").status_code == 200  # by name, from the repository
        assert_error(c.post("/v2/repository/models/cif2/load", json={"parameters": {"model_dir": "seg"}}), 409, "at most 3")
        assert c.post("/v2/repository/models/plain/unload").json() == {"unloaded": ["plain"]}
        assert_error(c.get("/v2/models/plain"), 404)
        assert c.post("/v2/repository/models/cif2/load", json={"parameters": {"model_dir": "seg"}}).status_code == 200


def test_tritonclient_extensions(repo_root):
    with Server(repo_root / "seg", "--model-repository", str(repo_root), "--max-delay-ms", "1") as s:
        client = s.client()
        x = images(1, 32, 32)
        for algorithm in ("gzip", "deflate"):
            inp = triton.InferInput("image", list(x.shape), "UINT8").set_data_from_numpy(x)
            result = client.infer("seg", [inp], request_compression_algorithm=algorithm)
            assert result.as_numpy("labels").shape == (1, 32, 32)
        config = client.get_model_config("seg")
        assert config["max_batch_size"] == 8 and config["input"][0] == {"name": "image", "data_type": "TYPE_UINT8",
                                                                       "dims": [3, -1, -1]}
        stats = client.get_inference_statistics("seg")["model_stats"][0]
        assert stats["inference_count"] >= 2 and stats["inference_stats"]["success"]["count"] >= 2
        index = {m["name"]: m for m in client.get_model_repository_index()}
        assert index["seg"]["state"] == "READY" and index["plain"]["state"] == "UNAVAILABLE"
        client.load_model("plain")
        assert client.is_model_ready("plain")
        client.unload_model("plain")
        assert not client.is_model_ready("plain")
        bomb = gzip.compress(bytes(50 * 1024 * 1024))
        r = httpx.post(f"{s.url}/v2/models/seg/infer", content=bomb, headers={"Content-Encoding": "gzip"})
        assert_error(r, 413, "inflates")
        r = httpx.post(f"{s.url}/v2/models/seg/infer", content=zlib.compress(b"{")[:-3], headers={"Content-Encoding": "deflate"})
        assert_error(r, 400)


# --- hot reload under real servers ------------------------------------------------------------------------
def test_reload_reaches_every_worker(repo_root):
    with Server(repo_root / "seg", "--model-repository", str(repo_root), "--workers", "2") as s:
        r = httpx.post(f"{s.url}/v2/repository/models/seg/load", json={"parameters": {"model_dir": "plain"}}, timeout=120)
        assert r.status_code == 200 and r.json()["workers_switched"] == 2, r.text
        seen = set()
        for _ in range(20):  # fresh connections, spread over both workers
            with httpx.Client() as fresh:
                meta = fresh.get(f"{s.url}/v2/models/seg").json()
                seen.add((meta["versions"][0], len(meta["outputs"])))
                assert fresh.get(f"{s.url}/v2/models/seg_cif").status_code == 404
        assert seen == {("2", 2)}, seen
        # a sibling unloaded on its own comes back with its package on every worker
        r = httpx.post(f"{s.url}/v2/repository/models/seg/load", json={"parameters": {"model_dir": "seg"}}, timeout=120)
        assert r.status_code == 200 and r.json()["workers_switched"] == 2, r.text
        r = httpx.post(f"{s.url}/v2/repository/models/seg_cif/unload", timeout=120)
        assert r.status_code == 200 and r.json()["workers_switched"] == 2, r.text
        r = httpx.post(f"{s.url}/v2/repository/models/seg/load", timeout=120)
        assert r.status_code == 200 and r.json()["models"] == ["seg", "seg_cif"], r.text
        for _ in range(10):
            with httpx.Client() as fresh:
                assert fresh.get(f"{s.url}/v2/models/seg_cif").json()["versions"] == ["4"]


def test_request_uploading_during_reload_is_served_by_the_new_version(repo_root):
    with Server(repo_root / "seg", "--model-repository", str(repo_root)) as s:
        x = images(1, 32, 32)
        body, headers = binary_request(x.shape, x.tobytes())
        uploading, reloaded = threading.Event(), threading.Event()

        def slow_body():
            yield body[:10]
            uploading.set()  # httpx asks for the next chunk once the head and the first bytes are sent
            reloaded.wait(120)
            yield body[10:]

        def reload():
            assert uploading.wait(60)
            r = httpx.post(f"{s.url}/v2/repository/models/seg/load", json={"parameters": {"model_dir": "plain"}}, timeout=120)
            assert r.status_code == 200
            reloaded.set()

        for _ in range(2):
            uploading.clear()
            reloaded.clear()
            thread = threading.Thread(target=reload)
            thread.start()
            r = httpx.post(f"{s.url}/v2/models/seg/infer", content=slow_body(), headers=headers, timeout=120)
            thread.join()
            assert reloaded.is_set(), "the reload did not finish"  # the thread's own asserts do not fail the test
            assert r.status_code == 200, r.text
            n = int(r.headers["Inference-Header-Content-Length"])
            assert json.loads(r.content[:n])["model_version"] == str(s.client().get_model_metadata("seg")["versions"][0])
        assert infer(s.client(), x, outputs=["labels"]).as_numpy("labels").shape == (1, 32, 32)


def test_env_has_no_key_on_command_line(repo_root, tmp_path):
    """The key given by environment reaches the server without appearing in its argv."""
    env_before = os.environ.get("SCALESEG_API_KEY")
    os.environ["SCALESEG_API_KEY"] = "env-key"
    try:
        with Server(repo_root / "seg") as s:
            argv = open(f"/proc/{s.proc.pid}/cmdline", "rb").read()
            assert b"env-key" not in argv
            assert httpx.get(f"{s.url}/v2/models/seg").status_code == 401
            assert httpx.get(f"{s.url}/v2/models/seg", headers={"Authorization": "bearer env-key"}).status_code == 200
    finally:
        if env_before is None:
            os.environ.pop("SCALESEG_API_KEY")
        else:
            os.environ["SCALESEG_API_KEY"] = env_before
