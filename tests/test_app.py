"""The web app: upload ingestion (bad archives included), its API through gradio_client, the whole
loop with a real Label Studio (push, label, pull, retrain, promote), and a browser driving the UI."""
from __future__ import annotations

import io
import os
import socket
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.ingest import ingest
from app.labeling import effort_by_version, load_state, prediction_result
from app.labelstudio import LabelStudio
from app.ui import App
from training.data.folder import class_dicts, load_classes, mask_path, read_split
from training.data.synth import render

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
SCREENSHOTS = Path(os.environ.get("SCALESEG_SCREENSHOTS", "")) if os.environ.get("SCALESEG_SCREENSHOTS") else None


def png_bytes(seed: int, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size[::-1], 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_ingest_images_zip_duplicates_and_junk(data_copy, tmp_path):
    data = data_copy
    before = {p.name for p in (data / "masks").iterdir()}
    (tmp_path / "a.png").write_bytes(png_bytes(1))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(png_bytes(2)[:60])
    archive = tmp_path / "batch.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("nested/deeper/b.png", png_bytes(3))
        z.writestr("../../escape.png", png_bytes(4))
        z.writestr("/abs.png", png_bytes(5))
        z.writestr("__MACOSX/._b.png", b"junk")
        z.writestr("readme.md", "hello")
        z.writestr("copy-of-a.png", png_bytes(1))
    existing = data / "images" / "synth_00006.png"  # already in the dataset under another name
    report = ingest(data, [tmp_path / "a.png", tmp_path / "notes.txt", tmp_path / "broken.png", archive, existing])
    assert len(report.added) == 2
    assert sorted(report.duplicates) == ["batch.zip:copy-of-a.png", "synth_00006.png"]
    assert set(report.invalid) == {"notes.txt", "broken.png", "batch.zip:../../escape.png", "batch.zip:/abs.png", "batch.zip:readme.md"}
    assert "unsafe path" in report.invalid["batch.zip:../../escape.png"]
    assert not (tmp_path.parent / "escape.png").exists() and not Path("/abs.png").exists()
    assert read_split(data, "unlabeled")[-2:] == report.added
    assert {p.name for p in (data / "masks").iterdir()} == before  # nothing else touched
    again = ingest(data, [tmp_path / "a.png"])
    assert again.added == [] and again.duplicates == ["a.png"]


@pytest.fixture
def app(package, data_copy, tmp_path, label_studio):
    return App(package, data_copy, tmp_path / "work", ls_url=label_studio.url, ls_token=label_studio.token)


def test_loop_push_label_pull_retrain_promote(app, label_studio):
    s = app.s
    assert s.registry.serving()["name"] == "v1"
    gallery, table, message = app.rank("entropy", 3, 1.0)
    assert len(gallery) == 3 and "Selected 3" in message
    restarted = App(s.predictor.model_dir, s.data, s.registry.work, ls_url=label_studio.url, ls_token=label_studio.token)
    assert [r.image_id for r in restarted.s.ranking] == [r.image_id for r in s.ranking]  # the ranking survives a restart
    message, counts = app.ls_push(label_studio.url, "", "app loop", "local")  # empty box: the token given at launch
    assert "pushed 3 new task(s) with model v1's masks" in message
    assert counts == "Project 'app loop' (id %d): 3 pushed, 0 annotated, 0 pulled, 3 pending." % load_state(s.data)["project_id"]
    client = LabelStudio(label_studio.url, label_studio.token)
    project = next(p for p in client.projects() if p["title"] == "app loop")
    tasks = list(client.tasks(project["id"]))
    assert all(t["predictions"] for t in tasks)
    assert {t["predictions"][0]["model_version"] for t in tasks} == {"v1"}  # the registry's name, as in the Models tab
    classes = class_dicts(load_classes(s.data))
    truth = {}
    for task in tasks:
        image_id = task["data"]["scaleseg_id"]
        _, truth[image_id] = render(int(image_id.split("_")[1]), 0, 48, load_classes(s.data))
        client.create_annotation(task["id"], prediction_result(truth[image_id], classes))
    message, counts = app.ls_pull(label_studio.url, label_studio.token, False)
    assert "3 mask(s) written" in message and "3 pushed, 3 annotated, 3 pulled, 0 pending" in counts
    assert "labelling effort:" in message and "(3 image(s))" in message
    for image_id, mask in truth.items():
        assert np.array_equal(np.array(Image.open(mask_path(s.data, image_id))), mask)

    assert "Started v2" in app.retrain("supervised", 3, "current model", "if-not-worse")
    with pytest.raises(Exception, match="one job at a time"):
        app.retrain("supervised", 3, "current model", "if-not-worse")
    deadline = time.time() + 300
    while s.retrainer.busy and time.time() < deadline:
        time.sleep(1)
    job = s.retrainer.job
    assert job.status == "done", job.message
    new, old = job.result["new"]["miou"], job.result["serving"]["miou"]
    assert job.promoted == (new >= old)
    assert app.promote("v2") == "v2 is now serving."
    assert s.registry.serving()["name"] == "v2" and s.predictor.model_dir.name == "v2"
    rows, curve, which, cif = app.models()
    assert [r[0] for r in rows] == ["v1", "v2 (serving)"] and rows[1][2] == 9  # 6 labelled + 3 pulled
    # v1's pre-annotations were corrected into the 3 pulled masks; v2 has pre-annotated nothing yet
    effort, images = effort_by_version(load_state(s.data))["v1"]
    assert rows[0][6] == f"{100 * effort:.1f} % (3 images)" and images == 3 and rows[1][6] == "-"
    assert which.choices == [("v1", "v1"), ("v2", "v2")] and which.value == "v2"
    assert curve.x_lim[0] < 6 and curve.x_lim[1] > 9  # every point inside the plot, none on its border
    mious = [v["miou"] for v in s.registry.read()["versions"]]
    assert curve.y_lim[0] < min(mious) and curve.y_lim[1] > max(mious)
    # v2 is a supervised model: no CIF graph, so the checkbox is off and says why, and Predict says so too
    assert cif.value is False and cif.interactive is False and "v2 has no CIF graph" in cif.label
    *_, info, _ = app.predict(str(s.data / "images" / "synth_00000.png"), 0.5, True)
    assert "single scale (model v2 has no CIF graph)" in info


def test_each_label_studio_action_closes_its_connections(app, label_studio, monkeypatch):
    import gradio as gr

    closed = []
    monkeypatch.setattr(LabelStudio, "close", lambda self: closed.append(self.url) or self._http.close())
    assert app.ls_status(label_studio.url, label_studio.token) == "Nothing pushed from this dataset yet."
    app.rank("entropy", 1, 1.0)  # push needs a selection before it connects
    nobody = "http://127.0.0.1:9"  # nothing listens there: the error paths close too
    for action in (lambda: app.ls_connect(nobody, "a-token"), lambda: app.ls_push(nobody, "a-token", "p", "local"),
                   lambda: app.ls_pull(nobody, "a-token", False)):
        with pytest.raises(gr.Error):  # pull stops before any request: nothing was pushed from this dataset
            action()
    assert closed == [label_studio.url] + [nobody] * 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def running_app(app):
    demo = app.blocks()
    demo.queue(default_concurrency_limit=1)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, ssr_mode=False, quiet=True)
    yield app, f"http://127.0.0.1:{port}/"
    demo.close()


