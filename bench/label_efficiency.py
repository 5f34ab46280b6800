"""Label efficiency: every method on the same data, budget and seeds, on two benchmarks.

- ``synthetic``: the multi-scale shapes set of ``scaleseg data synth``;
- ``textures``: real photographic textures from scikit-image's bundled images (bench/texture_scenes.py);
- ``photos``: the same scenes widened (several photographs per class, recoloured, turned, unevenly lit);
- ``recoloured``: ``textures`` with every object's colour varied as far as the strong view varies it.
``textures`` and ``photos`` are label-bound on the ImageNet encoder (bench/linear_probe.py); ``textures`` also within 2,400 CPU
iterations of fine-tuning, where ``photos`` still underfits (docs/benchmarks.md, label headroom).

One run is (benchmark, labelled fraction, method, seed). Each trains in its own process (`scaleseg train`,
DeepLabV3+ on ``--backbone`` with ``--pretrained`` weights, on ``--device``), validates every ``--eval-every`` iterations at x0.5 / x1 / x2
(the curves), and is scored at the end on val at those scales (and ScaleMatch with CIF multi-scale
inference). All methods of one seed train on the same dataset and labelled subset; seeds change both the
subset and the training randomness. With ``--warm-start N``
every (benchmark, fraction, seed) first trains supervised for N iterations, and each method, supervised
included, then trains ``--iters`` more from those weights (``--init-from``): the protocol of the app's
retraining loop, and a test of whether pseudo-labels pay once they come from a trained network rather than
a random one. Runs live in ``--work``: finished ones are kept, and ``--resume`` continues an interrupted
study (an unfinished run continues exactly from its last checkpoint).
Results: bench/results/label_efficiency.{json,md} and label_efficiency_curves.png, mean +- std over seeds.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import RESULTS, child_env, machine, mean_std, plot_bands, write_results  # noqa: E402
from training.config import MIN_CROP, below_floors  # noqa: E402
from training.data.folder import (atomic_write, load_classes, mask_path, read_mask, read_split, staged_folder,  # noqa: E402
                                  write_split)

METHODS = ["supervised", "selftrain", "meanteacher", "fixmatch", "cps", "unimatch", "scalematch", "pseudoseg", "cct", "psmt",
           "cutmixseg", "rankmatch", "prcl", "advsemseg", "gct", "supervised+contextrast", "fixmatch+contextrast",
           "scalematch+contextrast"]
SCALES = ("0.5", "1.0", "2.0")
TEACHERS = ("supervised", "scalematch")  # selftrain's teachers (selftrain:teacher=METHOD); their runs keep snapshots
PSEUDO_KEYS = ("pseudo_miou", "pseudo_miou_reliable", "pseudo_miou_relabelled_teacher", "pseudo_miou_relabelled_student")
BENCHMARK_VARIETY = {"textures": "narrow", "photos": "wide", "recoloured": "recoloured"}  # bench/texture_scenes.py
POOL_SEED = 1000  # generator seed of the image pool and val set, the same for every run seed
MAX_SPAN = 8  # labels supervised needs: interpolated only between measured label counts at most 8x apart
POLL_S, TICK_S = 0.2, 30.0  # how often a run's child is checked for its end, and its wall time saved


def make_data(benchmark: str, path: Path, n_labeled: int, n_unlabeled: int, n_val: int, size: int, seed: int) -> Path:
    """The dataset of one (benchmark, fraction, seed): one generated pool and val set for every seed
    (generator seed fixed); the run's seed picks which pool images are labelled."""
    if (path / "classes.json").is_file():
        found = len(read_split(path, "labeled"))
        if found != n_labeled:  # an older version could leave a folder whose splits were never written
            raise SystemExit(f"{path}: {found} labelled images where this study labels {n_labeled}; the folder was "
                             "left by an interrupted run. Delete it (and the runs beside it) and run again.")
        return path
    pool_size = n_labeled + n_unlabeled
    # Rendering a pool takes seconds per hundred images, and every (fraction, seed) shares it: rendered once,
    # then hard-linked into each folder. Named by benchmark too: bench/active_learning.py's benchmarks share a parent.
    generated = path.parent.parent / f"pool-{benchmark}-{pool_size}-val{n_val}-{size}px"
    if not (generated / "classes.json").is_file():
        if benchmark == "synthetic":
            from training.data.synth import synthesize
            synthesize(generated, 5, pool_size, 0, n_val, size, POOL_SEED, force=True, progress=False)
        elif benchmark in BENCHMARK_VARIETY:
            from bench.texture_scenes import synthesize_textures
            synthesize_textures(generated, pool_size, 0, n_val, size, POOL_SEED, force=True,
                                variety=BENCHMARK_VARIETY[benchmark])
        else:
            raise SystemExit(f"unknown benchmark {benchmark!r}; choose synthetic, {', '.join(BENCHMARK_VARIETY)}")
    with staged_folder(path) as staging:
        shutil.copytree(generated, staging, copy_function=link_or_copy, dirs_exist_ok=True)
        pool = read_split(staging, "labeled")
        labelled = labelled_subset(pool, n_labeled, seed)
        # write_split replaces the file (atomic rename), so the shared pool's own split stays as it was.
        write_split(staging, "labeled", labelled)
        write_split(staging, "unlabeled", sorted(set(pool) - set(labelled)))
    return path


