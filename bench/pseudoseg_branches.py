"""Where PseudoSeg's pseudo-labels go wrong: each of its prediction branches, scored on masks the benchmark keeps.

PseudoSeg labels an unlabelled image by fusing two predictions: the decoder's, and the SGC branch's (Grad-CAM of
a multi-label classifier, propagated by self-attention), calibrated by their shared RMS, averaged and sharpened
with temperature 0.5 (training/methods/pseudoseg.py); every pixel of that distribution is a soft target for the
strong view. This script scores a trained run's branches, from its last checkpoint, on its labelled images, val
and the unlabelled pool (the study's data folders keep the pool's masks; a user's pool has none):

- the decoder alone (what the exported model predicts); the SGC branch with the classifier's own image labels
  (what the fusion uses) and with the true ones; the fused target with either;
- the classifier's image labels: how many of the classes an image holds it finds, and how many it names;
- how sure the fused target is against how often it is right (mean top probability vs pixel accuracy).

Each in two modes: inference (batch norm on its running statistics, whole images one at a time), and training,
as the fusion runs inside a training step (batch norm on the statistics of each batch of ``--batch`` whole
images; the running statistics are left untouched). Training fuses random crops; whole images stand in for them.

    python bench/pseudoseg_branches.py runs/headroom_tex/textures/1_32/pseudoseg:head-lr-mult=10/seed*
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
from training.methods.pseudoseg import image_labels  # noqa: E402
from training.models.deeplabv3plus import resize  # noqa: E402

BRANCHES = ("decoder", "sgc", "sgc_true_labels", "fused", "fused_true_labels")
SPLITS = ("labeled", "val", "unlabeled")
MODES = ("inference", "training")


@torch.no_grad()
def predictions(method, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each branch's class probabilities [B, K, H, W], and the classifier's image labels [B, K-1]."""
    k = method.model.num_classes
    valid = torch.ones_like(masks, dtype=torch.bool)
    logits_dec = method.model(images).float()
    c3, c4 = method.cam_features(images)
    own = method.own_image_labels(c4)
    att_own, att_true = (resize(method.sgc_logits(c3, c4, labels, valid), images.shape[-2:]).float()
                         for labels in (own, image_labels(masks, k)))
    return {"decoder": logits_dec.softmax(1), "sgc": att_own.softmax(1), "sgc_true_labels": att_true.softmax(1),
            "fused": method.fuse(logits_dec, att_own), "fused_true_labels": method.fuse(logits_dec, att_true),
            "image_labels": own}


def score_split(method, data: Path, ids: list[str], names: list[str], split: str, batch: int) -> dict:
    k = len(names)
    cms = {branch: torch.zeros(k, k, dtype=torch.long) for branch in BRANCHES}
    conf = correct = pixels = 0.0
    present = found = named = images = 0.0
    for x, y in whole_image_batches(data, ids, k, split, batch):
        if method.training:
            require_batch_statistics(x, data, split)
        probs = predictions(method, x, y)
        for branch in BRANCHES:
            cms[branch] += confusion_matrix(probs[branch].argmax(1), y, k)
        top, label = probs["fused"].max(1)
        known = y != IGNORE
        conf, pixels = conf + float(top[known].sum()), pixels + float(known.sum())
        correct += float((label == y)[known].sum())
        truth = image_labels(y, k)
        present, named, images = present + float(truth.sum()), named + float(probs["image_labels"].sum()), images + len(y)
        found += float((probs["image_labels"] * truth).sum())
    out = {branch: round(metrics_from_confusion(cm, names)["miou"], 2) for branch, cm in cms.items()}
    return out | {"classes_present_per_image": round(present / max(images, 1), 2),
                  "classes_named_per_image": round(named / max(images, 1), 2),
                  "present_class_recall": round(100 * found / max(present, 1), 1),
                  "fused_confidence": round(100 * conf / max(pixels, 1), 1),
                  "fused_accuracy": round(100 * correct / max(pixels, 1), 1)}


def score_run(run: Path, data: Path | None = None, batch: int = 4) -> dict:
    data = data or run_data(run)
    names = [c.name for c in load_classes(data)]
    method, _ = load_trained_method(run, "pseudoseg", len(names))
    row = {"run": str(run), "method": run.parent.name, "seed": run.name}
    for mode in MODES:
        set_mode(method, mode)
        torch.manual_seed(0)  # dropout's draws in training mode
        row[mode] = {}
        for split, ids in scored_splits(data, SPLITS):
            row[mode][split] = (None if ids is None else
                                score_split(method, data, ids, names, split, batch if mode == "training" else 1))
            print(f"{run} {mode} {split}: {row[mode][split]}", flush=True)
    return row


COLUMNS = [("decoder", "decoder"), ("sgc", "SGC, own image labels"), ("sgc_true_labels", "SGC, true image labels"),
           ("fused", "fused target"), ("fused_true_labels", "fused with true image labels"),
           ("present_class_recall", "classes present found %"), ("classes_present_per_image", "classes present / image"),
           ("classes_named_per_image", "classes named / image"), ("fused_confidence", "fused top probability %"),
           ("fused_accuracy", "fused pixel accuracy %")]
SPLIT_TITLES = {"labeled": "its labelled images", "val": "val", "unlabeled": "the unlabelled pool"}


def markdown(rows: list[dict]) -> str:
    lines = ["mIoU of each branch's argmax, then the classifier's image labels and the fused target's calibration; "
             "mean ± std over runs.", ""]
    for mode in MODES:
        lines += [f"### {mode} mode", "", "| images (runs) | " + " | ".join(h for _, h in COLUMNS) + " |",
                  "|---|" + "---|" * len(COLUMNS)]
        for split in SPLITS:
            scored = [r[mode][split] for r in rows if r[mode][split]]
            if not scored:
                continue
            cells = [mean_std_cell([v[key] for v in scored]) for key, _ in COLUMNS]
            lines.append(f"| {SPLIT_TITLES[split]} ({len(scored)}) | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    args = batch_runs_arguments(__doc__, "pseudoseg_branches", "PseudoSeg `scaleseg train --out` folders",
                                "images per batch in training mode (the study's batch)")
    rows = [score_run(run, batch=args.batch) for run in args.runs]
    note = ("Each run's last checkpoint at x1.0 on whole images. The fused target is what PseudoSeg trains the "
            "strong view on (training fuses random crops of a batch; here whole images), every pixel of it a soft "
            "target. Its top probability is the mean, over labelled pixels, of its largest class probability; its "
            "pixel accuracy is how often that class is right.")
    write_results(args.name, {"machine": machine(), "batch": args.batch, "rows": rows}, markdown(rows), note,
                  args.results, script="pseudoseg_branches")


if __name__ == "__main__":
    main()