def test_gradio_client_api(running_app, tiny_data, tmp_path):
    from gradio_client import Client, handle_file

    app, url = running_app
    client = Client(url, verbose=False)
    overlay, heat, table, info, legend = client.predict(handle_file(str(tiny_data / "images" / "synth_00000.png")), 0.5,
                                                        True, api_name="/predict")
    assert Path(overlay).is_file() and Path(heat).is_file() and "CIF multi-scale" in info
    assert [row[0] for row in table["data"]] == ["background", "disc", "square", "triangle", "ring"]
    (tmp_path / "new.png").write_bytes(png_bytes(7, (64, 48)))
    assert client.predict([handle_file(str(tmp_path / "new.png"))], api_name="/add_unlabeled").startswith("1 added")
    gallery, ranked, message = client.predict("scale_disagreement", 2, 1.0, api_name="/rank")
    assert len(gallery) == 2 and len(ranked["data"]) == 2
    versions, *_ = client.predict(api_name="/models")
    assert versions["data"][0][0] == "v1 (serving)"


def test_browser_drives_the_ui(running_app, tiny_data, tmp_path):
    from playwright.sync_api import sync_playwright

    if not Path("/usr/bin/chromium").exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    app, url = running_app
    shots = SCREENSHOTS or tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    uploads = []
    for k in range(3):
        uploads.append(tmp_path / f"u{k}.png")
        uploads[-1].write_bytes(png_bytes(20 + k, (64, 64)))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.get_by_role("button", name="Segment").wait_for()
        # the Label Studio token given at launch is nowhere in the page or its config
        assert app.s.ls_token and app.s.ls_token not in page.content()
        assert app.s.ls_token not in page.request.get(url + "config").text()
        huge = tmp_path / "huge.png"
        Image.fromarray(np.zeros((4200, 4200), np.uint8)).save(huge)
        page.locator("input[type=file]").first.set_input_files(str(huge))
        page.get_by_role("button", name="Segment").click()
        # CIF is ticked for a package with a CIF graph: its budget allows 2048^2 / 5.25 pixels
        page.get_by_text("huge.png: 4200x4200 is larger than the 798,915-pixel limit").first.wait_for(timeout=60_000)
        page.screenshot(path=str(shots / "predict-too-large.png"))
        page.reload()
        page.get_by_role("button", name="Segment").wait_for()
        page.locator("input[type=file]").first.set_input_files(str(tiny_data / "images" / "synth_00002.png"))
        page.get_by_role("button", name="Segment").click()
        page.locator("#overlay img").wait_for(timeout=60_000)
        page.locator("#predict-info").get_by_text("ms").wait_for(timeout=60_000)
        page.screenshot(path=str(shots / "predict.png"), full_page=True)

        page.get_by_role("tab", name="Unlabeled").click()
        page.locator("input[type=file][multiple]").set_input_files([str(u) for u in uploads])
        page.get_by_role("button", name="Add to dataset").click()
        page.locator("#ingest-report").get_by_text("3 added").wait_for(timeout=60_000)
        page.get_by_role("button", name="Score and rank").click()
        page.locator("#rank-report").get_by_text("Selected").wait_for(timeout=120_000)
        assert page.locator("#ranked img").count() >= 1
        page.screenshot(path=str(shots / "unlabeled.png"), full_page=True)
        page.get_by_role("tab", name="Label Studio").click()
        page.get_by_role("button", name="Push selection with pre-annotations").click()  # empty token box: the server's
        page.locator("#ls-status").get_by_text("8 pushed, 0 annotated, 0 pulled, 8 pending").wait_for(timeout=120_000)
        assert app.s.ls_token not in page.content()
        for tab, name in (("Label Studio", "label-studio"), ("Retrain", "retrain"), ("Models", "models")):
            page.get_by_role("tab", name=tab).click()
            time.sleep(1.0)
            page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
        browser.close()
    assert len(read_split(app.s.data, "unlabeled")) == 15


