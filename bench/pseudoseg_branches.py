"""Where PseudoSeg's pseudo-labels go wrong: each of its prediction branches, scored on masks the benchmark keeps.

PseudoSeg labels an unlabelled image by fusing two predictions: the decoder's, and the SGC branch's (Grad-CAM of
a multi-label classifier, propagated by self-attention), each calibrated by their shared RMS, averaged and
sharpened with temperature 0.5 (training/methods/pseudoseg.py). Every pixel of that sharpened distribution is a
soft target. This script scores a trained run's branches, as its last checkpoint makes them, on val and on the
unlabelled pool (the study's data folders keep the pool's masks; a user's pool has none):

- the decoder alone (what the exported model predicts), the SGC branch with the classifier's own image labels
  (what training fuses) and with the true image labels (the attention alone), and the fused pseudo-label;
- how sure the fused target is against how often it is right (mean top probability vs pixel accuracy);
- the classifier's image labels against the classes each image holds.

    python bench/pseudoseg_branches.py runs/headroom_tex/textures/1_32/pseudoseg:head-lr-mult=10/seed*
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.augment_sensitivity import run_data  # noqa: E402
from bench.common import RESULTS, machine, mean_std, require_finished_runs, write_results  # noqa: E402
from training.checkpoint import load_checkpoint  # noqa: E402
from training.data.datasets import EvalSet  # noqa: E402
from training.data.folder import IGNORE, load_classes, mask_path, read_split  # noqa: E402
from training.engine import build_method, config_from_checkpoint  # noqa: E402
from training.evaluate import confusion_matrix, metrics_from_confusion  # noqa: E402
from training.methods.pseudoseg import image_labels  # noqa: E402
from training.models.deeplabv3plus import resize  # noqa: E402

BRANCHES = ("decoder", "sgc", "sgc_true_labels", "fused")
SPLITS = ("val", "unlabeled")


def load_method(run: Path, num_classes: int):
    ckpt = load_checkpoint(run / "last.pt")
    cfg = config_from_checkpoint(ckpt)
    method = build_method(replace(cfg, model=replace(cfg.model, pretrained="")), num_classes)
    method.load_state_dict(ckpt["method_state"])
    return method.eval()


@torch.no_grad()
def predictions(method, image: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Class-probability maps [1, K, H, W] of each branch for one normalised image."""
    decoder = method.model(image).float().softmax(1)
    k = method.model.num_classes
    valid = torch.ones_like(mask, dtype=torch.bool)
    _, c3, c4 = method.model.encoder.stages(image)
    own = (torch.sigmoid(method.classifier(c4.mean((2, 3))).float()) >= method.cfg.cls_thresh).float()

    def sgc(labels):
        return resize(method.sgc_logits(c3, c4, labels, valid), image.shape[-2:]).float().softmax(1)
    return {"decoder": decoder, "sgc": sgc(own), "sgc_true_labels": sgc(image_labels(mask, k)),
            "fused": method.pseudo_labels(image, valid), "image_labels": own}


def score_run(run: Path, data: Path | None = None) -> dict:
    data = data or run_data(run)
    names = [c.name for c in load_classes(data)]
    k = len(names)
    method = load_method(run, k)
    if method.name != "pseudoseg":
        raise SystemExit(f"{run}: a {method.name} run; this script scores PseudoSeg's branches.")
    row = {"run": str(run), "method": run.parent.name, "seed": run.name}
    for split in SPLITS:
        ids = read_split(data, split)
        if split == "unlabeled" and not all(mask_path(data, i).is_file() for i in ids):
            print(f"{data}: the unlabelled pool has no masks (a user's pool); scored on val only", flush=True)
            row[split] = None
            continue
        cms: dict[str, torch.Tensor] = {}
        conf = correct = pixels = 0.0
        label_hits = label_total = present = present_found = 0.0
        for sample in EvalSet(data, ids, k):
            mask = sample["mask"].unsqueeze(0)
            probs = predictions(method, sample["image"].unsqueeze(0), mask)
            for branch in BRANCHES:
                cms[branch] = cms.get(branch, 0) + confusion_matrix(probs[branch].argmax(1), mask, k)
            top, label = probs["fused"].max(1)
            known = mask != IGNORE
            conf += float(top[known].sum())
            correct += float((label == mask)[known].sum())
            pixels += float(known.sum())
            truth = image_labels(mask, k)
            label_hits += float((probs["image_labels"] == truth).sum())
            label_total += truth.numel()
            present += float(truth.sum())
            present_found += float((probs["image_labels"] * truth).sum())
        row[split] = {branch: round(metrics_from_confusion(cm, names)["miou"], 2) for branch, cm in cms.items()}
        row[split] |= {"fused_confidence": round(100 * conf / max(pixels, 1), 1),
                       "fused_accuracy": round(100 * correct / max(pixels, 1), 1),
                       "image_label_accuracy": round(100 * label_hits / max(label_total, 1), 1),
                       "present_class_recall": round(100 * present_found / max(present, 1), 1)}
        print(f"{run} {split}: {row[split]}", flush=True)
    return row


COLUMNS = [("decoder", "decoder mIoU"), ("sgc", "SGC mIoU (own image labels)"),
           ("sgc_true_labels", "SGC mIoU (true image labels)"), ("fused", "fused pseudo-label mIoU"),
           ("fused_confidence", "fused top probability %"), ("fused_accuracy", "fused pixel accuracy %"),
           ("image_label_accuracy", "classifier image labels right %"), ("present_class_recall", "present classes found %")]


def markdown(rows: list[dict]) -> str:
    lines = []
    for split in SPLITS:
        lines += [f"### {'val' if split == 'val' else 'the unlabelled pool'} (mean ± std over runs)", "",
                  "| runs | " + " | ".join(h for _, h in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
        for method in dict.fromkeys(r["method"] for r in rows):
            rs = [r for r in rows if r["method"] == method]
            cells = []
            for key, _ in COLUMNS:
                vals = [r[split][key] for r in rs if r[split]]
                m, s = mean_std(vals) if vals else (None, None)
                cells.append("-" if m is None else f"{m:.1f} ± {s:.1f}" if len(vals) > 1 else f"{m:.1f}")
            lines.append(f"| {method} ({len(rs)}) | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="PseudoSeg `scaleseg train --out` folders")
    p.add_argument("--name", default="pseudoseg_branches", help="results file name (NAME.json, NAME.md)")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args()
    require_finished_runs(args.runs)
    rows = [score_run(run) for run in args.runs]
    note = ("Each run's last checkpoint, in inference mode, at x1.0 on whole images. The SGC branch with its own "
            "image labels and the fused, sharpened (T 0.5) distribution are what PseudoSeg trains the strong view "
            "on; every pixel of it counts as a soft target. The fused top probability is the mean, over labelled "
            "pixels, of that target's largest class probability; its pixel accuracy is how often that class is right.")
    write_results(args.name, {"machine": machine(), "rows": rows}, markdown(rows), note, args.results,
                  script="pseudoseg_branches")


if __name__ == "__main__":
    main()
