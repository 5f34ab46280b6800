"""`scaleseg app`: the Gradio web app. Predict, add unlabelled images and rank them by uncertainty, push
the least certain to Label Studio with the model's masks, pull the labels back, retrain, promote."""
from __future__ import annotations

import html
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the constructor flag alone does not stop telemetry

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from serving.backends import current_gpu  # noqa: E402
from serving.imaging import overlay as colour_overlay  # noqa: E402
from training.data.folder import find_image, read_split  # noqa: E402
from training.methods import METHODS  # noqa: E402

from . import acquisition  # noqa: E402
from .ingest import MAX_UPLOAD_BYTES, ingest, read_upload  # noqa: E402
from .labeling import ProjectChanged, effort_by_version, load_state, pull, push, status  # noqa: E402
from .labelstudio import LabelStudio, LabelStudioError  # noqa: E402
from .predictor import Predictor  # noqa: E402
from .scoring import Scored, image_batch, load_ranking, save_ranking, select_next  # noqa: E402
from .versions import Registry, Retrainer, package_runtime, register_initial  # noqa: E402

CIF_LABEL = "CIF multi-scale (x0.5, x1, x2)"
HEAT_STOPS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float32)


def user_error(message: str) -> gr.Error:
    """A mistake the user can fix: shown in the page, not written to the log as a traceback."""
    return gr.Error(message, print_exception=False)


def overlay(rgb: np.ndarray, labels: np.ndarray, classes: list[dict], opacity: float) -> np.ndarray:
    """Class colours blended over the image, except on background, which stays as it was (its colour is
    usually black and would only darken the picture)."""
    painted = np.isin(labels, [c["id"] for c in classes if c["name"] != "background"])
    return np.where(painted[..., None], colour_overlay(rgb, labels, classes, opacity), rgb)


def legend(classes: list[dict], labels: np.ndarray | None = None) -> str:
    """HTML swatches for the classes (those present in ``labels`` where given)."""
    present = set(np.unique(labels).tolist()) if labels is not None else {c["id"] for c in classes}
    items = []
    for c in classes:
        if c["id"] not in present:
            continue
        if c["name"] == "background":
            items.append('<span style="margin-right:14px">background (not painted)</span>')
            continue
        r, g, b = c["color"]
        swatch = (f'<span style="display:inline-block;width:14px;height:14px;background:rgb({r},{g},{b});'
                  'border:1px solid #888;vertical-align:middle"></span>')
        items.append(f'<span style="margin-right:14px">{swatch} {html.escape(c["name"])}</span>')
    return '<div id="legend-items">' + "".join(items) + "</div>"


def heatmap(confidence: np.ndarray) -> np.ndarray:
    """Confidence in [0, 1] -> RGB (dark purple = unsure, yellow = sure)."""
    x = np.clip(confidence, 0, 1) * (len(HEAT_STOPS) - 1)
    i = np.minimum(x.astype(int), len(HEAT_STOPS) - 2)
    t = (x - i)[..., None]
    return (HEAT_STOPS[i] * (1 - t) + HEAT_STOPS[i + 1] * t).astype(np.uint8)


def effort_cell(effort: tuple[float, int] | None) -> str:
    """A version's labelling effort for the Models table: mean % of pre-annotated pixels corrected (images)."""
    return "-" if effort is None else f"{100 * effort[0]:.1f} % ({effort[1]} images)"


@dataclass
class AppState:
    data: Path
    predictor: Predictor
    registry: Registry
    retrainer: Retrainer
    ls_url: str = ""
    ls_token: str = ""
    ranking: list[Scored] = field(default_factory=list)
    ranking_version: str = ""         # the model version whose masks the ranking holds

    @property
    def ranking_path(self) -> Path:
        return self.registry.work / "ranking.npz"