def link_or_copy(src: str, dst: str) -> None:
    """A hard link where the file system has them, a copy elsewhere."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def labelled_subset(pool: list[str], n_labeled: int, seed: int) -> list[str]:
    """The ``n_labeled`` pool images a seed labels (the pool in generation order), sorted."""
    pool = list(pool)
    random.Random(seed).shuffle(pool)
    return sorted(pool[:n_labeled])


def method_parts(method: str) -> tuple[str, str, list[str]]:
    """(method, auxiliary loss, flags) of "METHOD[+AUX][:flag=value...]", e.g. "fixmatch+contextrast" or
    "prcl:num-queries=32" (a method with its own hyper-parameters, in its own run folder and row)."""
    spec, *overrides = method.split(":")
    base, _, aux = spec.partition("+")
    flags = []
    for override in overrides:
        flag, sep, value = override.partition("=")
        if not sep or not flag:
            raise SystemExit(f"--methods {method!r}: write hyper-parameters as METHOD:flag=value, e.g. prcl:num-queries=32")
        # Boolean hyper-parameters are switches: cps:cutmix=false is --no-cutmix.
        flags += {"true": [f"--{flag}"], "false": [f"--no-{flag}"]}.get(value.lower(), [f"--{flag}", value])
    return base, aux, flags


def ordered(methods) -> list[str]:
    """The study's methods in METHODS order, variants (METHOD+AUX, METHOD:flag=value) after their method."""
    def key(m):
        base = method_parts(m)[0]
        return (METHODS.index(base) if base in METHODS else len(METHODS), METHODS.index(m) if m in METHODS else len(METHODS), m)
    return sorted(set(methods), key=key)


