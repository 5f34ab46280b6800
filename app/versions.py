"""Model versions of an app workspace, and the retraining job that makes new ones.

WORK/
  registry.json       versions (method, labels used, mIoU at x0.5 / x1 / x2) and which one is serving
  versions/vN/        model packages (scaleseg export)
  runs/vN/            training runs, with train.log

A retraining job runs in a background thread, each stage in its own process: train (optionally from
the serving model's weights), evaluate on val, export, evaluate the serving model on the same val, and
promote the new version only if it is not worse (or when asked). One job at a time; if any stage fails,
the serving model is untouched.
"""
from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from training.data.folder import read_split, write_text


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


def evaluate_package(package: Path, data: Path, out: Path, log) -> dict:
    """mIoU of a package's network on DATA's val split at x0.5 / x1 / x2, in a separate process; the
    report goes to ``out`` (never into the package, which may be read-only)."""
    _run("evaluation", [sys.executable, "-m", "training.cli", "eval", str(package / "checkpoint.pt"), str(data),
                        "--json", str(out), "--device", "cpu"], log)
    scales = json.loads(out.read_text())["scales"]
    return {"miou": scales["1.0"]["miou"], "miou_x0.5": scales["0.5"]["miou"], "miou_x2.0": scales["2.0"]["miou"]}


def _run(stage: str, cmd: list[str], log) -> None:
    """Run one stage with its output appended to ``log``; on failure the error names the cause (the stage's
    last line of output) and the log's path."""
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    start = log.tell()
    code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        log.flush()
        with open(log.name, "rb") as fh:
            fh.seek(start)
            lines = [line.strip() for line in fh.read().decode(errors="replace").splitlines() if line.strip()]
        cause = lines[-1][:500] if lines else "no output"
        raise RuntimeError(f"{stage} failed (exit code {code}): {cause}. Full log: {Path(log.name).resolve()}")


def register_initial(registry: Registry, package: Path, data: Path) -> dict:
    """Make the package the app starts with version v1 (evaluated on val) if the workspace is new."""
    current = registry.serving()
    if current is not None:
        return current
    meta = json.loads((package / "meta.json").read_text())
    registry.work.mkdir(parents=True, exist_ok=True)
    with open(registry.work / "initial-eval.log", "w") as log:
        scores = evaluate_package(package, data, registry.work / "initial-eval.json", log)
    return registry.add({"name": "v1", "dir": str(Path(package).resolve()), "method": meta["method"],
                         "labeled": meta.get("labeled_count"), "created": _now(), "source": "initial", **scores})


@dataclass
class RetrainJob:
    name: str
    method: str
    iterations: int
    from_current: bool
    run_dir: Path
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

    def __init__(self, registry: Registry, data: Path, on_promote, crop_size: int = 96, batch_size: int = 4):
        self.registry, self.data, self.on_promote = registry, Path(data), on_promote
        self.crop_size, self.batch_size = crop_size, batch_size
        self.job: RetrainJob | None = None
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        return self.job is not None and self.job.status not in ("done", "failed")

    def start(self, method: str, iterations: int, from_current: bool = True, promote: str = "if-not-worse") -> RetrainJob:
        with self._lock:
            if self.busy:
                raise RuntimeError(f"retraining {self.job.name} is still {self.job.status}; one job at a time.")
            name = self.registry.next_name()
            self.job = RetrainJob(name, method, iterations, from_current, self.registry.work / "runs" / name, total=iterations)
            threading.Thread(target=self._run, args=(self.job, promote), daemon=True).start()
            return self.job

    def _run(self, job: RetrainJob, promote: str) -> None:
        job.run_dir.mkdir(parents=True, exist_ok=True)
        current = self.registry.serving()
        try:
            with open(job.run_dir / "train.log", "w") as log:
                job.status = "training"
                cmd = [sys.executable, "-m", "training.cli", "train", str(self.data), "--method", job.method,
                       "--max-iters", str(job.iterations), "--eval-every", str(job.iterations), "--crop-size",
                       str(self.crop_size), "--batch-size", str(self.batch_size), "--backbone",
                       json.loads((Path(current["dir"]) / "meta.json").read_text())["backbone"] if current else "efficientnet_lite0",
                       "--lr", "0.01", "--num-workers", "1", "--out", str(job.run_dir), "--device", "cpu"]
                cmd.append("--force")  # a failed job's folder is reused: the next version gets its name
                if job.from_current and current:
                    cmd += ["--init-from", str(Path(current["dir"]) / "checkpoint.pt")]
                _run("training", cmd, log)
                job.status = "exporting"
                package = self.registry.work / "versions" / job.name
                export = [sys.executable, "-m", "training.cli", "export", str(job.run_dir / "last.pt"), "--out", str(package),
                          "--with-probs", "--data", str(self.data), "--force"]
                if job.method == "scalematch":
                    export += ["--cif-scales", "0.5,2.0"]
                _run("export", export, log)
                job.status = "evaluating"
                scores = evaluate_package(package, self.data, job.run_dir / "eval-new.json", log)
                baseline = evaluate_package(Path(current["dir"]), self.data, job.run_dir / "eval-serving.json", log) if current else None
            entry = self.registry.add({"name": job.name, "dir": str(package.resolve()), "method": job.method,
                                       "labeled": len(read_split(self.data, "labeled")), "created": _now(),
                                       "source": "retrain", "run": str(job.run_dir), **scores})
            job.result = {"new": scores, "serving": baseline}
            better = baseline is None or scores["miou"] >= baseline["miou"]
            if promote == "always" or (promote == "if-not-worse" and better):
                self.promote(entry["name"])
                job.promoted = True
            job.message = (f"{job.name}: mIoU {scores['miou']:.2f}" + (f" vs serving {baseline['miou']:.2f}" if baseline else "")
                           + ("; promoted" if job.promoted else "; not promoted (worse than the serving model)"))
            job.status = "done"
        except Exception as err:  # the job fails as a whole; the serving model is untouched
            job.status, job.message = "failed", f"{job.name} failed: {err}"

    def promote(self, name: str) -> None:
        version = next(v for v in self.registry.read()["versions"] if v["name"] == name)
        self.on_promote(Path(version["dir"]))
        self.registry.promote(name)
