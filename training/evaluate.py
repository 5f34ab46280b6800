"""Evaluation: mIoU from a confusion matrix over the whole split (255 ignored), whole-image or
sliding-window prediction, and the scale-robustness protocol (ScaleMatch Fig. 1a: rescale the input by
0.5 / 1.0 / 2.0, predict, resize the labels back with nearest neighbour, score against the original)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data.folder import IGNORE
from .distributed import all_reduce_sum


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[K, K] counts, rows = ground truth, columns = prediction; pixels labelled 255 are skipped."""
    valid = target != IGNORE
    idx = target[valid] * num_classes + pred[valid]
    return torch.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def metrics_from_confusion(cm: torch.Tensor, class_names: Sequence[str]) -> dict:
    cm = cm.double()
    inter = cm.diag()
    union = cm.sum(0) + cm.sum(1) - inter
    iou = inter / union.clamp(min=1)
    present = union > 0  # classes absent from both prediction and ground truth do not count
    miou = float(iou[present].mean()) if present.any() else 0.0
    return {"miou": 100 * miou,
            "pixel_acc": 100 * float(inter.sum() / cm.sum().clamp(min=1)),
            "iou": {name: (100 * float(iou[i]) if present[i] else None) for i, name in enumerate(class_names)}}


def sliding_window_logits(model, image: torch.Tensor, window: int, num_classes: int) -> torch.Tensor:
    """Sum of softmax probabilities over windows of side ``window`` at stride 2/3 window; edge windows
    are truncated (UniMatch's Cityscapes protocol)."""
    _, _, h, w = image.shape
    stride = max(1, int(window * 2 / 3))
    total = image.new_zeros(image.shape[0], num_classes, h, w)
    for top in range(0, h, stride):
        for left in range(0, w, stride):
            patch = image[:, :, top:top + window, left:left + window]
            total[:, :, top:top + window, left:left + window] += model(patch).softmax(1)
    return total


@torch.no_grad()
def predict(model, image: torch.Tensor, mode: str = "whole", window: int = 0,
            cif_scales: Sequence[float] | None = None) -> torch.Tensor:
    """Label map [B, H, W] for a normalised image batch; with ``cif_scales`` each whole image or window
    is predicted by CIF multi-scale inference."""
    if mode not in ("whole", "sliding"):
        raise ValueError(f"evaluation mode must be 'whole' or 'sliding', got {mode!r}")
    forward = (lambda x: model.forward_multiscale(x, cif_scales)) if cif_scales else model
    if mode == "sliding":
        return sliding_window_logits(forward, image, window, model.num_classes).argmax(1)
    return forward(image).argmax(1)


@torch.no_grad()
def evaluate(model, dataset, class_names: Sequence[str], device: torch.device, mode: str = "whole",
             window: int = 0, scales: Sequence[float] = (1.0,), cif_scales: Sequence[float] | None = None,
             rank: int = 0, world: int = 1, progress: bool = False) -> dict:
    """{'mode', 'scales': {'1.0': {'miou', 'pixel_acc', 'iou': {class: IoU}}}}; each process scores a
    disjoint share of the images and the confusion matrices are summed, so nothing is counted twice."""
    was_training = model.training
    model.eval()
    k = len(class_names)
    cms = {s: torch.zeros(k, k, dtype=torch.long, device=device) for s in scales}
    indices = range(rank, len(dataset), world)
    for i in tqdm(indices, desc="eval", unit="img", disable=not progress, leave=False):
        sample = dataset[i]
        image = sample["image"].unsqueeze(0).to(device)
        target = sample["mask"].unsqueeze(0).to(device)
        for s in scales:
            x = image if s == 1.0 else F.interpolate(image, scale_factor=s, mode="bilinear", align_corners=True)
            pred = predict(model, x, mode, window, cif_scales)
            if s != 1.0:
                pred = F.interpolate(pred[:, None].float(), size=target.shape[-2:], mode="nearest")[:, 0].long()
            cms[s] += confusion_matrix(pred, target, k)
    model.train(was_training)
    return {"mode": f"{mode}+cif:" + ",".join(map(str, cif_scales)) if cif_scales else mode,
            "scales": {str(s): metrics_from_confusion(all_reduce_sum(cms[s]), class_names) for s in scales}}


def format_table(result: dict) -> str:
    """Markdown table: one row per class, one column per input scale."""
    scales = list(result["scales"])
    head = "| class | " + " | ".join(f"IoU @x{s}" for s in scales) + " |"
    lines = [head, "|" + "---|" * (len(scales) + 1)]
    first = result["scales"][scales[0]]["iou"]
    for name in first:
        cells = []
        for s in scales:
            v = result["scales"][s]["iou"][name]
            cells.append("-" if v is None else f"{v:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| **mIoU** | " + " | ".join(f"**{result['scales'][s]['miou']:.2f}**" for s in scales) + " |")
    return "\n".join(lines)
