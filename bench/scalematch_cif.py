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

It runs in training mode, as the step does (batch norm normalising by each batch of ``--batch`` images, its
running statistics untouched), on centre crops of the run's crop size (training crops at random after a random
x0.5-2 resize; the centre crop keeps the image's own scale). Inference-mode x1 and CIF (0.5, 1, 2) predictions,
what the exported models run, are scored beside them.

    python bench/scalematch_cif.py runs/headroom_tex/textures/1_32/scalematch/seed*
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import (batch_runs_arguments, load_trained_method, machine, mean_std, run_data, set_mode,  # noqa: E402
                          whole_image_batches, write_results)
from training.data.folder import IGNORE, load_classes, mask_path, read_split  # noqa: E402
from training.evaluate import confusion_matrix, metrics_from_confusion  # noqa: E402
from training.methods.taps import outputs_of  # noqa: E402

SPLITS = ("labeled", "val", "unlabeled")
MEMBERS = ("ori", "size", "joint")
EVAL = ("eval_x1", "eval_cif")
STRIDE = 16  # the study's encoders run at output stride 16: a view of n pixels has n / 16 feature cells


def draws(cfg) -> list[tuple[float, float]]:
    """Every (v, t) a ScaleMatch step can draw: t from the up pool when v > 1, from the down pool otherwise."""
    return [(v, t) for v in cfg.img_scales for t in (cfg.feat_scales_up if v > 1 else cfg.feat_scales_down)]


def centre_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
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
def score_split(method, cfg, data: Path, ids: list[str], names: list[str], split: str, batch: int) -> dict:
    k, crop, tau = len(names), cfg.data.crop_size, method.cfg.conf_thresh
    model = method.model
    tallies = {f"v{v}_t{t}": {m: Tally(k) for m in MEMBERS} for v, t in draws(method.cfg)}
    tallies["eval"] = {m: Tally(k) for m in EVAL}
    for x, y in whole_image_batches(data, ids, k, split, batch):
        if len(x) == 1:
            raise SystemExit(f"{data}: an image of {split} has a size no neighbour shares, and training mode needs "
                             "batches of two or more; score a benchmark whose images share one size.")
        x, y = centre_crop(x, crop), centre_crop(y, crop)
        set_mode(method, "training")
        for v, t in draws(method.cfg):
            with outputs_of(model.cif) as gates:
                out = method.two_scale_forward(x, v, t)
            for member in MEMBERS:
                tallies[f"v{v}_t{t}"][member].add(out[member], y, tau, gates[0] if member == "joint" else None)
        set_mode(method, "inference")
        tallies["eval"]["eval_x1"].add(model(x), y, tau)
        tallies["eval"]["eval_cif"].add(model.forward_multiscale(x, (0.5, 2.0)), y, tau)
    return {draw: {m: t.result(names) for m, t in members.items()} for draw, members in tallies.items()}


def score_run(run: Path, batch: int) -> dict:
    data = run_data(run)
    names = [c.name for c in load_classes(data)]
    method, cfg = load_trained_method(run, "scalematch", len(names))
    row = {"run": str(run), "seed": run.name, "crop": cfg.data.crop_size, "tau": method.cfg.conf_thresh,
           "draws": [list(d) for d in draws(method.cfg)], "splits": {}}
    torch.manual_seed(0)  # the dropout of the FSVC stream, which shares the decoder's batch norm
    for split in SPLITS:
        ids = read_split(data, split)
        missing = sum(not mask_path(data, i).is_file() for i in ids)
        if missing:
            print(f"{data}: {missing} of the {len(ids)} {split} images have no mask; {split} is not scored", flush=True)
            row["splits"][split] = None
            continue
        row["splits"][split] = score_split(method, cfg, data, ids, names, split, batch)
        print(f"{run} {split}: {row['splits'][split]}", flush=True)
    return row


def cell(values: list[float], digits: int = 1) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    lines = []
    for split in SPLITS:
        scored = [r["splits"][split] for r in rows if r["splits"].get(split)]
        if not scored:
            continue
        crop = rows[0]["crop"]
        lines += [f"### {split} ({len(scored)} runs)", "",
                  "| draw (v, t) | x v view px (cells) | ori mIoU | x v mIoU | fused mIoU | fused − ori | gate s | "
                  "ori coverage % | fused coverage % | ori kept accuracy % | fused kept accuracy % |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for v, t in rows[0]["draws"]:
            d = [s[f"v{v}_t{t}"] for s in scored]
            px = round(crop * v)
            lines.append(f"| {v:g}, {t:g} | {px} ({max(1, -(-px // STRIDE))}) | "
                         + " | ".join([cell([x["ori"]["miou"] for x in d]), cell([x["size"]["miou"] for x in d]),
                                       cell([x["joint"]["miou"] for x in d]),
                                       cell([x["joint"]["miou"] - x["ori"]["miou"] for x in d]),
                                       cell([x["joint"]["gate"] for x in d], 2),
                                       cell([x["ori"]["coverage"] for x in d]), cell([x["joint"]["coverage"] for x in d]),
                                       cell([x["ori"]["kept_accuracy"] for x in d]),
                                       cell([x["joint"]["kept_accuracy"] for x in d])]) + " |")
        e = [s["eval"] for s in scored]
        lines += ["", "| inference mode | mIoU | coverage % | kept accuracy % |", "|---|---|---|---|"]
        for key, title in (("eval_x1", "x1 (the exported model; CutMix partners' labels)"),
                           ("eval_cif", "CIF (0.5, 1, 2)")):
            lines.append(f"| {title} | " + " | ".join(cell([x[key][f] for x in e]) for f in
                                                     ("miou", "coverage", "kept_accuracy")) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    args = batch_runs_arguments(__doc__, "scalematch_cif", "ScaleMatch `scaleseg train --out` folders",
                                "images per batch in training mode (the study's labelled + unlabelled batch)", batch=8)
    rows = [score_run(run, args.batch) for run in args.runs]
    note = ("Each run's last checkpoint, on centre crops of its training crop size, in training mode (batch norm on "
            f"batches of {args.batch}). ori is the original view decoded from features rescaled by t, x v the view "
            "resized by v and its prediction resized back, fused their CIF fusion (the unlabelled losses' target after "
            "the warm-up); the gate s is the fused prediction's weight on the lower-resolution member. Coverage is the "
            "share of labelled pixels at confidence tau or more, kept accuracy how often those are right. Cells "
            f"count the x v view's feature grid at output stride {STRIDE}.")
    write_results(args.name, {"machine": machine(), "batch": args.batch, "rows": rows}, markdown(rows), note,
                  args.results, script="scalematch_cif")


if __name__ == "__main__":
    main()
