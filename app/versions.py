"""Model versions of an app workspace, and the retraining job that makes new ones.

WORK/
  registry.json       versions (method, labels used, mIoU at x0.5 / x1 / x2) and which one is serving
  versions/vN/        model packages (scaleseg export)
  runs/vN/            training runs, with train.log

A retraining job runs in a background thread, each stage in its own process: train (optionally from
the serving model's weights), evaluate on val, export, evaluate the serving model on the same val, and
promote the new version only if it is not worse (or when asked). One job at a time; if any stage fails,
the serving model is untouched. The recipe (method, iterations, crop, batch, learning rate, encoder, device)
is the serving model's own training config, as its package records it, with `scaleseg app` flags on top;
training and evaluation run on --device auto (CUDA, then MPS, then CPU). A new version gets a TensorRT engine
for this GPU when TensorRT is installed and a GPU is visible; otherwise it runs on ONNX Runtime, and the
Models tab says which.
"""
from __future__ import annotations

import datetime as dt
import importlib.util
import json
import subprocess
import threading
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from serving.backends import current_gpu
from training.data.folder import DatasetError, load_classes, read_split, write_text

from .spawn import python_command, python_env


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class Registry:
    def __init__(self, work: Path):
        self.work = Path(work)
        self.path = self.work / "registry.json"
        self._lock = threading.Lock()

    def read(self) -> dict:
        if not self.path.is_file():
            return {"versions": [], "serving": None}
        return json.loads(self.path.read_text())

    def _write(self, reg: dict) -> None:
        write_text(self.path, json.dumps(reg, indent=2))

    def add(self, entry: dict, serve: bool = False) -> dict:
        with self._lock:
            reg = self.read()
            reg["versions"].append(entry)
            if serve or reg["serving"] is None:
                reg["serving"] = entry["name"]
            self._write(reg)
            return entry

    def promote(self, name: str) -> dict:
        with self._lock:
            reg = self.read()
            if not any(v["name"] == name for v in reg["versions"]):
                raise KeyError(f"no version {name!r}")
            reg["serving"] = name
            self._write(reg)
            return reg

    def next_name(self) -> str:
        return f"v{len(self.read()['versions']) + 1}"

    def name_of(self, package: Path) -> str:
        """The version name of a package directory (its folder name if it is not registered)."""
        package = Path(package).resolve()
        return next((v["name"] for v in self.read()["versions"] if Path(v["dir"]) == package), package.name)

    def serving(self) -> dict | None:
        reg = self.read()
        return next((v for v in reg["versions"] if v["name"] == reg["serving"]), None)


@dataclass(frozen=True)
class RetrainRecipe:
    """How the app retrains; ``recipe_from_package`` fills it from the serving model's training config."""
    method: str = "supervised"   # the Retrain tab's default method
    iterations: int = 200        # the Retrain tab's default iterations
    crop_size: int = 96          # square training crop
    batch_size: int = 4          # labelled images per step
    optimizer: str = "sgd"       # sgd or adamw: a learning rate means something only with its optimizer
    lr: float = 0.01             # backbone learning rate
    backbone: str = "efficientnet_lite0"  # encoder of a run from scratch (the small-data recipe's)
    decoder: str = "standard"    # DeepLabV3+ head: standard or light; fine-tuning needs the serving model's
    pretrained: str = "imagenet"  # its weights: imagenet, none, or a .pth file ('' in old packages: none)
    num_workers: int = 1         # data-loading worker processes
    device: str = "auto"         # where training and evaluation run: auto (CUDA, then MPS, then CPU), cuda, mps or cpu


