"""Pooled encoder features of images, for the diversity-aware selection strategies (core-set, combined).

The exported graphs output predictions only, so the features come from the package's checkpoint.pt (which
`scaleseg export` always writes): the network's deepest encoder map, averaged over the image and scaled to
unit length, so that distances compare what the images show rather than how bright they are.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from training.checkpoint import load_checkpoint, load_inference_model
from training.data.transforms import MEAN, STD


class EncoderFeatures:
    def __init__(self, model_dir: Path):
        checkpoint = Path(model_dir) / "checkpoint.pt"
        if not checkpoint.is_file():
            raise ValueError(f"{model_dir}: core-set and combined selection need the package's checkpoint.pt "
                             "(written by `scaleseg export`); export the model again")
        self.model = load_inference_model(load_checkpoint(checkpoint), checkpoint)[0]
        self.mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(STD).view(1, 3, 1, 1) * 255

    @torch.inference_mode()
    def __call__(self, image: np.ndarray) -> np.ndarray:
        """uint8 [1, 3, H, W] (what the backends take) -> float32 [C] of unit length."""
        x = (torch.from_numpy(image).float() - self.mean) / self.std
        pooled = self.model.encode(x)[1].mean((2, 3))[0]
        return (pooled / pooled.norm().clamp(min=1e-12)).numpy()