def test_demo_stages_chain_supervised_into_scalematch(tmp_path):
    from app.demo import SCALEMATCH_LR, precision_note, stage_args
    from training.cli import parse_train_args
    first, second = (parse_train_args(a) for a in stage_args(tmp_path / "data", tmp_path / "warm", tmp_path / "run", 1500,
                                                               250, seed=3))
    # the supervised stage is the small-data recipe as shipped (AdamW at its lr), the ScaleMatch stage the paper's SGD
    assert (first.method, first.run.max_iters, first.optim.lr, first.run.seed) == ("supervised", 1500, 0.0004, 3)
    assert (first.optim.optimizer, second.optim.optimizer) == ("adamw", "sgd")
    assert (second.method, second.run.max_iters, second.optim.lr, second.run.seed) == ("scalematch", 250, SCALEMATCH_LR, 3)
    assert second.model.init_from == str(tmp_path / "warm" / "last.pt") and first.run.out == str(tmp_path / "warm")
    assert first.data.root == second.data.root == str(tmp_path / "data")
    assert not first.optim.amp_cpu and not second.optim.amp_cpu
    bf16 = [parse_train_args(a) for a in stage_args(tmp_path / "data", tmp_path / "warm", tmp_path / "run", 1500, 250,
                                                     cpu_bf16=True)]
    assert all(stage.optim.amp_cpu for stage in bf16)
    assert "bfloat16" in precision_note("cpu", True)
    assert "float32 (this CPU has no native bfloat16)" in precision_note("cpu", False)
    assert precision_note("cuda", True) == "precision: float32 on cuda"


def test_demo_stage_is_skipped_when_finished_and_resumed_when_interrupted(tmp_path, monkeypatch):
    """last.pt is written at every epoch's end, so its existence does not mean the stage finished."""
    import training.cli
    from app.demo import run_stage
    from training.checkpoint import save_checkpoint
    calls = []
    monkeypatch.setattr(training.cli, "cmd_train", calls.append)
    argv = ["data", "--max-iters", "4", "--force", "--out", str(tmp_path)]
    assert run_stage(argv, tmp_path) and calls[-1] == argv
    stage = {"total_iters": 4, "inference": {}, "config": {"run": {"max_iters": 4}}}
    save_checkpoint(tmp_path / "last.pt", {**stage, "iteration": 2})
    assert run_stage(argv, tmp_path) and calls[-1] == ["data", "--max-iters", "4", "--resume", "--out", str(tmp_path)]
    save_checkpoint(tmp_path / "last.pt", {**stage, "iteration": 4})
    assert not run_stage(argv, tmp_path) and len(calls) == 2


def test_user_errors_are_shown_without_a_traceback_in_the_log(package, data_copy, tmp_path):
    """Gradio prints the traceback of every gr.Error unless told not to; a user's mistake is no server fault."""
    import gradio as gr

    app = App(package, data_copy, tmp_path / "work")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    for call in (lambda: app.predict(None), lambda: app.predict(str(tmp_path / "junk.png")), lambda: app.promote(""),
                 lambda: app.promote("v9")):
        with pytest.raises(gr.Error) as err:
            call()
        assert err.value.print_exception is False, err.value