def train_argv(args, method: str, data: Path, out: Path, seed: int, iters: int, lr: float, epochs_total: float) -> list[str]:
    base, aux, flags = method_parts(method)
    argv = [str(data), "--method", base, "--backbone", args.backbone, "--pretrained", args.pretrained, "--crop-size", str(args.crop),
            "--batch-size", str(args.batch), "--max-iters", str(iters), "--eval-every", str(args.eval_every),
            "--save-every", str(args.save_every or args.eval_every), "--val-scales", "0.5,1,2", "--lr", str(lr), "--seed", str(seed),
            "--num-workers", "1", "--device", args.device, "--out", str(out), "--log-every", "10"]
    if aux:
        argv += ["--aux", aux]
    if args.head_lr_mult is not None:
        argv += ["--head-lr-mult", str(args.head_lr_mult)]
    if args.amp_cpu:
        argv.append("--amp-cpu")
    if args.device != "cpu":  # float32 as on CPU (CUDA's default is float16 autocast; cuDNN may still use TF32)
        argv.append("--no-amp")
    if base in TEACHERS:  # ST++ ranks images by agreement with checkpoints at 1/3 and 2/3
        argv += ["--snapshot-every", str(max(1, iters // 3))]
    if base == "scalematch":  # the paper's 10 of 80 warm-up epochs, scaled to this budget
        argv += ["--warmup-epochs", str(max(1, round(epochs_total / 8)))]
    return argv + flags  # last, so that a flag given here wins over the defaults above


def run(cmd: list[str], log: Path, threads: int, tick=None) -> float:
    """Run a child process, appending its output to ``log``; returns its peak RSS in MiB. ``tick`` is called
    every TICK_S seconds while it runs."""
    with open(log, "a") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=child_env(threads))
        last = time.monotonic()
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if tick and time.monotonic() - last >= TICK_S:
                tick()
                last = time.monotonic()
            time.sleep(POLL_S)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed with exit code {code}; see {log}")
    return usage.ru_maxrss / 1024


def cell_folder(work: Path, benchmark: str, fraction: str) -> Path:
    """Where the datasets and runs of one (benchmark, fraction) live: runs in METHOD/seedN below it."""
    return Path(work) / benchmark / fraction.replace("/", "_")


def one_dataset(args, benchmark: str, fraction: str, seed: int) -> tuple[Path, int]:
    n_labeled = max(1, round(args.pool * Fraction(fraction)))
    root = cell_folder(args.work, benchmark, fraction)
    return make_data(benchmark, root / f"data_seed{seed}", n_labeled, args.pool - n_labeled, args.n_val, args.size, seed), n_labeled


def train(args, label: str, method: str, data: Path, out: Path, seed: int, iters: int, lr: float,
          init_from: Path | None = None, extra: list[str] = ()) -> tuple[list[dict], float]:
    """One `scaleseg train` run into ``out`` (continued from its last checkpoint if it has one);
    returns its validation records and peak RSS."""
    out.mkdir(parents=True, exist_ok=True)
    n_unlabeled = len(read_split(data, "unlabeled"))
    argv = train_argv(args, method, data, out, seed, iters, lr, iters / max(1, n_unlabeled // args.batch))
    if init_from is not None:
        argv += ["--init-from", str(init_from)]
    argv += extra
    # A run killed before its first checkpoint starts over (--force clears its partial log).
    resumed = (out / "last.pt").is_file()
    argv.append("--resume" if resumed else "--force")
    print(f"== {label}" + (" (resumed)" if resumed else ""), flush=True)
    # Summed over the invocations of an interrupted and resumed run (a run that starts over counts from
    # zero); kept current while it trains, so a study killed mid-run loses at most TICK_S of it.
    wall = out / "wall_s.txt"
    before, start = (float(wall.read_text()) if resumed and wall.is_file() else 0.0), time.monotonic()

    def tick():
        atomic_write(wall, lambda fh: fh.write(str(before + time.monotonic() - start).encode()))
    tick()  # replaces a killed attempt's time before this run can checkpoint
    rss = run([sys.executable, "-m", "training.cli", "train", *argv], out / "train.log", args.threads, tick)
    tick()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return records, rss


def curve(records: list[dict], offset: int = 0) -> list[dict]:
    return [{"iter": r["iter"] + offset, **{f"x{s}": r["val_miou_by_scale"][s] for s in SCALES}}
            for r in records if "val_miou_by_scale" in r]


def warm_up(args, benchmark: str, fraction: str, seed: int) -> Path:
    """The supervised run every method of this seed starts from (``--warm-start``); returns its checkpoint."""
    data, n_labeled = one_dataset(args, benchmark, fraction, seed)
    out = data.parent / "warm-up" / f"seed{seed}"
    if not (out / "curve.json").is_file():
        records, _ = train(args, f"{benchmark} {fraction} warm-up (supervised) seed {seed}: {n_labeled} labelled",
                           "supervised", data, out, seed, args.warm_start, args.warm_lr)
        (out / "curve.json").write_text(json.dumps(curve(records)))
    return out / "last.pt"


# "supervised:init-from=teacher": supervised training continued from this seed's supervised run for the
# study's iterations again, so it costs what self-training from that teacher costs (the equal-time control)
CONTINUED = "init-from=teacher"
# "selftrain:teacher=METHOD": this seed's METHOD run teaches instead of its supervised run (scalematch's
# pseudo-labels are CIF-fused); the methods in TEACHERS keep the snapshots that ST++ ranks images by
TEACHER = "teacher="


def teacher_of(method: str) -> tuple[str, str]:
    """(the method as trained, the method of its teacher's run) of a selftrain study method:
    "selftrain:teacher=scalematch:conf-thresh=0.9" trains "selftrain:conf-thresh=0.9" taught by ScaleMatch."""
    parts = method.split(":")
    named = [p[len(TEACHER):] for p in parts[1:] if p.startswith(TEACHER)]
    if method_parts(method)[0] != "selftrain" and named:
        raise SystemExit(f"--methods {method!r}: only selftrain has a teacher (selftrain:{TEACHER}METHOD).")
    if named and (len(named) > 1 or named[0] not in TEACHERS):
        raise SystemExit(f"--methods {method!r}: name one teacher, {' or '.join(TEACHERS)} (their runs keep the snapshots "
                         "ST++ ranks images by).")
    return ":".join(p for p in parts if not p.startswith(TEACHER)), named[0] if named else "supervised"

_RUN_LOCKS: dict[tuple, threading.Lock] = {}
_LOCKS_LOCK = threading.Lock()


def one_run(args, benchmark: str, fraction: str, method: str, seed: int, need_checkpoint: bool = False) -> dict:
    """One run's row, trained unless finished; a run another worker is training is waited for, not repeated."""
    with _LOCKS_LOCK:
        lock = _RUN_LOCKS.setdefault((benchmark, fraction, method, seed), threading.Lock())
    with lock:
        return _one_run(args, benchmark, fraction, method, seed, need_checkpoint)


def _one_run(args, benchmark: str, fraction: str, method: str, seed: int, need_checkpoint: bool = False) -> dict:
    data, n_labeled = one_dataset(args, benchmark, fraction, seed)
    out = data.parent / method / f"seed{seed}"
    row_file = out / "row.json"
    # A row adopted from the committed results has no checkpoint; a teacher needs one, so it trains again.
    if row_file.is_file() and (not need_checkpoint or (out / "last.pt").is_file()):
        return json.loads(row_file.read_text())
    replaced = json.loads(row_file.read_text()) if row_file.is_file() else None
    if replaced:  # the study's table changes with it: say so, since a rerun can land points away
        print(f"   {benchmark} {fraction} {method} seed {seed}: the committed row ({replaced['miou_x1.0']:.1f} at x1.0) has "
              "no checkpoint, which a teacher needs: training it again; its row will hold the new run", flush=True)
    warm = warm_up(args, benchmark, fraction, seed) if args.warm_start else None
    start = json.loads((warm.parent / "curve.json").read_text()) if warm else []  # the curve before this run's own
    extra, teacher_s, trained, offset = [], 0.0, method, args.warm_start
    continued = CONTINUED in method.split(":")[1:]
    if method_parts(method)[0] == "selftrain" or continued:
        # The teacher is this seed's supervised run (or the one selftrain:teacher= names): the same labels,
        # iterations and optimiser, so the student's total cost is that run's time plus its own (pseudo-labelling
        # included).
        trained, by = teacher_of(method)
        teacher = one_run(args, benchmark, fraction, by, seed, need_checkpoint=True)
        teacher_s, teacher_dir = teacher.get("wall_s") or 0.0, data.parent / by / f"seed{seed}"
        if continued:  # self-training's control: the teacher trained on as long again, on its labels alone
            warm, trained = teacher_dir / "last.pt", ":".join(p for p in method.split(":") if p != CONTINUED)
            start, offset = teacher["curve"], args.iters
        else:
            extra = ["--teacher", str(teacher_dir)]
    records, rss = train(args, f"{benchmark} {fraction} {method} seed {seed}: {n_labeled} labelled", trained, data, out,
                         seed, args.iters, args.lr, warm, extra)
    wall = float((out / "wall_s.txt").read_text())
    steps = sorted(r["sec_per_iter"] for r in records if "sec_per_iter" in r)
    own = curve(records, offset)
    row = {"benchmark": benchmark, "fraction": fraction, "labeled": n_labeled, "method": method, "seed": seed,
           "warm_start": args.warm_start, **{f"miou_x{s}": own[-1][f"x{s}"] for s in SCALES},
           "curve": start + own, "sec_per_iter": steps[len(steps) // 2] if steps else None, "peak_rss_mib": rss,
           "wall_s": wall, "total_s": wall + teacher_s,
           "machine": {**machine(), "threads": args.threads},
           "threads": args.threads}  # a run's threads change its float sums, so its result, not only its speed
    if method_parts(method)[0] == "selftrain":
        row.update(pseudo_label_quality(out, data))
    if method_parts(method)[0] == "scalematch":  # only ScaleMatch trains CIF
        report = out / "eval_cif.json"
        run([sys.executable, "-m", "training.cli", "eval", str(out / "last.pt"), str(data), "--cif-scales", "0.5,2",
             "--scales", "1", "--device", args.device, "--json", str(report)], out / "train.log", args.threads)
        row["miou_cif"] = json.loads(report.read_text())["scales"]["1.0"]["miou"]
    row_file.write_text(json.dumps(row, indent=1))
    print(f"   {benchmark} {fraction} {method} seed {seed}: x0.5 {row['miou_x0.5']:.1f}  x1.0 {row['miou_x1.0']:.1f}  "
          f"x2.0 {row['miou_x2.0']:.1f}" + (f" (the committed run: {replaced['miou_x1.0']:.1f})" if replaced else ""),
          flush=True)
    return row


def pseudo_label_quality(run: Path, data: Path) -> dict:
    """How right a selftrain run's pseudo-labels are, scored against the masks the benchmark keeps for its
    unlabelled pool (a user's pool has none): the teacher's on every image and on the first stage's most
    reliable share, and the student's round-1 labels on the images it re-labels."""
    import torch
    import yaml
    from training.evaluate import confusion_matrix, metrics_from_confusion
    from training.methods.selftrain import PSEUDO, reliable_count
    from training.pseudo_labels import rank_images, read_manifest
    names = [c.name for c in load_classes(data)]
    share = yaml.safe_load((run / "config.yaml").read_text())["method_cfg"]["reliable_fraction"]
    teacher_dir, student_dir = run / PSEUDO / "teacher", run / PSEUDO / "round1"
    teacher = read_manifest(teacher_dir)["images"]
    order, _ = rank_images({i: teacher[i] for i in read_split(data, "unlabeled")})
    reliable = order[:reliable_count(share, len(order))]

    def miou(folder: Path, ids: list[str]) -> float | None:
        cm = torch.zeros(len(names), len(names), dtype=torch.long)
        for i in ids:
            pred = torch.from_numpy(read_mask(folder / "labels" / f"{i}.png").astype("int64"))
            cm += confusion_matrix(pred, torch.from_numpy(read_mask(mask_path(data, i)).astype("int64")), len(names))
        return round(metrics_from_confusion(cm, names)["miou"], 2) if ids else None
    relabelled = [i for i in order if (student_dir / "labels" / f"{i}.png").is_file()]
    return {"pseudo_miou": miou(teacher_dir, order), "pseudo_miou_reliable": miou(teacher_dir, reliable),
            "pseudo_miou_relabelled_teacher": miou(teacher_dir, relabelled),
            "pseudo_miou_relabelled_student": miou(student_dir, relabelled)}


def summarise(rows: list[dict]) -> list[dict]:
    """One line per (benchmark, fraction, method): mean +- std over seeds, and the gain over supervised."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["benchmark"], r["fraction"], r["method"]), []).append(r)
    out = []
    for (bench, frac, method), rs in groups.items():
        line = {"benchmark": bench, "fraction": frac, "method": method, "seeds": sorted(r["seed"] for r in rs)}
        for key in [f"miou_x{s}" for s in SCALES] + ["miou_cif", "sec_per_iter", "total_s", "peak_rss_mib", *PSEUDO_KEYS]:
            vals = [r[key] for r in rs if r.get(key) is not None]
            if vals:
                line[key] = mean_std(vals)
        by_seed = {r["seed"]: r["miou_x1.0"] for r in groups.get((bench, frac, "supervised"), [])}
        seeds = [r["seed"] for r in rs if r["seed"] in by_seed]
        if seeds and method != "supervised":
            line["gain_x1.0"] = mean_std([r["miou_x1.0"] - by_seed[r["seed"]] for r in rs if r["seed"] in by_seed])
        full = {r["seed"]: r["miou_x1.0"] for r in groups.get((bench, "1", "supervised"), [])}
        if seeds and full and frac != "1":
            # share of the gap from supervised at this fraction to supervised on every image, in percent, on the
            # method's own seeds (full supervision's mean over its seeds where it lacks one of them)
            low = statistics.mean(by_seed[s] for s in seeds)
            high = statistics.mean(full[s] for s in seeds) if all(s in full for s in seeds) else statistics.mean(full.values())
            gain = line["gain_x1.0"][0] if method != "supervised" else 0.0
            line["gap_closed"] = 100 * gain / (high - low) if high > low else None
        out.append(line)
    for line in out:
        if line["method"] != "supervised" or line["fraction"] != "1":
            line["labels_to_match"] = labels_to_match(line["miou_x1.0"][0], supervised_curve(rows, line["benchmark"]))
    return out


def supervised_curve(rows: list[dict], benchmark: str) -> list[tuple[int, float]]:
    """(labelled images, mean x1.0 mIoU over seeds) of supervised on ``benchmark``, by labelled count."""
    by_count: dict[int, list[float]] = {}
    for r in rows:
        if r["benchmark"] == benchmark and r["method"] == "supervised" and not r.get("warm_start"):
            by_count.setdefault(r["labeled"], []).append(r["miou_x1.0"])
    return sorted((n, statistics.mean(v)) for n, v in by_count.items())


def labels_to_match(miou: float, curve: list[tuple[int, float]]) -> float | str | None:
    """How many labelled images supervised needs to score ``miou``: interpolated in log(labels) between the
    first two fractions whose supervised scores bracket it; "<N" / ">N" outside the measured range; None
    where the bracketing fractions are more than MAX_SPAN apart (a straight line across 19 to 600 labels
    would be a guess, not a measurement)."""
    if len(curve) < 2:
        return None
    if miou <= curve[0][1]:
        return f"<={curve[0][0]}"
    for (n0, m0), (n1, m1) in zip(curve, curve[1:]):
        if m0 < miou <= m1:
            if n1 > MAX_SPAN * n0:
                return None
            t = (miou - m0) / (m1 - m0)
            return round(math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0))), 1)
    return f">{curve[-1][0]}"


def pseudo_label_sentence(s: dict, cell) -> str:
    """The pseudo-label quality line, naming only what the run had: a recipe that trains on every image from the
    start has no separate reliable share (its figure equals the whole pool's) and nothing left to re-label, and
    --rounds 0 re-labels nothing."""
    text = (f"{s['method']}, pseudo-labels scored against the pool's hidden masks (mIoU): the teacher's "
            f"{cell(s['pseudo_miou'])} on every unlabelled image")
    if s.get("pseudo_miou_reliable") not in (None, s["pseudo_miou"]):
        text += f", {cell(s['pseudo_miou_reliable'])} on the most reliable share trained on first"
    if s.get("pseudo_miou_relabelled_student") is not None:
        text += (f"; on the images re-labelled in round 1, the teacher's {cell(s.get('pseudo_miou_relabelled_teacher'))} "
                 f"and the student's {cell(s['pseudo_miou_relabelled_student'])}")
    return text + "."


def markdown(summary: list[dict]) -> str:
    def cell(v):
        return "-" if v is None else f"{v[0]:.1f} ± {v[1]:.1f}"

    def gap(v):
        return "-" if v is None else f"{v:.0f}"

    def labels(v):
        return "-" if v is None else (v if isinstance(v, str) else f"{v:.0f}")
    lines = []
    for bench in sorted({s["benchmark"] for s in summary}):
        for frac in sorted({s["fraction"] for s in summary if s["benchmark"] == bench}, key=Fraction):
            lines += [f"### {bench}, {frac} labelled", "",
                      "| method | seeds | mIoU x0.5 | mIoU x1.0 | mIoU x2.0 | CIF (0.5,1,2) | x1.0 gain over supervised (paired) | gap closed % | labels supervised needs | s / iter | minutes, teacher included | peak RSS MiB |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            here = {s["method"]: s for s in summary if s["benchmark"] == bench and s["fraction"] == frac}
            for s in (here[m] for m in ordered(here)):
                rss = s.get("peak_rss_mib")
                spi, total = s.get("sec_per_iter"), s.get("total_s")
                lines.append(f"| {s['method']} | {len(s['seeds'])} | {cell(s.get('miou_x0.5'))} | {cell(s.get('miou_x1.0'))} | "
                             f"{cell(s.get('miou_x2.0'))} | {cell(s.get('miou_cif'))} | {cell(s.get('gain_x1.0'))} | "
                             f"{gap(s.get('gap_closed'))} | {labels(s.get('labels_to_match'))} | "
                             f"{'-' if spi is None else f'{spi[0]:.2f}'} | {'-' if total is None else f'{total[0] / 60:.0f}'} | "
                             f"{'-' if rss is None else f'{rss[0]:.0f}'} |")
            lines.append("")
            for s in (here[m] for m in ordered(here) if "pseudo_miou" in here[m]):
                lines += [pseudo_label_sentence(s, cell), ""]
    return "\n".join(lines)


def plot_curves(rows: list[dict], path: Path, warm_start: int = 0) -> None:
    panels = []
    for bench, frac in sorted({(r["benchmark"], r["fraction"]) for r in rows}):
        curves = []
        for method in ordered(r["method"] for r in rows):
            runs = [r["curve"] for r in rows if (r["benchmark"], r["fraction"], r["method"]) == (bench, frac, method)]
            if not runs:
                continue
            iters = [p["iter"] for p in runs[0]]
            per_iter = [[c[i]["x1.0"] for c in runs if len(c) > i] for i in range(len(iters))]
            curves.append((f"{method} ({len(runs)} seeds)", iters, [statistics.mean(v) for v in per_iter],
                           [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_iter]))
        panels.append((f"{bench}, {frac} labelled" + (f", warm start {warm_start}" if warm_start else ""), curves))
    plot_bands(path, panels, "iteration", vline=warm_start or None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmarks", default="synthetic,textures")
    p.add_argument("--fractions", default="1/32", help="labelled fractions of the pool, e.g. 1/64,1/32,1/16; 1 labels "
                   "every pool image (supervised only: the upper bound that gap_closed is measured against)")
    p.add_argument("--backbone", default="resnet18", help="encoder of every run")
    p.add_argument("--pretrained", default="none", help="encoder weights of every run: none (random init) or imagenet")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated; METHOD+AUX adds an auxiliary loss, e.g. fixmatch+contextrast; "
                   "METHOD:flag=value[:flag=value] sets the method's hyper-parameters, e.g. prcl:num-queries=32; "
                   "supervised:init-from=teacher continues each seed's supervised run as long again (self-training's "
                   "equal-time control)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--iters", type=int, default=2000, help="training iterations per run (the same for every method)")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--save-every", type=int, default=0,
                   help="write each run's last.pt every N iterations, so a killed study resumes from there "
                   "(default: at every evaluation)")
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--size", type=int, default=96, help="image side of both benchmarks")
    p.add_argument("--batch", type=int, default=4, help="labelled images per step (unlabelled: the same)")
    p.add_argument("--lr", type=float, default=0.01, help="encoder LR of every method's run")
    p.add_argument("--head-lr-mult", type=float, default=None,
                   help="decoder LR multiplier of every method (default: each method's own, x10 but x1 for CPS, PS-MT, "
                   "PseudoSeg and PRCL, whose code trains every layer at one LR)")
    p.add_argument("--warm-start", type=int, default=0,
                   help="supervised iterations every method of a seed starts from (0: random init)")
    p.add_argument("--warm-lr", type=float, default=0.01, help="backbone LR of the --warm-start run")
    p.add_argument("--pool", type=int, default=320, help="training images (labelled + unlabelled)")
    p.add_argument("--n-val", type=int, default=60)
    p.add_argument("--work", default=str(REPO / "runs" / "label_efficiency"))
    p.add_argument("--resume", action="store_true", help="keep finished runs and continue unfinished ones")
    p.add_argument("--results", default=str(RESULTS), help="folder for the JSON, Markdown and PNG results")
    p.add_argument("--name", default="label_efficiency", help="results file name (NAME.json, NAME.md, NAME_curves.png)")
    p.add_argument("--device", default="cpu", help="where every run trains: cpu, or cuda (a GPU study is its own "
                   "budget, never mixed with CPU runs: the two differ in float sums and random streams)")
    p.add_argument("--amp-cpu", action="store_true", help="train every run (warm-up included) in bfloat16 autocast")
    p.add_argument("--publish-only", action="store_true", help="write the results of the runs finished so far, train nothing")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, each with cores/jobs threads "
                   "(one thread per run is much faster than two when the cores are shared)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads per run (default: cores / jobs); 1 beside another study, so the cores are not oversubscribed")
    args = p.parse_args()
    low = below_floors({"--iters": (args.iters, 1), "--eval-every": (args.eval_every, 1), "--save-every": (args.save_every, 0),
                        "--crop": (args.crop, MIN_CROP), "--batch": (args.batch, 1), "--threads": (args.threads, 1)})
    if low:  # before settings.json, so a mistyped flag leaves no study behind
        raise SystemExit(f"{low}.")
    if args.amp_cpu and args.device != "cpu":
        raise SystemExit(f"--amp-cpu is bfloat16 on the CPU; --device {args.device} trains in float32 here. Drop one.")
    for method in args.methods.split(","):
        teacher_of(method)
    if args.warm_start and CONTINUED in args.methods:
        raise SystemExit(f"--methods supervised:{CONTINUED} starts from the teacher already; leave out --warm-start.")
    work = Path(args.work)
    settings = work / "settings.json"
    budget = {k: getattr(args, k) for k in ("iters", "eval_every", "crop", "size", "batch", "lr", "pool", "n_val")}
    if (args.backbone, args.pretrained) != ("resnet18", "none"):  # studies from before encoders were a choice
        budget.update(backbone=args.backbone, pretrained=args.pretrained)
    if args.head_lr_mult is not None:
        budget.update(head_lr_mult=args.head_lr_mult)
    if args.warm_start:
        budget.update(warm_start=args.warm_start, warm_lr=args.warm_lr)
    if args.amp_cpu:
        budget.update(amp_cpu=True)
    if args.device != "cpu":
        budget.update(device=args.device)
    if args.publish_only:
        if not settings.is_file():
            raise SystemExit(f"{work}: no study there to publish.")
        publish(work, json.loads(settings.read_text()), Path(args.results), args.name)
        return
    if settings.is_file():
        saved = json.loads(settings.read_text())
        if not args.resume:
            raise SystemExit(f"{work}: a study is there already; pass --resume to continue it, or another --work.")
        if saved != budget:
            raise SystemExit(f"{work}: was run with {saved}, now {budget}; one study keeps one budget.")
    else:
        work.mkdir(parents=True, exist_ok=True)
        settings.write_text(json.dumps(budget))
    adopt_published(work, Path(args.results) / f"{args.name}.json", budget)

    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    # Method by method, its seeds side by side: a study cut short has whole methods (3 seeds), not one seed of each.
    runs = [(bench, frac, method, int(seed)) for bench in args.benchmarks.split(",") for frac in args.fractions.split(",")
            for method in args.methods.split(",") for seed in args.seeds.split(",")]
    for bench, frac, _, seed in runs:  # datasets first, so that parallel runs never generate one twice
        one_dataset(args, bench, frac, seed)
    with ThreadPoolExecutor(args.jobs) as pool:
        if args.warm_start:  # likewise the shared warm-up runs
            for future in [pool.submit(warm_up, args, *cell) for cell in dict.fromkeys((b, f, s) for b, f, _, s in runs)]:
                future.result()
        for future in as_completed([pool.submit(one_run, args, *r) for r in runs]):
            future.result()
            publish(work, budget, Path(args.results), args.name)  # results grow as runs finish


def adopt_published(work: Path, published: Path, budget: dict) -> None:
    """Count the runs in the committed results as finished, so a study continues across machines and working
    stretches from what was published; results of another budget are never mixed in."""
    if not published.is_file():
        return
    payload = json.loads(published.read_text())
    if payload.get("budget") != budget:
        print(f"{published}: another budget ({payload.get('budget')}); its runs are not continued, and this study's "
              "results will replace it (give a study its own --name to keep both)", flush=True)
        return
    for row in payload["rows"]:
        row_file = cell_folder(work, row["benchmark"], row["fraction"]) / row["method"] / f"seed{row['seed']}" / "row.json"
        if not row_file.is_file():
            row_file.parent.mkdir(parents=True, exist_ok=True)
            row_file.write_text(json.dumps(row, indent=1))


def publish(work: Path, budget: dict, results: Path, name: str) -> None:
    """Every finished run under ``work`` into the results files, under the machine most of them trained on
    (a study's runs can be trained on one machine and published on another)."""
    rows = [json.loads(f.read_text()) for f in sorted(work.glob("*/*/*/seed*/row.json"))]
    trained_on = [r["machine"] for r in rows if r.get("machine")]
    where = max(trained_on, key=trained_on.count) if trained_on else machine()
    summary = summarise(rows)
    results.mkdir(parents=True, exist_ok=True)
    plot_curves(rows, results / f"{name}_curves.png", budget.get("warm_start", 0))
    warm = budget.get("warm_start", 0)
    start = (f"from a supervised run of {warm} iterations (SGD lr {budget['warm_lr']}, same data and labelled subset) "
             "that every method of a seed shares, supervised included; the curves show that run, then each method"
             if warm else "without a warm start")
    head = (f"decoder x{budget['head_lr_mult']:g} for every method" if "head_lr_mult" in budget
            else "decoder x10; CPS, PS-MT, PseudoSeg and PRCL x1 unless the row names head-lr-mult")
    on_cpu = budget.get("device", "cpu") == "cpu"
    precision = ("bfloat16 autocast (--amp-cpu)" if budget.get("amp_cpu") else "fp32" if on_cpu
                 else "fp32 with cuDNN's default TF32 convolutions")
    encoder = (f"{budget['backbone']} ({budget['pretrained']} weights)" if "backbone" in budget
               else "ResNet-18 (random init)")
    device = "CPU" if on_cpu else f"trained on {budget['device'].upper()}"
    note = (f"DeepLabV3+ on {encoder} {start}, {device}, {precision}. Pool of {budget['pool']} training images of {budget['size']} px "
            f"(labelled fraction as given; the rest unlabelled), {budget['n_val']} val images. Crop {budget['crop']}, "
            f"batch {budget['batch']}+{budget['batch']}, {budget['iters']} iterations for every method, SGD lr {budget['lr']} "
            f"({head}), poly. mIoU of the final model on val (no checkpoint selection), mean ± std over seeds; "
            "the gain is paired by seed (same data and labelled subset); gap closed is the share of the distance from "
            "supervised at that fraction to supervised with every pool image labelled (fraction 1) that the method "
            "covers, in percent, on the method's own seeds (full supervision's mean over its seeds where it lacks one); labels supervised needs is how many labelled images supervised training needs to "
            f"score the method's mean, interpolated in log(labels) between measured fractions at most {MAX_SPAN}x apart. "
            "s / iter is the median logged step time, "
            "data loading included, and minutes the run's wall time plus its teacher's (selftrain, supervised:init-from=teacher), "
            "on a machine shared with other work: compare them only within one table.\n\n"
            f"![curves]({name}_curves.png)")
    write_results(name, {"machine": where, "budget": budget, "summary": summary, "rows": rows},
                  markdown(summary), note, results, script="label_efficiency")


if __name__ == "__main__":
    main()