def recipe_from_package(package: Path, **overrides) -> RetrainRecipe:
    """The recipe of the run that made ``package`` (its meta.json ``train_config``, the checkpoint's config as
    export recorded it), then every override that is not None (`scaleseg app` flags)."""
    meta = json.loads((Path(package) / "meta.json").read_text())
    config = meta.get("train_config") or {}
    data, optim, model, run = (config.get(k, {}) for k in ("data", "optim", "model", "run"))
    found = {"method": meta.get("method"), "iterations": run.get("max_iters") or None,
             "crop_size": data.get("crop_size"), "batch_size": data.get("batch_size"),
             "optimizer": optim.get("optimizer"), "lr": optim.get("lr"),
             "backbone": model.get("backbone") or meta.get("backbone"), "decoder": model.get("decoder"),
             "pretrained": model.get("pretrained"),
             "num_workers": data.get("num_workers")}
    unknown = set(overrides) - {f.name for f in fields(RetrainRecipe)}
    if unknown:
        raise TypeError(f"unknown retraining settings {sorted(unknown)}")
    chosen = {k: v for k, v in (found | {k: v for k, v in overrides.items() if v is not None}).items() if v is not None}
    return replace(RetrainRecipe(), **chosen)


def train_command(recipe: RetrainRecipe, data: Path, method: str, iterations: int, out: Path,
                  init_from: Path | None, teacher: Path | None = None) -> list[str]:
    """`scaleseg train` of one retraining job. Encoder weights are named only for a run from scratch
    (fine-tuning replaces the encoder with the serving weights); a weights file that is gone falls back to
    ImageNet's. selftrain's teacher is the serving package, which labels the unlabelled images once."""
    cmd = python_command("training.cli", "train", str(data), "--method", method, "--max-iters", str(iterations),
                         "--eval-every", str(iterations), "--crop-size", str(recipe.crop_size), "--batch-size",
                         str(recipe.batch_size), "--backbone", recipe.backbone, "--decoder", recipe.decoder,
                         "--optimizer", recipe.optimizer, "--lr", str(recipe.lr), "--num-workers", str(recipe.num_workers),
                         # --force: a failed job's folder is reused, since the next version gets its name
                         "--out", str(out), "--device", recipe.device, "--force")
    if init_from is not None:
        cmd += ["--init-from", str(init_from)]
    else:
        keyword = recipe.pretrained in ("imagenet", "none", "")
        cmd += ["--pretrained", (recipe.pretrained or "none") if keyword or Path(recipe.pretrained).is_file() else "imagenet"]
    if method == "selftrain":
        # ST++ needs a reliable-first stage and a second one, each at least an epoch of the unlabelled images
        epoch = max(1, len(read_split(data, "unlabeled", required=False)) // recipe.batch_size)
        cmd += ["--teacher", str(teacher), "--rounds", "1" if iterations >= 2 * epoch else "0"]
    return cmd


def tensorrt_ready() -> bool:
    """Whether `export --tensorrt` can build an engine here: TensorRT installed and an NVIDIA GPU visible."""
    return importlib.util.find_spec("tensorrt") is not None and current_gpu() is not None


def export_command(checkpoint: Path, package: Path, data: Path, method: str, tensorrt: bool) -> list[str]:
    """`scaleseg export` of a new version: the CIF graph for ScaleMatch, a TensorRT engine when ``tensorrt``."""
    cmd = python_command("training.cli", "export", str(checkpoint), "--out", str(package), "--with-probs",
                         "--data", str(data), "--force")
    if method == "scalematch":
        cmd += ["--cif-scales", "0.5,2.0"]
    if tensorrt:
        cmd.append("--tensorrt")
    return cmd


def package_runtime(meta: dict, gpu: str | None) -> str:
    """What a package runs on here, for the Models tab: its TensorRT engine for ``gpu``, else ONNX Runtime."""
    engine = next((e for e in meta.get("tensorrt", []) if gpu is not None and e.get("gpu") == gpu
                   and e.get("graph") == "model.onnx"), None)
    if engine is None:
        return "ONNX Runtime"
    return f"TensorRT {engine.get('tensorrt')} ({engine.get('precision', 'fp32')})"


def evaluate_package(package: Path, data: Path, out: Path, log, device: str = "auto", classes_of: Path | None = None) -> dict:
    """mIoU of a package's network on DATA's val split at x0.5 / x1 / x2, in a separate process; the
    report goes to ``out`` (never into the package, which may be read-only). Only the classes the package knows are
    scored (a dataset may have gained classes since), or with ``classes_of`` those of that older package."""
    _run("evaluation", python_command("training.cli", "eval", str(package / "checkpoint.pt"), str(data),
                                      "--json", str(out), "--device", device, "--known-classes",
                                      *([str(classes_of)] if classes_of else [])), log)
    scales = json.loads(out.read_text())["scales"]
    return {"miou": scales["1.0"]["miou"], "miou_x0.5": scales["0.5"]["miou"], "miou_x2.0": scales["2.0"]["miou"]}


def _run(stage: str, cmd: list[str], log) -> None:
    """Run one stage with its output appended to ``log``; on failure the error names the cause (the stage's
    last line of output) and the log's path."""
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    start = log.tell()
    code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=python_env()).returncode
    if code != 0:
        log.flush()
        with open(log.name, "rb") as fh:
            fh.seek(start)
            lines = [line.strip() for line in fh.read().decode(errors="replace").splitlines() if line.strip()]
        cause = lines[-1][:500] if lines else "no output"
        raise RuntimeError(f"{stage} failed (exit code {code}): {cause}. Full log: {Path(log.name).resolve()}")


