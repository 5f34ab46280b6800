"""Where ScaleMatch's pseudo-labels come from, and how good they are, for each scale it draws.

A ScaleMatch step draws an image scale v and a feature scale t (training/methods/scalematch.py): the batch
[labelled; weak unlabelled] is decoded from features rescaled by t (the original view, "ori"), run again at x v
(the "x v" view, resized back) and the two are fused by CIF with its gate s, the weight of the lower-resolution
member ("fused"). After the warm-up the fused prediction is every unlabelled loss's target, kept where its
confidence reaches the threshold tau. This script replays that forward pass from a trained run's last checkpoint
on the masks a benchmark keeps (its labelled images, val and the unlabelled pool; a user's pool has none) and
scores, for every (v, t) the method can draw:

- each member's and the fusion's mIoU (argmax over every pixel);
- coverage, the share of pixels at confidence tau or more (the pixels the losses learn from), and the accuracy
  of those pixels;
- the mean gate s, and the member sizes in pixels and in feature cells.

It runs in training mode, as the step does (batch norm normalising by each batch, its running statistics
untouched), in float32, on centre crops of the run's crop size. Where a step's batch is [labelled; weak
unlabelled] crops taken after a random x0.5-2 resize and a flip, each batch here holds ``--batch`` images of one
split at their own scale (by default as many as a step's: twice the run's batch size), so batch norm sees other
statistics than in training; runs trained with autocast (``--amp-cpu``, or on CUDA) trained in lower precision.
Inference-mode x1 and CIF (0.5, 1, 2) predictions, what the exported models run, are scored beside them.

    python bench/scalematch_cif.py runs/sm_diag/textures/1_32/scalematch/seed0
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import (batch_runs_arguments, load_trained_method, machine, mean_std_cell,  # noqa: E402
                          require_batch_statistics, run_data, scored_splits, set_mode, whole_image_batches,
                          write_results)
from training.data.folder import IGNORE, load_classes  # noqa: E402
from training.evaluate import confusion_matrix, metrics_from_confusion  # noqa: E402
from training.methods.taps import outputs_of  # noqa: E402

SPLITS = ("labeled", "val", "unlabeled")
MEMBERS = {"ori": "ori", "size": "x_v", "joint": "fused"}  # two_scale_forward's names: this script's
EVAL = ("eval_x1", "eval_cif")


def draws(method) -> list[tuple[float, float]]:
    """Every (v, t) a ScaleMatch step can draw."""
    return [(v, t) for v, t, _ in method.scale_draws()]


def centre_crop(x: torch.Tensor, size: int, data: Path) -> torch.Tensor:
    """The centre size x size of images or masks; training pads a smaller image, which this replay does not."""
    h, w = x.shape[-2:]
    if min(h, w) < size:
        raise SystemExit(f"{data}: an image of {h}x{w} is smaller than the run's {size}-pixel crop; score a benchmark "
                         "whose images are at least the crop's size.")
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


class Tally:
    """mIoU, coverage at tau and accuracy of the covered pixels of one prediction, summed over batches."""

    def __init__(self, k: int):
        self.cm = torch.zeros(k, k, dtype=torch.long)
        self.known = self.kept = self.kept_right = 0.0
        self.gate = self.gate_n = 0.0

    def add(self, logits: torch.Tensor, y: torch.Tensor, tau: float, gate: torch.Tensor | None = None) -> None:
        conf, label = logits.float().softmax(1).max(1)
        self.cm += confusion_matrix(label, y, self.cm.shape[0])
        known = y != IGNORE
        kept = known & (conf >= tau)
        self.known += float(known.sum())
        self.kept += float(kept.sum())
        self.kept_right += float((kept & (label == y)).sum())
        if gate is not None:
            self.gate += float(gate.sum())
            self.gate_n += gate.numel()

    def result(self, names: list[str]) -> dict:
        out = {"miou": round(metrics_from_confusion(self.cm, names)["miou"], 2),
               "coverage": round(100 * self.kept / max(self.known, 1), 1),
               "kept_accuracy": round(100 * self.kept_right / max(self.kept, 1), 1)}
        return out | ({"gate": round(self.gate / self.gate_n, 3)} if self.gate_n else {})


@torch.no_grad()
def score_split(method, crop: int, data: Path, ids: list[str], names: list[str], split: str, batch: int) -> dict:
    k, tau, model = len(names), method.cfg.conf_thresh, method.model
    tallies = {f"v{v}_t{t}": {m: Tally(k) for m in MEMBERS.values()} for v, t in draws(method)}
    tallies["eval"] = {m: Tally(k) for m in EVAL}
    for x, y in whole_image_batches(data, ids, k, split, batch):
        require_batch_statistics(x, data, split)
        x, y = centre_crop(x, crop, data), centre_crop(y, crop, data)
        set_mode(method, "training")
        for v, t in draws(method):
            with outputs_of(model.cif) as gates:
                out = method.two_scale_forward(x, v, t)
            for key, member in MEMBERS.items():
                tallies[f"v{v}_t{t}"][member].add(out[key], y, tau, gates[0] if member == "fused" else None)
        set_mode(method, "inference")
        tallies["eval"]["eval_x1"].add(model(x), y, tau)
        tallies["eval"]["eval_cif"].add(model.forward_multiscale(x, (0.5, 2.0)), y, tau)
    return {draw: {m: t.result(names) for m, t in members.items()} for draw, members in tallies.items()}


def score_run(run: Path, batch: int | None = None) -> dict:
    data = run_data(run)
    names = [c.name for c in load_classes(data)]
    method, cfg = load_trained_method(run, "scalematch", len(names))
    batch = batch or 2 * cfg.data.batch_size
    row = {"run": str(run), "seed": run.name, "crop": cfg.data.crop_size, "output_stride": cfg.model.output_stride,
           "batch": batch, "tau": method.cfg.conf_thresh, "draws": [list(d) for d in draws(method)], "splits": {}}
    torch.manual_seed(0)  # the dropout of the FSVC stream, which shares the decoder's batch norm
    for split, ids in scored_splits(data, SPLITS):
        row["splits"][split] = None if ids is None else score_split(method, cfg.data.crop_size, data, ids, names,
                                                                    split, batch)
        print(f"{run} {split}: {row['splits'][split]}", flush=True)
    return row


def markdown(rows: list[dict]) -> str:
    settings = {(r["crop"], r["output_stride"], str(r["draws"])) for r in rows}
    if len(settings) > 1:
        raise SystemExit(f"the runs differ in crop, output stride or scale draws ({sorted(settings)}); "
                         "score runs of one setting together.")
    crop, stride, pairs = rows[0]["crop"], rows[0]["output_stride"], rows[0]["draws"]
    lines = []
    for split in SPLITS:
        scored = [r["splits"][split] for r in rows if r["splits"].get(split)]
        if not scored:
            continue
        lines += [f"### {split} ({len(scored)} runs)", "",
                  f"| draw (v, t) | x v view px (encoder cells at stride {stride}) | ori mIoU | x v mIoU | fused mIoU | "
                  "fused − ori | gate s | ori coverage % | fused coverage % | ori kept accuracy % | "
                  "fused kept accuracy % |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for v, t in pairs:
            d = [s[f"v{v}_t{t}"] for s in scored]
            px = int(crop * v)  # the size F.interpolate gives with this scale factor
            cells = [mean_std_cell([x[m]["miou"] for x in d]) for m in MEMBERS.values()]
            cells += [mean_std_cell([x["fused"]["miou"] - x["ori"]["miou"] for x in d]),
                      mean_std_cell([x["fused"]["gate"] for x in d], 2)]
            cells += [mean_std_cell([x[m][f] for x in d]) for f in ("coverage", "kept_accuracy") for m in ("ori", "fused")]
            lines.append(f"| {v:g}, {t:g} | {px} ({-(-px // stride)}) | " + " | ".join(cells) + " |")
        e = [s["eval"] for s in scored]
        lines += ["", "| inference mode | mIoU | coverage % | kept accuracy % |", "|---|---|---|---|"]
        for key, title in (("eval_x1", "x1 (the exported model; CutMix partners' labels)"),
                           ("eval_cif", "CIF (0.5, 1, 2)")):
            lines.append(f"| {title} | " + " | ".join(mean_std_cell([x[key][f] for x in e]) for f in
                                                     ("miou", "coverage", "kept_accuracy")) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    args = batch_runs_arguments(__doc__, "scalematch_cif", "ScaleMatch `scaleseg train --out` folders",
                                "images per batch in training mode (default: a step's, twice the run's batch size)",
                                batch=None)
    rows = [score_run(run, args.batch) for run in args.runs]
    note = ("Each run's last checkpoint, on centre crops of its training crop size, in training mode (batch norm on "
            "batches of one split's images at their own scale, as many as a step's batch unless --batch says). ori is "
            "the original view decoded from features rescaled by t, x v the view resized by v and its prediction "
            "resized back, fused their CIF fusion (the training step's 'joint': the unlabelled losses' target after "
            "the warm-up); the gate s is the fused prediction's weight on the lower-resolution member. Coverage is the "
            "share of labelled pixels at confidence tau or more, kept accuracy how often those are right. Cells count "
            "the x v view's deepest feature grid; CIF itself runs on the original view's stride-4 grid.")
    write_results(args.name, {"machine": machine(), "rows": rows}, markdown(rows), note, args.results,
                  script="scalematch_cif")


if __name__ == "__main__":
    main()