class App:
    def __init__(self, model: Path, data: Path, work: Path, serving_url: str = "", ls_url: str = "", ls_token: str = "",
                 serving_api_key: str = "", retrain: dict | None = None):
        """``retrain``: RetrainRecipe fields that override the serving model's training config (None: keep it)."""
        registry = Registry(work)
        current = register_initial(registry, Path(model), Path(data), (retrain or {}).get("device") or "auto")
        predictor = Predictor(Path(current["dir"]), serving_url, api_key=serving_api_key)
        self.s = AppState(Path(data), predictor, registry, Retrainer(registry, Path(data), predictor.load, retrain),
                          ls_url, ls_token)
        self.s.ranking, self.s.ranking_version = load_ranking(self.s.ranking_path, self.s.data)

    # --- Predict ---------------------------------------------------------------------------------------
    def predict(self, image, opacity: float = 0.5, multiscale: bool = False):
        """``image``: the uploaded file (Gradio's payload, not preprocessed, so that its size is checked
        before anything decodes it) or a path."""
        path = image.get("path") if isinstance(image, dict) else image
        if not path:
            raise user_error("Upload or pick an image first.")
        try:
            rgb = read_upload(Path(path), *self.s.predictor.upload_limits(multiscale and self.s.predictor.cif is not None))
        except (ValueError, OSError) as err:
            name = image.get("orig_name") if isinstance(image, dict) else None
            raise user_error(f"{name or Path(path).name}: {err}.") from None
        model_dir, single, cif = self.s.predictor.snapshot()
        ran = cif if multiscale and cif is not None else single
        tic = time.perf_counter()
        out = self.s.predictor.predict(rgb, multiscale)
        latency = 1000 * (time.perf_counter() - tic)
        classes = self.s.predictor.classes
        labels, conf = out["labels"], out["confidence"]
        counts = np.bincount(labels.ravel(), minlength=len(classes))
        table = [[c["name"], round(100 * counts[c["id"]] / labels.size, 2),
                  round(float(conf[labels == c["id"]].mean()), 3) if counts[c["id"]] else None] for c in classes]
        version = self.s.registry.name_of(model_dir)
        used = "CIF multi-scale" if multiscale and cif is not None else "single scale"
        if multiscale and cif is None:
            used += f" (model {version} has no CIF graph)"
        info = f"{latency:.0f} ms, {used}, {ran.precision.upper()}, mean confidence {conf.mean():.3f}, model {version}"
        return overlay(rgb, labels, classes, opacity), heatmap(conf), table, info, legend(classes, labels)

    # --- Unlabeled ---------------------------------------------------------------------------------------
    def add_unlabeled(self, files, progress=gr.Progress()):
        if not files:
            raise user_error("Choose image files or a .zip first.")
        paths = [f if isinstance(f, str) else f.name for f in files]
        report = ingest(self.s.data, paths, progress=lambda f, m: progress(f, desc=m))
        return report.summary() + f"\n\nThe unlabelled pool now has {len(read_split(self.s.data, 'unlabeled', required=False))} images."

    def rank(self, function: str, k: int, balance: float, progress=gr.Progress()):
        model_dir, single, cif = self.s.predictor.snapshot()  # one model for the whole ranking, even if promoted meanwhile
        if function == "scale_disagreement" and cif is None:
            raise user_error("Scale disagreement needs a ScaleMatch model exported with --cif-scales.")
        try:
            scored, picks = select_next(model_dir, self.s.data, function, int(k), balance, backend=single, cif_backend=cif,
                                        progress=lambda f, m: progress(f, desc=m))
        except ValueError as err:
            raise user_error(str(err)) from None
        if not scored:
            raise user_error("No unlabelled images: add some first.")
        self.s.ranking = picks
        self.s.ranking_version = self.s.registry.name_of(model_dir)
        save_ranking(self.s.ranking_path, self.s.ranking, self.s.ranking_version)
        classes = self.s.predictor.classes
        gallery = []
        for s in self.s.ranking:
            path = find_image(self.s.data, s.image_id)
            if path is not None:
                rgb = image_batch(path)[0].transpose(1, 2, 0)
                gallery.append((overlay(rgb, s.labels, classes, 0.45), f"{s.image_id}  {function} {s.score:.3f}"))
        table = [[s.image_id, round(s.score, 4)] for s in self.s.ranking]
        return gallery, table, (f"Selected {len(self.s.ranking)} of {len(scored)} unlabelled images by {function} "
                                f"with model {self.s.ranking_version}.")

    # --- Label Studio --------------------------------------------------------------------------------------
    def _client(self, url: str, token: str) -> LabelStudio:
        """A client for this request. The token given at launch never reaches the browser and is only ever
        sent to the URL given with it; any other URL needs its own token, which is used for that request only."""
        url = (url or "").strip().rstrip("/") or self.s.ls_url.rstrip("/")
        token = (token or "").strip()
        if not token:
            if not self.s.ls_token:
                raise user_error("Paste a Label Studio access token (Account & Settings -> Access Token).")
            if url != self.s.ls_url.rstrip("/"):
                raise user_error(f"The token the app was started with belongs to {self.s.ls_url}; paste the access token "
                               f"for {url}, or set the URL back.")
            token = self.s.ls_token
        try:
            return LabelStudio(url, token)
        except LabelStudioError as err:
            raise user_error(str(err)) from None

    def ls_connect(self, url: str, token: str, progress=gr.Progress()) -> tuple[str, str]:
        with self._client(url, token) as client:  # an action's connections close when it ends
            progress(0, desc=f"connecting to {client.url}")
            try:
                who = client.whoami()
                counts = status(client, self.s.data)
            except LabelStudioError as err:
                raise user_error(str(err)) from None
        return f"Connected to {client.url} as {who.get('email') or who.get('username')}.", counts.summary()

    def ls_push(self, url: str, token: str, project: str, delivery: str, switch: bool = False,
                progress=gr.Progress()) -> tuple[str, str]:
        if not self.s.ranking:
            raise user_error("Rank the unlabelled images first (Unlabeled tab).")
        preds = {s.image_id: {"labels": s.labels, "confidence": s.confidence, "score": s.score} for s in self.s.ranking}
        with self._client(url, token) as client:
            progress(0, desc=f"connecting to {client.url}")
            try:
                report = push(client, self.s.data, preds, self.s.ranking_version, project or "scaleseg", delivery,
                              progress=lambda f, m: progress(f, desc=m), switch_project=switch)
                counts = status(client, self.s.data)
            except ProjectChanged as err:
                raise user_error(str(err)) from None
            except LabelStudioError as err:
                raise user_error(f"{err} The selection is kept; push again when Label Studio is back.") from None
        return (f"Project {report.project_id}: pushed {len(report.pushed)} new task(s) with model "
                f"{self.s.ranking_version}'s masks; {len(report.already)} were already there. Open "
                f"{client.url}/projects/{report.project_id} to label them."), counts.summary()

    def ls_pull(self, url: str, token: str, overwrite: bool, progress=gr.Progress()) -> tuple[str, str]:
        with self._client(url, token) as client:
            progress(0, desc=f"connecting to {client.url}")
            try:
                r = pull(client, self.s.data, overwrite, progress=lambda f, m: progress(f, desc=m))
                counts = status(client, self.s.data)
            except LabelStudioError as err:
                raise user_error(str(err)) from None
        text = (f"{len(r.written)} mask(s) written ({len(r.updated)} of them edits of annotations pulled before, "
                f"{len(r.imported)} from tasks made in Label Studio), "
                f"{len(r.unchanged)} unchanged, {len(r.skipped)} skipped by the labeller, {len(r.pending)} not labelled yet. "
                f"The labelled set now has {len(read_split(self.s.data, 'labeled'))} images.")
        if r.conflicts:
            text += f" {len(r.conflicts)} differ from existing human masks and were kept ({', '.join(r.conflicts)}); tick overwrite to replace them."
        if r.protected:
            text += (f" {len(r.protected)} are validation images and kept their masks ({', '.join(r.protected)}); to replace "
                     f"one, run `scaleseg label pull {self.s.data} --replace-val ID`.")
        if r.effort:
            text += f" The {r.effort_summary()}."
        if r.errors:
            text += " Errors: " + "; ".join(f"{k}: {v}" for k, v in r.errors.items())
        return text, counts.summary()

    def ls_status(self, url: str, token: str) -> str:
        with self._client(url, token) as client:
            try:
                return status(client, self.s.data).summary()
            except LabelStudioError as err:
                raise user_error(str(err)) from None

    # --- Retrain and models -----------------------------------------------------------------------------------
    def retrain(self, method: str, iterations: int, start_from: str, promote: str) -> str:
        try:
            job = self.s.retrainer.start(method, int(iterations), start_from == "current model", promote)
        except RuntimeError as err:
            raise user_error(str(err)) from None
        return f"Started {job.name}: {job.method}, {job.iterations} iterations." + (f" Note: {job.note}." if job.note else "")

    def retrain_status(self):
        job = self.s.retrainer.job
        if job is None:
            return "No retraining job yet.", pd.DataFrame({"iteration": [], "loss": []})
        done, losses = job.progress()
        bar = f"{job.name} {job.status}: {done}/{job.total} iterations ({100 * done / max(1, job.total):.0f} %)"
        if job.message:
            bar += f" — {job.message}"
        return bar, pd.DataFrame({"iteration": [r["iter"] for r in losses], "loss": [r["loss"] for r in losses]})

    def promote(self, name: str) -> str:
        if not name:
            raise user_error("Choose a version to serve.")
        try:
            self.s.retrainer.promote(name)
        except (KeyError, StopIteration):
            raise user_error(f"No version {name!r}.") from None
        except Exception as err:
            raise user_error(f"{name} could not be loaded ({err}); the serving model is unchanged.") from None
        return f"{name} is now serving."

    def models(self):
        """(table rows, plot, version dropdown, CIF checkbox) for the Models tab as the registry stands."""
        reg = self.s.registry.read()
        effort = effort_by_version(load_state(self.s.data))
        gpu = current_gpu()
        rows = [[v["name"] + (" (serving)" if v["name"] == reg["serving"] else ""), v["method"], v.get("labeled"),
                 round(v["miou"], 2), round(v["miou_x0.5"], 2), round(v["miou_x2.0"], 2), effort_cell(effort.get(v["name"])),
                 self._runtime(Path(v["dir"]), gpu), v["created"]] for v in reg["versions"]]
        plot = pd.DataFrame({"labelled images": [v.get("labeled") or 0 for v in reg["versions"]],
                             "mIoU": [v["miou"] for v in reg["versions"]], "version": [v["name"] for v in reg["versions"]]})
        x, y = plot["labelled images"], plot["mIoU"]
        pad_x, pad_y = max(1.0, 0.1 * (x.max() - x.min())), max(0.02, 0.1 * (y.max() - y.min()))  # mIoU is in [0, 1]
        curve = gr.ScatterPlot(plot, x_lim=[x.min() - pad_x, x.max() + pad_x], y_lim=[y.min() - pad_y, y.max() + pad_y])
        names = [v["name"] for v in reg["versions"]]
        return rows, curve, gr.Dropdown(choices=names, value=reg["serving"]), self.cif_control()

    def _runtime(self, package: Path, gpu: str | None) -> str:
        """What a version runs on here (TensorRT engine or ONNX Runtime); through `scaleseg serve` when the app
        uses an endpoint, which picks its backend itself."""
        try:
            runtime = package_runtime(json.loads((package / "meta.json").read_text()), gpu)
        except (OSError, ValueError):
            return "package missing"
        return f"{runtime} (if served here)" if self.s.predictor.serving_url else runtime

    def cif_control(self) -> gr.Checkbox:
        """The CIF checkbox as the serving model allows: off and disabled, with the reason, without a CIF graph."""
        model_dir, _, cif = self.s.predictor.snapshot()
        if cif is None:
            return gr.Checkbox(value=False, interactive=False, label=self._no_cif_label(model_dir))
        return gr.Checkbox(interactive=True, label=CIF_LABEL)

    def _no_cif_label(self, model_dir: Path) -> str:
        return (f"CIF multi-scale: not available, model {self.s.registry.name_of(model_dir)} has no CIF graph "
                "(retrain with ScaleMatch)")

    def models_if_changed(self, seen: str):
        """The Models tab and the CIF checkbox again when the registry or the serving model changed since
        this browser last looked (a retraining job may promote in the background)."""
        path = self.s.registry.path
        now = f"{path.stat().st_mtime_ns if path.is_file() else 0}:{self.s.predictor.snapshot()[0]}"
        if now == seen:
            return (gr.skip(),) * 5
        return (now, *self.models())

    # --- layout --------------------------------------------------------------------------------------
    def blocks(self) -> gr.Blocks:
        has_cif = self.s.predictor.cif is not None
        with gr.Blocks(title="scaleseg") as demo:
            gr.Markdown("# scaleseg\nSegment, find the images the model is least sure of, label them in Label Studio, retrain.")
            with gr.Tab("Predict"):
                with gr.Row():
                    image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"], height=360)
                    with gr.Column():
                        opacity = gr.Slider(0, 1, 0.5, step=0.05, label="Overlay opacity")
                        multiscale = gr.Checkbox(has_cif, interactive=has_cif, elem_id="cif",
                                                 label=CIF_LABEL if has_cif else self._no_cif_label(self.s.predictor.model_dir))
                        go = gr.Button("Segment", variant="primary")
                with gr.Row():
                    over = gr.Image(label="Overlay", elem_id="overlay", height=360)
                    heat = gr.Image(label="Confidence (dark = unsure)", height=360)
                colours = gr.HTML(legend(self.s.predictor.classes), elem_id="legend")
                areas = gr.Dataframe(headers=["class", "area %", "mean confidence"], label="Per-class area")
                info = gr.Markdown(elem_id="predict-info")
                go.click(self.predict, [image, opacity, multiscale], [over, heat, areas, info, colours], api_name="predict",
                         preprocess=False)  # predict checks the file's size itself, before decoding it
            with gr.Tab("Unlabeled"):
                files = gr.File(file_count="multiple", file_types=["image", ".zip"], label="Unlabelled images or .zip")
                add = gr.Button("Add to dataset")
                added = gr.Markdown(elem_id="ingest-report")
                add.click(self.add_unlabeled, [files], [added], api_name="add_unlabeled")
                with gr.Row():
                    function = gr.Dropdown(list(acquisition.FUNCTIONS), value="entropy", label="Acquisition function")
                    k = gr.Number(8, precision=0, label="Top k")
                    balance = gr.Slider(0, 3, 1.0, step=0.1, label="Class balance")
                    rank_btn = gr.Button("Score and rank", variant="primary")
                ranked_info = gr.Markdown(elem_id="rank-report")
                gallery = gr.Gallery(label="Least certain first", columns=4, height=420, object_fit="contain", elem_id="ranked")
                ranked = gr.Dataframe(headers=["image", "score"], label="Selection")
                rank_btn.click(self.rank, [function, k, balance], [gallery, ranked, ranked_info], api_name="rank")
            with gr.Tab("Label Studio"):
                with gr.Row():
                    url = gr.Textbox(self.s.ls_url, label="Label Studio URL")
                    token = gr.Textbox("", label="Access token", type="password",
                                       placeholder="given at launch (kept on the server)" if self.s.ls_token else "paste it here")
                    connect = gr.Button("Connect")
                with gr.Row():
                    project = gr.Textbox(load_state(self.s.data).get("project_title") or "scaleseg", label="Project")
                    switch = gr.Checkbox(False, label="Switch this dataset to this project (its tasks stay in the old one)")
                delivery = gr.Radio(["local", "upload"], value="local", label="Images reach Label Studio by")
                with gr.Row():
                    push_btn = gr.Button("Push selection with pre-annotations", variant="primary")
                    overwrite = gr.Checkbox(False, label="Overwrite differing human masks")
                    pull_btn = gr.Button("Pull finished labels")
                    status_btn = gr.Button("Refresh status")
                ls_status = gr.Markdown(elem_id="ls-status")
                ls_msg = gr.Markdown(elem_id="ls-report")
                connect.click(self.ls_connect, [url, token], [ls_msg, ls_status], api_name="ls_connect")
                push_btn.click(self.ls_push, [url, token, project, delivery, switch], [ls_msg, ls_status], api_name="ls_push")
                pull_btn.click(self.ls_pull, [url, token, overwrite], [ls_msg, ls_status], api_name="ls_pull")
                status_btn.click(self.ls_status, [url, token], [ls_status], api_name="ls_status")
            with gr.Tab("Retrain"):
                with gr.Row():
                    recipe = self.s.retrainer.recipe()
                    method = gr.Dropdown(list(METHODS), value=recipe.method, label="Method")
                    iters = gr.Number(recipe.iterations, precision=0, label="Iterations")
                    start_from = gr.Radio(["current model", "scratch"], value="current model", label="Start from")
                    promote = gr.Radio(["if-not-worse", "always", "never"], value="if-not-worse", label="Promote")
                start = gr.Button("Start retraining", variant="primary")
                job_msg = gr.Markdown(elem_id="retrain-status")
                loss = gr.LinePlot(x="iteration", y="loss", title="Training loss")
                start.click(self.retrain, [method, iters, start_from, promote], [job_msg], api_name="retrain")
                gr.Timer(2.0).tick(self.retrain_status, None, [job_msg, loss], api_name="retrain_status")
            with gr.Tab("Models"):
                versions = gr.Dataframe(headers=["version", "method", "labelled", "mIoU", "mIoU x0.5", "mIoU x2",
                                                 "labelling effort", "runs on", "created"], label="Versions")
                gr.Markdown("Labelling effort: of the images labelled from a version's pre-annotations, the mean "
                            "share of pixels the labeller changed (lower: the model saved more work).")
                curve = gr.ScatterPlot(x="labelled images", y="mIoU", color="version", title="mIoU vs labelled images")
                with gr.Row():
                    which = gr.Dropdown([], label="Version to serve")
                    promote_btn = gr.Button("Promote")
                    refresh = gr.Button("Refresh")
                promoted = gr.Markdown(elem_id="promote-report")
                models_out = [versions, curve, which, multiscale]
                refresh.click(self.models, None, models_out, api_name="models")
                promote_btn.click(self.promote, [which], [promoted], api_name="promote").then(self.models, None, models_out)
                demo.load(self.models, None, models_out)
                seen = gr.State("")
                gr.Timer(2.0).tick(self.models_if_changed, [seen], [seen, *models_out], api_name=False)
        return demo


def launch(model: Path, data: Path, work: Path, host: str = "127.0.0.1", port: int = 7860, serving_url: str = "",
           ls_url: str = "", ls_token: str = "", auth: tuple[str, str] | None = None, block: bool = True,
           retrain: dict | None = None):
    app = App(model, data, work, serving_url, ls_url, ls_token, retrain=retrain)
    demo = app.blocks()
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, auth=auth, prevent_thread_lock=not block, ssr_mode=False,
                allowed_paths=[str(Path(data).resolve()), str(Path(work).resolve())], footer_links=["api"],
                max_file_size=MAX_UPLOAD_BYTES)
    return app, demo