def register_initial(registry: Registry, package: Path, data: Path, device: str = "auto") -> dict:
    """Make the package the app starts with version v1 (evaluated on val) if the workspace is new."""
    current = registry.serving()
    if current is not None:
        return current
    meta = json.loads((package / "meta.json").read_text())
    registry.work.mkdir(parents=True, exist_ok=True)
    with open(registry.work / "initial-eval.log", "w") as log:
        scores = evaluate_package(package, data, registry.work / "initial-eval.json", log, device)
    return registry.add({"name": "v1", "dir": str(Path(package).resolve()), "method": meta["method"],
                         "labeled": meta.get("labeled_count"), "created": _now(), "source": "initial", **scores})


def class_change(package: Path | None, data: Path) -> tuple[list[str], list[str]]:
    """(the classes ``package`` was trained on, the classes DATA gained since), refusing a classes.json that is broken
    or that changed the package's classes: a retraining on it would label pixels as the wrong class."""
    try:
        theirs = [c.name for c in load_classes(data)]
    except DatasetError as err:
        raise RuntimeError(f"{err} Retraining needs a valid classes.json; nothing was started.") from None
    if package is None:
        return theirs, []
    ours = [c["name"] for c in json.loads((Path(package) / "meta.json").read_text())["classes"]]
    if theirs[:len(ours)] != ours:
        raise RuntimeError(f"{Path(data) / 'classes.json'} lists {theirs}, but the serving model was trained on {ours}. "
                           "Classes can only be added after the existing ones (`scaleseg data add-class`), never renamed, "
                           "reordered or removed, since every mask and model would then mean other classes. Restore "
                           "the serving model's classes in classes.json; nothing was started.")
    return ours, theirs[len(ours):]


