"""`scaleseg predict` for model packages and training checkpoints. The command is serving's
(serving/predict.py); this stage adds checkpoints, which only it may read (serving imports neither
training nor export). torch and training are imported only when a checkpoint is given, so a serving
image without them still predicts from packages."""
from __future__ import annotations

import argparse

import numpy as np

from serving.backends import Backend
from serving.predict import main as predict_main
from serving.segmenter import Segmenter


class TorchBackend(Backend):
    """A checkpoint's network wrapped in the exported graph's own module (normalisation, argmax and max softmax
    in the same code), so it answers exactly as its ONNX export would."""
    name = "torch"

    def __init__(self, graph, device):
        self.graph, self.device = graph.to(device), device

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            labels, confidence = self.graph(torch.from_numpy(np.ascontiguousarray(images)).to(self.device))
        return {"labels": labels.cpu().numpy(), "confidence": confidence.float().cpu().numpy()}

    @property
    def description(self) -> str:
        return f"torch ({self.device})"


def checkpoint_segmenter(args: argparse.Namespace) -> Segmenter:
    from training.checkpoint import CheckpointError, load_checkpoint, load_inference_model
    from training.config import parse_floats
    from training.engine import resolve_device

    from .onnx_export import SegmentationGraph

    model, classes, cfg = load_inference_model(load_checkpoint(args.model), args.model)
    scales = ()
    if args.cif:
        if model.cif is None:
            raise CheckpointError(f"{args.model}: has no CIF module ({cfg.method} run); --cif needs a scalematch checkpoint.")
        scales = parse_floats(args.cif_scales)
    backend = TorchBackend(SegmentationGraph(model, scales), resolve_device(args.device))
    return Segmenter(backend, classes, sorted({1.0, *scales}))


def main(argv: list[str] | None = None) -> int:
    return predict_main(argv, load_checkpoint=checkpoint_segmenter)
