"""Evaluation: mIoU from a confusion matrix over the whole split (255 ignored), whole-image or
sliding-window prediction, and the scale-robustness protocol (ScaleMatch Fig. 1a: rescale the input by
0.5 / 1.0 / 2.0, predict, resize the labels back with nearest neighbour, score against the original).
A checkpoint's network and a model package's graph (through serving's Segmenter) are scored by the same code."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
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
    """Metrics of the first len(class_names) classes; further rows and columns (predictions of classes that are not
    scored) count against the classes whose pixels they took."""
    k = len(class_names)
    cm = cm.double()
    inter = cm.diag()[:k]
    union = cm.sum(0)[:k] + cm.sum(1)[:k] - inter
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
    """{'mode', 'scales': {'1.0': {'miou', 'pixel_acc', 'iou': {class: IoU}}}} of a network over ``dataset``
    (normalised images)."""
    was_training = model.training
    model.eval()
    per_scale = score(lambda x: predict(model, x, mode, window, cif_scales), dataset, class_names, device, scales,
                      rank, world, progress)
    model.train(was_training)
    return {"mode": mode_name(mode, cif_scales), "scales": per_scale}


def evaluate_segmenter(segmenter, dataset, class_names: Sequence[str], scales: Sequence[float] = (1.0,),
                       cif_scales: Sequence[float] = (), tile: bool = False, progress: bool = False) -> dict:
    """The same result for a model package's graph behind a ``serving.segmenter.Segmenter`` (what `scaleseg serve`
    and `predict` run), over ``dataset``'s uint8 images: the graph normalises, resizes and takes the argmax itself."""
    def labels(x: torch.Tensor) -> torch.Tensor:
        out, _ = segmenter.predict(x[0].permute(1, 2, 0).numpy(), tile=tile)
        return torch.from_numpy(out.astype(np.int64))[None]

    return {"mode": mode_name("tiled" if tile else "whole", cif_scales),
            "scales": score(labels, dataset, class_names, torch.device("cpu"), scales, progress=progress)}


def mode_name(mode: str, cif_scales: Sequence[float] | None) -> str:
    """The result's 'mode': whole, sliding or tiled, with the CIF scales when CIF fused them."""
    return f"{mode}+cif:" + ",".join(map(str, cif_scales)) if cif_scales else mode


def rescale(image: torch.Tensor, s: float) -> torch.Tensor:
    """An image batch resized by ``s`` (bilinear, as the networks resize); uint8 images stay uint8."""
    out = F.interpolate(image.float(), scale_factor=s, mode="bilinear", align_corners=True)
    return out.round().clamp(0, 255).to(torch.uint8) if image.dtype == torch.uint8 else out


def score(labels_of: Callable[[torch.Tensor], torch.Tensor], dataset, class_names: Sequence[str], device: torch.device,
          scales: Sequence[float] = (1.0,), rank: int = 0, world: int = 1, progress: bool = False) -> dict:
    """{'1.0': {'miou', 'pixel_acc', 'iou'}, ...}: ``labels_of`` (image batch [1, 3, h, w] -> class ids [1, h, w]) at
    each input scale, its labels resized back to the mask with nearest neighbour. Each process scores a disjoint
    share of the images and the confusion matrices are summed, so nothing is counted twice.

    Only ``class_names`` (the first classes of the dataset) are scored: pixels labelled with a later class are ignored,
    and a prediction of a later class is wrong wherever it lands, so a model on a dataset that gained classes since
    another one was trained compares with it on the classes both know (`scaleseg eval --known-classes`)."""
    k = len(class_names)
    cms = {s: torch.zeros(k + 1, k + 1, dtype=torch.long, device=device) for s in scales}  # + one column: any other class
    indices = range(rank, len(dataset), world)
    for i in tqdm(indices, desc="eval", unit="img", disable=not progress, leave=False):
        sample = dataset[i]
        image = sample["image"].unsqueeze(0).to(device)
        target = sample["mask"].unsqueeze(0).to(device)
        target = target.masked_fill(target >= k, IGNORE)
        for s in scales:
            try:
                pred = labels_of(image if s == 1.0 else rescale(image, s)).to(device)
            except ValueError as err:  # an image the backend refuses at this scale (too large or too small)
                raise ValueError(f"image {sample['id']!r} at x{s}: {err}") from None
            if s != 1.0:
                pred = F.interpolate(pred[:, None].float(), size=target.shape[-2:], mode="nearest")[:, 0].long()
            cms[s] += confusion_matrix(pred.clamp(max=k), target, k + 1)
    return {str(s): metrics_from_confusion(all_reduce_sum(cms[s]), class_names) for s in scales}


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