@dataclass
class RetrainJob:
    name: str
    method: str
    iterations: int
    from_current: bool
    run_dir: Path
    known: list[str] = field(default_factory=list)  # the serving model's classes
    added: list[str] = field(default_factory=list)  # classes the dataset gained since the serving model
    note: str = ""                                   # why the job differs from what was asked
    status: str = "starting"          # starting, training, evaluating, exporting, done, failed
    message: str = ""
    total: int = 0
    promoted: bool = False
    result: dict = field(default_factory=dict)

    def progress(self) -> tuple[int, list[dict]]:
        """(iterations done, loss records) from the run's metrics log."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return 0, []
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        losses = [r for r in records if "loss" in r]
        return (losses[-1]["iter"] if losses else 0), losses


class Retrainer:
    """Runs one retraining job at a time; ``on_promote(package_dir)`` swaps the serving model."""

    def __init__(self, registry: Registry, data: Path, on_promote, overrides: dict | None = None):
        self.registry, self.data, self.on_promote = registry, Path(data), on_promote
        self.overrides = dict(overrides or {})  # `scaleseg app` flags; None: the serving model's value
        self.job: RetrainJob | None = None
        self._lock = threading.Lock()

    def recipe(self) -> RetrainRecipe:
        """The recipe a job started now would use: the serving model's, with the app's overrides."""
        current = self.registry.serving()
        if current is None:
            return replace(RetrainRecipe(), **{k: v for k, v in self.overrides.items() if v is not None})
        return recipe_from_package(Path(current["dir"]), **self.overrides)

    @property
    def busy(self) -> bool:
        return self.job is not None and self.job.status not in ("done", "failed")

    def start(self, method: str, iterations: int, from_current: bool = True, promote: str = "if-not-worse") -> RetrainJob:
        with self._lock:
            if self.busy:
                raise RuntimeError(f"retraining {self.job.name} is still {self.job.status}; one job at a time.")
            current = self.registry.serving()
            if method == "selftrain" and current is None:
                raise RuntimeError("selftrain needs a serving model to label the unlabelled images; promote one first.")
            known, added = class_change(Path(current["dir"]) if current else None, self.data)
            note = ""
            if method == "selftrain" and added:
                # the teacher's pseudo-labels could never hold the new classes, so its student would unlearn them
                method, note = "supervised", (f"selftrain's teacher, the serving model {current['name']}, knows "
                                              f"{len(known)} classes and not {added}: training supervised instead")
            name = self.registry.next_name()
            self.job = RetrainJob(name, method, iterations, from_current, self.registry.work / "runs" / name,
                                  known=known, added=added, note=note, total=iterations)
            threading.Thread(target=self._run, args=(self.job, promote), daemon=True).start()
            return self.job

    def _run(self, job: RetrainJob, promote: str) -> None:
        job.run_dir.mkdir(parents=True, exist_ok=True)
        current = self.registry.serving()
        try:
            recipe = self.recipe()
            with open(job.run_dir / "train.log", "w") as log:
                log.write(f"recipe: {json.dumps(asdict(recipe))}\n")
                job.status = "training"
                init_from = Path(current["dir"]) / "checkpoint.pt" if job.from_current and current else None
                teacher = Path(current["dir"]) if current else None
                _run("training", train_command(recipe, self.data, job.method, job.iterations, job.run_dir, init_from,
                                               teacher), log)
                job.status = "exporting"
                package = self.registry.work / "versions" / job.name
                _run("export", export_command(job.run_dir / "last.pt", package, self.data, job.method, tensorrt_ready()), log)
                job.status = "evaluating"
                scores = evaluate_package(package, self.data, job.run_dir / "eval-new.json", log, recipe.device)
                compared, baseline = scores, None
                if current:
                    serving = Path(current["dir"])
                    if job.added:  # the serving model knows only the earlier classes: compare the two on those
                        compared = evaluate_package(package, self.data, job.run_dir / "eval-new-known.json", log,
                                                    recipe.device, classes_of=serving)
                    baseline = evaluate_package(serving, self.data, job.run_dir / "eval-serving.json", log, recipe.device)
            entry = self.registry.add({"name": job.name, "dir": str(package.resolve()), "method": job.method,
                                       "labeled": len(read_split(self.data, "labeled")), "created": _now(),
                                       "source": "retrain", "run": str(job.run_dir), **scores})
            job.result = {"new": scores, "serving": baseline, "compared": compared}
            better = baseline is None or compared["miou"] >= baseline["miou"]
            if promote == "always" or (promote == "if-not-worse" and better):
                self.promote(entry["name"])
                job.promoted = True
            runtime = package_runtime(json.loads((package / "meta.json").read_text()), current_gpu())
            versus = ""
            if baseline and job.added:
                versus = (f" on all {len(job.known) + len(job.added)} classes; on the {len(job.known)} classes "
                          f"{current['name']} knows {compared['miou']:.2f} vs serving {baseline['miou']:.2f}")
            elif baseline:
                versus = f" vs serving {baseline['miou']:.2f}"
            job.message = (f"{job.name} ({runtime}): mIoU {scores['miou']:.2f}{versus}"
                           + ("; promoted" if job.promoted else "; not promoted (worse than the serving model)")
                           + (f" ({job.note})" if job.note else ""))
            job.status = "done"
        except Exception as err:  # the job fails as a whole; the serving model is untouched
            job.status, job.message = "failed", f"{job.name} failed: {err}"

    def promote(self, name: str) -> None:
        version = next(v for v in self.registry.read()["versions"] if v["name"] == name)
        self.on_promote(Path(version["dir"]))
        self.registry.promote(name)
